"""The only place that talks to MLflow and writes run records (format: pipelines/CONTRACT.md).

    with RunTracker("regression", "boston-gal-s0", cfg, profile="smoke",
                    data_files=[Path("data/processed/boston.npz")]) as tracker:
        for epoch in range(1, epochs + 1):
            tracker.log_epoch(epoch, {"train_loss": loss, "val_mae": mae})
        tracker.log_final({"test_mae": mae, "test_mse": mse})

One MLflow experiment per task; one MLflow run per ``with`` block. On success the block leaves
``runs/<task>/<run_name>/{config.yaml, history.csv, metrics.json, run.json}`` (plus, from a dirty tree,
``git_diff.patch`` and ``git_untracked.txt``: see Tags) and the MLflow run FINISHED: the record is
written into a temp dir beside it, the run is marked FINISHED, then the temp dir replaces the old record
(``pipelines.atomic``), so a record on disk is always whole and means a FINISHED run, or a diverged one (below).
On any exception, a NaN/inf metric included, the MLflow run ends FAILED (KILLED for Ctrl-C), no record is
written, a previous record of the same name is left as it was, and the exception propagates.

A divergence kept as a result: instead of ``log_epoch``, ``log_diverged(step, metrics)`` with the step's
row that holds a NaN/inf (``first_nonfinite`` finds it) ends the logging. That row is not logged (history.csv
and MLflow keep the finite steps only), the final metrics become ``{"diverged_<step_name>": step}`` only
(metrics.json and an MLflow metric), and the MLflow run gets the tags ``diverged_<step_name>`` and
``diverged_metric``. Leaving the block then writes the whole record as above, run.json with ``"status":
"diverged"`` and ``"diverged_metric"``, and ends the MLflow run FAILED. Only such a record has "status".

``variant`` (keyword, default "") names a run off a preset (e.g. "eps0.001"; "" for the preset's own
run): run.json "variant" and MLflow tag ``variant``; a resume must have the same one. ``tags`` (keyword) are
more MLflow tags, set again on resume: where the run executes (a Slurm job's id and nodes).

Resuming (a stage that checkpoints each epoch and is rerun after being killed):

    with RunTracker(..., resume=ckpt.get("tracker")) as tracker:  # None: a new run
        for epoch in range(start, epochs + 1):
            ...
            torch.save({..., "tracker": tracker.state()}, ckpt_path)  # JSON-able: fine for weights_only=True

``state()`` (inside the block only; sends nothing) snapshots the MLflow run id, experiment, store,
history rows, final metrics so far, metrics not sent yet, last step, variant and the run record. With
``resume=state`` no new MLflow run is made: the state's run is set back to RUNNING (it is RUNNING after
a SIGKILL, FAILED/KILLED after an exception) and the history restored, so the finished record and
MLflow run look like an uninterrupted run's (history.csv: the state's rows plus the new ones; log from
the step after the state's). Params and tags are not logged again; run.json keeps the original
``created``, git and data fields (the git diff recorded is the start's). Refused with a TrackingError,
before the run is touched, when the state is not one of this task/run_name/step_name/variant, the store
differs, the run is not in it (or is deleted), the config differs from the run's params, or the git
commit, git diff (of tracked files: its sha256), data checksums, env lock or profile differ from the
state's (a resume would mix two versions); the message says to delete the checkpoint to start over.
Steps logged after the state was taken and before the crash are logged again by the resumed run: MLflow
keeps both values for such a step, the later (resumed) one as the latest.

Params are the flattened config (``a.b.c``; values as strings, cut to 500 characters; config.yaml has
them whole). Epoch metrics are buffered and sent in batches (at the latest on the first log_epoch call
5 s after the previous send, and at the end), so long runs cost few requests. Final metrics are logged
last, at the last step, so they are each metric's latest value (what ``logged_metrics`` returns).

Store: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db`` with root = ``DVC_ROOT`` or the
current directory. An http(s) server is probed (``/health``) before anything else, so an unreachable
one fails in seconds with a TrackingError instead of MLflow's minutes of retries. (A server that goes
away mid-run still gets MLflow's retries, MLFLOW_HTTP_REQUEST_MAX_RETRIES/_TIMEOUT, before the run fails.)
An sqlite store gets a write tried and rolled back first, so a read-only file or directory fails at
once (MLflow would retry for about 100 s when it cannot create the file). Store errors are one line
naming the root cause (the innermost ``raise ... from``: e.g. "sqlite3.OperationalError: attempt to
write a readonly database"); MLflow's, alembic's and SQLAlchemy's loggers are silenced meanwhile (they
would print the error again with tracebacks, about 90 lines). Artifacts: a database store's new
experiment keeps them in ``<dir of the sqlite file>/mlartifacts/<task>`` (for another database,
``<root>/mlartifacts/<task>``), set when it is created, not in MLflow's default ./mlruns of whatever
the cwd is; a server (its ``--artifacts-destination`` or ``--default-artifact-root``) or file store
decides itself.

Tags: ``git_commit`` (``git rev-parse HEAD``; "unknown" outside a git checkout) and ``git_dirty``:
"true" when ``git status --porcelain`` lists anything, untracked files included (an untracked module
the run imported is not in the commit either), except ignored files (DVC outputs such as data/ and
runs/ are git-ignored), this module's own outputs (the runs root, mlflow.db, mlruns/, mlartifacts/) and
dvc.lock (DVC's record of outputs, rewritten after each stage);
"unknown" outside git. In run.json it is true/false/null. What made it dirty is kept with the run:
``git diff HEAD --binary`` of the tracked files (same exclusions; ``git apply`` puts it back onto the
commit) as ``git_diff.patch`` and the untracked, not ignored files (one per line, from the top of the
checkout, quoted as git quotes them) as ``git_untracked.txt``, both in the run record and as MLflow
artifacts under ``provenance/`` (logged at the start: a failed run has them too); run.json has
``git_diff_sha256`` (of the patch, also the tag ``git_diff_sha256``) and ``git_untracked`` (the list).
A clean tree writes neither file: ``git_diff_sha256`` null, ``git_untracked`` [] (null outside git).
``dvc_stage`` (env ``DVC_STAGE``, else "manual"), ``profile``, ``variant``, ``env_lock_sha256`` (of
``<root>/requirements.lock``; "missing" if absent) and ``data.<path>`` = "md5:<hex>" per data file, path
relative to the root. A directory's md5 runs over
its files in sorted relative-path order, each fed as ``<relpath> NUL <md5 of the file> LF``.
"""
from __future__ import annotations

