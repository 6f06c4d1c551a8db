"""`python -m pipelines.dvc_cli` is DVC with a faster dvc.lock writer: the lock it writes holds exactly what
DVC's own would, a plain `dvc` reads it as up to date, it keeps DVC's order, and a failed write leaves the
old lock whole."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dvc.dvcfile
import dvc.utils.serialize
import dvc.utils.serialize._yaml
import dvc.utils.strictyaml
import pytest
from dvc.utils.serialize import YAMLFileCorruptedError, load_yaml

from pipelines import dvc_cli
from tests.workspace import undo_dvc_cli_after

BIN = Path(sys.executable).parent
# Three stages in a chain, with a long command (DVC's round-trip emitter folds it), a param and a directory.
DVC_YAML = """\
stages:
  make_data:
    cmd: python -c "import pathlib; pathlib.Path('data').mkdir(exist_ok=True); pathlib.Path('data/a.txt').write_text('1')" --long-argument-that-makes-the-line-fold yes null 0123e4
    deps: [src.txt]
    params: [seed]
    outs: [data]
  {name}:
    cmd: python -c "import pathlib; pathlib.Path('out.txt').write_text(pathlib.Path('data/a.txt').read_text() * 2)"
    deps: [data]
    outs: [out.txt]
  last:
    cmd: python -c "import pathlib; pathlib.Path('last.txt').write_text('x')"
    deps: [out.txt]
    outs: [last.txt]
