"""The paper's reported numbers (paper.yaml), looked up by the same keys as the report's provenance."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

PAPER_FILE = Path(__file__).with_name("paper.yaml")


@lru_cache(maxsize=None)
def load(path: Path = PAPER_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def lookup(key: str, paper: dict[str, Any] | None = None) -> Any:
    """paper.yaml's value at a provenance-style key ("Table V/Boston/GAL/MAE/mean"); None if absent."""
    node: Any = load() if paper is None else paper
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
