"""The recipe table (recipe.yaml): each setting where the paper, the authors' scripts and our presets could part,
with our value and its source; rendered into reports/index.md and checked against the presets by
tests/pipelines/test_recipe.py."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

RECIPE_FILE = Path(__file__).with_name("recipe.yaml")


@lru_cache(maxsize=None)
def settings() -> list[dict[str, Any]]:
    return yaml.safe_load(RECIPE_FILE.read_text())["settings"]


def markdown() -> str:
    lines = ["| setting | presets | ours | source | where the authors differ |", "|---|---|---|---|---|"]
    for s in settings():
        lines.append(f"| `{s['key']}` | {', '.join(s['presets'])} | {s['value']} | {s['source']} | "
                     f"{s.get('authors', '')} |")
    return "\n".join(lines) + "\n"