import base64
import csv
import getpass
import hashlib
import io
import json
import logging
import math
import numbers
import os
import posixpath
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines.atomic import replace_dir, temp_dir_beside
from pipelines.errors import UserError
from pipelines.fetch import digest

LOCK_FILE = "requirements.lock"
PARAM_VALUE_MAX = 500  # MLflow's historic limit for a param value (newer servers allow more; old ones don't)
PARAM_BATCH = 100  # MLflow's log_batch limit for params
METRIC_BATCH = 1000  # MLflow's log_batch limit for metrics
FLUSH_SECONDS = 5.0  # log_epoch sends the buffered metrics once this long has passed since the last send
KEY_MAX = 250  # MLflow's limit for a param/tag/metric key
STATE_VERSION = 2  # of RunTracker.state() (2: variant, git diff)
# Characters MLflow accepts in param, tag and metric names; anything else in a key becomes "_".
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")
# Not code: the tracking store, and dvc.lock, which DVC rewrites after every stage it runs.
_OWN_OUTPUTS = ("mlflow.db", "mlruns", "mlartifacts", "dvc.lock")
DIFF_FILE, UNTRACKED_FILE = "git_diff.patch", "git_untracked.txt"  # a dirty run's record (and MLflow artifacts)
PROVENANCE_DIR = "provenance"  # the MLflow artifact directory they go to
RECORD_FILES = ("config.yaml", "history.csv", "metrics.json", "run.json")  # a run record, also MLflow artifacts
RECORD_DIR = "record"  # ... under this artifact directory
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy stores: MLflow puts artifacts at ./mlruns
_STORE_LOGGERS = ("mlflow", "alembic", "sqlalchemy")

# The "View run ... at: http://..." line MLflow prints to stdout when a run ends on a server.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class TrackingError(UserError):
    """Tracking failed; the message is one line saying what happened and what to do."""


