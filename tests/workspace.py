"""A fresh git copy of this checkout's committed-or-working tree without outputs: where tests run DVC; and
``undo_dvc_cli_after``, for tests that run DVC in-process as pipelines/dvc_cli.py installs it."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def copy_project(repo: Path) -> Path:
    """Copy the tracked and untracked-but-not-ignored files into ``repo`` (not dvc.lock: this checkout's
    lock describes its own outputs; not results/: the published reports, which nothing runs from) and commit
    them there."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and name != "dvc.lock" and not name.startswith("results/"):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    git = lambda *args: subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    return repo


def undo_dvc_cli_after(monkeypatch) -> None:
    """What ``pipelines.dvc_cli.install()`` replaces in DVC, put back when ``monkeypatch`` undoes."""
    import dvc.dvcfile

    from pipelines import dvc_cli

    monkeypatch.setattr(dvc.dvcfile, "modify_yaml", dvc.dvcfile.modify_yaml)
    for module in dvc_cli.parsing_modules():
        monkeypatch.setattr(module, "parse_yaml", module.parse_yaml)
