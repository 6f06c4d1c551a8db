"""What every test process sets up, for `make test`'s parallel workers (pytest-xdist) as for one process.

- Threads: each of the N workers (and the runs it starts, through OMP_NUM_THREADS) uses cores / N threads:
  OpenMP threads that outnumber the cores spin against each other, and a test then takes ten times as long.
- SIGINT: an xdist worker ignores it, and a child inherits an ignored signal; the tests that Ctrl-C a run
  need it delivered, as from a terminal.
"""
from __future__ import annotations

import os
import signal

import torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // _workers))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
