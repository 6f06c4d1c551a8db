"""Training runs that start warm: one process imports torch, MLflow, Hydra and the tasks once, and forks a copy
of itself for each `python -m pipelines.train` command run while it lives.

    python -m pipelines.warm dvc repro          # `make repro` and `make fanout` run their command so
    python -m pipelines.warm --serve SOCKET     # the server alone (the line above starts one on demand)

A run started cold spends about 5 s of its 6 s on imports (2 cores; BENCHMARKS.md, start-up), more than the
training of a smoke run. Under ``GAL_WARM=<socket>`` the train command is a thin client: it hands its
arguments, working directory, environment and standard streams to the server, whose fork runs the command
exactly as ``python -m pipelines.train`` would, writing straight to the client's streams. The client forwards
SIGINT, SIGTERM and SIGHUP to the fork (not those it ignores: nohup), and ends with the fork's exit status
(a fork killed by a signal kills the client with it). A client killed outright (SIGKILL) takes its fork with
it: the server kills the fork when the client's connection closes.

The fork runs the code the server imported. So the server serves only a client whose code state is the
server's: the same interpreter, import path, files of pipelines/ and gal_core (path, size, modification
time) and the environment variables read at import (``IMPORT_ENV``; those the server's own imports set count
only where the client's value differs). At any difference the server says which on its own stderr (the
terminal of `make repro`, not the run's output) and the client runs the command itself, cold, as it does when
no server answers: a warm start is never a different run, only a faster one.
DVC sees the same command, outputs and exit code either way; a plain ``dvc repro`` runs cold. The wrapper
starts the server when the first client connects, so a command that trains nothing (a repro with every
stage up to date) pays none of its imports.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOCKET_ENV = "GAL_WARM"
SERVED = ("pipelines.train",)  # the entry points a fork runs
BACKLOG = 64  # clients that may wait while the server starts or forks
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# prefixes of the variables imports read. Those read when CUDA or NCCL start (CUDA_VISIBLE_DEVICES,
# CUBLAS_WORKSPACE_CONFIG, NCCL_*) are not among them: the server never starts CUDA, its forks do, with the
# client's environment (and a run sets CUBLAS_WORKSPACE_CONFIG itself, in-process in tests). Nor is KMP_*:
# torch's GNU OpenMP reads OMP_*, and only Intel's reads KMP_* (which importing scikit-learn sets). timm reads
# TIMM_*, and the Hugging Face hub it imports (pretrained weights) HF_*, HUGGINGFACE_*, its cache's home and
# whether to go offline
IMPORT_ENV = ("PYTHON", "LD_", "TORCH", "PYTORCH", "OMP_", "MKL_", "OPENBLAS_", "CUDA_HOME", "CUDA_PATH",
              "TRITON", "MLFLOW_CONFIGURE_LOGGING", "TIMM_", "HF_", "HUGGINGFACE_", "XDG_CACHE_HOME", "HOME",
              "TRANSFORMERS_OFFLINE", "DISABLE_TELEMETRY", "DO_NOT_TRACK")
PRELOAD = ("torch", "torch._dynamo", "torch.optim", "numpy", "omegaconf", "hydra", "hydra.core.global_hydra",
           "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "sqlalchemy.dialects.sqlite",
           "pipelines.config", "pipelines.training.runner", "pipelines.tasks.regression.task",
           "pipelines.tasks.classification.task", "pipelines.tasks.detection.task",
           "timm", "timm.optim", "timm.scheduler", "timm.data")  # timm: 0.7 s of each image run's start otherwise


def code_state() -> str:
    """A digest of what a fork's run would import: interpreter, import path, and every file of the pipelines
    and gal_core packages as this process would find them."""
    from importlib.util import find_spec

    digest = hashlib.sha256(repr((sys.executable, sys.version, sys.flags, sys.path)).encode())
    for package in ("pipelines", "gal_core"):
        spec = find_spec(package)
        for folder in sorted(spec.submodule_search_locations or ()) if spec else ():
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    stat = path.stat()
                    digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def import_vars(environ: dict[str, str]) -> dict[str, str]:
    """The variables of ``environ`` that imports read."""
    return {k: v for k, v in environ.items() if k.startswith(IMPORT_ENV)}


# ------------------------------------------------------------------------------------------------ client
def run_served(module: str) -> None:
    """Under GAL_WARM, run ``python -m <module>`` in the server and exit as it did; return (to run here,
    cold) when no server answers or its code state is not this one."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
    except OSError:
        return
    ignored = [int(s) for s in FORWARDED if signal.getsignal(s) == signal.SIG_IGN]
    request = {"module": module, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ),
               "ignored": ignored, "state": code_state()}
    reader = conn.makefile("r")
    try:
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        reply = json.loads(reader.readline() or "{}")
    except (OSError, ValueError):
        return
    if "pid" not in reply:
        return
    pid = reply["pid"]
    for signum in FORWARDED:
        if signum not in ignored:
            signal.signal(signum, lambda s, _frame: _send(pid, s))
    try:
        line = reader.readline()
    except OSError:
        line = ""
    if not line:
        print(f"{module}: the warm server went away while it ran this command", file=sys.stderr)
        sys.exit(1)
    code = os.waitstatus_to_exitcode(json.loads(line)["status"])
    if code < 0:  # killed by a signal: end the same way, so the caller sees what it would have seen
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------ server
def serve(path: str, listening: int | None = None) -> None:
    """Import what runs need, then fork one process per accepted request until the parent process ends
    (or a SIGTERM). ``listening``: the socket's descriptor, bound and listening already (the wrapper's)."""
    import importlib

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    cold = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    # what imports put in the environment (torch's compile cache folder, MLflow's session) goes to each run,
    # as a cold run's own imports would have put it there
    Server(path, cold, {k: v for k, v in os.environ.items() if k not in cold}, listening).loop(os.getppid())


