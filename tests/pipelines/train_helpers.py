"""What the training tests share: the run config as `python -m pipelines.train` composes it, the run name
identity gives it, the train command and its environment, a run killed at its first checkpoint, what a run
leaves (checkpoint, record), and the data a run reads (prepared data copied in, or a small Boston table).
The fixtures built on these are in conftest.py."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from pipelines import hashing, warm
from pipelines.training import identity
from tests.pipelines.prepare_helpers import CONF, ROOT


def train_config(*overrides: str):
    """The ``train`` config with ``overrides`` (e.g. ``experiment=boston_gal``, ``root=...``), as the CLI
    composes it."""
    GlobalHydra.instance().clear()  # a stage's `hydra.main` run in-process by an earlier test leaves it set
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_name(cfg) -> str:
    """The run's name: its record's, its checkpoint's and its MLflow run's."""
    return identity.run_name(cfg, identity.variant(cfg))


def name_of(*overrides: str) -> str:
    """The run name of the config ``overrides`` compose."""
    return run_name(train_config(*overrides))


def train_cmd(root: Path, *overrides: str) -> list[str]:
    """``python -m pipelines.train root=<root> <overrides>``."""
    return [sys.executable, "-m", "pipelines.train", f"root={root}", *overrides]


def train_env(store: Path, **extra: str) -> dict:
    """This environment with MLflow on an sqlite store in ``store``, outside any DVC stage, plus ``extra``."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", **extra}
    env.pop("DVC_STAGE", None)
    return env


WARM: dict = {}  # the session's warm server: started by the first train(), stopped by conftest.py
SESSION_ENV = dict(os.environ)  # the server's, whatever a test has monkeypatched when the first train() runs


def warm_server() -> tuple[Path, subprocess.Popen]:
    """(socket, process) of the session's warm server (pipelines/warm.py) serving this checkout, started on
    the first call; runs started before it listens (or after this tree's code changed) start cold."""
    if not WARM:
        socket = Path(tempfile.mkdtemp(prefix="gal-warm-test-")) / "socket"
        with open(socket.parent / "server.log", "w") as log:  # why a client started cold: warm_log()
            WARM["socket"], WARM["server"] = socket, subprocess.Popen(
                [sys.executable, "-m", "pipelines.warm", "--serve", str(socket)], cwd=ROOT, env=SESSION_ENV,
                stderr=log, start_new_session=True)
    return WARM["socket"], WARM["server"]


def warm_log() -> str:
    """What the session's warm server said so far (each client it refused, and why)."""
    return (warm_server()[0].parent / "server.log").read_text()


def stop_warm_server() -> None:
    if WARM:
        WARM["server"].terminate()
        WARM["server"].wait()
        shutil.rmtree(WARM.pop("socket").parent, ignore_errors=True)
        WARM.clear()


def train(root: Path, *overrides: str, env: dict | None = None, timeout: float | None = 600
          ) -> subprocess.CompletedProcess:
    """The train command run to its end from the repo root (in ``env``, else this environment), started warm
    (the same run, tests/pipelines/test_warm.py; the tests that kill a run start it cold)."""
    env = {**(os.environ if env is None else env), warm.SOCKET_ENV: str(warm_server()[0])}
    return subprocess.run(train_cmd(root, *overrides), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def start(root: Path, *overrides: str, env: dict) -> subprocess.Popen:
    """The train command started in the background, its stderr in its stdout."""
    return subprocess.Popen(train_cmd(root, *overrides), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, procs: list[subprocess.Popen], limit: float = 300) -> None:
    """Return once ``path`` exists (a run's first checkpoint); fail if a process of ``procs`` ends first."""
    deadline = time.monotonic() + limit
    while not path.exists():
        ended = [p for p in procs if p.poll() is not None]
        assert not ended and time.monotonic() < deadline, ended[0].stdout.read() if ended else "timeout"
        time.sleep(0.01)


def kill_at_first_checkpoint(root: Path, *overrides: str, env: dict, checkpoint: Path) -> None:
    """The train command SIGKILLed as soon as it wrote ``checkpoint``: the epochs after the first are left."""
    proc = start(root, *overrides, env=env)
    wait_for(checkpoint, [proc])
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def checkpoint_path(root: Path, task: str, run: str) -> Path:
    return root / "checkpoints" / task / run / "last.pt"


TIMINGS = {"time_per_image", "time_per_step", "images_per_s"}  # wall-clock: the only values allowed to differ between runs


def outcome(root: Path, task: str, run: str) -> tuple[list[dict], dict, dict]:
    """(history rows, final metrics, final model weights) of a finished run, without the wall-clock timings."""
    record = root / "runs" / task / run
    with open(record / "history.csv") as f:
        history = [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]
    metrics = {k: v for k, v in json.loads((record / "metrics.json").read_text()).items() if k not in TIMINGS}
    weights = torch.load(checkpoint_path(root, task, run), map_location="cpu", weights_only=True)["task"]["model"]
    return history, metrics, weights


def with_data(root: Path, processed: Path) -> Path:
    """``root`` with a copy of ``processed`` (a prepared-data fixture) as its data/processed."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    shutil.copytree(processed, root / "data" / "processed")
    return root


def reprepared(output: Path) -> None:
    """Record the edited content of a prepared ``output`` as its identity, as its prepare stage would have: a
    test that reshapes prepared data plays that stage (else the run refuses the data as changed)."""
    sidecar = hashing.sidecar_path(output)
    record = json.loads(sidecar.read_text())
    record["identity"] = hashing.record_identity(output, record["identity"]["stage"])
    sidecar.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def write_boston(root: Path, rows: int = 80) -> None:
    """A Boston-shaped table (13 features, a linear target) as root/data/processed/boston.npz."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, 13))
    y = X @ rng.normal(size=13) + 0.1 * rng.normal(size=rows) + 20
    (root / "data" / "processed").mkdir(parents=True, exist_ok=True)
    np.savez(root / "data" / "processed" / "boston.npz", X=X, y=y, feature_names=np.array(["f"] * 13))