# --------------------------------------------------------------------------------------------- store
def project_root() -> Path:
    """The directory that holds mlflow.db and requirements.lock: env DVC_ROOT, else the cwd (absolute)."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else an sqlite store at the project root (the same from any cwd)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root().as_posix()}/mlflow.db"


def _redact(uri: str) -> str:
    """The URI without a password (it goes into run.json and error messages)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.netloc.rsplit('@', 1)[1]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_tracking_server(uri: str, timeout: float = 5) -> None:
    """Fail fast (TrackingError) when an http(s) store does not answer or an sqlite store cannot be
    written; make a local store's directory."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(uri)  # without user:password (urllib does not take them in the URL)
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])).rstrip("/") + "/health"
        request = urllib.request.Request(url, headers={"User-Agent": "pipelines.tracking"})
        reason = None
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read(64)
        except urllib.error.HTTPError as err:  # it answered: only a server error counts as down
            if err.code >= 500:
                reason = f"HTTP {err.code} {err.reason}"
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            reason = f"{type(reason).__name__ if isinstance(reason, BaseException) else 'error'}: {reason}"
        if reason is not None:
            raise TrackingError(f"MLflow tracking server at {_redact(uri)} is unreachable: {reason}; "
                                "start it or unset MLFLOW_TRACKING_URI")
        _check_credentials(url[: -len("/health")], uri, timeout)
        return
    path = None
    if scheme == "sqlite":
        db = _sqlite_path(uri)
        path = db.parent if db is not None else None
    elif scheme == "file":
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path))
    elif scheme == "" or (len(scheme) == 1 and uri[1:3] in (":/", ":\\")):  # a bare path is a file store
        path = Path(uri)
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"cannot create the MLflow store directory {path}: {err.strerror or err}; "
                                "fix the path or set MLFLOW_TRACKING_URI") from None
    if scheme == "sqlite" and db is not None:
        reason = _sqlite_unwritable(db)
        if reason is not None:
            raise TrackingError(f"cannot write to the MLflow store {_redact(uri)}: {reason}; make it a writable "
                                "sqlite file or set MLFLOW_TRACKING_URI")


def _check_credentials(base: str, uri: str, timeout: float) -> None:
    """A server with authentication refuses missing or wrong credentials now, in one line, rather than at
    the run's first write. They come from MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (MLflow's
    own variables) and go nowhere else: not into a message, tag, param or run record."""
    headers = {"User-Agent": "pipelines.tracking"}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        token = base64.b64encode(f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(64)
    except urllib.error.HTTPError as err:
        if err.code == 401:
            raise TrackingError(f"MLflow server {_redact(uri)} refused the credentials (HTTP 401): set "
                                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of the server") from None
        if err.code == 403:
            raise TrackingError(f"MLflow server {_redact(uri)} does not let this user read experiments (HTTP 403): "
                                "ask its admin for permission") from None
    except (urllib.error.URLError, OSError, ValueError):
        pass  # it answered /health just now: the run's own requests will say what is wrong


def _sqlite_unwritable(db: Path) -> str | None:
    """Why the sqlite file ``db`` cannot be written (a write is tried and rolled back), else None. MLflow
    finds out only at its first write, after logging each SQL error with its traceback, or, when it
    cannot create the file, after about 100 s of retries."""
    try:
        conn = sqlite3.connect(db, timeout=20, isolation_level=None)  # creates the file as MLflow would
        try:
            conn.execute("BEGIN IMMEDIATE")  # the write lock: waits out another writer, as MLflow does
            conn.execute("CREATE TABLE pipelines_write_probe (x)")  # a page write: needs the journal too
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
    except sqlite3.Error as err:
        return _cause(err)
    return None


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts in a database store: ``<root>/mlartifacts/<experiment>``,
    root being the sqlite file's directory (else the project root), so the same from any cwd (MLflow's
    default is ./mlruns of the cwd). None for a server or file store: it decides itself."""
    if uri.split(":", 1)[0].split("+", 1)[0].lower() not in _DB_SCHEMES:
        return None
    db = _sqlite_path(uri)
    root = db.resolve().parent if db is not None else project_root()
    return (root / "mlartifacts" / experiment).as_uri()


@contextmanager
def _quiet_store():
    """MLflow, alembic and SQLAlchemy silenced: a failing store logs each SQL error with its traceback
    (about 90 lines for a read-only mlflow.db) and a new one its migrations; a TrackingError says the
    root cause in one line instead. (Import mlflow first: it sets its loggers up on import.)"""
    manager = logging.root.manager
    loggers = {logging.getLogger(name) for name in _STORE_LOGGERS}
    loggers.update(lg for name, lg in list(manager.loggerDict.items()) if isinstance(lg, logging.Logger)
                   and lg.level != logging.NOTSET and name.split(".")[0] in _STORE_LOGGERS)
    levels = {lg: lg.level for lg in loggers}
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in levels.items():
            lg.setLevel(level)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of an sqlite:/// URI (relative or, with four slashes, absolute), else None."""
    if not uri.lower().startswith("sqlite:///"):
        return None
    rest = urllib.parse.unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return Path(rest) if rest and rest != ":memory:" else None


