"""provenance.json: for every rendered number, its value, how it was aggregated, the runs behind it (run
dirs, MLflow run ids, git commits) and the `dvc repro` targets that remake them. The audit reads it.

    {"profiles": {"Table V": "smoke", ...},
     "numbers": {"Table V/Boston/GAL/MAE/mean": {
         "value", "text", "paper", "aggregation", "op", "metric",
         "groups": [[run dir, ...], ...],            # op's inputs (t and p: [baseline runs, GAL runs])
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


def _clean(value: Any) -> Any:
    """JSON has no nan or inf: nan is stored as null (the entry's text still says nan), an infinity as the string
    "inf" or "-inf" (a t-test of two groups without variance; float() reads it back)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value) if isinstance(value, float) and math.isinf(value) else value


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
