"""The MLflow run lifecycle: one ``with RunTracker(...)`` block is one MLflow run and, on success, one run record.

    with RunTracker("regression", "boston-gal-s0", cfg, profile="smoke", journal=ckpt_dir / "history.jsonl",
                    data_files=[Path("data/processed/boston.npz")], resume=ckpt.get("tracker")) as tracker:
        for epoch in range(start, epochs + 1):
            tracker.log_epoch(epoch, {"train_loss": loss, "val_mae": mae})  # or log_diverged(epoch, row): the end
            torch.save({..., "tracker": tracker.state()}, ckpt_path)        # plain JSON types
        tracker.log_final({"test_mae": mae, "test_mse": mse})

Leaving the block writes the record atomically and ends the MLflow run FINISHED (FAILED when it diverged);
an exception ends it FAILED (KILLED for an interruption: SIGTERM, Ctrl-C), writes nothing and propagates.
A resumable run names a ``journal`` file (beside its checkpoint): each history row is appended there, and
``state()`` holds only the row count, so a checkpoint's size does not grow with the epochs. ``exclusive``
says the caller holds the run's lock (pipelines/training/checkpoint.py): another RUNNING MLflow run of this
name from the same root was then left by a process that is gone, and is closed KILLED. ``variant`` names a
run off its preset, ``tags`` are more MLflow tags (set again on resume), ``source`` the entry point, and
``system_metrics`` turns on MLflow's system/* sampler. Epoch metrics are buffered and sent in batches (at the
latest on the first log_epoch FLUSH_SECONDS after the previous send, and at the end). What is recorded and
logged, and when a resume is refused: pipelines/CONTRACT.md (Run records, MLflow, Resume).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines.atomic import replace_dir, temp_dir_beside, write_atomic
from pipelines.tracking import provenance, record, store
from pipelines.tracking import resume as _resume  # RunTracker's argument resume is the state
from pipelines.errors import TrackingError
from pipelines.tracking.store import redact

PARAM_BATCH = 100  # MLflow's log_batch limit for params
METRIC_BATCH = 1000  # MLflow's log_batch limit for metrics
ROOT_TAG = "run_root_id"  # the tag naming the root a run belongs to (RunTracker.root_id)
FLUSH_SECONDS = 5.0  # log_epoch sends the buffered metrics once this long has passed since the last send

# The "View run ... at: http://..." line MLflow prints to stdout when a run ends on a server.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class RunTracker:
    """One tracked run: an MLflow run plus, on success, its record under runs/<task>/<run_name>/."""

    def __init__(self, task: str, run_name: str, config: Mapping, *, profile: str,
                 data_files: Sequence[Path] = (), runs_root: Path = Path("runs"), stage: str | None = None,
                 step_name: str = "epoch", variant: str = "", resume: Mapping | None = None,
                 tags: Mapping[str, str] | None = None, source: str | None = None, system_metrics: bool = False,
                 journal: Path | None = None, exclusive: bool = False):
        for what, value in (("task", task), ("run_name", run_name)):
            if not value or "/" in value or "\\" in value or value in (".", "..") or value.startswith("."):
                raise TrackingError(f"bad {what} {value!r}: use a plain name such as 'regression' or 'boston-gal-s0'")
        self.task, self.run_name, self.profile, self.step_name = task, run_name, str(profile), step_name
        self.variant = str(variant)
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}  # where it ran (a job's id and nodes)
        self.source = source or Path(sys.argv[0]).name  # mlflow.source.name: the entry point
        self.system_metrics = system_metrics
        self._monitor = None  # MLflow's system metrics sampler, while the block runs
        self.config = record.plain_container(config)
        self.data_files = [Path(p) for p in data_files]
        self.runs_root = Path(runs_root)
        self.stage = stage or os.environ.get("DVC_STAGE") or "manual"
        self.run_dir = self.runs_root / task / run_name
        self.journal = None if journal is None else Path(journal)
        self.exclusive = exclusive
        # which root's runs these are (a digest of its absolute path): orphans are closed only among them
        self.root_id = hashlib.sha256(str(self.runs_root.resolve()).encode()).hexdigest()[:16]
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
        self._journal = None  # the journal's open file, while the block runs
        self._diff: bytes | None = None  # a dirty tree's git diff (None: clean or outside git)
        self._active = False  # inside the with block
        self._unreachable = False  # a flush failed: do not wait on MLflow's retries again while failing
        self._resume = (_resume.check_state(resume, task, run_name, step_name, self.variant)
                        if resume is not None else None)
        self._config_sha = _resume.config_digest(self.config)

    # ---------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "RunTracker":
        from mlflow.entities import Param

        if self.run_id is not None:
            raise TrackingError(f"RunTracker {self.task}/{self.run_name} was already used; make a new one per run")
        root = store.project_root()
        self.uri = store.tracking_uri()
        store.check_tracking_server(self.uri)
        checksums, lock_sha, commit, dirty, diff, untracked = _made_from(root, self.data_files, self.runs_root)
        if self._resume is not None:
            self._enter_resumed(checksums, lock_sha, commit, diff or b"")
            self._start_monitor(resumed=True)
            self._active = True
            return self
        diff_sha = None if diff is None else hashlib.sha256(diff).hexdigest()
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        tags = {"git_commit": commit, "git_dirty": {True: "true", False: "false", None: "unknown"}[dirty],
                "dvc_stage": self.stage, "profile": self.profile, "variant": self.variant,
                "env_lock_sha256": lock_sha, ROOT_TAG: self.root_id}
        if diff_sha is not None:
            tags["git_diff_sha256"] = diff_sha
        tags.update({record.mlflow_key(f"data.{path}"): value for path, value in checksums.items()})
        tags.update(self.tags)
        tags.update(provenance.source_tags(root, commit, self.source))
        try:
            self._client = store.client(self.uri)
            with store.quiet():
                self.experiment_id = self._experiment()
                self._close_orphans(keep=None)
                run = self._client.create_run(self.experiment_id, run_name=self.run_name,
                                              tags={k: str(v) for k, v in tags.items()})
        except TrackingError:
            raise
        except Exception as err:
            raise TrackingError(f"cannot start an MLflow run in {redact(self.uri)}: {store.cause(err)}; "
                                "check MLFLOW_TRACKING_URI and the store") from None
        self.run_id = run.info.run_id
        self._diff = diff
        if self.journal is not None:
            self._rewrite_journal([])
        self._record = {"task": self.task, "run_name": self.run_name, "variant": self.variant,
                        "mlflow_run_id": self.run_id, "mlflow_experiment_id": self.experiment_id,
                        "tracking_uri": redact(self.uri), "stage": self.stage, "git_commit": commit,
                        "git_dirty": dirty, "git_diff_sha256": diff_sha,
                        "git_untracked": [] if dirty is False else untracked, "profile": self.profile,
                        "data_checksums": checksums, "env_lock_sha256": lock_sha, "created": created}
        what = "config"
        try:
            params = [Param(k, v) for k, v in record.to_params(self.config)]
            with store.quiet():
                for i in range(0, len(params), PARAM_BATCH):
                    self._client.log_batch(self.run_id, params=params[i:i + PARAM_BATCH], synchronous=True)
                what = "datasets"
                if checksums:
                    self._client.log_inputs(self.run_id, provenance.dataset_inputs(checksums))
                if diff is not None:  # with the run from its start: a failed run says what code it ran too
                    what = "git diff"
                    with tempfile.TemporaryDirectory() as tmp:
                        record.write_git_changes(Path(tmp), diff, self._record["git_untracked"])
                        self._client.log_artifacts(self.run_id, tmp, record.PROVENANCE_DIR)
        except Exception as err:
            self._terminate("FAILED")
            raise TrackingError(f"cannot log the {what} of run {self.run_name} to MLflow: {store.cause(err)}; "
                                "check the store") from None
        self._start_monitor(resumed=False)
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._active:
            return False
        self._active = False
        self._stop_monitor()
        if self._journal is not None:
            self._journal.close()
        if exc_type is not None:
            self._fail("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
            return False
        tmp = None
        try:
            self._flush()
            tmp = temp_dir_beside(self.run_dir)
            self._write(tmp)
            self._log_record(tmp)
            status = "FINISHED" if self._diverged is None else "FAILED"
            with store.quiet():  # before publishing: a record means a FINISHED run (or a diverged, FAILED one)
                self._client.set_terminated(self.run_id, status)
            replace_dir(tmp, self.run_dir)  # an old record is replaced, or kept if this fails
            tmp = None
        except BaseException as err:
            self._fail("FAILED")
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, Exception) and not isinstance(err, TrackingError):
                raise TrackingError(f"cannot finish run {self.task}/{self.run_name}: {store.cause(err)}; "
                                    f"check that {self.run_dir.parent} is writable and the MLflow store "
                                    "is reachable") from err
            raise
        return False

    def _enter_resumed(self, checksums: dict[str, str], lock_sha: str, commit: str, diff: bytes) -> None:
        """Continue the state's MLflow run: check it all first, then set it RUNNING and restore."""
        from mlflow.entities import Metric

        state = self._resume
        saved = state["record"]
        redo = "delete the checkpoint to start the run over"
        if redact(self.uri) != state["tracking_uri"]:
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: its MLflow run is in "
                                f"{state['tracking_uri']}, not in {redact(self.uri)}; set MLFLOW_TRACKING_URI "
                                f"back or {redo}")
        run_id = state["mlflow_run_id"]
        try:
            self._client = store.client(self.uri)
            with store.quiet():
                run = self._client.get_run(run_id)
        except Exception as err:
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: MLflow run {run_id} is not in "
                                f"{redact(self.uri)} ({store.cause(err)}); {redo}") from None
        if (run.info.lifecycle_stage != "active" or run.info.experiment_id != state["mlflow_experiment_id"]
                or run.info.run_name != self.run_name):
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: MLflow run {run_id} is deleted "
                                f"or not this run; {redo}")
        what = _resume.config_changes(self.config, run.data.params, state["config_sha256"])
        if what is not None:
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: the config differs from the "
                                f"checkpoint's ({what}); a resumed run must have the same config: restore it "
                                f"or {redo}")
        changed = _resume.changed_since(saved, commit=commit, diff=diff, checksums=checksums, lock_sha=lock_sha,
                                        profile=self.profile)
        if changed:
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: the {' and '.join(changed)} "
                                f"changed since the checkpoint, so a resume would mix two versions; restore "
                                f"them or {redo}")
        history = self._read_journal(state["history_rows"], redo)
        try:
            columns = dict.fromkeys(str(c) for c in state["columns"])
            final = {str(k): float(v) for k, v in state["final"].items()}
            pending = [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in state["pending"]]
        except (TypeError, ValueError, AttributeError):
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: the resume state is damaged; "
                                f"{redo}") from None
        try:
            self.experiment_id = state["mlflow_experiment_id"]
            with store.quiet():
                self._close_orphans(keep=run_id)
                self._client.update_run(run_id, status="RUNNING")
                for key, value in self.tags.items():  # a requeued or resubmitted job: where it runs now
                    self._client.set_tag(run_id, key, value, synchronous=True)
        except Exception as err:
            raise TrackingError(f"cannot resume MLflow run {run_id} in {redact(self.uri)}: {store.cause(err)}; "
                                "check the store") from None
        self.run_id, self.experiment_id = run_id, state["mlflow_experiment_id"]
        self._history, self._columns, self._final, self._pending = history, columns, final, pending
        self._last_step, self._last_ts = state["last_step"], state["last_ts"]
        self._record = json.loads(json.dumps(saved))
        self._diff = None if saved["git_diff_sha256"] is None else diff  # the same as the start's (checked)

    def state(self) -> dict:
        """What ``RunTracker(..., resume=state)`` needs to continue this run: plain JSON types only (a copy)."""
        self._require_active()
        if self.journal is None:
            raise TrackingError(f"RunTracker {self.task}/{self.run_name} has no journal: pass journal=<file beside "
                                "the checkpoint> to make it resumable")
        self._journal_file().flush()
        os.fsync(self._journal_file().fileno())  # every row the checkpoint counts is on disk before it
        # Metrics not sent yet travel in the state (sent on resume; MLflow drops exact duplicates), so a
        # checkpoint costs no request and a SIGKILL loses nothing the checkpoint covers.
        pending = [[m.key, m.value, m.timestamp, m.step] for m in self._pending]
        return json.loads(json.dumps({
            "version": _resume.STATE_VERSION, "task": self.task, "run_name": self.run_name,
            "step_name": self.step_name, "variant": self.variant, "mlflow_run_id": self.run_id,
            "mlflow_experiment_id": self.experiment_id, "tracking_uri": redact(self.uri),
            "config_sha256": self._config_sha, "columns": list(self._columns),
            "history_rows": len(self._history), "final": self._final,
            "last_step": self._last_step, "last_ts": self._last_ts, "pending": pending, "record": self._record}))

    # ---------------------------------------------------------------------------------- logging
    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        """One history row (and MLflow metrics at ``step``); a NaN/inf value raises TrackingError."""
        self._require_logging()
        values = record.finite_metrics(metrics, f"at {self.step_name} {step}")
        step = int(step)
        for name in values:
            self._columns.setdefault(name, None)
        row = {str(k): record.csv_cell(raw, values[str(k)]) for k, raw in metrics.items()}
        self._history.append((step, row))
        if self.journal is not None:
            self._journal_file().write(json.dumps([step, row]) + "\n")
        self._last_step = step
        self._queue(values, step)
        if len(self._pending) >= METRIC_BATCH or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self._flush()

    def log_final(self, metrics: Mapping[str, float]) -> None:
        """Final metrics: metrics.json and MLflow metrics under their own names (they win over any
        same-named epoch metric as the run's latest value)."""
        self._require_logging()
        values = record.finite_metrics(metrics, "in the final metrics")
        self._final.update(values)
        self._queue(values, self._last_step)
        self._flush()

    def log_diverged(self, step: int, metrics: Mapping[str, Any]) -> tuple[str, float]:
        """End the logging at ``step``, whose row ``metrics`` holds a NaN/inf: the run diverged there, and that
        is its result (pipelines/CONTRACT.md, Run records). The row itself is not logged. Returns the offending
        metric's (name, value); TrackingError if every value is finite."""
        from mlflow.entities import RunTag

        self._require_logging()
        found = record.first_nonfinite(metrics)
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
            with store.quiet():
                self._client.log_batch(self.run_id, tags=tags, synchronous=True)
        except Exception as err:
            self._unreachable = True
            raise TrackingError(f"cannot tag run {self.run_name} in MLflow at {redact(self.uri)}: "
                                f"{store.cause(err)}; check that the tracking server is up") from None
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

    def _journal_file(self):
        if self._journal is None:
            self._journal = open(self.journal, "a", encoding="utf-8")
        return self._journal

    def _rewrite_journal(self, rows: list) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.journal, "".join(json.dumps([step, row]) + "\n" for step, row in rows))

    def _read_journal(self, rows: int, redo: str) -> list[tuple[int, dict[str, str]]]:
        """The first ``rows`` rows of the journal (rows past them are of epochs no checkpoint holds: dropped)."""
        try:
            lines = self.journal.read_text(encoding="utf-8").splitlines()[:rows] if self.journal else []
            history = [(int(step), {str(k): str(v) for k, v in values.items()})
                       for step, values in map(json.loads, lines)]
        except (OSError, ValueError, TypeError, AttributeError):
            history = []
        if len(history) != rows:
            raise TrackingError(f"cannot resume run {self.task}/{self.run_name}: its history journal "
                                f"{self.journal} lacks rows the checkpoint counts; {redo}")
        self._rewrite_journal(history)
        return history

    def _close_orphans(self, keep: str | None) -> None:
        """End KILLED every other RUNNING MLflow run of this name from this root: with the run's lock held
        (``exclusive``), no live process owns them; a kill -9 or a deleted checkpoint left them."""
        if not self.exclusive or "'" in self.run_name:
            return
        orphans = self._client.search_runs(
            [self.experiment_id], max_results=100,
            filter_string=f"attributes.run_name = '{self.run_name}' AND attributes.status = 'RUNNING' "
                          f"AND tags.{ROOT_TAG} = '{self.root_id}'")
        for run in orphans:
            if run.info.run_id != keep:
                self._client.set_terminated(run.info.run_id, "KILLED")
                print(f"{self.run_name}: closed MLflow run {run.info.run_id} as KILLED: it was left RUNNING by "
                      "a process that is gone", flush=True)

    def _experiment(self) -> str:
        client = self._client
        exp = client.get_experiment_by_name(self.task)
        if exp is None:
            try:  # the kind tag opens it in the UI's model-training view (MLflow 3 guesses GenAI otherwise)
                return client.create_experiment(self.task, store.artifact_location(self.uri, self.task),
                                                tags={"mlflow.experimentKind": "custom_model_development"})
            except Exception:  # another process created it meanwhile
                exp = client.get_experiment_by_name(self.task)
                if exp is None:
                    raise
        store.check_artifact_location(self.uri, exp)
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _queue(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = max(_now_ms(), self._last_ts + 1)  # strictly increasing: the last logged value is the latest
        self._last_ts = ts
        self._pending.extend(Metric(record.mlflow_key(k), v, ts, step) for k, v in values.items())

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        try:
            with store.quiet():
                for i in range(0, len(pending), METRIC_BATCH):
                    self._client.log_batch(self.run_id, metrics=pending[i:i + METRIC_BATCH], synchronous=True)
        except Exception as err:
            self._unreachable = True
            raise TrackingError(f"cannot log metrics of run {self.run_name} to MLflow at {redact(self.uri)}: "
                                f"{store.cause(err)}; check that the tracking server is up") from None

    def _terminate(self, status: str) -> None:
        try:
            with store.quiet():
                self._client.set_terminated(self.run_id, status)
        except Exception as err:  # never hide the exception that ended the run
            logging.getLogger(__name__).warning("could not mark MLflow run %s %s: %s", self.run_id, status,
                                                store.cause(err))

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
        meta = self._record if self._diverged is None else {
            **self._record, "status": "diverged", "diverged_metric": self._diverged["metric"]}
        record.write(tmp, config=self.config, step_name=self.step_name, columns=self._columns,
                     history=self._history, final=self._final, meta=meta, diff=self._diff)

    def _log_record(self, directory: Path) -> None:
        """The record's files as the run's MLflow artifacts (record/). No picture of the curves: MLflow's run
        page charts every per-epoch metric itself, and drawing one cost each run half a second of imports."""
        with store.quiet():
            for name in record.RECORD_FILES:
                self._client.log_artifact(self.run_id, str(directory / name), record.RECORD_DIR)

    def _start_monitor(self, resumed: bool) -> None:
        """MLflow's own sampler of CPU, memory, disk, network and (with NVML) GPU use: system/* metrics."""
        if not self.system_metrics:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        with store.quiet():
            # every 10 s unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise
            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.uri)
            self._monitor.start()

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            with store.quiet():
                self._monitor.finish()
            self._monitor = None


