"""Fixed cost of one training run, cold and warm: the wall time of a smoke Boston run from start to exit.

    python -m benchmarks.startup [--repeats 5] [--epochs 15]

Prepares the smoke Boston data in a temporary root with the real prepare stage, then times, ``--repeats``
times each and interleaved, `python -m pipelines.train experiment=boston_gal profile=smoke` (a new seed each
time, so every run trains and records itself):
- cold: a process of its own, as under a plain `dvc repro`;
- warm: started through a warm server (pipelines/warm.py), as under `make repro` and `make fanout`.
The run's own training takes well under a second of this; the rest is the fixed cost. The client's CPU
seconds show what a warm start leaves in the command DVC runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15, help="the smoke profile's 15 by default")
    return parser.parse_args(argv)


def timed_run(root: Path, seed: int, epochs: int, env: dict) -> tuple[float, float]:
    """(wall seconds, the command's own CPU seconds) of one training run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.train", "experiment=boston_gal", "profile=smoke",
                    f"seed={seed}", f"task.epochs={epochs}", f"root={root}"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> dict:
    from pipelines import warm
    from pipelines.machine import describe

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gal-startup-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        env.pop("DVC_STAGE", None)
        subprocess.run([sys.executable, "-m", "pipelines.prepare.regression", "data=boston", "profile=smoke",
                        f"root={root}"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        socket = root / "warm.socket"
        server = subprocess.Popen([sys.executable, "-m", "pipelines.warm", "--serve", str(socket)], cwd=ROOT,
                                  start_new_session=True)
        try:
            warm.wait_listening(socket, server)
            timed_run(root, 1000, args.epochs, env)  # the store's first run creates its tables: not timed
            runs: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}
            for i in range(args.repeats):  # interleaved, so drift in machine load hits both alike
                runs["cold"].append(timed_run(root, 2 * i, args.epochs, env))
                runs["warm"].append(timed_run(root, 2 * i + 1, args.epochs, {**env, warm.SOCKET_ENV: str(socket)}))
        finally:
            server.terminate()
            server.wait()
    result = {
        "epochs": args.epochs, "repeats": args.repeats,
        "median_wall_s": {k: round(statistics.median(w for w, _ in v), 2) for k, v in runs.items()},
        "median_command_cpu_s": {k: round(statistics.median(c for _, c in v), 2) for k, v in runs.items()},
        "all_wall_s": {k: [round(w, 2) for w, _ in v] for k, v in runs.items()},
        "machine": describe(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
