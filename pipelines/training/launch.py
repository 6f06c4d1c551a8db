"""Processes and devices for a training run: relaunch under torchrun for several processes, then set up
torch.distributed (NCCL on GPUs, gloo on CPU) and pick this process's device.

The DVC stage command is the same for 1 GPU and for many: with trainer.gpus * trainer.nodes > 1 and no
torchrun around it, `python -m pipelines.train ...` re-executes itself as
`python -m torch.distributed.run --nproc_per_node <gpus> ... -m pipelines.train ...`.
"""
from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipelines.errors import ConfigError


@dataclass(frozen=True)
class Processes:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        return dist.group.WORLD if self.world > 1 else None


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(trainer, argv: list[str]) -> list[str]:
    """The torchrun command line that reruns ``python -m pipelines.train <argv>`` on trainer.gpus processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={trainer.gpus}"]
    if trainer.nodes > 1:
        check_nodes(trainer)
        # static rendezvous: ranks follow node_rank, so global rank 0 (logging, checkpoints) is on node 0,
        # where the DVC stage runs; c10d would hand out node ranks in arrival order
        cmd += [f"--nnodes={trainer.nodes}", f"--node_rank={trainer.node_rank}", "--rdzv_backend=static",
                f"--rdzv_endpoint={trainer.rdzv_endpoint}"]
    else:
        cmd.append("--standalone")
    return [*cmd, "-m", "pipelines.train", *argv]


def check_nodes(trainer) -> None:
    if not trainer.rdzv_endpoint:
        raise ConfigError(f"trainer.nodes={trainer.nodes} needs trainer.rdzv_endpoint=<host:port of node 0>")
    if str(trainer.node_rank) not in map(str, range(trainer.nodes)):
        raise ConfigError(f"trainer.node_rank={trainer.node_rank!r}: use 0 to {trainer.nodes - 1} (0 on the node "
                          "at rdzv_endpoint)")


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies. torchrun starts workers in sessions of their own, so
    without this a killed stage would leave them training (and writing checkpoints) beside its rerun."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent was gone before prctl took effect
            os._exit(1)


def worker_init(worker_id: int) -> None:
    """A DataLoader worker's start: it ends with its training process, so a cancelled or killed job leaves
    no worker behind (they would hold the job's memory and GPU node)."""
    die_with_parent()


def relaunch(trainer) -> int:
    """Run this command again under torchrun; the exit code of torchrun."""
    cmd = torchrun_command(trainer, sys.argv[1:])
    print(f"launching {trainer.gpus * trainer.nodes} processes: {' '.join(cmd[1:])}", flush=True)
    with subprocess.Popen(cmd, preexec_fn=die_with_parent) as proc:
        try:
            return proc.wait()
        except KeyboardInterrupt as err:  # pass SIGTERM/SIGINT on: torchrun stops its workers, which end KILLED
            proc.send_signal(getattr(err, "signum", signal.SIGINT))
            proc.wait()
            raise


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def precision(trainer, device_type: str) -> str:
    """trainer.precision as it runs on ``device_type``: auto is bf16 autocast on CUDA, fp32 elsewhere; fp16 is
    float16 autocast with a GradScaler (the authors' ImageNet recipe, apex O1)."""
    chosen = str(trainer.precision)
    return ("bf16" if device_type == "cuda" else "fp32") if chosen == "auto" else chosen


def compiled_step(trainer) -> bool:
    """trainer.compile: GAL's step through torch.compile (gal_core's compiled step: the same numbers within
    float rounding). auto is off until a GPU measurement shows it faster (BENCHMARKS.md, GAL step overhead)."""
    return str(trainer.compile) == "True"


def device_choice(trainer) -> str:
    """trainer.device as asked (auto, cuda or cpu), without asking this machine."""
    choice = str(trainer.device)
    if choice not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"trainer.device={choice!r}: use auto, cuda or cpu")
    return choice


def device_type(trainer) -> str:
    """The device type this machine runs trainer.device on."""
    choice = device_choice(trainer)
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but torch sees no CUDA device; use trainer.device=cpu or auto")
    return choice


def setup(trainer) -> Processes:
    """Initialise torch.distributed when under torchrun; this process's rank, world size and device."""
    kind = device_type(trainer)
    if not under_torchrun():
        return Processes(0, 0, 1, torch.device(kind))
    die_with_parent()  # with the torchrun agent
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if kind == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"trainer.gpus={trainer.gpus} but this node has {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local)
    device = torch.device(kind, local) if kind == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30),
                            device_id=device if kind == "cuda" else None)
    return Processes(rank, local, world, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, procs: Processes) -> torch.Tensor:
    if procs.world > 1:
        dist.all_reduce(tensor)
    return tensor


class _Slot:
    """Where a tensor sat in a broadcast state: the skeleton carries these instead of the tensors."""

    def __init__(self, tensor: torch.Tensor):
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype


def _skeleton(obj, tensors: list):
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(obj)
    if isinstance(obj, dict):
        return {k: _skeleton(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_skeleton(v, tensors) for v in obj)
    return obj


def _fill(obj, tensors, procs: Processes):
    if isinstance(obj, _Slot):
        if procs.main:
            kept = next(tensors)
            dist.broadcast(kept.to(procs.device).contiguous(), src=0)
            return kept
        received = torch.empty(obj.shape, dtype=obj.dtype, device=procs.device)
        dist.broadcast(received, src=0)
        return received
    if isinstance(obj, dict):
        return {k: _fill(v, tensors, procs) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors, procs) for v in obj)
    return obj


def broadcast_state(state: dict | None, procs: Processes) -> dict | None:
    """Rank 0's ``state`` (a checkpoint, or None) on every process. Only a skeleton with the plain values is
    pickled; the tensors follow one by one through ``dist.broadcast`` (on the GPU under NCCL), so no rank
    holds a pickled copy of the whole state. Other ranks get their tensors on their own device."""
    if procs.world == 1:
        return state
    tensors: list = []
    box = [_skeleton(state, tensors) if procs.main else None]
    dist.broadcast_object_list(box, src=0, device=procs.device if procs.device.type == "cuda" else None)
    return None if box[0] is None else _fill(box[0], iter(tensors), procs)