def _made_from(root: Path, data_files: Sequence[Path], runs_root: Path) -> tuple:
    """(data checksums, env lock sha256, commit, dirty, diff, untracked) of the checkout now, as a run records
    what it was made from; diff and untracked are None for a clean tree."""
    checksums = {provenance.display_path(p, root): provenance.data_checksum(p) for p in data_files}
    lock_sha = provenance.env_lock_sha(root)
    commit, dirty = provenance.git_state(root, exclude=[runs_root])
    diff, untracked = provenance.git_changes(root, exclude=[runs_root]) if dirty else (None, None)
    return checksums, lock_sha, commit, dirty, diff, untracked


def changed_since_state(state: Mapping, data_files: Sequence[Path], profile: str, runs_root: Path) -> list[str]:
    """What of the code, data and environment differs now from what the run of resume ``state`` was made with
    (resume.changed_since's names; a data file that cannot be read counts as changed data)."""
    try:
        checksums, lock_sha, commit, _, diff, _ = _made_from(store.project_root(), data_files, runs_root)
    except OSError:
        return ["data checksums"]
    return _resume.changed_since(state["record"], commit=commit, diff=diff or b"", checksums=checksums,
                                 lock_sha=lock_sha, profile=profile)


def _now_ms() -> int:
    return int(time.time() * 1000)
