"""Every way a training run ends leaves a true state (pipelines/CONTRACT.md, Run endings): a signal ends its
MLflow run KILLED with no debris and a rerun resumes; a run killed before its record is finished from its
checkpoint; an orphaned RUNNING MLflow run is closed at the next start; a second start of a running run is
refused; a corrupt checkpoint, an unwritable folder or a full disk is one line; a checkpoint's size does not
grow with the epochs; a copied store does not write into its original's artifacts."""
from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from pipelines.errors import RunError, TrackingError
from pipelines.training import checkpoint
from pipelines.tracking import run as run_module
from pipelines.tracking.resume import config_digest, decide
from pipelines.tracking.run import RunTracker
from tests.pipelines.prepare_helpers import ROOT
from tests.pipelines.train_helpers import (checkpoint_path, kill_at_first_checkpoint, name_of, outcome, start, train,
                                           train_cmd, train_env, wait_for, write_boston)

RUN = ("experiment=boston_gal", "profile=smoke", "seed=0")
LONG = (*RUN, "task.epochs=400")  # long enough to be stopped mid-run


def runs(root: Path) -> list[tuple[str, str, str]]:
    """(run id, name, status) of every MLflow run in root's store (none without a store)."""
    if not (root / "mlflow.db").exists():
        return []
    with sqlite3.connect(root / "mlflow.db") as db:
        if not db.execute("select name from sqlite_master where name = 'runs'").fetchall():
            return []
        return db.execute("select run_uuid, name, status from runs order by start_time").fetchall()


@pytest.fixture
def root(tmp_path) -> Path:
    write_boston(tmp_path)
    return tmp_path


