"""What the prepare-stage tests share: the stage config as the CLI composes it, the CLI itself, and the files a
stage left."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from pipelines.fetch import MIRROR_ENV

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "pipelines" / "conf"
SOURCE_ENVS = (MIRROR_ENV, "IMAGENET_ARCHIVES")  # the user's own settings must not leak into a test


def prepare_config(root: Path, *overrides: str):
    """The stage's config as the CLI builds it, with outputs under ``root``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("prepare", overrides=list(overrides))
    cfg.root = str(root)
    return cfg


def files_under(folder: Path) -> set[str]:
    """Every file below ``folder``, as paths relative to it."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def prepare_cli(module: str, cwd: Path, *args: str, mirror: Path | None = None,
                env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in ``cwd``, with GAL_DATA_MIRROR set to ``mirror`` (else unset)."""
    env = {k: v for k, v in os.environ.items() if k not in SOURCE_ENVS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if mirror is not None:
        env[MIRROR_ENV] = str(mirror)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
