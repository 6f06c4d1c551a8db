"""Hex digests of files, read in chunks (datasets do not fit in memory).

    digest(Path("data/raw/cifar-10-python.tar.gz"), "md5")  # -> "c58f30108f718f92721af3b95e74349a"

Shared by the downloader (pipelines.fetch verifies what it fetched), the prepare stages and tracking (the
data checksums and env lock hash of a run), so that no training stage depends on the downloader's code.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file (``algorithm``: a hashlib name such as "md5" or "sha256")."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()
