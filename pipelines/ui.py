"""`make ui`: the MLflow UI on a local store, bound to 127.0.0.1, with each experiment's runs link printed
once the server answers.

    python -m pipelines.ui [--store sqlite:///mlflow.db] [--port 5000]

MLflow 3 keeps its GenAI / Model training switch in the browser's localStorage only (key
`mlflow.workflowType`, default GenAI; MLflow issue #24498), and its server has no option to change that
default: a fresh browser shows an experiment of training runs inside the GenAI sidebar. The UI reads a
`workflowType` query parameter before localStorage, so the links printed here carry
`?workflowType=machine_learning` and open each experiment's runs in the Model training view.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pipelines.errors import UserError, run_cli
from pipelines.tracking import store

HOST = "127.0.0.1"  # the default UI is never exposed beyond this machine
VIEW = "workflowType=machine_learning"  # the UI's own query parameter for the Model training view
START_TIMEOUT = 120  # seconds for the server to answer /health (a new store runs its migrations first)


def runs_url(base: str, experiment_id: str) -> str:
    """The UI's page of an experiment's runs, in the Model training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{VIEW}"


def runs_links(uri: str, base: str) -> list[tuple[str, str]]:
    """(experiment name, runs URL) for every active experiment of the store at ``uri``, by id; MLflow's
    own "Default" experiment only when it holds a run (this project never logs there)."""
    with store.quiet():
        client = store.client(uri)
        experiments = sorted(client.search_experiments(), key=lambda e: int(e.experiment_id)
                             if e.experiment_id.isdigit() else e.experiment_id)
        return [(e.name, runs_url(base, e.experiment_id)) for e in experiments
                if e.name != "Default" or client.search_runs([e.experiment_id], max_results=1)]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def serve(store_uri: str, port: int) -> int:
    """Start `mlflow ui`, print the links when it answers, and wait for it; its exit code."""
    base = f"http://{HOST}:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: a UI only
    # Its own session, so that every way this process ends (Ctrl-C, SIGTERM, an error) stops the server's whole
    # process tree (mlflow ui starts uvicorn and its workers) here; no access log, so the links stay in sight;
    # its output on stderr, so stdout holds the links alone.
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri,
                               "--host", HOST, "--port", str(port), "--uvicorn-opts", "--no-access-log"],
                              env=env, start_new_session=True, stdout=sys.stderr)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while server.poll() is None and not _answers(base):
            if time.monotonic() > deadline:
                raise UserError(f"the MLflow UI did not answer at {base} within {START_TIMEOUT} s; see its output "
                                "above")
            time.sleep(0.5)
        if server.poll() is not None:
            raise UserError(f"the MLflow UI exited (code {server.returncode}) before answering at {base}; "
                            f"if port {port} is taken, run make ui UI_PORT=<another port>")
        try:
            links = runs_links(base, base)
            shown = "Each experiment's runs, in the Model training view:" if links else "No runs yet."
        except Exception as err:  # MLflow's own errors: the UI still serves, only the list is missing
            links, shown = [], f"(cannot list its experiments: {store.cause(err)})"
        print(f"MLflow UI at {base} ({store_uri}); Ctrl-C stops it. {shown}", flush=True)
        width = max((len(name) for name, _ in links), default=0)
        for name, url in links:
            print(f"  {name:<{width}}  {url}", flush=True)
        while True:  # waits in short steps: a signal another thread (MLflow's) receives is then handled here
            try:
                return server.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """End the server's process group: SIGTERM (uvicorn shuts down gracefully), SIGKILL after 10 s."""
    for signum, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, signum)
        except ProcessLookupError:  # the whole group is gone already
            return
        try:
            server.wait(timeout=wait)
            return
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C: kill at once
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite:///mlflow.db", help="backend store URI (default: the repo's)")
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli("ui", lambda: serve(args.store, args.port), interrupted="the MLflow UI stopped")


if __name__ == "__main__":
    sys.exit(main())