"""


def project(root: Path, middle: str = "double") -> Path:
    root.mkdir()
    (root / "dvc.yaml").write_text(DVC_YAML.format(name=middle))
    (root / "params.yaml").write_text("seed: 3\n")
    (root / "src.txt").write_text("source\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([BIN / "dvc", "init", "-q"], cwd=root, check=True)
    return root


def run(root: Path, *cmd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_the_lock_is_dvcs_own_and_plain_dvc_finds_it_up_to_date(tmp_path):
    ours, theirs = project(tmp_path / "ours"), project(tmp_path / "theirs")
    run(ours, BIN / "python", "-m", "pipelines.dvc_cli", "repro")
    run(theirs, BIN / "dvc", "repro")

    lock, dvcs = (ours / "dvc.lock").read_text(), (theirs / "dvc.lock").read_text()
    assert load_yaml(ours / "dvc.lock") == load_yaml(theirs / "dvc.lock")
    assert list(load_yaml(ours / "dvc.lock")["stages"]) == ["make_data", "double", "last"]
    assert "!!" not in lock  # plain mappings, no tags
    assert lock.index("    cmd:") < lock.index("    deps:") < lock.index("    params:") < lock.index("    outs:")
    assert lock != dvcs and len(lock.splitlines()) < len(dvcs.splitlines())  # the long command on one line
    assert "up to date" in run(ours, BIN / "dvc", "status").stdout

    # a change reruns what it should under either writer, and DVC's own then rewrites the lock it left
    (ours / "params.yaml").write_text("seed: 4\n")
    assert "Running stage 'make_data'" in run(ours, BIN / "dvc", "repro").stdout
    assert "up to date" in run(ours, BIN / "python", "-m", "pipelines.dvc_cli", "status").stdout


def test_each_text_is_parsed_once_and_each_caller_gets_its_own_copy(monkeypatch):
    undo_dvc_cli_after(monkeypatch)
    calls = []
    parse = dvc.utils.serialize._yaml.parse_yaml
    monkeypatch.setattr(dvc.utils.serialize._yaml, "parse_yaml", lambda *a, **k: calls.append(a) or parse(*a, **k))
    dvc_cli.install()
    first = dvc.utils.serialize.parse_yaml("seed: 1\nlist: [1, 2]\n", "params.yaml")
    first["list"].append(3)  # a caller that changes its data changes no one else's
    assert dvc.utils.strictyaml.parse_yaml("seed: 1\nlist: [1, 2]\n", "params.yaml") == {"seed": 1, "list": [1, 2]}
    assert len(calls) == 1
    assert dvc.utils.serialize.parse_yaml("seed: 2\n", "params.yaml") == {"seed": 2} and len(calls) == 2
    assert dvc.utils.serialize.parse_yaml("seed: 2\n", "params.yaml", typ="rt") == {"seed": 2} and len(calls) == 3
    for _ in range(2):  # a broken file fails each time it is read, as DVC's own parse does
        with pytest.raises(YAMLFileCorruptedError):
            dvc.utils.serialize.parse_yaml("seed: [1\n", "params.yaml")


def test_only_the_lock_takes_the_fast_path_and_a_failed_write_keeps_the_old_lock(tmp_path, monkeypatch):
    undo_dvc_cli_after(monkeypatch)
    dvc_cli.install()
    lock, other = tmp_path / "dvc.lock", tmp_path / "dvc.yaml"
    lock.write_text("schema: '2.0'\nstages:\n  a:\n    cmd: echo a\n")
    other.write_text("# a comment DVC keeps\nstages:\n  a:\n    cmd: echo a\n")

    with dvc.dvcfile.modify_yaml(str(lock)) as data:
        data["stages"]["b"] = {"cmd": "echo b", "deps": [{"path": "x", "md5": "0123e4", "size": 1}]}
    assert load_yaml(lock)["stages"]["b"]["deps"][0]["md5"] == "0123e4"  # a string that looks like a number
    with dvc.dvcfile.modify_yaml(str(other)) as data:
        data["stages"]["b"] = {"cmd": "echo b"}
    assert other.read_text().startswith("# a comment DVC keeps")  # round trip: DVC's own writer

    before = lock.read_text()
    monkeypatch.setattr(dvc_cli, "render", lambda data: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        with dvc.dvcfile.modify_yaml(str(lock)) as data:
            data["stages"]["c"] = {"cmd": "echo c"}
    assert lock.read_text() == before


def test_repeated_writes_render_what_a_fresh_write_would_and_see_another_process_s_write(tmp_path, monkeypatch):
    from benchmarks.dvc_lock import stage

    undo_dvc_cli_after(monkeypatch)
    monkeypatch.setattr(dvc_cli, "_written", {})
    monkeypatch.setattr(dvc_cli, "_stages", {})
    round_trip = dvc.dvcfile.modify_yaml
    dvc_cli.install()
    lock = tmp_path / "dvc.lock"
    for i in range(3):  # an empty lock, then a stage at a time, as a repro writes it
        with dvc.dvcfile.modify_yaml(str(lock)) as data:
            data.setdefault("schema", "2.0")
            data.setdefault("stages", {})[f"s{i}"] = stage(i, deps=3)
    with dvc.dvcfile.modify_yaml(str(lock)) as data:  # a stage rerun: its entry changes
        data["stages"]["s1"] = stage(7, deps=2)
    whole = {"schema": "2.0", "stages": {"s0": stage(0, 3), "s1": stage(7, 2), "s2": stage(2, 3)}}
    assert lock.read_text() == dvc_cli.render(whole)

    monkeypatch.setattr(dvc_cli, "_written", {})  # the next process: it reads the lock, renders only s0
    monkeypatch.setattr(dvc_cli, "_stages", {})
    with dvc.dvcfile.modify_yaml(str(lock)) as data:
        data["stages"]["s0"] = stage(8, deps=3)
    whole["stages"]["s0"] = stage(8, deps=3)
    assert lock.read_text() == dvc_cli.render(whole)

    with round_trip(str(lock)) as data:  # another process (DVC's own writer) adds a stage and folds long lines
        data["stages"]["other"] = stage(9, deps=1)
    with dvc.dvcfile.modify_yaml(str(lock)) as data:
        data["stages"]["s3"] = stage(3, deps=1)
    whole["stages"].update(other=stage(9, deps=1), s3=stage(3, deps=1))
    assert load_yaml(lock) == whole and list(load_yaml(lock)["stages"]) == ["s0", "s1", "s2", "other", "s3"]

    with pytest.raises(KeyError):  # a write that fails halfway leaves nothing of it behind, on disk or in memory
        with dvc.dvcfile.modify_yaml(str(lock)) as data:
            data["stages"]["half"] = stage(5, deps=1)
            raise KeyError("stop")
    with dvc.dvcfile.modify_yaml(str(lock)) as data:
        pass
    assert "half" not in load_yaml(lock)["stages"]
