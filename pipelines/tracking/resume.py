"""The one resume decision: may a checkpoint be continued, and may a RunTracker state be?

    config = plain_container(cfg)                 # the resolved config the run records (trainer.* included)
    saved = checkpoint.load(path)                 # {"epoch", "config_sha", "config", "task", "tracker", "final"}
    decision = decide(saved, config, epochs,      # Resume(resume, start_epoch, reason, finish)
                      recorded=recorded_run_id(record_dir))
    print(f"{name}: {decision.reason}")
    ...
    checkpoint.save({"epoch": epoch, "config_sha": config_digest(config), "config": config, ...}, path)

RunTracker(..., resume=state) applies the same rule with ``config_digest`` (``config_changes``), and checks the
rest of the state with ``check_state`` and ``changed_since``. The rule: pipelines/CONTRACT.md (Resume).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipelines.tracking.record import PARAM_VALUE_MAX, dotted, plain_container, to_params
from pipelines.errors import TrackingError

STATE_VERSION = 4  # of RunTracker.state() (2: variant, git diff; 3: config_sha256 is config_digest; 4: the
# history lives in the run's journal, the state holds its row count)
_STATE_KEYS = {"version": int, "task": str, "run_name": str, "step_name": str, "variant": str, "mlflow_run_id": str,
               "mlflow_experiment_id": str, "tracking_uri": str, "config_sha256": str, "columns": list,
               "history_rows": int, "final": dict, "last_step": int, "last_ts": int, "pending": list, "record": dict}
SHOWN_KEYS = 5  # differing config keys a message names


@dataclass(frozen=True)
class Resume:
    """What to do with a checkpoint: resume at ``start_epoch``, start over at 1, or (``finish``) write the
    record of the finished run it holds without training; ``reason``: one line."""
    resume: bool
    start_epoch: int
    reason: str
    finish: bool = False


def recorded_run_id(record_dir: Path) -> str | None:
    """The MLflow run id of the run record in ``record_dir`` (runs/<task>/<name>), None without a readable one."""
    try:
        return json.loads((Path(record_dir) / "run.json").read_text())["mlflow_run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def config_digest(config: Mapping) -> str:
    """sha256 of the whole resolved config (JSON, sorted keys): what a checkpoint must match to be resumed."""
    plain = config if isinstance(config, dict) else plain_container(config)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def decide(saved: Mapping | None, config: Mapping, epochs: int, where: str = "the checkpoint",
           recorded: str | None = None) -> Resume:
    """Resume the checkpoint ``saved`` ({"epoch", "config_sha", optional "config", "tracker", "final", ...}, or
    None) of a run of ``config`` with ``epochs`` epochs, finish it, or start over; ``recorded`` is the MLflow run
    id of the run's record on disk. TrackingError for an unfinished checkpoint of another config (``where``
    names it in the message). The rule: pipelines/CONTRACT.md (Resume)."""
    if saved is None:
        return Resume(False, 1, "no checkpoint")
    epoch = int(saved["epoch"])
    tracker = saved.get("tracker")
    if (epoch == epochs and saved.get("final") is not None and saved.get("config_sha") == config_digest(config)
            and isinstance(tracker, Mapping) and tracker.get("mlflow_run_id") != recorded):
        return Resume(False, epoch + 1, "holds a finished run whose record was never written", finish=True)
    if epoch >= epochs:
        return Resume(False, 1, "holds a finished run")
    if saved.get("config_sha") != config_digest(config):
        raise TrackingError(f"cannot resume: the config differs from the checkpoint's ({_differing(saved.get('config'), config)}); "
                            f"run it with the checkpoint's config, or delete {where} to start the run over")
    return Resume(True, epoch + 1, f"resuming after epoch {epoch}")


def _differing(old: Any, config: Mapping) -> str:
    """The differing keys when the checkpoint kept its config, else what can be said."""
    if not isinstance(old, Mapping):
        return "the checkpoint keeps no config to compare"
    a, b = dotted(old), dotted(config if isinstance(config, dict) else plain_container(config))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return _list(keys) if keys else "in a value's type"


def _list(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")


# ------------------------------------------------------------------------------ RunTracker's resume state
def check_state(state: Any, task: str, run_name: str, step_name: str, variant: str) -> dict:
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


def config_changes(config: Mapping, logged_params: Mapping[str, str], digest: str) -> str | None:
    """None when ``config`` is the one whose ``config_digest`` is ``digest`` (the state's); else what differs:
    the params that differ from the MLflow run's ``logged_params``, or where the params cannot show it."""
    params = dict(to_params(config))
    changed = sorted(k for k in params.keys() | logged_params.keys() if params.get(k) != logged_params.get(k))
    if changed:
        return _list(changed)
    if config_digest(config) != digest:
        return f"past the {PARAM_VALUE_MAX} characters MLflow keeps, or in a value's type"
    return None


def changed_since(record: Mapping, *, commit: str, diff: bytes, checksums: Mapping[str, str], lock_sha: str,
                  profile: str) -> list[str]:
    """What of the code, data and environment changed since the state's run ``record`` was made (names for a
    message, e.g. ["git diff", "env lock"]). The diff is of tracked files only: an untracked file made or
    removed meanwhile is no other version of the code the run imported."""
    empty = hashlib.sha256(b"").hexdigest()
    now = {"git commit": commit, "git diff": hashlib.sha256(diff).hexdigest(), "data checksums": dict(checksums),
           "env lock": lock_sha, "profile": profile}
    then = {"git commit": record["git_commit"], "git diff": record["git_diff_sha256"] or empty,
            "data checksums": record["data_checksums"], "env lock": record["env_lock_sha256"],
            "profile": record["profile"]}
    return [k for k in now if now[k] != then[k]]