def listen(path: str) -> socket.socket:
    """A Unix socket at ``path``, listening."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(BACKLOG)
    return listener


class Server:
    def __init__(self, path: str, cold: dict[str, str], import_env: dict[str, str], listening: int | None = None):
        self.path, self.state, self.import_env = path, code_state(), import_env
        self.cold_vars = import_vars(cold)
        self.listener = listen(path) if listening is None else socket.socket(fileno=listening)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "request")
        self.forks: dict[int, tuple[socket.socket, int]] = {}  # pid -> (its client's connection, pidfd)

    def loop(self, parent: int) -> None:
        try:
            while os.getppid() == parent:
                for key, _ in self.selector.select(timeout=1.0):
                    kind, pid = key.data if isinstance(key.data, tuple) else (key.data, None)
                    if kind == "request":
                        self.start()
                    elif kind == "ended":  # the fork's exit status to its client
                        self.finish(pid, os.waitpid(pid, 0)[1])
                    else:  # the client's connection closed before its fork ended: it was killed outright
                        _send(pid, signal.SIGKILL)
                        self.selector.unregister(key.fileobj)
        finally:
            for pid in self.forks:
                _send(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def start(self) -> None:
        """Accept one request and fork its run; a refused one (its client then runs cold) gets an empty reply."""
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        try:
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            while not message.endswith(b"\n"):
                chunk = conn.recv(1 << 20)
                if not chunk:
                    raise OSError("truncated request")
                message += chunk
            request = json.loads(message)
        except (OSError, ValueError):
            conn.close()
            return
        refused = self.refusal(request) or (len(fds) != 3 and "no standard streams")
        if refused:  # said here, not in the run's own output, which stays a cold run's
            print(f"warm server: {' '.join(['python -m', str(request.get('module')), *request.get('argv', [])])} "
                  f"starts cold: {refused}", file=sys.stderr, flush=True)
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall(b"{}\n")
            conn.close()
            return
        conn.settimeout(None)
        pid = os.fork()
        if pid == 0:  # nothing of the server's stays open in the run
            for other, pidfd in self.forks.values():
                other.close()
                os.close(pidfd)
            self.selector.close(), self.listener.close(), conn.close()
            _run(request, {**request["env"], **self.import_env}, fds)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.forks[pid] = (conn, pidfd)
        self.selector.register(pidfd, selectors.EVENT_READ, ("ended", pid))
        self.selector.register(conn, selectors.EVENT_READ, ("client", pid))
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")

    def refusal(self, request: dict) -> str | None:
        """Why the client's code state is not this server's (None: it is): the same code, and the same variables
        that imports read, but for those the server's own imports set (a client that imported torch has them)."""
        if request.get("module") not in SERVED:
            return f"{request.get('module')} is not served"
        if request.get("state") != self.state:
            return "the code or interpreter differs from the warm server's"
        client_vars = {k: v for k, v in import_vars(request.get("env", {})).items() if self.import_env.get(k) != v}
        differing = sorted(k for k in client_vars.keys() | self.cold_vars.keys()
                           if client_vars.get(k) != self.cold_vars.get(k))
        return f"{', '.join(differing)} differ from the warm server's" if differing else None

    def finish(self, pid: int, status: int) -> None:
        conn, pidfd = self.forks.pop(pid)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"status": status}).encode() + b"\n")
        for registered in (pidfd, conn):
            with contextlib.suppress(KeyError):  # the connection is gone if its client closed it first
                self.selector.unregister(registered)
        os.close(pidfd)
        conn.close()


