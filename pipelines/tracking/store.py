"""Where the MLflow store is and whether it answers, before any work is done.

    uri = tracking_uri()           # MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db
    check_tracking_server(uri)     # TrackingError in seconds if it cannot be reached or written
    mlflow = client(uri)           # an MlflowClient with the store opened (a new one migrated, under a lock)
    with quiet():                  # MLflow's, alembic's and SQLAlchemy's loggers silenced meanwhile
        ...

Errors are one-line TrackingErrors naming the root cause (``cause``); a URI that goes into a message or a
record is ``redact``-ed first. The rules (store, artifacts, credentials) are in pipelines/CONTRACT.md.
"""
from __future__ import annotations

import base64
import logging
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipelines.errors import TrackingError

_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy stores: MLflow puts artifacts at ./mlruns
_STORE_LOGGERS = ("mlflow", "alembic", "sqlalchemy")


def project_root() -> Path:
    """The directory that holds mlflow.db and requirements.lock: env DVC_ROOT, else the cwd (absolute)."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else an sqlite store at the project root (the same from any cwd)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root().as_posix()}/mlflow.db"


def redact(uri: str) -> str:
    """The URI without a password (it goes into run.json and error messages)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.netloc.rsplit('@', 1)[1]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def cause(err: BaseException) -> str:
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
            raise TrackingError(f"MLflow tracking server at {redact(uri)} is unreachable: {reason}; "
                                "start it or unset MLFLOW_TRACKING_URI")
        _check_credentials(url[: -len("/health")], uri, timeout)
        return
    path = None
    if scheme == "sqlite":
        db = sqlite_path(uri)
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
            raise TrackingError(f"cannot write to the MLflow store {redact(uri)}: {reason}; make it a writable "
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
            raise TrackingError(f"MLflow server {redact(uri)} refused the credentials (HTTP 401): set "
                                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of the server") from None
        if err.code == 403:
            raise TrackingError(f"MLflow server {redact(uri)} does not let this user read experiments (HTTP 403): "
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
        return cause(err)
    return None


def sqlite_path(uri: str) -> Path | None:
    """The database file of an sqlite:/// URI (relative or, with four slashes, absolute), else None."""
    if not uri.lower().startswith("sqlite:///"):
        return None
    rest = urllib.parse.unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return Path(rest) if rest and rest != ":memory:" else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts in a database store: ``<root>/mlartifacts/<experiment>``,
    root being the sqlite file's directory (else the project root), so the same from any cwd (MLflow's
    default is ./mlruns of the cwd). None for a server or file store: it decides itself."""
    if uri.split(":", 1)[0].split("+", 1)[0].lower() not in _DB_SCHEMES:
        return None
    db = sqlite_path(uri)
    root = db.resolve().parent if db is not None else project_root()
    return (root / "mlartifacts" / experiment).as_uri()


def check_artifact_location(uri: str, experiment) -> None:
    """Refuse an experiment of a database store whose artifacts live outside the store's folder: its
    mlflow.db was copied from another checkout, whose mlartifacts/ would receive this one's artifacts."""
    expected = artifact_location(uri, experiment.name)
    location = experiment.artifact_location or ""
    if expected is None or not location.startswith("file:") or location == expected:
        return
    raise TrackingError(f"experiment {experiment.name!r} of {redact(uri)} keeps its artifacts in {location}, not "
                        f"beside that store ({expected}): the database was copied from another checkout; "
                        "use that checkout's store, or move this mlflow.db away to start a new one")


@contextmanager
def quiet():
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


@contextmanager
def _creating(uri: str):
    """For an sqlite store, an exclusive lock on its directory while MLflow opens it: runs started at once
    (a fan-out) would otherwise each migrate a new database, and all but one fail ("duplicate column
    name"). flock on the directory: no lock file to leave in the tree, and none of sqlite's own locks on
    the database file to disturb."""
    db = sqlite_path(uri)
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


def client(uri: str):
    """An MlflowClient of the store at ``uri``, opened now (a new store: migrated, under ``_creating``'s lock)."""
    from mlflow.tracking import MlflowClient  # imported late: mlflow takes a while to import

    with quiet(), _creating(uri):  # creating a store runs (and logs) its database migrations
        mlflow = MlflowClient(tracking_uri=uri)
        mlflow.search_experiments(max_results=1)  # opens (a new store: migrates) it now, under the lock
        return mlflow


def logged_metrics(run_id: str, uri: str | None = None, histories: tuple[str, ...] = ()) -> dict[str, Any]:
    """The latest value of each metric of an MLflow run (for the audit's cross-check with metrics.json); with
    ``histories``, those metrics' {step: value} instead."""
    uri = uri or tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # reading must not create an empty store (or its directories)
        raise TrackingError(f"no MLflow store at {db}; pass the store's URI or set MLFLOW_TRACKING_URI")
    if db is None:
        check_tracking_server(uri)
    try:
        with quiet():
            run = client(uri).get_run(run_id)
            found = {name: {m.step: m.value for m in client(uri).get_metric_history(run_id, name)}
                     for name in histories}
    except Exception as err:  # MlflowException and friends
        raise TrackingError(f"cannot read MLflow run {run_id} from {redact(uri)}: {cause(err)}; "
                            "check the run id and MLFLOW_TRACKING_URI") from None
    return {**{k: float(v) for k, v in run.data.metrics.items()}, **found}
