"""Many training runs at once, on DVC's own terms: ``make fanout JOBS=8 [STAGES="train_cifar ..."]``.

    python -m pipelines.fanout --jobs 8 [--devices 0,1,2,3,4,5,6,7] [TARGET ...]

1. ``dvc repro`` of what the training stages depend on (the prepare stages), once;
2. every training stage (a ``python -m pipelines.train`` command) that is not up to date, each in its own
   ``dvc --wait-for-lock repro --single-item <stage>``, at most ``--jobs`` at a time. DVC releases its
   repository lock while a stage's command runs and takes it again to write dvc.lock, so runs overlap
   and their dvc.lock entries do not;
3. ``dvc repro`` of the targets (by default the whole pipeline: the report), once all of them finished.

On one multi-GPU node (GAL_LAUNCHER=local), each run gets its own ``trainer.gpus`` GPUs through
CUDA_VISIBLE_DEVICES (from ``--devices``, else CUDA_VISIBLE_DEVICES, else every GPU torch sees), and waits
until that many are free; CPU runs (trainer.device=cpu) take none. With GAL_LAUNCHER=slurm each run is a
job of its own and ``--jobs`` bounds how many are queued at once. A stage's output is in
logs/fanout/<stage>.log; a failed stage stops nothing else, and step 3 then does not run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines.errors import ConfigError, UserError, print_error
from pipelines.training import cluster

TRAIN = "pipelines.train"
LOGS = Path("logs/fanout")
_SAY = threading.Lock()


def say(line: str) -> None:
    """One whole line from any thread (print writes the line and its newline separately)."""
    with _SAY:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def dvc(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.dvc_cli", *args], **kwargs)


def plan(targets: list[str], root: str = ".") -> tuple[list[str], list]:
    """(the stages the training stages depend on, the training stages as (name, command)), for ``targets``
    (all stages when empty) and what they depend on, in the DVC project at ``root``."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with Repo(root) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        chosen = list(graph) if not targets else []
        for target in targets:  # a target names a stage or stage group of root's dvc.yaml, wherever this runs
            try:
                chosen += repo.stage.collect(f"{Path(root) / 'dvc.yaml'}:{target}")
            except DvcException:
                raise ConfigError(f"no stage or stage group {target!r} in dvc.yaml") from None
        wanted = set(chosen).union(*(nx.descendants(graph, s) for s in chosen))
        training = [s for s in wanted if TRAIN in s.cmd]
        upstream = set().union(*(nx.descendants(graph, s) for s in training)) - set(training)
        order = {s: i for i, s in enumerate(repo.index.stages)}  # dvc.yaml's order
        return ([s.name for s in sorted(upstream, key=order.get)],
                [(s.name, s.cmd) for s in sorted(training, key=order.get)])


def stale(names: list[str]) -> list[str]:
    """The stages of ``names`` that ``dvc status`` finds changed (or never run). One status of the whole
    pipeline: given stage names, DVC collects each against the whole project (minutes for a few hundred)."""
    if not names:
        return []
    done = dvc("status", "--json", capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"dvc status failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    changed = json.loads(done.stdout or "{}")
    return [name for name in names if name in changed]


def gpus_needed(cmd: str) -> int:
    """How many GPUs the run of ``cmd`` takes: trainer.gpus x trainer.nodes, none on the CPU."""
    from pipelines.config import compose

    argv = shlex.split(cmd)
    trainer = compose("train", argv[argv.index(TRAIN) + 1:]).trainer
    return 0 if str(trainer.device) == "cpu" else int(trainer.gpus) * int(trainer.nodes)


def local_devices(flag: str | None) -> list[str]:
    if flag is not None:
        return [d for d in flag.split(",") if d]
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class Devices:
    """A pool of GPU ids; a run holds ``n`` of them while it runs."""

    def __init__(self, ids: list[str]):
        self.free, self.cond = list(ids), threading.Condition()

    def take(self, n: int) -> list[str]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.free) >= n)
            taken, self.free = self.free[:n], self.free[n:]
            return taken

    def give(self, ids: list[str]) -> None:
        with self.cond:
            self.free += ids
            self.cond.notify_all()


def run_stage(name: str, gpus: int, devices: Devices | None) -> tuple[str, int, float]:
    held = devices.take(gpus) if devices is not None else []
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ",".join(held)} if devices is not None else {})}
    log = LOGS / f"{name.replace('/', '_')}.log"
    start = time.monotonic()
    say(f"start {name}" + (f" on GPU {','.join(held)}" if held else ""))
    try:
        with open(log, "w") as out:
            code = dvc("--wait-for-lock", "repro", "--single-item", name, stdout=out, stderr=subprocess.STDOUT,
                       env=env).returncode
    finally:
        if devices is not None:
            devices.give(held)
    took = time.monotonic() - start
    say(f"{'done' if code == 0 else 'FAILED'} {name} in {took:.0f} s" + ("" if code == 0 else f" (see {log})"))
    return name, code, took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="DVC stages or stage groups (default: the whole pipeline)")
    parser.add_argument("--jobs", type=int, default=4, help="runs at once (default 4)")
    parser.add_argument("--devices", help="GPU ids to share out, e.g. 0,1,2,3 (default: every visible GPU)")
    args = parser.parse_args(argv)
    try:
        if args.jobs < 1:
            raise ConfigError(f"--jobs={args.jobs}: use at least 1")
        upstream, training = plan(args.targets)
        if upstream and dvc("repro", *upstream).returncode != 0:
            return 1
        todo = stale([name for name, _ in training])
        devices = None
        if cluster.launcher() == "local":
            ids = local_devices(args.devices)
            if ids:
                devices = Devices(ids)
        needs = {name: gpus_needed(cmd) if devices is not None else 0 for name, cmd in training if name in todo}
        too_big = [n for n, g in needs.items() if devices is not None and g > len(devices.free)]
        if too_big:
            raise ConfigError(f"{too_big[0]} needs {needs[too_big[0]]} GPUs and only {len(devices.free)} are shared "
                              "out here (--devices)")
        print(f"{len(todo)} of {len(training)} training stages to run, {args.jobs} at a time", flush=True)
        LOGS.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda name: run_stage(name, needs[name], devices), todo))
        failed = [name for name, code, _ in results if code != 0]
        if failed:
            print(f"{len(failed)} stage(s) failed: {' '.join(failed)}; the rest is left for a rerun", file=sys.stderr)
            return 1
        return dvc("repro", *args.targets).returncode
    except UserError as err:
        return print_error("fanout", err)


if __name__ == "__main__":
    sys.exit(main())