def _run(request: dict, environ: dict[str, str], fds: list[int]) -> None:
    """In the fork: become the client's process (streams, directory, environment, signals), then run."""
    import io
    import runpy

    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(environ)
        os.environ.pop(SOCKET_ENV, None)  # its own children (torchrun workers) start cold
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=unbuffered,
                                      line_buffering=os.isatty(1))
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_IGN if signum in request["ignored"] else signal.SIG_DFL)
        _fresh_randomness()
        sys.argv = [request["module"], *request["argv"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if not isinstance(done.code, (int, type(None))):
                print(done.code, file=sys.stderr)
    except BaseException:  # what an uncaught exception prints in a process of its own
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _fresh_randomness() -> None:
    """Unseeded generators as a cold process has them (each fork would otherwise repeat the server's draws)."""
    import random

    import numpy
    import torch

    random.seed()
    numpy.random.seed()
    torch.seed()


def wait_listening(path: Path, server: subprocess.Popen, limit: float = 600.0) -> None:
    """Return once ``server`` (``python -m pipelines.warm --serve path``) listens; RuntimeError if it ended or
    ``limit`` seconds passed first (until then a client would start cold: a benchmark or test waits)."""
    deadline = time.monotonic() + limit
    while not Path(path).exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the warm server at {path} did not start (exit code {server.poll()})")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------------ wrapper
def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"] and len(argv) in (2, 3):
        serve(argv[1], int(argv[2]) if len(argv) == 3 else None)
        return 0
    if not argv:
        print("usage: python -m pipelines.warm COMMAND [ARG ...]", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gal-warm-") as folder:
        path = os.path.join(folder, "socket")
        listener = listen(path)
        command = subprocess.Popen(argv, env={**os.environ, SOCKET_ENV: path})
        for signum in FORWARDED:  # the command gets the terminal's signals itself; a kill of this is passed on
            signal.signal(signum, lambda s, _frame: _send(command.pid, s) if s != signal.SIGINT else None)
        server = _serve_on_demand(listener, command)
        code = command.wait()
        if server is not None:
            server.terminate()
            server.wait()
    return code if code >= 0 else 128 - code


def _serve_on_demand(listener: socket.socket, command: subprocess.Popen) -> subprocess.Popen | None:
    """The server, started once the first client connects (it waits in the backlog while the server imports),
    or None if ``command`` ended first: a repro with nothing to train pays none of the server's imports. The
    listener is closed here either way, so a server that dies leaves no client waiting: each then runs cold."""
    with contextlib.closing(listener), selectors.DefaultSelector() as selector:
        ended = os.pidfd_open(command.pid)
        try:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(ended, selectors.EVENT_READ)
            ready = {key.fileobj for key, _ in selector.select()}
        finally:
            os.close(ended)
        if listener not in ready:
            return None
        # its own session: a terminal's Ctrl-C reaches the clients, which pass it on, never the forks twice
        return subprocess.Popen([sys.executable, "-m", "pipelines.warm", "--serve", listener.getsockname(),
                                 str(listener.fileno())], pass_fds=[listener.fileno()], start_new_session=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
