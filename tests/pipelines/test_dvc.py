"""dvc.yaml cannot drift from the code: every stage's deps cover the project modules its entry point imports
(transitively) and the config files it composes, every training stage's outputs are the run record of the
run name pipelines/training/identity.py gives its command, and an edit to one task, the downloader or the
report makes only the stages that run it stale."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
from dvc.repo import Repo
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from pipelines import dvc_cli
from pipelines.training import identity
from tests.pipelines.import_graph import ROOT, closure, module_file
from tests.workspace import copy_project, undo_dvc_cli_after

CONF = ROOT / "pipelines" / "conf"


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


@pytest.mark.slow  # composes every training stage's command
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


# ------------------------------------------------------------------ an edit re-runs only what it can change
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A copy of the project whose every stage is recorded in dvc.lock as if it had run (outputs stand-ins,
    `dvc commit`): `dvc status` then lists exactly the stages an edit makes stale, as after a real repro. DVC
    runs as `make repro` runs it (pipelines/dvc_cli.py: each YAML text parsed once), undone after."""
    repo = copy_project(tmp_path_factory.mktemp("recorded"))
    cwd = os.getcwd()
    os.chdir(repo)  # DVC's stage cache resolves paths against the working directory
    try:
        with pytest.MonkeyPatch.context() as patch:
            undo_dvc_cli_after(patch)
            dvc_cli.install()
            with Repo(str(repo)) as project:
                for stage in project.index.stages:
                    for out in stage.outs:
                        path = Path(out.fs_path)
                        if not path.exists():
                            path.parent.mkdir(parents=True, exist_ok=True)
                            path.write_text(f"{stage.addressing}\n")
                project.commit(None, force=True)
                assert project.status() == {}
                names = {s.addressing for s in project.index.stages}
            yield repo, names
    finally:
        os.chdir(cwd)


def stale_after_editing(repo: Path, name: str) -> set[str]:
    """The stages `dvc status` lists after a comment is appended to ``name`` (then the file is restored)."""
    path = repo / name
    text = path.read_text()
    path.write_text(text + "# an edit\n")
    try:
        with Repo(str(repo)) as dvc:
            return set(dvc.status())
    finally:
        path.write_text(text)


@pytest.mark.slow  # one dvc commit of every stage, then a dvc status per case: about a minute in all
@pytest.mark.parametrize("edited, stale", [
    ("pipelines/tasks/detection/task.py", {"train_detection"}),
    ("pipelines/tasks/detection/detr/transformer.py", {"train_detection"}),
    ("pipelines/tasks/regression/data.py", {"train_regression", "protocol", "protocol_eps", "beyond_regression"}),
    ("pipelines/tasks/digits/task.py", {"beyond_digits"}),
    ("pipelines/prepare/digits.py", {"prepare_digits"}),
    ("pipelines/tasks/classification/task.py", {"train_cifar", "train_imagenet", "ablate_noise", "ablate_raw_noise",
                                                "ablate_adjuster", "ablate_policy", "ablate_eps", "ablate_scale",
                                                "ablate_lookahead_arch"}),
    ("pipelines/fetch.py", {"prepare", "prepare_cifar", "prepare_imagenet", "prepare_coco"}),
    ("pipelines/prepare/coco.py", {"prepare_coco"}),
    ("pipelines/report/build.py", {"report"}),
])
def test_an_edit_makes_stale_only_the_stages_that_run_the_edited_code(recorded, edited, stale):
    repo, names = recorded
    found = stale_after_editing(repo, edited)
    assert found == {name for name in names if name.split("@")[0] in stale}  # every stage of those, no other
