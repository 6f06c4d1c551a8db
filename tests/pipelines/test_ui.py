"""`make ui` (pipelines/ui.py): the runs link of each experiment, in MLflow's Model training view; the real
server started, its links printed once it answers, stopped by SIGTERM with its whole process tree; and, where
a Chromium is installed, what a browser with an empty profile shows at such a link."""
from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from pipelines import ui

BASE = "http://127.0.0.1:5000"
BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def make_store(uri: str) -> dict[str, str]:
    """Two experiments as the project makes them (one with a run), MLflow's Default empty; name -> id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = {name: client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})
           for name in ("regression", "classification")}
    run = client.create_run(ids["regression"], run_name="boston-gal-s0")
    client.log_metric(run.info.run_id, "test_mae", 2.5)
    client.set_terminated(run.info.run_id)
    return ids


def test_runs_links_list_each_experiment_in_the_model_training_view(sqlite_uri):
    ids = make_store(sqlite_uri)
    assert ui.runs_links(sqlite_uri, BASE + "/") == [
        (name, f"{BASE}/#/experiments/{ids[name]}/runs?workflowType=machine_learning")
        for name in ("regression", "classification")]  # by id; MLflow's empty Default left out

    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=sqlite_uri).create_run("0")  # a run in Default: then it is listed too
    assert [name for name, _ in ui.runs_links(sqlite_uri, BASE)] == ["Default", "regression", "classification"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m pipelines.ui` on a new store and a free port, until its links are printed."""
    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root.as_posix()}/mlflow.db"
    ids = make_store(uri)
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.ui", "--store", uri, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=log)
    out = b""
    deadline = time.monotonic() + 180
    while out.count(b"\n") < 3 and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1)[0]:
            out += os.read(proc.stdout.fileno(), 4096)
    lines = out.decode().splitlines()
    yield {"proc": proc, "lines": lines, "base": f"http://127.0.0.1:{port}", "ids": ids, "log": root / "server.log"}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    log.close()


@pytest.mark.slow
def test_make_ui_prints_each_runs_link_once_the_server_answers(server):
    base, ids = server["base"], server["ids"]
    assert server["lines"] == [
        f"MLflow UI at {base} (sqlite:///{server['log'].parent.as_posix()}/mlflow.db); Ctrl-C stops it. Each "
        "experiment's runs, in the Model training view:",
        f"  regression      {base}/#/experiments/{ids['regression']}/runs?workflowType=machine_learning",
        f"  classification  {base}/#/experiments/{ids['classification']}/runs?workflowType=machine_learning",
    ], server["log"].read_text()[-2000:]
    with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
        assert response.status == 200


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")
def test_a_fresh_browser_opens_the_link_in_the_model_training_view(server, tmp_path):
    """An empty profile (no localStorage: MLflow would show its GenAI sidebar) at the printed link: the
    sidebar is Model training's (Runs, Models), with none of GenAI's pages (Judges, Sessions)."""
    url = server["lines"][1].split()[-1]
    dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                          "--virtual-time-budget=15000", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    exp = server["ids"]["regression"]
    assert f'href="#/experiments/{exp}/runs?startTime=ALL&amp;workflowType=machine_learning"' in dom, dom[-2000:]
    assert "boston-gal-s0" in dom and f"#/experiments/{exp}/judges" not in dom


@pytest.mark.slow
def test_sigterm_stops_the_server_and_its_workers(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert "ui: interrupted by SIGTERM; the MLflow UI stopped" in server["log"].read_text()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server['base']}/health", timeout=5)
