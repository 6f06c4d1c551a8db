"""What every prepare stage shares: its error, and the run wrapper that reports a failure in one line and
leaves no outputs behind."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from pipelines.config import hydra_main
from pipelines.errors import ConfigError, UserError, print_error


class PrepareError(UserError):
    """An expected failure (unparseable file, checksum mismatch); reported in one line."""


def remove_outputs(created: list[Path]) -> None:
    """Delete what a failed run wrote, and the folders it made for it when they are left empty."""
    for path in created:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for folder in {p.parent for p in created}:
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty: it holds something else


def run_stage(name: str, prepare: Callable[[list[Path]], dict], summary: Callable[[dict], str]) -> int:
    """Run ``prepare(created)``; 0 and a summary line on success, else one line on stderr and exit code 2."""
    from omegaconf.errors import OmegaConfBaseException

    created: list[Path] = []
    try:
        record = prepare(created)
    except BaseException as e:
        remove_outputs(created)
        if isinstance(e, OmegaConfBaseException):
            e = ConfigError(str(e).splitlines()[0])
        if isinstance(e, UserError):
            return print_error(f"prepare {name}", e)
        raise  # a bug: the traceback is what helps
    print(f"prepare {name}: {summary(record)}")
    return 0


def hydra_entry(run: Callable[..., int]) -> None:
    """``python -m pipelines.prepare.<x> data=<name> profile=<p>``: compose conf/prepare.yaml, then run."""
    hydra_main("prepare", "prepare", run)
