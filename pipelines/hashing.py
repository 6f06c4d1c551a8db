"""Hex digests of files, read in chunks (datasets do not fit in memory), and the identity of a prepared output.

    digest(Path("data/raw/cifar-10-python.tar.gz"), "md5")  # -> "c58f30108f718f92721af3b95e74349a"
    content_md5(Path("data/processed/cifar10"))             # -> "md5:<hex>" of a file or a whole folder
    identity = record_identity(Path("data/processed/cifar10"), stage="prepare_cifar@cifar10")  # by a prepare stage

Shared by the downloader (pipelines.fetch verifies what it fetched), the prepare stages and tracking (the
data checksums and env lock hash of a run), so that no training stage depends on the downloader's code.

A prepare stage records its output's identity once, in two places:
- its sidecar (``<name>.json``, a DVC output: content facts only, so the same input gives the same bytes) gets
  ``"identity": {"path": <the output's name>, "md5": "md5:<hex>", "files": n, "bytes": b, "stage": <DVC stage>}``;
  "md5" is ``content_md5``, the value runs record as their data checksum;
- ``<name>.manifest.tsv`` beside it (this workspace's stat cache, not a DVC output: mtimes are not content)
  holds a first line ``# md5:<hex>`` (the identity it belongs to), then one line per file, sorted by path:
  ``<relative path> TAB <size> TAB <mtime_ns> TAB <md5>`` (a file output: one line, its own name).
pipelines.tracking.provenance.data_checksum checks the data against them at every run start.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, NamedTuple

from pipelines.atomic import write_atomic

CHUNK = 1 << 20
MANIFEST_SUFFIX = ".manifest.tsv"


def digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file (``algorithm``: a hashlib name such as "md5" or "sha256")."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class Entry(NamedTuple):
    """One file of an output: path relative to the output folder (a file output: its name), stat, md5."""
    path: str
    size: int
    mtime_ns: int
    md5: str


def stat_files(path: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative posix path, stat) of every file of a folder, in no order (a file: its name and stat).

    One os.scandir per folder and one stat per file, no file opened. Symbolic links to files count (their
    target's stat); symbolic links to folders are not followed, as ``Path.rglob`` does."""
    path = Path(path)
    if not path.is_dir():
        yield path.name, path.stat()
        return
    stack = [(str(path), "")]
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, f"{prefix}{e.name}/"))
                elif e.is_file():
                    yield prefix + e.name, e.stat()


def file_entries(path: Path) -> list[Entry]:
    """The manifest of a file or folder as it is now, sorted by path: reads every file."""
    path = Path(path)
    folder = path.is_dir()
    return [Entry(rel, st.st_size, st.st_mtime_ns, digest(path / rel if folder else path, "md5"))
            for rel, st in sorted(stat_files(path))]


def combined_md5(entries: list[Entry], folder: bool) -> str:
    """"md5:<hex>" of an output from its sorted entries: a file's md5, or a folder's md5 over its files in
    sorted relative-path order, each fed as ``<relpath> NUL <md5 of the file> LF``."""
    if not folder:
        return "md5:" + entries[0].md5
    h = hashlib.md5(usedforsecurity=False)
    for e in entries:
        h.update(f"{e.path}\0{e.md5}\n".encode())
    return "md5:" + h.hexdigest()


def content_md5(path: Path) -> str:
    """"md5:<hex>" of a file's content, or of a folder's files (combined_md5): reads everything."""
    path = Path(path)
    return combined_md5(file_entries(path), path.is_dir())


# ------------------------------------------------------------------------------------ prepared identity
def sidecar_path(output: Path) -> Path:
    """The sidecar of a prepared output: ``<name>.json`` beside a folder ``<name>`` or a file ``<name>.<ext>``."""
    output = Path(output)
    return output.parent / f"{output.name if output.is_dir() else output.stem}.json"


def manifest_path(sidecar: Path) -> Path:
    """The manifest beside a sidecar ``<name>.json``: ``<name>.manifest.tsv``."""
    sidecar = Path(sidecar)
    return sidecar.parent / f"{sidecar.stem}{MANIFEST_SUFFIX}"


def write_manifest(path: Path, md5: str, entries: list[Entry]) -> None:
    """Write a manifest file (atomically): the identity's md5, then the entries."""
    bad = next((e.path for e in entries if "\n" in e.path or "\r" in e.path), None)
    if bad is not None:
        raise ValueError(f"a file name with a line break cannot go into a manifest: {bad!r}")
    lines = [f"# {md5}\n", *(f"{e.path}\t{e.size}\t{e.mtime_ns}\t{e.md5}\n" for e in entries)]
    write_atomic(path, "".join(lines))


def read_manifest(path: Path) -> tuple[str, list[Entry]] | None:
    """(the identity's md5, entries) of a manifest file; None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.readline()
            if not head.startswith("# md5:"):
                return None
            entries = []
            for line in f:
                rel, size, mtime, md5 = line.rstrip("\n").rsplit("\t", 3)
                entries.append(Entry(rel, int(size), int(mtime), md5))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return head[2:].strip(), entries


def record_identity(output: Path, stage: str) -> dict:
    """Hash a prepared output once, write its manifest beside its sidecar, and return the sidecar's
    ``identity`` entry (``stage``: the DVC stage that makes it, named when the data no longer match)."""
    output = Path(output)
    entries = file_entries(output)
    md5 = combined_md5(entries, output.is_dir())
    write_manifest(manifest_path(sidecar_path(output)), md5, entries)
    return {"path": output.name, "md5": md5, "files": len(entries), "bytes": sum(e.size for e in entries),
            "stage": stage}
