"""Per-epoch training checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain Python values (state dicts, numbers, strings, lists, dicts), so
loading it never runs pickled code. It is written atomically (pipelines.atomic): a kill at any moment
leaves the old or the new checkpoint, whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipelines.atomic import open_atomic
from pipelines.errors import RunError


def save(state: dict[str, Any], path: Path) -> None:
    with open_atomic(path) as f:
        torch.save(state, f)


def load(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (on the CPU), or None when there is none."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or holding objects weights_only refuses
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise RunError(f"checkpoint {path} is unreadable ({type(err).__name__}: {reason}); delete it to start "
                       "the run over") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise RunError(f"checkpoint {path} is not a training checkpoint of this pipeline; delete it to start over")
    return state
