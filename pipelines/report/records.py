"""Run records (pipelines/CONTRACT.md): loading runs/<task>/<run>/ and checking a table's set of runs.

A record is read-only here: the report and the audit only look at what the training stages wrote.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

import yaml

from pipelines.errors import UserError
from pipelines.report import stats
from pipelines.tracking.record import RECORD_FILES


class ReportError(UserError):
    """A problem the user must fix (inconsistent or unreadable runs); reported in one line."""


class MissingRuns(ReportError):
    """A spec's runs are absent (all of them, a cell or some seeds): the report skips that spec and says in
    index.md what it ``needs``, what is ``missing`` and the command that ``make``s the runs."""

    def __init__(self, spec: str, needs: str, missing: str, make: str):
        self.spec, self.needs, self.missing, self.make = spec, needs, missing, make
        super().__init__(f"{spec}: {missing}; make them with `{make}`")


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (as provenance stores it)."""
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys: {"data": {"name": "boston"}} -> {"data.name": "boston"}.
    Lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


@dataclass(frozen=True, eq=False)  # compared and hashed by identity
class RunRecord:
    """One run directory: resolved config, final metrics, run metadata (run.json) and per-step history."""

    dir: str                    # as shown in reports and provenance (relative to the working directory)
    config: dict = field(repr=False)
    metrics: dict = field(repr=False)
    meta: dict = field(repr=False)
    path: Path = field(repr=False)

    @cached_property
    def flat(self) -> dict[str, Any]:
        return flatten(self.config)

    def get(self, key: str) -> Any:
        """A dotted config key; ReportError naming the run when it is absent."""
        if key not in self.flat:
            raise ReportError(f"{self.dir}/config.yaml has no key {key!r}")
        return self.flat[key]

    @property
    def profile(self) -> str:
        return str(self.flat.get("profile", self.meta.get("profile", "?")))

    @property
    def variant(self) -> str:
        """run.json's variant: "" for a preset's own run, e.g. "eps0.001" for a run off the preset."""
        return str(self.meta.get("variant") or "")

    @property
    def diverged_epoch(self) -> int | None:
        """The epoch a run kept as a diverged result stopped at (run.json "status": "diverged", metrics.json
        diverged_epoch: trainer.on_divergence=record); None for a finished run, as for every older record."""
        if self.meta.get("status") != "diverged":
            return None
        return int(self.metric("diverged_epoch"))

    def metric(self, name: str) -> float:
        """metrics.json's ``name``; ReportError naming the file if it is absent or not a finite number."""
        if name not in self.metrics:
            raise ReportError(f"{self.dir}/metrics.json has no metric {name!r} (has {sorted(self.metrics)})")
        value = self.metrics[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ReportError(f"{self.dir}/metrics.json: {name} is {json.dumps(value)}, not a finite number; "
                              f"rerun that run or remove it")
        return float(value)

    def latest(self, name: str) -> float:
        """The run's latest value of ``name``, as MLflow reports it: metrics.json's (final metrics win), else
        the last history.csv row's (a per-epoch metric such as GAL's remainder); ReportError if neither has it."""
        if name in self.metrics:
            return self.metric(name)
        columns, rows = self._table
        if rows and rows[-1].get(name) not in (None, ""):
            return self._number(rows[-1], name)
        raise ReportError(f"{self.dir} has no metric {name!r} in metrics.json nor a value in the last row of "
                          f"history.csv (columns: {', '.join(columns) or 'none'})")

    def at_best_epoch(self, best: dict) -> float:
        """history.csv's value at the run's best epoch by the rule ``best`` (stats.at_best_epoch)."""
        return stats.at_best_epoch(best, {c: self.series(c) for c in (best["by"], best["column"])})

    def series(self, column: str, x: str = "epoch") -> dict[float, float]:
        """history.csv's ``column`` against its ``x`` column, rows with an empty cell left out; ReportError
        naming the file if a column is absent or a value is not a finite number."""
        columns, rows = self._table
        for name in (x, column):
            if name not in columns:
                raise ReportError(f"{self.dir}/history.csv has no column {name!r} (has {', '.join(columns) or 'none'})")
        return {self._number(row, x): self._number(row, column) for row in rows if row[column] not in (None, "")}

    @property
    def columns(self) -> list[str]:
        """history.csv's column names."""
        return self._table[0]

    def _number(self, row: dict[str, str], column: str) -> float:
        try:
            value = float(row[column])
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ReportError(f"{self.dir}/history.csv: {column} is {row[column]!r} in the row of "
                              f"{next(iter(row))} {next(iter(row.values()))}, not a finite number; rerun that run "
                              f"or remove it")
        return value

    @cached_property
    def _table(self) -> tuple[list[str], list[dict[str, str]]]:
        """history.csv's columns and rows (cells as strings); read once."""
        with open(self.path / "history.csv", newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def summary(self) -> dict[str, Any]:
        """The run.json fields provenance keeps for this run."""
        keys = ("mlflow_run_id", "mlflow_experiment_id", "tracking_uri", "stage", "git_commit", "git_dirty",
                "data_checksums")
        return {key: self.meta.get(key) for key in keys}


def load_run(path: Path) -> RunRecord:
    """One run directory; ReportError if a file of the record is missing or unreadable."""
    missing = [name for name in RECORD_FILES if not (path / name).is_file()]
    if missing:
        raise ReportError(f"incomplete run record {display_path(path)}: no {', '.join(missing)}")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        metrics = json.loads((path / "metrics.json").read_text())
        meta = json.loads((path / "run.json").read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"unreadable run record {display_path(path)}: {str(err).splitlines()[0]}") from None
    for name, data in (("config.yaml", config), ("metrics.json", metrics), ("run.json", meta)):
        if not isinstance(data, dict):
            raise ReportError(f"unreadable run record {display_path(path)}: {name} holds a {type(data).__name__}, "
                              "not a mapping; rerun that run or remove it")
    return RunRecord(dir=display_path(path), config=config, metrics=metrics, meta=meta, path=path)


def load_task(runs_root: Path, task: str) -> list[RunRecord]:
    """Every run under runs_root/task, sorted by directory name; [] when there is none."""
    root = Path(runs_root) / task
    if not root.is_dir():
        return []
    return [load_run(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def check_one_profile(name: str, runs: Iterable[RunRecord], expected: str | None = None) -> str:
    """The single profile of ``runs``; ReportError if they mix profiles or differ from ``expected``."""
    by_profile: dict[str, list[str]] = {}
    for run in runs:
        by_profile.setdefault(run.profile, []).append(run.dir)
    if len(by_profile) > 1:
        parts = [f"{p} ({len(d)} runs, e.g. {d[0]})" for p, d in sorted(by_profile.items())]
        raise ReportError(f"{name}: runs come from mixed profiles: {'; '.join(parts)}; rerun the stale ones "
                          f"with one profile (dvc repro) or remove them")
    (profile,) = by_profile or ["?"]
    if expected is not None and profile != expected:
        raise ReportError(f"{name}: runs were made with profile {profile!r} but profile={expected} was "
                          f"asked for; rerun them with profile={expected} (dvc repro)")
    return profile