@contextmanager
def _creating_store(uri: str):
    """For an sqlite store, an exclusive lock on its directory while MLflow opens it: runs started at once
    (a fan-out) would otherwise each migrate a new database, and all but one fail ("duplicate column
    name"). flock on the directory: no lock file to leave in the tree, and none of sqlite's own locks on
    the database file to disturb."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    fd = os.open(db.resolve().parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _client(uri: str):
    from mlflow.tracking import MlflowClient  # imported late: mlflow takes a while to import

    with _quiet_store(), _creating_store(uri):  # creating a store runs (and logs) its database migrations
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # opens (a new store: migrates) it now, under the lock
        return client


def logged_metrics(run_id: str, uri: str | None = None) -> dict[str, float]:
    """The latest value of each metric of an MLflow run (for the audit's cross-check with metrics.json)."""
    uri = uri or tracking_uri()
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():  # reading must not create an empty store (or its directories)
        raise TrackingError(f"no MLflow store at {db}; pass the store's URI or set MLFLOW_TRACKING_URI")
    if db is None:
        check_tracking_server(uri)
    try:
        with _quiet_store():
            run = _client(uri).get_run(run_id)
    except Exception as err:  # MlflowException and friends
        raise TrackingError(f"cannot read MLflow run {run_id} from {_redact(uri)}: {_cause(err)}; "
                            "check the run id and MLFLOW_TRACKING_URI") from None
    return {k: float(v) for k, v in run.data.metrics.items()}


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


def _display_path(path: Path, root: Path) -> str:
    """The path relative to the root when it lies under it, else absolute (posix)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


# ------------------------------------------------------------------------------------ MLflow's own views
def _source_tags(root: Path, commit: str, source: str) -> dict[str, str]:
    """MLflow's standard tags of where a run comes from, which its UI shows (Source with the commit, User)."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": source, "mlflow.user": getpass.getuser()}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
        branch = (_git(root, "rev-parse", "--abbrev-ref", "HEAD") or "").strip()
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
        remote = (_git(root, "remote", "get-url", "origin") or "").strip()
        if remote:
            tags["mlflow.source.git.repoURL"] = _redact(remote)
    return tags


def _dataset_inputs(checksums: Mapping[str, str]) -> list:
    """The run's data files as MLflow dataset inputs (its UI's Dataset column), named by path, digest = md5."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [DatasetInput(Dataset(name=path, digest=checksum.split(":", 1)[1], source_type="local",
                                 source=json.dumps({"uri": path}), profile=json.dumps({"checksum": checksum})),
                         tags=[InputTag("mlflow.data.context", "training")])
            for path, checksum in checksums.items()]


def _loss_curve(history: Sequence[tuple[int, Mapping[str, str]]], step_name: str, title: str, path: Path) -> None:
    """A PNG of every *loss* column (else the first column) against the step: the run's curve in MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys(c for _, row in history for c in row))
    shown = [c for c in columns if "loss" in c] or columns[:1]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for column in shown:
        points = [(step, float(row[column])) for step, row in history if row.get(column, "") != ""]
        ax.plot(*zip(*points), label=column, marker="." if len(points) < 30 else None)
    ax.set_xlabel(step_name)
    ax.set_title(title, fontsize=9)
    if shown:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ git
def _git(root: Path, *args: str, text: bool = True) -> Any:
    """git's stdout (str, or bytes with text=False), None if it fails or is not there."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=text, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _pathspecs(root: Path, exclude: Sequence[Path]) -> list[str]:
    """The whole checkout less ``exclude`` and this module's own outputs, as git pathspecs."""
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
    """(HEAD commit or "unknown", dirty or None outside git); see the module docstring for "dirty"."""
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


# ------------------------------------------------------------------------------------------- helpers
def _cause(err: BaseException) -> str:
    """The root cause in one line: the first line of the last exception in the ``raise ... from`` chain
    (MLflow and SQLAlchemy wrap the driver's error), its type named with its package, e.g.
    "sqlite3.OperationalError: attempt to write a readonly database"."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    package = type(err).__module__.split(".")[0]
    name = type(err).__qualname__ if package == "builtins" else f"{package}.{type(err).__qualname__}"
    text = str(err).strip().splitlines()
    return f"{name}: {text[0]}" if text else name


def _plain(config: Any) -> dict:
    """A DictConfig (resolved) or mapping as plain containers."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    return OmegaConf.to_container(OmegaConf.create(dict(config)), resolve=True)


def _key(name: str) -> str:
    """A name MLflow accepts: allowed characters only, and no path that normalises to another name."""
    key = posixpath.normpath(_BAD_KEY_CHARS.sub("_", str(name))).lstrip("/")
    if key.startswith("..") or key in ("", "."):
        key = "_" + key[1:]
    if len(key) > KEY_MAX:  # keep it unique: cut and add a short hash of the full name
        key = key[:KEY_MAX - 9] + "~" + hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()[:8]
    return key


def flatten(config: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested mappings as {"a.b.c": str(value)}; lists of scalars stay one value, lists holding
    mappings are flattened by index; empty mappings become "{}"."""
    flat: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten(v, key + ".") if v else {key: "{}"})
        elif isinstance(v, (list, tuple)) and any(isinstance(x, (Mapping, list, tuple)) for x in v):
            flat.update(flatten({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            flat[key] = str(v)
    return flat


def _param_value(value: str) -> str:
    return value if len(value) <= PARAM_VALUE_MAX else value[:PARAM_VALUE_MAX - 3] + "..."


def first_nonfinite(metrics: Mapping[str, Any]) -> tuple[str, float] | None:
    """(name, value) of the first metric that is a number but NaN or +-inf (a diverged run), else None."""
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue  # not a number at all: log_epoch refuses it
        if not math.isfinite(number):
            return str(name), number
    return None


def _finite(metrics: Mapping[str, float], where: str) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TrackingError(f"metric {name!r} {where} is not a number ({value!r}); log floats only") from None
        if not math.isfinite(number):
            raise TrackingError(f"metric {name!r} is {number} {where}: the run diverged; "
                                "lower the learning rate or check the data")
        out[str(name)] = number
    return out


def _cell(raw: Any, number: float) -> str:
    """A history.csv cell: integers (flags, counts) as integers, everything else as a round-tripping float."""
    if isinstance(raw, numbers.Integral):
        return str(int(raw))
    dtype = getattr(raw, "dtype", None)  # numpy scalars (dtype.kind) and torch tensors (dtype.is_floating_point)
    if dtype is not None and (dtype.kind in "biu" if hasattr(dtype, "kind") else
                              not (dtype.is_floating_point or dtype.is_complex)):
        return str(int(raw))
    return repr(number)


def _now_ms() -> int:
    return int(time.time() * 1000)


_STATE_KEYS = {"version": int, "task": str, "run_name": str, "step_name": str, "variant": str, "mlflow_run_id": str,
               "mlflow_experiment_id": str, "tracking_uri": str, "config_sha256": str, "columns": list,
               "history": list, "final": dict, "last_step": int, "last_ts": int, "pending": list, "record": dict}


def _check_state(state: Any, task: str, run_name: str, step_name: str, variant: str) -> dict:
    """A resume state from ``RunTracker.state()`` for this task, run name and variant, else TrackingError."""
    redo = "delete the checkpoint to start the run over"
    if not isinstance(state, Mapping) or any(not isinstance(state.get(k), t) for k, t in _STATE_KEYS.items()) \
            or state["version"] != STATE_VERSION:
        raise TrackingError(f"cannot resume run {task}/{run_name}: the resume state is not one from "
                            f"RunTracker.state() (version {STATE_VERSION}); {redo}")
    mine = (task, run_name, step_name, variant)
    theirs = tuple(state[k] for k in ("task", "run_name", "step_name", "variant"))
    if mine != theirs:
        raise TrackingError(f"cannot resume run {_who(*mine)} from the state of {_who(*theirs)}; pass the right "
                            f"checkpoint or {redo}")
    return dict(state)


def _who(task: str, run_name: str, step_name: str, variant: str) -> str:
    return f"{task}/{run_name} (per {step_name}{f', variant {variant!r}' if variant else ''})"


# --------------------------------------------------------------------------------------------- tracker
class RunTracker:
    """One tracked run: an MLflow run plus, on success, its record under runs/<task>/<run_name>/."""

    def __init__(self, task: str, run_name: str, config: Mapping, *, profile: str,
                 data_files: Sequence[Path] = (), runs_root: Path = Path("runs"), stage: str | None = None,
                 step_name: str = "epoch", variant: str = "", resume: Mapping | None = None,
                 tags: Mapping[str, str] | None = None, source: str | None = None, system_metrics: bool = False):
        for what, value in (("task", task), ("run_name", run_name)):
            if not value or "/" in value or "\\" in value or value in (".", "..") or value.startswith("."):
                raise TrackingError(f"bad {what} {value!r}: use a plain name such as 'regression' or 'boston-gal-s0'")
        self.task, self.run_name, self.profile, self.step_name = task, run_name, str(profile), step_name
        self.variant = str(variant)
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}  # where it ran (a job's id and nodes)
        self.source = source or Path(sys.argv[0]).name  # mlflow.source.name: the entry point
        self.system_metrics = system_metrics
        self._monitor = None  # MLflow's system metrics sampler, while the block runs
        self.config = _plain(config)
        self.data_files = [Path(p) for p in data_files]
        self.runs_root = Path(runs_root)
        self.stage = stage or os.environ.get("DVC_STAGE") or "manual"
        self.run_dir = self.runs_root / task / run_name
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri: str | None = None
        self._client = None
        self._history: list[tuple[int, dict[str, str]]] = []  # (step, {metric: csv cell})
        self._columns: dict[str, None] = {}  # first-seen order
        self._final: dict[str, float] = {}
        self._diverged: dict | None = None  # {"step", "metric"} once log_diverged ended the logging
        self._pending: list = []  # metrics not yet sent to MLflow
        self._last_flush = 0.0
        self._last_step = 0
        self._last_ts = 0
        self._record: dict | None = None
        self._diff: bytes | None = None  # a dirty tree's git diff (None: clean or outside git)
        self._active = False  # inside the with block
        self._unreachable = False  # a flush failed: do not wait on MLflow's retries again while failing
        self._resume = _check_state(resume, task, run_name, step_name, self.variant) if resume is not None else None
        self._config_sha = hashlib.sha256(json.dumps(flatten(self.config), sort_keys=True).encode()).hexdigest()

    # ---------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "RunTracker":
        from mlflow.entities import Param

        if self.run_id is not None:
            raise TrackingError(f"RunTracker {self.task}/{self.run_name} was already used; make a new one per run")
        root = project_root()
        self.uri = tracking_uri()
        check_tracking_server(self.uri)
        checksums = {_display_path(p, root): data_checksum(p) for p in self.data_files}
        lock = root / LOCK_FILE
        lock_sha = digest(lock, "sha256") if lock.is_file() else "missing"
        commit, dirty = git_state(root, exclude=[self.runs_root])
        diff, untracked = git_changes(root, exclude=[self.runs_root]) if dirty else (None, None)
        if self._resume is not None:
            self._enter_resumed(checksums, lock_sha, commit, diff or b"")
            self._start_monitor(resumed=True)
            self._active = True
            return self
        diff_sha = None if diff is None else hashlib.sha256(diff).hexdigest()
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        tags = {"git_commit": commit, "git_dirty": {True: "true", False: "false", None: "unknown"}[dirty],
                "dvc_stage": self.stage, "profile": self.profile, "variant": self.variant,
                "env_lock_sha256": lock_sha}
        if diff_sha is not None:
            tags["git_diff_sha256"] = diff_sha
        tags.update({_key(f"data.{path}"): value for path, value in checksums.items()})
        tags.update(self.tags)
        tags.update(_source_tags(root, commit, self.source))
        try:
            self._client = _client(self.uri)
            with _quiet_store():
                self.experiment_id = self._experiment()
                run = self._client.create_run(self.experiment_id, run_name=self.run_name,
                                              tags={k: str(v) for k, v in tags.items()})
        except TrackingError:
            raise
        except Exception as err:
            raise TrackingError(f"cannot start an MLflow run in {_redact(self.uri)}: {_cause(err)}; "
                                "check MLFLOW_TRACKING_URI and the store") from None
        self.run_id = run.info.run_id
        self._diff = diff
        self._record = {"task": self.task, "run_name": self.run_name, "variant": self.variant,
                        "mlflow_run_id": self.run_id, "mlflow_experiment_id": self.experiment_id,
                        "tracking_uri": _redact(self.uri), "stage": self.stage, "git_commit": commit,
                        "git_dirty": dirty, "git_diff_sha256": diff_sha,
                        "git_untracked": [] if dirty is False else untracked, "profile": self.profile,
                        "data_checksums": checksums, "env_lock_sha256": lock_sha, "created": created}
        what = "config"
        try:
            params = [Param(_key(k), _param_value(v)) for k, v in flatten(self.config).items()]
            with _quiet_store():
                for i in range(0, len(params), PARAM_BATCH):
                    self._client.log_batch(self.run_id, params=params[i:i + PARAM_BATCH], synchronous=True)
                what = "datasets"
                if checksums:
                    self._client.log_inputs(self.run_id, _dataset_inputs(checksums))
                if diff is not None:  # with the run from its start: a failed run says what code it ran too
                    what = "git diff"
                    with tempfile.TemporaryDirectory() as tmp:
                        self._write_git_changes(Path(tmp))
                        self._client.log_artifacts(self.run_id, tmp, PROVENANCE_DIR)
        except Exception as err:
            self._terminate("FAILED")
            raise TrackingError(f"cannot log the {what} of run {self.run_name} to MLflow: {_cause(err)}; "
                                "check the store") from None
        self._start_monitor(resumed=False)
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._active:
            return False
        self._active = False
        self._stop_monitor()
        if exc_type is not None:
            self._fail("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
            return False
        tmp = None
        try:
            self._flush()
            tmp = temp_dir_beside(self.run_dir)
            self._write(tmp)
            self._log_record(tmp)
            status = "FINISHED" if self._diverged is None else "FAILED"
            with _quiet_store():  # before publishing: a record means a FINISHED run (or a diverged, FAILED one)
                self._client.set_terminated(self.run_id, status)
            replace_dir(tmp, self.run_dir)  # an old record is replaced, or kept if this fails
            tmp = None
        except BaseException as err:
            self._fail("FAILED")
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, Exception) and not isinstance(err, TrackingError):
                raise TrackingError(f"cannot finish run {self.task}/{self.run_name}: {_cause(err)}; "
                                    f"check that {self.run_dir.parent} is writable and the MLflow store "
                                    "is reachable") from err
            raise
        return False

    def _enter_resumed(self, checksums: dict[str, str], lock_sha: str, commit: str, diff: bytes) -> None:
        """Continue the state's MLflow run: check it all first, then set it RUNNING and restore."""
        from mlflow.entities import Metric

        state = self._resume
        record = state["record"]
        redo = "delete the checkpoint to start the run over"
        if _redact(self.uri) != state["tracking_uri"]:
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: its MLflow run is in "
                                f"{state['tracking_uri']}, not in {_redact(self.uri)}; set MLFLOW_TRACKING_URI "
                                f"back or {redo}")
        run_id = state["mlflow_run_id"]
        try:
            self._client = _client(self.uri)
            with _quiet_store():
                run = self._client.get_run(run_id)
        except Exception as err:
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: MLflow run {run_id} is not in "
                                f"{_redact(self.uri)} ({_cause(err)}); {redo}") from None
        if (run.info.lifecycle_stage != "active" or run.info.experiment_id != state["mlflow_experiment_id"]
                or run.info.run_name != self.run_name):
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: MLflow run {run_id} is deleted "
                                f"or not this run; {redo}")
        params = {_key(k): _param_value(v) for k, v in flatten(self.config).items()}
        changed = sorted(k for k in params.keys() | run.data.params.keys()
                         if params.get(k) != run.data.params.get(k))
        if changed or self._config_sha != state["config_sha256"]:
            what = (", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "") if changed
                    else "past the 500 characters MLflow keeps")
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: the config differs from the "
                                f"checkpoint's ({what}); a resumed run must have the same config: restore it "
                                f"or {redo}")
        # The diff of tracked files only: an untracked file made or removed meanwhile is no other version
        # of the code the run imported (the record keeps the list from the start).
        empty = hashlib.sha256(b"").hexdigest()
        now = {"git commit": commit, "git diff": hashlib.sha256(diff).hexdigest(), "data checksums": checksums,
               "env lock": lock_sha, "profile": self.profile}
        then = {"git commit": record["git_commit"], "git diff": record["git_diff_sha256"] or empty,
                "data checksums": record["data_checksums"], "env lock": record["env_lock_sha256"],
                "profile": record["profile"]}
        changed = [k for k in now if now[k] != then[k]]
        if changed:
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: the {' and '.join(changed)} "
                                f"changed since the checkpoint, so a resume would mix two versions; restore "
                                f"them or {redo}")
        try:
            history = [(int(step), {str(k): str(v) for k, v in values.items()}) for step, values in state["history"]]
            columns = dict.fromkeys(str(c) for c in state["columns"])
            final = {str(k): float(v) for k, v in state["final"].items()}
            pending = [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in state["pending"]]
        except (TypeError, ValueError, AttributeError):
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: the resume state is damaged; "
                                f"{redo}") from None
        try:
            with _quiet_store():
                self._client.update_run(run_id, status="RUNNING")
                for key, value in self.tags.items():  # a requeued or resubmitted job: where it runs now
                    self._client.set_tag(run_id, key, value, synchronous=True)
        except Exception as err:
            raise TrackingError(f"cannot resume MLflow run {run_id} in {_redact(self.uri)}: {_cause(err)}; "
                                "check the store") from None
        self.run_id, self.experiment_id = run_id, state["mlflow_experiment_id"]
        self._history, self._columns, self._final, self._pending = history, columns, final, pending
        self._last_step, self._last_ts = state["last_step"], state["last_ts"]
        self._record = json.loads(json.dumps(record))
        self._diff = None if record["git_diff_sha256"] is None else diff  # the same as the start's (checked)

    def state(self) -> dict:
        """What ``RunTracker(..., resume=state)`` needs to continue this run: plain JSON types only (a copy)."""
        self._require_active()
        # Metrics not sent yet travel in the state (sent on resume; MLflow drops exact duplicates), so a
        # checkpoint costs no request and a SIGKILL loses nothing the checkpoint covers.
        pending = [[m.key, m.value, m.timestamp, m.step] for m in self._pending]
        return json.loads(json.dumps({
            "version": STATE_VERSION, "task": self.task, "run_name": self.run_name, "step_name": self.step_name,
            "variant": self.variant, "mlflow_run_id": self.run_id, "mlflow_experiment_id": self.experiment_id,
            "tracking_uri": _redact(self.uri), "config_sha256": self._config_sha,
            "columns": list(self._columns), "history": [[step, values] for step, values in self._history],
            "final": self._final, "last_step": self._last_step, "last_ts": self._last_ts, "pending": pending,
            "record": self._record}))

    # ---------------------------------------------------------------------------------- logging
    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        """One history row (and MLflow metrics at ``step``); a NaN/inf value raises TrackingError."""
        self._require_logging()
        values = _finite(metrics, f"at {self.step_name} {step}")
        step = int(step)
        for name in values:
            self._columns.setdefault(name, None)
        self._history.append((step, {str(k): _cell(raw, values[str(k)]) for k, raw in metrics.items()}))
        self._last_step = step
        self._queue(values, step)
        if len(self._pending) >= METRIC_BATCH or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self._flush()

    def log_final(self, metrics: Mapping[str, float]) -> None:
        """Final metrics: metrics.json and MLflow metrics under their own names (they win over any
        same-named epoch metric as the run's latest value)."""
        self._require_logging()
        values = _finite(metrics, "in the final metrics")
        self._final.update(values)
        self._queue(values, self._last_step)
        self._flush()

    def log_diverged(self, step: int, metrics: Mapping[str, Any]) -> tuple[str, float]:
        """End the logging at ``step``, whose row ``metrics`` holds a NaN/inf: the run diverged there, and that
        is its result (see the module docstring). The row itself is not logged. Returns the offending metric's
        (name, value); TrackingError if every value is finite."""
        from mlflow.entities import RunTag

        self._require_logging()
        found = first_nonfinite(metrics)
        if found is None:
            raise TrackingError(f"log_diverged at {self.step_name} {step} of run {self.run_name}: every metric is "
                                "finite; log the row with log_epoch")
        step, key = int(step), f"diverged_{self.step_name}"
        self._diverged = {"step": step, "metric": found[0]}
        # metrics.json holds the step it diverged at and nothing else: a last finite epoch's val/test values
        # are not what the configured run computes, and a table must not take them for its result (they stay
        # in history.csv). MLflow gets the same number, so the record and the run agree (the audit checks).
        self._final = {key: step}
        self._queue({key: float(step)}, self._last_step)
        tags = [RunTag(key, str(step)), RunTag("diverged_metric", found[0])]
        try:
            with _quiet_store():
                self._client.log_batch(self.run_id, tags=tags, synchronous=True)
        except Exception as err:
            self._unreachable = True
            raise TrackingError(f"cannot tag run {self.run_name} in MLflow at {_redact(self.uri)}: {_cause(err)}; "
                                "check that the tracking server is up") from None
        self._flush()
        return found

    # ---------------------------------------------------------------------------------- internals
    def _require_active(self) -> None:
        if not self._active:
            raise TrackingError("RunTracker used outside its 'with' block; log inside 'with RunTracker(...) as t:'")

    def _require_logging(self) -> None:
        self._require_active()
        if self._diverged is not None:
            raise TrackingError(f"run {self.run_name} diverged at {self.step_name} {self._diverged['step']}: "
                                "log_diverged ended its logging")

    def _experiment(self) -> str:
        client = self._client
        exp = client.get_experiment_by_name(self.task)
        if exp is None:
            try:  # the kind tag opens it in the UI's model-training view (MLflow 3 guesses GenAI otherwise)
                return client.create_experiment(self.task, _artifact_location(self.uri, self.task),
                                                tags={"mlflow.experimentKind": "custom_model_development"})
            except Exception:  # another process created it meanwhile
                exp = client.get_experiment_by_name(self.task)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _queue(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = max(_now_ms(), self._last_ts + 1)  # strictly increasing: the last logged value is the latest
        self._last_ts = ts
        self._pending.extend(Metric(_key(k), v, ts, step) for k, v in values.items())

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        try:
            with _quiet_store():
                for i in range(0, len(pending), METRIC_BATCH):
                    self._client.log_batch(self.run_id, metrics=pending[i:i + METRIC_BATCH], synchronous=True)
        except Exception as err:
            self._unreachable = True
            raise TrackingError(f"cannot log metrics of run {self.run_name} to MLflow at {_redact(self.uri)}: "
                                f"{_cause(err)}; check that the tracking server is up") from None

    def _terminate(self, status: str) -> None:
        try:
            with _quiet_store():
                self._client.set_terminated(self.run_id, status)
        except Exception as err:  # never hide the exception that ended the run
            logging.getLogger(__name__).warning("could not mark MLflow run %s %s: %s", self.run_id, status,
                                                _cause(err))

    def _fail(self, status: str) -> None:
        if self._unreachable:
            logging.getLogger(__name__).warning("MLflow run %s is left RUNNING: its store did not answer",
                                                self.run_id)
            return
        try:
            self._flush()  # keep what the run logged before it failed
        except TrackingError as err:
            logging.getLogger(__name__).warning("%s; MLflow run %s is left RUNNING", err, self.run_id)
            return
        self._terminate(status)

    def _write(self, tmp: Path) -> None:
        from omegaconf import OmegaConf

        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(self.config)))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        columns = list(self._columns)
        writer.writerow([self.step_name, *columns])
        for step, values in self._history:
            writer.writerow([step, *(values.get(c, "") for c in columns)])
        (tmp / "history.csv").write_text(buf.getvalue())
        (tmp / "metrics.json").write_text(json.dumps(self._final, indent=2) + "\n")
        record = self._record if self._diverged is None else {
            **self._record, "status": "diverged", "diverged_metric": self._diverged["metric"]}
        (tmp / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        if self._diff is not None:
            self._write_git_changes(tmp)

    def _log_record(self, record: Path) -> None:
        """The record's files and the loss curve as the run's MLflow artifacts (record/, loss_curve.png)."""
        with _quiet_store(), tempfile.TemporaryDirectory() as tmp:
            for name in RECORD_FILES:
                self._client.log_artifact(self.run_id, str(record / name), RECORD_DIR)
            if self._history:
                curve = Path(tmp) / "loss_curve.png"
                _loss_curve(self._history, self.step_name, f"{self.task} / {self.run_name}", curve)
                self._client.log_artifact(self.run_id, str(curve))

    def _start_monitor(self, resumed: bool) -> None:
        """MLflow's own sampler of CPU, memory, disk, network and (with NVML) GPU use: system/* metrics."""
        if not self.system_metrics:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        with _quiet_store():
            # every 10 s unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise
            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.uri)
            self._monitor.start()

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            with _quiet_store():
                self._monitor.finish()
            self._monitor = None

    def _write_git_changes(self, directory: Path) -> None:
        """A dirty tree's diff and untracked files (run record and MLflow artifacts)."""
        (directory / DIFF_FILE).write_bytes(self._diff)
        (directory / UNTRACKED_FILE).write_text("".join(f"{path}\n" for path in self._record["git_untracked"]))
