"""A run's start-up. The warm start (pipelines/warm.py): a served train command is the run a cold one is
(record, output, exit code, one-line errors, signals), a client killed outright takes its run with it, and a
client whose code state is not the server's runs cold. Whether a command was served shows in its own
`-X importtime`: a served client never imports torch. And what a cold regression run imports: no image
library, no plotting (torch._dynamo it cannot avoid: every torch.optim step imports it)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pipelines import warm
from tests.pipelines.prepare_helpers import ROOT
from tests.pipelines.train_helpers import (checkpoint_path, train_cmd, train_env, wait_for, warm_log, warm_server,
                                          write_boston)

RUN = ("experiment=boston_gal", "task.epochs=3")


@pytest.fixture(scope="module")
def socket_path() -> Path:
    socket, server = warm_server()
    warm.wait_listening(socket, server)
    return socket


def command(root: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-X", "importtime", *train_cmd(root, *overrides)[1:]]


def run(root: Path, *overrides: str, env: dict, via: tuple[str, ...] = ()
        ) -> tuple[subprocess.CompletedProcess, set[str]]:
    """(the finished command, run under the command ``via`` if any, with its import-time lines removed from
    stderr, the modules it imported)."""
    done = subprocess.run([*via, *command(root, *overrides)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    imported = set(re.findall(r"^import time:.*\|\s+(\S+)$", done.stderr, re.MULTILINE))
    done.stderr = "".join(line for line in done.stderr.splitlines(True) if not line.startswith("import time:"))
    return done, imported


def served_env(root: Path, socket: Path, **extra: str) -> dict:
    return train_env(root, **{warm.SOCKET_ENV: str(socket)}, **extra)


def test_a_served_run_is_the_cold_run(socket_path, tmp_path):
    import torch._dynamo  # noqa: F401  (sets torch's variables in this environment, as the server's imports did)

    served_root, cold_root = tmp_path / "served", tmp_path / "cold"
    for root in (served_root, cold_root):
        write_boston(root)
    # what an in-process run (read when CUDA starts) or scikit-learn's import (Intel OpenMP's) leaves in a test's
    # environment refuses nothing
    runtime = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "KMP_DUPLICATE_LIB_OK": "True"}
    served, served_imports = run(served_root, *RUN, env=served_env(served_root, socket_path, **runtime))
    cold, cold_imports = run(cold_root, *RUN, env=train_env(cold_root, **runtime))
    assert served.returncode == cold.returncode == 0, served.stderr + cold.stderr
    assert "torch" not in served_imports and "torch" in cold_imports, warm_log()
    assert not cold_imports & {"matplotlib", "timm", "torchvision", "pycocotools", "PIL"}
    assert served.stdout == cold.stdout and served.stderr == cold.stderr
    for name in ("metrics.json", "config.yaml", "history.csv", "run.json"):
        served_file, cold_file = (root / "runs/regression/boston-gal-epochs3-s0" / name for root in (served_root, cold_root))
        served_text = served_file.read_text().replace(str(served_root), str(cold_root))
        if name == "run.json":  # its own MLflow run, created at its own second
            served_text, cold_text = (re.sub(r'"(mlflow_run_id|created)": "[^"]*"', "", text)
                                      for text in (served_text, cold_file.read_text()))
        else:
            cold_text = cold_file.read_text()
        assert served_text == cold_text, name

def test_a_served_bad_override_is_the_same_one_line(socket_path, tmp_path):
    served, served_imports = run(tmp_path, *RUN, "task.epochz=3", env=served_env(tmp_path, socket_path))
    cold, _ = run(tmp_path, *RUN, "task.epochz=3", env=train_env(tmp_path))
    assert "torch" not in served_imports
    assert served.returncode == cold.returncode == 2 and served.stderr == cold.stderr
    assert served.stderr.count("\n") == 1 and "task.epochz" in served.stderr


def test_a_client_whose_code_state_differs_runs_cold(socket_path, tmp_path):
    write_boston(tmp_path)
    done, imported = run(tmp_path, *RUN, env=served_env(tmp_path, socket_path, TORCH_SHOW_CPP_STACKTRACES="0"))
    assert done.returncode == 0 and "torch" in imported, done.stderr
    assert "TORCH_SHOW_CPP_STACKTRACES differ from the warm server's" in warm_log().splitlines()[-1]
    assert not done.stderr  # the run's own output is a cold run's


def served_children(server: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(server.pid).children()


def start_served(root: Path, socket: Path) -> subprocess.Popen:
    write_boston(root)
    proc = subprocess.Popen(train_cmd(root, "experiment=boston_gal", "task.epochs=100000"), cwd=ROOT,
                            env=served_env(root, socket), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for(checkpoint_path(root, "regression", "boston-gal-epochs100000-s0"), [proc])
    return proc


def test_a_signal_reaches_the_served_run_and_its_exit_code_the_client(socket_path, tmp_path):
    proc = start_served(tmp_path, socket_path)
    assert len(served_children(warm_server()[1])) == 1, warm_log()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "train regression: interrupted by SIGTERM" in out


def test_a_client_killed_outright_takes_its_run_with_it(socket_path, tmp_path):
    proc = start_served(tmp_path, socket_path)
    (fork,) = served_children(warm_server()[1])
    proc.kill()
    proc.wait()
    fork.wait(timeout=60)  # psutil.TimeoutExpired if the run outlived its client
    assert not served_children(warm_server()[1])
    assert os.path.exists(checkpoint_path(tmp_path, "regression", "boston-gal-epochs100000-s0"))


def test_the_wrapper_starts_its_server_with_the_first_run_and_never_without_one(tmp_path):
    """`make repro` with nothing to train pays no server; the first train command it runs is served."""
    siblings = "import psutil; print(len(psutil.Process().parent().children()))"
    idle = subprocess.run([sys.executable, "-m", "pipelines.warm", sys.executable, "-c", siblings], cwd=ROOT,
                          env=train_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert idle.returncode == 0 and idle.stdout == "1\n", idle.stderr  # the command alone: no server beside it
    write_boston(tmp_path)
    served, imported = run(tmp_path, *RUN, env=train_env(tmp_path), via=(sys.executable, "-m", "pipelines.warm"))
    assert served.returncode == 0 and "torch" not in imported, served.stderr[-2000:]
    assert (tmp_path / "runs/regression/boston-gal-epochs3-s0/metrics.json").is_file()
