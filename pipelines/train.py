"""One training run: `python -m pipelines.train experiment=boston_gal seed=0 profile=smoke [key=value ...]`.

Hydra composes pipelines/conf/train.yaml with the overrides; the task module named by `task.name` in
pipelines/tasks/<name>/task.py runs it on the shared runner (pipelines/training/runner.py) and records it through
pipelines.tracking.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipelines.errors import ConfigError, report, run_cli

CONF = Path(__file__).resolve().parent / "conf"


def compose(argv: list[str]) -> DictConfig:
    """The run's config from its overrides, as ``main`` gets it (a submitit job composes it this way)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=argv)


def preflight(argv: list[str]) -> None:
    """Compose once through the compose API, so an unknown preset or a bad override is one line (exit 2)
    rather than Hydra's multi-line report. Hydra's own flags (--cfg, --help, -m, ...) skip this."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(arg.startswith("-") for arg in argv):
        return
    try:
        compose(argv)
    except (HydraException, OmegaConfBaseException) as err:
        text = str(err).split("Config search path")[0].replace("\t", " ")
        sys.exit(report("train", ConfigError(text)))


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    task = importlib.import_module(f"pipelines.tasks.{cfg.task.name}.task")
    sys.exit(run_cli(f"train {cfg.task.name}", lambda: task.run(cfg)))


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
