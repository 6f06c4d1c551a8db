"""Start cost of a run's data checksum: full md5 of a prepared folder (before) against the stat check of its
prepared identity (after), on a synthetic folder of many small files.

    python -m benchmarks.data_identity [--files 100000] [--classes 100] [--size 1024] [--repeats 5]

Builds ``--files`` files of ``--size`` bytes in ``--classes`` subfolders (ImageNet's layout, in miniature) in a
temporary directory, records its identity as a prepare stage does (pipelines.hashing.record_identity), then
times, ``--repeats`` times each, interleaved:
- before: data_checksum as it was (Path.rglob, md5 of every file);
- after: data_checksum now (stat of every file against the manifest, nothing read);
- full: data_checksum with GAL_DATA_CHECK=full (every file read, compared with the identity).
The files were just written, so the full hashes read them from the page cache: the best case for "before";
on a cluster file system, cold, it reads 140 GB for ImageNet instead.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from pipelines.hashing import digest, record_identity
from pipelines.machine import describe
from pipelines.tracking.provenance import data_checksum


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100, help="subfolders the files are spread over")
    parser.add_argument("--size", type=int, default=1024, help="bytes per file")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to build the folder (default: the system's temp dir)")
    return parser.parse_args(argv)


def checksum_before(path: Path) -> str:
    """data_checksum of a folder as it was before prepared identities (every file's md5)."""
    h = hashlib.md5(usedforsecurity=False)
    for p in sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()):
        h.update(f"{p.relative_to(path).as_posix()}\0{digest(p, 'md5')}\n".encode())
    return "md5:" + h.hexdigest()


def build(folder: Path, files: int, classes: int, size: int) -> None:
    for i in range(files):
        sub = folder / f"n{i % classes:08d}"
        if i < classes:
            sub.mkdir(parents=True)
        (sub / f"img_{i:08d}.JPEG").write_bytes(os.urandom(size))


def timed(fn) -> tuple[float, str]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gal-data-identity-", dir=args.dir) as tmp:
        out = Path(tmp) / "data" / "processed" / "synthetic"
        build_s, _ = timed(lambda: build(out, args.files, args.classes, args.size))
        prepare_s, identity = timed(lambda: record_identity(out, stage="bench"))
        (out.parent / "synthetic.json").write_text(json.dumps({"name": "synthetic", "identity": identity}))
        manifest_bytes = (out.parent / "synthetic.manifest.tsv").stat().st_size
        runs = {"before": [], "after": [], "full": []}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits all three alike
            for name, fn in (("before", lambda: checksum_before(out)), ("after", lambda: data_checksum(out)),
                             ("full", lambda: data_checksum(out, full=True))):
                seconds, value = timed(fn)
                assert value == identity["md5"], (name, value)
                runs[name].append(seconds)
    median = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "files": args.files, "bytes_per_file": args.size, "subfolders": args.classes, "repeats": args.repeats,
        "build_s": round(build_s, 2), "prepare_identity_s": round(prepare_s, 2), "manifest_bytes": manifest_bytes,
        "median_s": {k: round(v, 3) for k, v in median.items()},
        "all_s": {k: [round(s, 3) for s in v] for k, v in runs.items()},
        "speedup_before_over_after": round(median["before"] / median["after"], 1),
        "machine": describe(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
