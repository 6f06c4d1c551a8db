"""One training run: `python -m pipelines.train task=regression data=boston method=gal seed=0 profile=smoke`.

Hydra composes pipelines/conf/train.yaml with the overrides; the task module named by `task.name` in
pipelines/tasks/ does the work and records the run through pipelines.tracking.
"""
from __future__ import annotations

import importlib
import sys

import hydra
from omegaconf import DictConfig

from pipelines.tasks import RunError
from pipelines.tracking import TrackingError


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    task = importlib.import_module(f"pipelines.tasks.{cfg.task.name}")
    try:
        task.run(cfg)
    except (RunError, TrackingError) as err:
        print(f"train {cfg.task.name}: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
