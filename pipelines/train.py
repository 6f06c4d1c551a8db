"""One training run: `python -m pipelines.train experiment=boston_gal seed=0 profile=smoke [key=value ...]`.

Hydra composes pipelines/conf/train.yaml with the overrides (pipelines/config.py); the task named by
`task.name` (pipelines/tasks/<name>/task.py) runs it on the shared runtime (pipelines/training/runner.py),
which records it through pipelines/tracking/.
"""
from __future__ import annotations

import importlib

from omegaconf import DictConfig

from pipelines.config import hydra_main
from pipelines.errors import run_cli


def run(cfg: DictConfig) -> int:
    task = importlib.import_module(f"pipelines.tasks.{cfg.task.name}.task")
    return run_cli(f"train {cfg.task.name}", lambda: task.run(cfg),
                   interrupted="its MLflow run is KILLED and its last checkpoint kept: rerun the same command to "
                               "resume")


if __name__ == "__main__":
    hydra_main("train", "train", run)
