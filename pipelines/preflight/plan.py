"""The training runs of a profile, as DVC would run them: one per distinct configuration (seeds share one).

The profile is planned on a copy of dvc.yaml and params.yaml in a scratch DVC project, switched by the rule
`make profile` applies (pipelines/profile.py) and with any ``--param key=value`` set there: the workspace's
params.yaml is never edited. DVC expands the stages (foreach, matrix) and pipelines/fanout.py's plan picks
the training commands from its graph, so the preflight sees the exact commands `dvc repro` would run.
"""
from __future__ import annotations

import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.errors import ConfigError
from pipelines.profile import switched

TRAIN = "pipelines.train"


@dataclass
class PlannedRun:
    """One distinct configuration: its stage group, its DVC stages (one per seed) and the train overrides of
    the first of them."""

    stage: str
    overrides: list[str]
    stages: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> int:
        return len(self.stages)


def set_params(text: str, assignments: list[str]) -> str:
    """params.yaml's text with top-level ``key=value`` lines replaced (e.g. gpus=8)."""
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise ConfigError(f"--param {item!r}: use key=value with a top-level key of params.yaml")
        text, found = re.subn(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.M)
        if found != 1:
            raise ConfigError(f"--param {item!r}: params.yaml has no top-level key {key!r}")
    return text


def plan(profile: str, stages: list[str], params: list[str], root: Path = Path(".")) -> list[PlannedRun]:
    """The distinct training configurations of ``profile`` among ``stages`` (all when empty), in dvc.yaml's
    order; ConfigError for an unknown profile, stage or param."""
    from pipelines import fanout

    text = set_params(switched((root / "params.yaml").read_text(), profile), params)
    scratch = Path(tempfile.mkdtemp(prefix="gal-preflight-plan-"))
    try:
        shutil.copy(root / "dvc.yaml", scratch / "dvc.yaml")
        (scratch / "params.yaml").write_text(text)
        (scratch / ".dvc").mkdir()  # an empty DVC project without git: enough to expand and collect stages
        (scratch / ".dvc" / "config").write_text("[core]\n    no_scm = True\n")
        _, training = fanout.plan(stages, root=str(scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    runs: dict[tuple[str, ...], PlannedRun] = {}
    for name, cmd in training:
        argv = shlex.split(cmd)
        overrides = argv[argv.index(TRAIN) + 1:]
        key = (name.split("@")[0], *(o for o in overrides if not o.startswith("seed=")))
        runs.setdefault(key, PlannedRun(key[0], overrides)).stages.append(name)
    if not runs:
        raise ConfigError(f"no training stage among {' '.join(stages) or 'the pipeline'}")
    return list(runs.values())
