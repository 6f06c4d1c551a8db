"""What a run was made from: the git commit and uncommitted changes, data checksums, the env lock.

    commit, dirty = git_state(root, exclude=[runs_root])    # ("<sha>" | "unknown", True | False | None)
    diff, untracked = git_changes(root, exclude=[runs_root])  # only for a dirty tree
    checksums = {display_path(p, root): data_checksum(p) for p in data_files}  # {"data/x.npz": "md5:<hex>"}
    lock_sha = env_lock_sha(root)                            # sha256 of requirements.lock, or "missing"

plus the same facts in MLflow's own terms (``source_tags``, ``dataset_inputs``) for its UI. What "dirty"
means and how a directory is hashed: pipelines/CONTRACT.md (Provenance).

The data check: ``data_checksum`` runs at every run start and resume, so for prepared data it stays cheap.
Data with a prepare stage's identity (pipelines.hashing: ``identity`` in its sidecar, a manifest beside it)
is checked by stat only: every file's size and mtime against the manifest, nothing read, and no file added or
missing; the recorded md5 is returned. A file whose mtime differs but size does not (touched, copied, or
restored by ``dvc checkout``) is hashed alone and passes if its md5 is the recorded one (the manifest then
takes its new mtime). Anything else is one TrackingError line: the prepared data changed since it was
prepared (naming a file), rerun its prepare stage. An edit that keeps a file's size and mtime passes the stat
check; ``GAL_DATA_CHECK=full`` rehashes everything and compares it with the identity instead (also done
when the manifest is missing or belongs to another identity, which then writes a fresh one). Data without an
identity (made by hand, test fixtures, a sidecar from before identities) are hashed in full, as always.
"""
from __future__ import annotations

import getpass
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines import hashing
from pipelines.hashing import digest
from pipelines.errors import TrackingError
from pipelines.tracking.store import redact

LOCK_FILE = "requirements.lock"
CHECK_ENV = "GAL_DATA_CHECK"  # "full": rehash prepared data at a run's start instead of checking size and mtime
# Not code: the tracking store (with sqlite's journal files, there while another run writes to it: the fan-out's
# runs at once), and dvc.lock, which DVC rewrites after every stage it runs.
_OWN_OUTPUTS = ("mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm", "mlruns", "mlartifacts", "dvc.lock")


# ------------------------------------------------------------------------------------------ checksums
def data_checksum(path: Path, full: bool | None = None) -> str:
    """"md5:<hex>" of a file's content, or of a directory's files (sorted relative paths and file md5s).

    Prepared data are checked against their prepare stage's identity by stat, or by a full rehash with
    ``full`` (default: env GAL_DATA_CHECK=full); see the module's docstring."""
    path = Path(path)
    if not (path.is_file() or path.is_dir()):
        raise TrackingError(f"data file {path} does not exist; run the stage that makes it first (dvc repro)")
    full = _full_check() if full is None else full
    identity = prepared_identity(path)
    if identity is None:
        return hashing.content_md5(path)
    manifest_file = hashing.manifest_path(hashing.sidecar_path(path))
    manifest = hashing.read_manifest(manifest_file)
    entries = manifest[1] if manifest is not None and manifest[0] == identity["md5"] else None
    if entries is None or full:
        return _check_content(path, identity, entries, manifest_file)
    return _check_stat(path, identity, entries, manifest_file)