def one_line_exit_2(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_the_run_killed_in_one_line_and_a_rerun_resumes_it(root, signum, code):
    env, name = train_env(root), name_of(*LONG)
    ckpt = checkpoint_path(root, "regression", name)
    proc = start(root, *LONG, env=env)
    wait_for(ckpt, [proc])
    proc.send_signal(signum)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, out
    assert "Traceback" not in out and f"interrupted by {signal.Signals(signum).name}; its MLflow run is KILLED" in out
    [(first, _, status)] = runs(root)
    assert status == "KILLED"
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [".lock", "history.jsonl", "last.pt"]  # no debris
    rerun = train(root, *LONG, env=env)
    assert rerun.returncode == 0 and "resuming" in rerun.stdout, rerun.stderr
    assert runs(root) == [(first, name, "FINISHED")]


@pytest.mark.slow
def test_a_run_killed_before_its_record_is_finished_from_its_checkpoint(root, tmp_path_factory):
    env, name = train_env(root), name_of(*RUN)
    # SIGKILL at the moment the record would be written: after the last epoch's checkpoint
    kill_at_record = ("import os, runpy, sys; from pipelines.tracking.run import RunTracker; "
                      "RunTracker._write = lambda *a: os.kill(os.getpid(), 9); "
                      "sys.argv = sys.argv[1:]; runpy.run_module('pipelines.train', run_name='__main__')")
    killed = subprocess.run([sys.executable, "-c", kill_at_record, *train_cmd(root, *RUN)[2:]], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9 and not (root / "runs").joinpath("regression", name).exists()
    [(first, _, status)] = runs(root)
    assert status == "RUNNING"
    finished = train(root, *RUN, env=env)
    assert finished.returncode == 0, finished.stderr
    assert "holds a finished run whose record was never written: recorded it from the checkpoint" in finished.stdout
    assert "epoch " not in finished.stdout  # nothing trained again
    assert runs(root) == [(first, name, "FINISHED")]
    assert json.loads((root / "runs/regression" / name / "run.json").read_text())["mlflow_run_id"] == first
    straight = tmp_path_factory.mktemp("straight")
    write_boston(straight)
    assert train(straight, *RUN, env=train_env(straight)).returncode == 0
    (history, metrics, weights), (history_0, metrics_0, weights_0) = (outcome(r, "regression", name)
                                                                      for r in (root, straight))
    assert (history, metrics) == (history_0, metrics_0)
    assert weights.keys() == weights_0.keys() and all(torch.equal(weights[k], weights_0[k]) for k in weights)


def test_a_finished_run_of_another_environment_whose_record_dvc_removed_starts_over(root, tmp_path_factory):
    """DVC reruns a stage whose code, data or environment changed, removing its record first: the finished
    checkpoint left by the old run is then no record to write (which a resume would refuse), but a run to redo."""
    project = tmp_path_factory.mktemp("project")  # the project root, as DVC_ROOT gives it inside a stage
    (project / "requirements.lock").write_text("torch==1\n")
    env, name = train_env(root, DVC_ROOT=str(project)), name_of(*RUN)
    assert train(root, *RUN, env=env).returncode == 0
    record = root / "runs/regression" / name
    (project / "requirements.lock").write_text("torch==2\n")  # what made DVC rerun it
    for path in record.iterdir():  # DVC removes a stage's outputs before it runs its command
        path.unlink()
    rerun = train(root, *RUN, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert f"starting {name} over: {checkpoint_path(root, 'regression', name)} holds a finished run whose env " \
           "lock differ" in rerun.stdout and "epoch " in rerun.stdout
    assert [status for _, _, status in runs(root)] == ["FINISHED", "FINISHED"]
    assert json.loads((record / "run.json").read_text())["mlflow_run_id"] == runs(root)[1][0]


@pytest.mark.slow
def test_an_orphaned_running_run_is_closed_at_the_next_start(root):
    env, name = train_env(root), name_of(*LONG)
    ckpt = checkpoint_path(root, "regression", name)
    kill_at_first_checkpoint(root, *LONG, env=env, checkpoint=ckpt)
    ckpt.unlink()  # what the error message of a refused resume tells a user to do
    [(orphan, _, status)] = runs(root)
    assert status == "RUNNING"
    rerun = train(root, *LONG, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert f"closed MLflow run {orphan} as KILLED: it was left RUNNING by a process that is gone" in rerun.stdout
    assert [status for _, _, status in runs(root)] == ["KILLED", "FINISHED"]


def test_a_second_start_of_a_running_run_is_refused_and_records_nothing(root):
    name = name_of(*RUN)
    with checkpoint.run_lock(checkpoint_path(root, "regression", name).parent, name):  # as a running start holds it
        second = train(root, *RUN, env=train_env(root))
    one_line_exit_2(second, f"run {name} is already running (pid {os.getpid()} on ")
    assert runs(root) == [] and not (root / "runs/regression" / name).exists()


def test_the_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from pipelines.training.checkpoint import run_lock\n"
                               f"with run_lock(Path({str(tmp_path)!r}), 'r'):\n print('held', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunError, match="run r is already running"):
        with checkpoint.run_lock(tmp_path, "r"):
            pass
    holder.kill()
    holder.wait()
    with checkpoint.run_lock(tmp_path, "r"):
        pass


def flip_a_weight_byte(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor's storage
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_a_flipped_bit_is_one_line_not_other_numbers(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 1, "task": {"w": torch.arange(4096, dtype=torch.float32)}}, path)
    assert checkpoint.load(path)["task"]["w"].sum() == sum(range(4096))
    flip_a_weight_byte(path)
    assert torch.load(path, weights_only=True)["task"]["w"].sum() != sum(range(4096))  # torch alone: silent
    with pytest.raises(RunError, match=r"checkpoint .*last.pt is corrupt: .* does not match its checksum; delete "
                                       "it to start the run over$"):
        checkpoint.load(path)


def test_a_run_with_a_corrupt_checkpoint_stops_in_one_line(root):
    env, name = train_env(root), name_of(*LONG)
    ckpt = checkpoint_path(root, "regression", name)
    kill_at_first_checkpoint(root, *LONG, env=env, checkpoint=ckpt)
    flip_a_weight_byte(ckpt)
    one_line_exit_2(train(root, *LONG, env=env), "is corrupt: ")


@pytest.mark.parametrize("blocked", ["checkpoints/regression", "runs/regression", "runs"])
def test_an_unwritable_output_folder_is_one_line_before_any_compute(root, blocked):
    (root / blocked).parent.mkdir(parents=True, exist_ok=True)
    (root / blocked).write_text("a file where a folder must be")  # root ignores permissions: a file blocks it
    result = train(root, *RUN, env=train_env(root))
    one_line_exit_2(result, "cannot write in ")
    assert "epoch" not in result.stdout and runs(root) == []


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 1}, path)

    def full(state, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunError, match=r"cannot write checkpoint .*last.pt: No space left on device \(free some "
                                       r"space\); the previous checkpoint is kept: rerun the same command"):
        checkpoint.save({"epoch": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_killed_write_leaves_debris_that_the_next_write_removes(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", "import time; from pathlib import Path; "
                               "from pipelines.atomic import open_atomic\n"
                               f"with open_atomic(Path({str(tmp_path / 'last.pt')!r})) as f:\n"
                               " f.write(b'x'); f.flush(); print('writing', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait()
    [debris] = tmp_path.iterdir()
    assert debris.name.startswith(".last.pt.tmp-")
    checkpoint.save({"epoch": 1}, tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ------------------------------------------------------------------------------ the tracker's side
@pytest.fixture
def tracked(store_env) -> Path:
    return store_env


def test_a_checkpoints_tracker_state_does_not_grow_with_the_epochs(tracked, monkeypatch):
    monkeypatch.setattr(run_module, "FLUSH_SECONDS", 0.0)  # nothing pending: the state is what stays
    sizes = {}
    with RunTracker("regression", "r", {"a": 1}, profile="smoke", journal=Path("history.jsonl")) as tracker:
        for epoch in range(1, 1001):
            tracker.log_epoch(epoch, {"train_loss": 1.0 / epoch, "val_mae": 0.5})
            if epoch in (10, 1000):
                sizes[epoch] = len(json.dumps(tracker.state()))
        tracker.log_final({"test_mae": 0.5})
    assert abs(sizes[1000] - sizes[10]) < 64, sizes  # a few digits more, not 990 rows
    assert len(Path("runs/regression/r/history.csv").read_text().splitlines()) == 1001


def test_a_resume_drops_journal_rows_past_its_checkpoint(tracked):
    journal = Path("history.jsonl")
    with pytest.raises(RuntimeError):
        with RunTracker("regression", "r", {"a": 1}, profile="smoke", journal=journal) as first:
            first.log_epoch(1, {"train_loss": 1.0})
            state = first.state()
            first.log_epoch(2, {"train_loss": 9.0})  # killed before epoch 2's checkpoint
            raise RuntimeError("killed")
    with RunTracker("regression", "r", {"a": 1}, profile="smoke", journal=journal, resume=state) as tracker:
        tracker.log_epoch(2, {"train_loss": 0.5})
        tracker.log_final({"test_mae": 0.5})
    assert Path("runs/regression/r/history.csv").read_text() == "epoch,train_loss\n1,1.0\n2,0.5\n"


def test_a_copied_store_does_not_write_into_its_originals_artifacts(tracked, monkeypatch):
    original, copy = tracked / "original", tracked / "copy"
    original.mkdir()
    copy.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{original / 'mlflow.db'}")
    with RunTracker("regression", "r", {"a": 1}, profile="smoke") as tracker:
        tracker.log_final({"test_mae": 0.5})
    (copy / "mlflow.db").write_bytes((original / "mlflow.db").read_bytes())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy / 'mlflow.db'}")
    with pytest.raises(TrackingError, match=r"keeps its artifacts in file://.*/original/mlartifacts/regression, "
                                            r"not beside that store .*copied from another checkout"):
        with RunTracker("regression", "r", {"a": 1}, profile="smoke"):
            pytest.fail("the block must not run")


def test_a_finished_checkpoint_without_its_record_is_finished_not_trained_again():
    config = {"seed": 0}
    saved = {"epoch": 3, "config_sha": config_digest(config), "final": {"test_mae": 1.0},
             "tracker": {"mlflow_run_id": "abc"}}
    assert decide(saved, config, 3, recorded=None).finish
    assert not decide(saved, config, 3, recorded="abc").finish  # recorded: a rerun starts over
    assert not decide({**saved, "final": None}, config, 3).finish  # a checkpoint from before final metrics
    assert not decide(saved, {"seed": 1}, 3).finish  # another config's
    assert decide(saved, config, 5).resume  # more epochs asked: resumed as before


def stage_writing(tmp_path: Path, **popen) -> subprocess.Popen:
    """A stage (run_cli) stopped inside an atomic write of tmp_path/out.bin."""
    code = ("import time; from pathlib import Path; from pipelines.atomic import open_atomic; "
            "from pipelines.errors import run_cli\n"
            "def main():\n"
            f" with open_atomic(Path({str(tmp_path / 'out.bin')!r})) as f:\n"
            "  f.write(b'x'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
            "raise SystemExit(run_cli('stage', main))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
    assert proc.stdout.readline().strip() == "writing"
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_every_stage_stops_on_a_signal_in_one_line_and_leaves_no_work_file(tmp_path, signum):
    proc = stage_writing(tmp_path)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    assert err == f"stage: interrupted by {signal.Signals(signum).name}; what it was writing is left as it was; " \
                  "rerun it\n"
    assert list(tmp_path.iterdir()) == []


def test_a_hangup_that_nohup_ignores_stays_ignored(tmp_path):
    proc = stage_writing(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    proc.send_signal(signal.SIGHUP)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=2)
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_request_during_a_checkpoint_write_waits_for_the_whole_checkpoint(tmp_path, monkeypatch, signum):
    """SIGTERM or Ctrl-C in the middle of torch.save (where the signal tests once caught them): the checkpoint is
    written whole, then the run is interrupted as usual, not failed by torch's zip writer."""
    from pipelines import errors

    real_save = torch.save

    def save_signalled_midway(state, f):
        os.kill(os.getpid(), signum)  # handled at once by _interrupt: held, not raised here
        real_save(state, f)

    monkeypatch.setattr(checkpoint.torch, "save", save_signalled_midway)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, errors._interrupt)  # as run_cli sets it; SIGINT keeps Python's own handler
    try:
        with pytest.raises(errors.Interrupted) as caught:
            checkpoint.save({"epoch": 3, "w": torch.ones(4)}, tmp_path / "last.pt")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert caught.value.signum == signum and errors._held is None
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 3


def test_ctrl_c_outside_a_checkpoint_write_is_pythons_own_again(tmp_path):
    from pipelines import errors

    with errors.signals_held():
        assert signal.getsignal(signal.SIGINT) is errors._interrupt
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
