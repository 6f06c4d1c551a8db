"""What a run was made from: the git commit and uncommitted changes, data checksums, the env lock.

    commit, dirty = git_state(root, exclude=[runs_root])    # ("<sha>" | "unknown", True | False | None)
    diff, untracked = git_changes(root, exclude=[runs_root])  # only for a dirty tree
    checksums = {display_path(p, root): data_checksum(p) for p in data_files}  # {"data/x.npz": "md5:<hex>"}
    lock_sha = env_lock_sha(root)                            # sha256 of requirements.lock, or "missing"

plus the same facts in MLflow's own terms (``source_tags``, ``dataset_inputs``) for its UI. What "dirty"
means and how a directory is hashed: pipelines/CONTRACT.md (Provenance).
"""
from __future__ import annotations

import getpass
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines.hashing import digest
from pipelines.errors import TrackingError
from pipelines.tracking.store import redact

LOCK_FILE = "requirements.lock"
# Not code: the tracking store, and dvc.lock, which DVC rewrites after every stage it runs.
_OWN_OUTPUTS = ("mlflow.db", "mlruns", "mlartifacts", "dvc.lock")


# ------------------------------------------------------------------------------------------ checksums
def data_checksum(path: Path) -> str:
    """"md5:<hex>" of a file's content, or of a directory's files (sorted relative paths and file md5s)."""
    path = Path(path)
    if path.is_file():
        return "md5:" + digest(path, "md5")
    if path.is_dir():
        h = hashlib.md5(usedforsecurity=False)
        for p in sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()):
            h.update(f"{p.relative_to(path).as_posix()}\0{digest(p, 'md5')}\n".encode())
        return "md5:" + h.hexdigest()
    raise TrackingError(f"data file {path} does not exist; run the stage that makes it first (dvc repro)")


def env_lock_sha(root: Path) -> str:
    """sha256 of ``<root>/requirements.lock``, "missing" if there is none."""
    lock = root / LOCK_FILE
    return digest(lock, "sha256") if lock.is_file() else "missing"


def display_path(path: Path, root: Path) -> str:
    """The path relative to the root when it lies under it, else absolute (posix)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


# ------------------------------------------------------------------------------------------------ git
def _git(root: Path, *args: str, text: bool = True) -> Any:
    """git's stdout (str, or bytes with text=False), None if it fails or is not there."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=text, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _pathspecs(root: Path, exclude: Sequence[Path]) -> list[str]:
    """The whole checkout less ``exclude`` and the tracking store's own files, as git pathspecs."""
    top = _git(root, "rev-parse", "--show-toplevel")
    top = Path(top.strip()).resolve() if top else root
    specs = [":(top)"]
    for path in [*exclude, *(root / name for name in _OWN_OUTPUTS)]:
        try:
            specs.append(f":(top,exclude){Path(path).resolve().relative_to(top).as_posix()}")
        except ValueError:
            pass  # outside the checkout: git would not list it anyway
    return specs


def git_state(root: Path, exclude: Sequence[Path] = ()) -> tuple[str, bool | None]:
    """(HEAD commit or "unknown", dirty or None outside git); "dirty": see pipelines/CONTRACT.md."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return "unknown", None
    status = _git(root, "status", "--porcelain", "--untracked-files=normal", "--", *_pathspecs(root, exclude))
    return commit.strip(), None if status is None else bool(status.strip())


def git_changes(root: Path, exclude: Sequence[Path] = ()) -> tuple[bytes, list[str]]:
    """What makes a dirty tree dirty (same exclusions as git_state): the diff of the tracked files against
    HEAD (binary-safe: ``git apply`` puts it back onto the commit) and the untracked, not ignored files
    (paths from the top of the checkout, quoted as git quotes them)."""
    specs = _pathspecs(root, exclude)
    # Options that user config could otherwise change: renames, external/textconv drivers, colour, prefixes.
    diff = _git(root, "diff", "HEAD", "--binary", "--no-renames", "--no-ext-diff", "--no-textconv",
                "--no-color", "--src-prefix=a/", "--dst-prefix=b/", "--", *specs, text=False)
    untracked = _git(root, "ls-files", "--others", "--exclude-standard", "--full-name", "--", *specs)
    if diff is None or untracked is None:
        raise TrackingError(f"cannot read the uncommitted changes in {root} (git diff HEAD, git ls-files); "
                            "check that git works in the checkout")
    return diff, untracked.splitlines()


# ------------------------------------------------------------------------------------ MLflow's own views
def source_tags(root: Path, commit: str, source: str) -> dict[str, str]:
    """MLflow's standard tags of where a run comes from, which its UI shows (Source with the commit, User)."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": source, "mlflow.user": getpass.getuser()}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
        branch = (_git(root, "rev-parse", "--abbrev-ref", "HEAD") or "").strip()
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
        remote = (_git(root, "remote", "get-url", "origin") or "").strip()
        if remote:
            tags["mlflow.source.git.repoURL"] = redact(remote)
    return tags


def dataset_inputs(checksums: Mapping[str, str]) -> list:
    """The run's data files as MLflow dataset inputs (its UI's Dataset column), named by path, digest = md5."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [DatasetInput(Dataset(name=path, digest=checksum.split(":", 1)[1], source_type="local",
                                 source=json.dumps({"uri": path}), profile=json.dumps({"checksum": checksum})),
                         tags=[InputTag("mlflow.data.context", "training")])
            for path, checksum in checksums.items()]
