"""provenance.json: for every rendered number, its value, how it was aggregated, the runs behind it (run
dirs, MLflow run ids, git commits) and the `dvc repro` targets that remake them. The audit reads it.

Runs of one cell (a group of runs aggregated into one number) must share their data (selection refuses them
otherwise) but may come from different git commits: ``commits`` lists each group's commits, and
``mixed_commit_cells`` names the cells of more than one commit, which the report flags under its table.

    {"profiles": {"Table V": "smoke", ...},
     "numbers": {"Table V/Boston/GAL/MAE/mean": {
         "value", "text", "paper", "aggregation", "op", "metric",
         "groups": [[run dir, ...], ...],            # op's inputs (t and p: [baseline runs, GAL runs])
         "commits": [[git commit, ...], ...],        # each group's distinct git commits (more than one: flagged)
         "runs": [{"dir", "mlflow_run_id", "git_commit", "git_dirty", "stage"}, ...],
         "dvc_repro": [stage, ...],                  # `dvc repro <stage>` remakes each run
         "files": [file, ...],                       # where the number is rendered
         "best_epoch": {"by", "better", "column", "complement"}},  # only for a value at each run's best epoch
       ...},
     "runs": {run dir: {"mlflow_run_id", "mlflow_experiment_id", "tracking_uri", "stage", "git_commit",
                        "git_dirty", "data_checksums", "baseline": matching baseline run dir or null}}}
"""
from __future__ import annotations

import json
import math
from typing import Any

from pipelines.report.model import Rendered
from pipelines.report.records import RunRecord


def _clean(value: Any) -> Any:
    """JSON has no nan or inf: nan is stored as null (the entry's text still says nan), an infinity as the string
    "inf" or "-inf" (a t-test of two groups without variance; float() reads it back)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value) if isinstance(value, float) and math.isinf(value) else value


def commits(runs: list[RunRecord]) -> list[str]:
    """The distinct git commits of ``runs`` (run.json's git_commit; "unknown" where none is recorded)."""
    return list(dict.fromkeys(str(run.meta.get("git_commit") or "unknown") for run in runs))


def mixed_commit_cells(item: Rendered) -> list[tuple[str, list[str]]]:
    """(cell, its commits) for every group of runs aggregated into one of ``item``'s numbers that comes from
    more than one git commit, in order; a cell is named by its number's fields (e.g. "Boston / GAL", metric
    and statistic aside), else by its provenance key."""
    labels: dict[tuple[str, ...], str] = {}
    for single in (True, False):  # a cell's own numbers name it before a t-test that pairs it with another
        for number in item.numbers:
            if (len(number.groups) == 1) != single:
                continue
            for i, group in enumerate(number.groups):
                cell = tuple(run.dir for run in group)
                if cell in labels or len(commits(group)) < 2:
                    continue
                shown = [str(v) for k, v in number.fields.items() if k not in ("metric", "stat") and v != ""]
                labels[cell] = " / ".join(shown) if single and shown else \
                    "/".join(number.key.split("/")[1:-1]) + (f" (group {i + 1})" if not single else "")
    runs = {run.dir: run for number in item.numbers for run in number.runs}
    return [(label, commits([runs[d] for d in cell])) for cell, label in labels.items()]


def commits_note(cells: list[tuple[str, list[str]]]) -> str:
    """The note under a table (or figure) with cells from more than one git commit."""
    shown = "; ".join(f"{label} ({len(c)} commits: {', '.join(x[:7] for x in c)})" for label, c in cells)
    return (f"runs from more than one git commit averaged in one cell: {shown}; their data are the same, their "
            "code may differ (provenance.json lists each number's commits)")


def build(rendered: list[Rendered], files: dict[str, list[str]]) -> dict[str, Any]:
    """``files``: spec name -> the output files its numbers appear in."""
    numbers: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    for item in rendered:
        for number in item.numbers:
            if number.key in numbers:
                raise ValueError(f"two rendered numbers share the provenance key {number.key!r}")
            stages = []
            for run in number.runs:
                stage = run.meta.get("stage")
                if stage and stage not in stages:
                    stages.append(stage)
                runs.setdefault(run.dir, {**run.summary(), "baseline": item.baselines.get(run.dir)})
            numbers[number.key] = {
                "value": _clean(number.value),
                "text": number.text,
                "paper": number.paper,
                "aggregation": number.aggregation,
                "op": number.op,
                "metric": number.metric,
                "groups": [[run.dir for run in group] for group in number.groups],
                "commits": [commits(group) for group in number.groups],
                "runs": [{"dir": run.dir, "mlflow_run_id": run.meta.get("mlflow_run_id"),
                          "git_commit": run.meta.get("git_commit"), "git_dirty": run.meta.get("git_dirty"),
                          "stage": run.meta.get("stage")} for run in number.runs],
                "dvc_repro": stages,
                "files": files.get(item.name, []),
            }
            if number.best_epoch is not None:
                numbers[number.key]["best_epoch"] = number.best_epoch
    return {"profiles": {item.name: item.profile for item in rendered}, "numbers": numbers,
            "runs": dict(sorted(runs.items()))}


def dumps(provenance: dict[str, Any]) -> str:
    return json.dumps(provenance, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
