"""The GAL step's arithmetic through ``torch.compile``, and what can silently go wrong with it.

What is compiled: g = dL/dz0 (``torch.func.grad_and_value``, because ``torch.autograd.grad`` would break the
graph), the adjustment, the trial step, the remainder's gradient path, the safeguard and every statistic, as
one graph (``fullgraph=True``: a graph break is an error, not a silent split). What stays eager: h's forward
(so a DDP-wrapped h, its hooks and its dtype work unchanged), the noise draw of the noise sources (so the
numbers equal the eager step's), the single ``torch.autograd.backward`` call and the detailed statistics.

Pitfalls designed around: lr enters as a 0-d tensor (a Python float that changes every step would be a
constant of the graph and recompile); the graph runs with autocast off, as its backward does; each adjuster
compiles its own code object, so two adjusters with different settings are not recompilations of each other
(dynamo's cache and its recompile limit are per code object; past the limit it falls back to eager silently).
With a CUDA-graph mode ("reduce-overhead"), torch falls back to plain kernels when it cannot graph a region
(a CPU tensor, a dynamic shape, an input mutation): that fallback is detected and reported
(``skips``, and a RuntimeWarning) instead of trusted.
"""
from __future__ import annotations

import logging
import types
import warnings
from contextlib import contextmanager
from itertools import count
from typing import Callable, Iterator

import torch
from torch import Tensor

from .stats import DERIVED, derive
from .step import StepConfig, StepResult, adjusted_step

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs
_CUDAGRAPH_LOG = "torch._inductor.cudagraph_utils.__cudagraphs"  # where Inductor logs a skip and its reason
PACKED = ("loss", "tentative_loss", "signed_remainder", "cosine", *DERIVED)  # the compiled step's statistics
_ids = count()


def _step_body(cfg: StepConfig, all_reduce: Callable[[Tensor], Tensor] | None):
    def gal_step(z0: Tensor, a: Tensor, lr: Tensor, loss_fn: Callable[[Tensor], Tensor]):
        g, loss = torch.func.grad_and_value(loss_fn)(z0)
        result = adjusted_step(cfg, z0, loss, g, a, lr, loss_fn, all_reduce)
        derived = derive(result.loss, result.tentative, result.signed_remainder, result.accepted)
        # every scalar statistic in one output: one small kernel writes them all
        stats = torch.stack([result.loss, result.tentative, result.signed_remainder, result.cosine,
                             *(derived[name] for name in DERIVED)])
        return result, stats
    # a code object of its own (see the module docstring)
    code = gal_step.__code__.replace(co_name=f"gal_step_{next(_ids)}")
    return types.FunctionType(code, gal_step.__globals__, code.co_name, None, gal_step.__closure__)


class _SkipLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class CompiledStep:
    """``torch.compile`` of one adjuster's step arithmetic; called like the eager arithmetic, it returns the
    StepResult and the packed statistics (PACKED's order)."""

    def __init__(self, cfg: StepConfig, all_reduce: Callable[[Tensor], Tensor] | None, mode: str | None,
                 backend: str = "inductor", dynamic: bool | None = None):
        self.mode, self.backend = mode, backend
        self.cudagraphs = backend == "inductor" and mode in CUDAGRAPH_MODES
        self.skips: list[str] = []  # why CUDA graphs were not used, as torch reported it
        self._fn = torch.compile(_step_body(cfg, all_reduce), fullgraph=True, mode=mode, backend=backend,
                                 dynamic=dynamic)

    def __call__(self, z0: Tensor, a: Tensor, lr: Tensor,
                 loss_fn: Callable[[Tensor], Tensor]) -> tuple[StepResult, Tensor]:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new training step: earlier outputs may be reused
        result, stats = self._fn(z0, a, lr, loss_fn)
        if self.cudagraphs:  # graph outputs are overwritten by the next replay; the statistics must outlive it
            stats = stats.clone()
        return result, stats

    @contextmanager
    def watch(self, device: torch.device) -> Iterator[None]:
        """Around the compiled call and the backward (where the backward graph compiles): records the CUDA
        graph skips torch counts there, with their logged reasons, and warns once per new skip."""
        if not self.cudagraphs:
            yield
            return
        from torch._dynamo.utils import counters

        before = counters["inductor"]["cudagraph_skips"]
        handler = _SkipLog()
        logger = logging.getLogger(_CUDAGRAPH_LOG)
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)
        new = counters["inductor"]["cudagraph_skips"] - before
        if new:
            # off CUDA, torch counts the skip without logging its reason
            reasons = handler.messages or [f"a skip torch counted without a reason (the step runs on {device.type})"]
            self.skips.extend(reasons)
            warnings.warn("GAL's compiled step runs without CUDA graphs: " + "; ".join(reasons), RuntimeWarning,
                          stacklevel=4)
