"""The seams of the layout (pipelines/CONTRACT.md), read off the import graph: a task imports the runtime and
never another task; the runtime and tracking import no task; tracking imports no runtime; the downloader is
nobody's dependency but the prepare stages'."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipelines.import_graph import ROOT, closure, imports

PIPELINES = ROOT / "pipelines"
TASKS = sorted(p.name for p in (PIPELINES / "tasks").iterdir() if p.is_dir() and p.name != "__pycache__")


def files_under(folder: str) -> list[Path]:
    return sorted((PIPELINES / folder).rglob("*.py"))


def imported(files: list[Path]) -> set[str]:
    """What ``files`` import, directly, as paths relative to pipelines/."""
    return {str(f.relative_to(PIPELINES)) for file in files for f in imports(file) if PIPELINES in f.parents}


def test_every_task_folder_holds_its_task_and_its_data():
    assert {"classification", "detection", "regression"} <= set(TASKS)
    for task in TASKS:
        folder = PIPELINES / "tasks" / task
        assert {"__init__.py", "task.py", "data.py"} <= {f.name for f in folder.iterdir()}, task
        assert "def run(cfg" in (folder / "task.py").read_text(), f"{task}/task.py has no run(cfg) for pipelines.train"


@pytest.mark.parametrize("task", TASKS)
def test_a_task_imports_no_other_task(task):
    others = {f"tasks/{t}/" for t in TASKS if t != task}
    found = sorted(m for m in imported(files_under(f"tasks/{task}")) if m.startswith(tuple(others)))
    assert not found, f"tasks/{task} imports {found}"


@pytest.mark.parametrize("package", ["training", "tracking"])
def test_the_runtime_and_tracking_import_no_task(package):
    found = sorted(m for m in imported(files_under(package)) if m.startswith("tasks/"))
    assert not found, f"{package}/ imports {found}"


def test_tracking_imports_no_runtime():
    assert not {m for m in imported(files_under("tracking")) if m.startswith("training/")}


def test_only_the_prepare_stages_run_the_downloader():
    users = sorted(str(f.relative_to(PIPELINES)) for f in PIPELINES.rglob("*.py")
                   if PIPELINES / "fetch.py" in closure({f}) and f.name != "fetch.py")
    assert users and all(u.startswith("prepare/") for u in users), users
