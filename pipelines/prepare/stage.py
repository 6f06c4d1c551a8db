"""What every prepare stage shares: its errors, atomic writes, and the run wrapper that reports a failure
in one line and leaves no outputs behind."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from pipelines.fetch import FetchError


class PrepareError(RuntimeError):
    """An expected failure (unparseable file, checksum mismatch); reported in one line, exit code 1."""

    exit_code = 1
    prefix = ""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(PrepareError):
    """A bad or incomplete stage config; exit code 2."""

    exit_code = 2
    prefix = "bad config: "


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` via a temporary sibling and one rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; data files are readable like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_if_changed(path: Path, content: bytes) -> None:
    """write_atomic unless ``path`` already holds ``content`` (then its mtime stays, and nothing reruns)."""
    if not (path.is_file() and path.read_bytes() == content):
        write_atomic(path, content)


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
    """Run ``prepare(created)``; 0 and a summary line on success, else one line on stderr and 1 (2: config)."""
    from omegaconf.errors import OmegaConfBaseException

    created: list[Path] = []
    try:
        record = prepare(created)
    except BaseException as e:
        remove_outputs(created)
        if isinstance(e, OmegaConfBaseException):
            e = ConfigError(str(e))
        if isinstance(e, FetchError):
            e = PrepareError(str(e))
        if isinstance(e, PrepareError):
            print(f"prepare {name}: {e.prefix}{e}", file=sys.stderr)
            return e.exit_code
        raise  # a bug: the traceback is what helps
    print(f"prepare {name}: {summary(record)}")
    return 0


def hydra_entry(run: Callable[..., int]) -> None:
    """``python -m pipelines.prepare.<x> data=<name> profile=<p>``: compose conf/prepare.yaml, then run."""
    import hydra

    conf = str(Path(__file__).resolve().parent.parent / "conf")  # absolute: Hydra resolves relative ones per caller

    @hydra.main(version_base="1.3", config_path=conf, config_name="prepare")
    def main(cfg) -> None:
        sys.exit(run(cfg))

    main()
