"""What a spec hands back: rendered numbers with their provenance, a display layout, claims, files.

The seam between one table/figure (a spec, see pipelines/report/specs/) and everything generic (writing
md/csv/tex, index.md, claims, provenance.json, the audit):

    class MySpec:
        name = "Table I"        # heading, provenance key prefix, paper.yaml section
        slug = "table1"         # file stem under tables/ or figures/
        kind = "table"          # or "figure"
        def render(self, ctx: Context) -> Rendered: ...

``render`` takes its runs with ``pipelines.report.selection.select`` (which raises MissingRuns when they are
absent: the report then skips the spec and shows a Skipped note; ReportError when they are inconsistent: the
report refuses), and returns a Rendered. A figure spec also saves its image files under ``ctx.out``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipelines.report import records
from pipelines.report.records import RunRecord


@dataclass
class Number:
    """One rendered number and how to remake it: ``stats.compute(op, [[run.latest(metric) for run in g]
    for g in groups])`` equals ``value`` (``latest``: metrics.json's value, else history.csv's last row's)."""

    key: str                          # provenance key, e.g. "Table V/Boston/GAL/MAE/mean"
    value: float
    text: str                         # as rendered
    op: str                           # a pipelines.report.stats op
    metric: str                       # the run-record / MLflow metric it aggregates, e.g. test_mae
    groups: list[list[RunRecord]]
    aggregation: str                  # how it was made, in words
    paper: Any = None                 # the paper's value at the same key, if it reports one
    fields: dict[str, str] = field(default_factory=dict)  # CSV columns, e.g. dataset/method/metric/stat
    best_epoch: dict | None = None    # a run's value at its best epoch (stats.at_best_epoch), not its latest

    @property
    def runs(self) -> list[RunRecord]:
        return [run for group in self.groups for run in group]


@dataclass
class Layout:
    """A table as displayed: header and rows of strings (ours next to the paper's)."""

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Claim:
    """'GAL better than baseline on <subject>, <metric>' as the paper states it, checked against ours."""

    table: str
    subject: str                      # e.g. "Boston"
    metric: str                       # display name, e.g. "MAE"
    better: str                       # "lower" or "higher"
    paper: dict[str, Any]             # baseline, gal, t, p (None where the paper gives none)
    ours: dict[str, float]            # baseline, gal, t, p
    keys: list[str]                   # provenance keys of ours' numbers
    alpha: float = 0.05
    ttest_undefined: str = ""         # why our t-test is undefined (nan), as its table says it; "" where it is not

    @property
    def direction_reproduced(self) -> bool:
        base, gal = self.ours["baseline"], self.ours["gal"]
        return gal < base if self.better == "lower" else gal > base

    @property
    def significant(self) -> bool:
        p = self.ours.get("p", math.nan)
        return p is not None and not math.isnan(p) and p < self.alpha

    @property
    def verdict(self) -> str:
        if not self.direction_reproduced:
            return "not reproduced"
        return "reproduced" if self.significant else "direction only"


@dataclass
class Rendered:
    """A spec's result."""

    name: str
    slug: str
    kind: str                         # "table" or "figure"
    profile: str
    numbers: list[Number]
    markdown: str                     # the block index.md shows (a table, or an image and its numbers)
    layout: Layout | None = None      # tables: written as <slug>.md/.tex; numbers as <slug>.csv
    files: list[str] = field(default_factory=list)   # extra files the spec wrote under ctx.out (figures)
    claims: list[Claim] = field(default_factory=list)
    claims_notes: list[str] = field(default_factory=list)  # what the claims table's notes must say from here
    baselines: dict[str, str] = field(default_factory=dict)  # run dir -> its matching baseline run dir


@dataclass
class Skipped:
    """A spec not rendered because its runs are absent (records.MissingRuns): index.md says why."""

    name: str
    slug: str
    kind: str
    needs: str                        # the runs it needs, in words
    missing: str                      # which of them are missing
    make: str                         # the command that makes them, e.g. "dvc repro train_regression"


@dataclass
class Context:
    """What a spec gets: where the runs are, where to write, the profile asked for (None: any one)."""

    runs_root: Path
    out: Path
    profile: str | None = None
    _cache: dict[str, list[RunRecord]] = field(default_factory=dict)

    def runs(self, task: str) -> list[RunRecord]:
        if task not in self._cache:
            self._cache[task] = records.load_task(self.runs_root, task)
        return self._cache[task]

    def task_dir(self, task: str) -> str:
        return records.display_path(self.runs_root / task)


class Spec(Protocol):
    name: str
    slug: str
    kind: str

    def render(self, ctx: Context) -> Rendered: ...
