"""One training run: `python -m pipelines.train experiment=boston_gal seed=0 profile=smoke [key=value ...]`.

Hydra composes pipelines/conf/train.yaml with the overrides (pipelines/config.py); the task named by
`task.name` (pipelines/tasks/<name>/task.py) runs it on the shared runtime (pipelines/training/runner.py),
which records it through pipelines/tracking/. Under GAL_WARM the run starts in a warm server's fork
(pipelines/warm.py) when the server's code is this one: before anything heavy is imported here.
"""
from __future__ import annotations

if __name__ == "__main__":
    from pipelines.warm import run_served

    run_served("pipelines.train")  # exits when served; returns to run cold

import importlib  # noqa: E402  (after the warm hand-off, which must not pay for these)

from omegaconf import DictConfig  # noqa: E402

from pipelines.config import hydra_main  # noqa: E402
from pipelines.errors import run_cli  # noqa: E402


def run(cfg: DictConfig) -> int:
    task = importlib.import_module(f"pipelines.tasks.{cfg.task.name}.task")
    return run_cli(f"train {cfg.task.name}", lambda: task.run(cfg),
                   interrupted="its MLflow run is KILLED and its last checkpoint kept: rerun the same command to "
                               "resume")


if __name__ == "__main__":
    hydra_main("train", "train", run)