def prepared_identity(path: Path) -> dict | None:
    """The ``identity`` its prepare stage recorded in the sidecar beside ``path``, None if there is none."""
    try:
        identity = json.loads(hashing.sidecar_path(path).read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(identity, dict) or identity.get("path") != Path(path).name \
            or not str(identity.get("md5", "")).startswith("md5:") or not isinstance(identity.get("stage"), str):
        return None
    return identity


def _full_check() -> bool:
    value = os.environ.get(CHECK_ENV, "")
    if value not in ("", "stat", "full"):
        raise TrackingError(f"{CHECK_ENV}={value!r}: set it to full (rehash the prepared data at the start) or "
                            "stat (check sizes and mtimes, the default)")
    return value == "full"


def _changed(path: Path, identity: Mapping, problems: list[tuple[str, str]]) -> TrackingError:
    """The one line for prepared data that no longer match their identity; ``problems``: (file, what)."""
    rel, what = min(problems)
    more = f"; {len(problems) - 1} more differ" if len(problems) > 1 else ""
    return _changed_line(path, identity, f"file {rel}: {what}{more}")


def _changed_line(path: Path, identity: Mapping, detail: str) -> TrackingError:
    return TrackingError(f"the prepared data at {path} changed since it was prepared ({detail}); rerun its "
                         f"prepare stage (dvc repro {identity['stage']})")


def _check_stat(path: Path, identity: Mapping, entries: list, manifest_file: Path) -> str:
    """Sizes and mtimes against the manifest, no file read (only files whose mtime alone differs)."""
    expected = {e.path: e for e in entries}
    problems, touched = [], []
    for rel, st in hashing.stat_files(path):
        e = expected.pop(rel, None)
        if e is None:
            problems.append((rel, "not in the prepared data"))
        elif st.st_size != e.size:
            problems.append((rel, f"{st.st_size} bytes, {e.size} when prepared"))
        elif st.st_mtime_ns != e.mtime_ns:
            touched.append(e._replace(mtime_ns=st.st_mtime_ns))
    problems += [(rel, "missing") for rel in expected]
    if problems:
        raise _changed(path, identity, problems)
    folder = path.is_dir()
    problems = [(e.path, "modified, content differs") for e in touched
                if digest(path / e.path if folder else path, "md5") != e.md5]
    if problems:
        raise _changed(path, identity, problems)
    if touched:  # same content, new mtimes: remember them, so the next start reads nothing
        new = {e.path: e for e in touched}
        _save_manifest(manifest_file, identity["md5"], [new.get(e.path, e) for e in entries])
    return identity["md5"]


def _check_content(path: Path, identity: Mapping, entries: list | None, manifest_file: Path) -> str:
    """Rehash everything and compare with the identity, naming the files that differ from the manifest
    when there is one; a match (re)writes the manifest with the files' current mtimes."""
    now = hashing.file_entries(path)
    md5 = hashing.combined_md5(now, path.is_dir())
    if md5 != identity["md5"]:
        then, problems = {e.path: e.md5 for e in entries or ()}, []
        for e in now:
            old = then.pop(e.path, None)
            if old != e.md5:
                problems.append((e.path, "not in the prepared data" if old is None else "content differs"))
        problems += [(rel, "missing") for rel in then]
        if entries is None or not problems:  # no manifest to name a file by
            raise _changed_line(path, identity, f"its content is {md5}, {identity['md5']} when prepared")
        raise _changed(path, identity, problems)
    if now != entries:
        _save_manifest(manifest_file, md5, now)
    return md5


def _save_manifest(manifest_file: Path, md5: str, entries: list) -> None:
    try:
        hashing.write_manifest(manifest_file, md5, entries)
    except OSError:
        pass  # read-only data (a shared copy): the check stays correct, only not as cheap next time


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
    for path in [*exclude, *(root / name for name in _OWN_OUTPUTS), *_profile_switch(top)]:
        try:
            specs.append(f":(top,exclude){Path(path).resolve().relative_to(top).as_posix()}")
        except ValueError:
            pass  # outside the checkout: git would not list it anyway
    return specs


def _profile_switch(top: Path) -> list[Path]:
    """[params.yaml] when it differs from the commit's only by the profile switch (`make repro PROFILE=...`,
    pipelines/profile.py): not a change, as the run's config records its profile. Else []."""
    from pipelines.errors import ConfigError
    from pipelines.profile import switched

    path = top / "params.yaml"
    committed = _git(top, "show", "HEAD:params.yaml")
    try:
        current = path.read_text()
        profile = next(line.split(":", 1)[1].strip() for line in current.splitlines() if line.startswith("profile:"))
        return [path] if committed is not None and current == switched(committed, profile) else []
    except (OSError, StopIteration, ConfigError):
        return []


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
