"""One training run: `python -m pipelines.train task=regression data=boston method=gal seed=0 profile=smoke`.

Hydra composes pipelines/conf/train.yaml with the overrides; the task module named by `task.name` in
pipelines/tasks/ does the work and records the run through pipelines.tracking.
"""
from __future__ import annotations

import importlib
import sys

import hydra
from omegaconf import DictConfig

from pipelines.errors import run_cli


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    task = importlib.import_module(f"pipelines.tasks.{cfg.task.name}")
    sys.exit(run_cli(f"train {cfg.task.name}", lambda: task.run(cfg)))


if __name__ == "__main__":
    main()
