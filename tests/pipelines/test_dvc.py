"""dvc.yaml cannot drift from the code: every stage's deps cover the project modules its entry point imports
(transitively) and the config files it composes, and every training stage's outputs are the run record of
the run name pipelines/training/identity.py gives its command."""
from __future__ import annotations

import ast
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
from dvc.repo import Repo
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from pipelines.training import identity
from tests.pipelines.prepare_helpers import ROOT

CONF = ROOT / "pipelines" / "conf"
PROJECT = ("pipelines", "gal_core", "benchmarks")
GAL_CORE = ROOT / "packages" / "gal_core" / "src"


def module_file(name: str) -> Path | None:
    base = GAL_CORE if name.split(".")[0] == "gal_core" else ROOT
    path = base.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=None)
def imports(path: Path) -> frozenset[Path]:
    """Project files ``path`` imports (at any depth of the module, late imports too), with the packages'
    __init__ files that importing them runs."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            if name.split(".")[0] not in PROJECT:
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a.b.c runs a/__init__ and a/b/__init__ too
                file = module_file(".".join(parts[:i]))
                if file is not None:
                    found.add(file)
    return frozenset(found)


def closure(files: set[Path]) -> set[Path]:
    todo, seen = list(files), set()
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo.extend(imports(file))
    return seen


def composed_files(config_name: str, overrides: list[str]) -> set[Path]:
    """The config files Hydra composes for ``config_name`` with ``overrides`` (its defaults list)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        defaults = loader.compute_defaults_list(config_name, overrides, RunMode.RUN).defaults
    return {CONF / f"{d.config_path}.yaml" for d in defaults
            if d.config_path and not d.config_path.startswith("hydra/") and (CONF / f"{d.config_path}.yaml").is_file()}


def stage_needs(cmd: str) -> tuple[set[Path], str | None, list[str]]:
    """(files the command reads as code or config, its Hydra config name, its overrides)."""
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "-m"], cmd
    module, args = argv[2], argv[3:]
    entry = module_file(module)
    entry = entry.parent / "__main__.py" if entry.name == "__init__.py" else entry
    files, config_name, configs = {entry}, None, set()
    if module == "pipelines.train":
        config_name = "train"
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            task = compose("train", overrides=args).task.name
        files.add(module_file(f"pipelines.tasks.{task}.task"))  # imported by name at run time
    elif module.startswith("pipelines.prepare."):
        config_name = "prepare"
    elif module == "pipelines.toy3d":
        configs.add(CONF / "task" / "toy3d.yaml")  # read directly, not through Hydra
    elif module == "pipelines.precision":
        configs.add(CONF / "task" / "precision.yaml")  # read directly; it composes the presets through Hydra
    if config_name:
        configs |= composed_files(config_name, args)
    return closure(files) | configs, config_name, args


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == dep or dep in path.parents for dep in deps)


@pytest.fixture(scope="module")
def stages():
    repo = Repo(str(ROOT))
    try:
        yield list(repo.index.stages)
    finally:
        repo.close()


def test_every_stage_depends_on_what_it_imports_and_composes(stages):
    seen_cmds = set()
    missing = []
    for stage in stages:
        key = stage.cmd.split(" seed=")[0]  # seeds do not change what a command reads
        if key in seen_cmds:
            continue
        seen_cmds.add(key)
        deps = [ROOT / d.def_path for d in stage.deps]
        needs, _, _ = stage_needs(stage.cmd)
        missing += [f"{stage.name}: {p.relative_to(ROOT)}" for p in sorted(needs) if not covered(p, deps)]
    assert not missing, "deps missing in dvc.yaml:\n" + "\n".join(missing)


def test_training_stages_write_the_record_of_the_run_their_command_names(stages):
    train = [s for s in stages if s.cmd.startswith("python -m pipelines.train ")]
    assert train
    for stage in train:
        args = shlex.split(stage.cmd)[3:]
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=args)
            name = identity.run_name(cfg, identity.variant(cfg))
        record = f"runs/{cfg.task.name}/{name}/"
        outs = [o.def_path for o in stage.outs]
        assert outs and all(o.startswith(record) for o in outs), (stage.name, record, outs)
        assert {Path(o).name for o in outs} == {"config.yaml", "run.json", "metrics.json", "history.csv"}
