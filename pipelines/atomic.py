"""The one way this project writes a file or a directory so that a reader, or a rerun after a kill, sees
the old version or the whole new one, never a part.

Work files sit beside their destination, named ``.<dest>.<kind>-<host>-<pid>-<random>`` (kind: tmp, old), so
the next write of the same destination on the same host removes those a killed process left behind
(``remove_debris``); a live process's, or another host's on a shared file system, are never touched.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def open_atomic(path: Path) -> Iterator[BinaryIO]:
    """A binary file object whose content becomes ``path`` (flushed to disk, one rename) when the block
    ends without an exception; on an exception ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_work_prefix(path, "tmp"))
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    with open_atomic(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_if_changed(path: Path, data: bytes) -> None:
    """write_atomic unless ``path`` already holds ``data`` (then its mtime stays, and nothing reruns)."""
    path = Path(path)
    if not (path.is_file() and path.read_bytes() == data):
        write_atomic(path, data)


def nearest_existing(path: Path) -> Path:
    """The deepest part of ``path`` (made absolute) that exists: what decides whether it can be made."""
    existing = Path(os.path.abspath(path))
    while not (existing.exists() or existing.is_symlink()):
        existing = existing.parent
    return existing


def temp_dir_beside(dest: Path) -> Path:
    """An empty directory next to ``dest`` (same filesystem) to build its new content in."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(dest)
    tmp = dest.parent / f"{_work_prefix(dest, 'tmp')}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: the usual permissions (umask), not 0700
    return tmp


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the finished directory ``tmp`` at ``dest``; an old ``dest`` is moved aside first and deleted
    after, and put back if the move fails."""
    tmp, dest = Path(tmp), Path(dest)
    remove_debris(dest)
    old = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=_work_prefix(dest, "old"), dir=dest.parent))
        os.rename(dest, old / "content")
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old is not None:
            os.rename(old / "content", dest)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def _work_prefix(dest: Path, kind: str) -> str:
    return f".{dest.name}.{kind}-{_host()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_debris(dest: Path) -> list[Path]:
    """Remove the work files and folders of ``dest`` that a process of this host left when it was killed
    (its pid is gone); the removed paths."""
    dest = Path(dest)
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(?:tmp|old)-{re.escape(_host())}-(\d+)-")
    removed = []
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        path = dest.parent / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
