"""The GAL step: replaces ``loss.backward()`` with an adjusted, safeguarded backward pass."""
from __future__ import annotations

import math
from contextlib import nullcontext
from numbers import Integral
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .compiled import PACKED, CompiledStep
from .modules import build_adjuster_net
from .stats import GALStats
from .step import (PROPOSALS, StepConfig, StepResult, adjusted_step, eager_all_reduce, normalized,
                   traceable_all_reduce)

POLICIES = ("safeguard", "strict", "always", "never")
REMAINDERS = ("reference", "exact", "mean")
SOURCES = ("learned", "uniform", "normal")
COMPUTE_DTYPES = (torch.float32, torch.float64)


def _added_grad_norm(params: list[Tensor], before: list[Tensor | None], like: Tensor) -> Tensor:
    """Norm of what one backward call added to ``params``' .grad (``before``: the grads it found)."""
    added = [p.grad if b is None else p.grad - b for p, b in zip(params, before) if p.grad is not None]
    # one fused (foreach) norm over all of h's tensors, not a kernel per tensor
    return nn.utils.get_total_norm(added).to(like.dtype) if added else torch.zeros_like(like)


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


class GradientAdjuster(nn.Module):
    """Gradient Adjustment Learning for any model whose output rows have width ``dim``.

    Replace ``loss_fn(output).backward()`` by ``adjuster.backward(output, loss_fn, lr)`` and let the
    optimiser step both the model and ``adjuster.parameters()`` (the adjustment network h).

    ``process_group``: when given (e.g. ``torch.distributed.group.WORLD``), loss, tentative loss,
    remainder and safeguard are batch-global (all-reduced on the device), so every rank takes the same
    decision and the gradients match a single process on the whole batch. When None, each process decides
    on its own shard. Either way, call :meth:`wrap_ddp` so h's gradients are averaged like the model's.

    ``proposal``: how h's output a (or the noise) becomes the adjustment a_hat. "row" (default; the paper's
    Eq. 4): per row ratio * ||g_i|| * a_i / ||a_i||. At output width 1 that is sign(a) * ratio * |g|, whose
    derivative in h is zero, so h never learns there; the two variants keep a gradient into h at d = 1.
    "batch": ratio * ||G||_F * H / ||H||_F, one norm over the whole batch (G: all rows of g, H: all rows of a;
    in global mode over all ranks), so the direction of H in batch space is learned. "bounded": per row
    ratio * ||g_i|| * tanh(||a_i||) * a_i / ||a_i|| (at d = 1, ratio * |g| * tanh(h(z))): smooth, at most the
    paper's norm, and dependent on the size of h's output. Every variant keeps a_i's direction row by row, so
    ``GALStats.cosine`` (the mean over rows of cos(g_i, a_hat_i)) is the same quantity for each. The noise
    sources use the same map; ``normalize=False`` (the raw draw) accepts only "row".

    ``compute_dtype``: the precision of GAL's arithmetic (g, the trial loss, the remainder, the safeguard):
    torch.float32 (default; what the authors' code computes) or torch.float64, for settings where the trial
    step's remainder is below float32's resolution at the loss (see ``GALStats.remainder_ulps``). h itself
    runs in its parameters' dtype; the gradient sent into the model is cast back to the output's dtype.

    ``compile``: False (default) runs the step eagerly; True compiles its arithmetic with ``torch.compile``
    (``fullgraph=True``); a string is a ``torch.compile`` mode, e.g. ``"reduce-overhead"`` for CUDA graphs
    (fixed shapes only). It is a constructor argument (and :meth:`compile` for later) rather than a wrapper
    around the module because the compiled region is not the module's forward: it is the arithmetic between
    h's output and the one backward call, so that h (DDP-wrapped or not) and the model stay as the user built
    them. See ``gal_core.compiled`` for what is compiled and why. The numbers equal the eager step's up to
    rounding (float64: 1e-12, float32: 1e-6); ``loss_fn`` must then be traceable (tensor code, no host sync).
    """

    def __init__(
        self,
        dim: int,
        arch: Sequence[int] = (),
        ratio: float = 1e-3,
        scale: float = 1.0,
        policy: str = "safeguard",
        remainder: str = "reference",
        source: str = "learned",
        normalize: bool = True,
        proposal: str = "row",
        kind: str = "mlp",
        activation: str | None = None,
        bias: bool = True,
        process_group: dist.ProcessGroup | None = None,
        compute_dtype: torch.dtype = torch.float32,
        compile: bool | str = False,
    ):
        super().__init__()
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        if not all(isinstance(w, Integral) and not isinstance(w, bool) and w >= 1 for w in (dim, *arch)):
            raise ValueError(f"dim and hidden widths must be positive integers, got dim={dim}, arch={tuple(arch)}")
        if not 0 <= ratio < math.inf or not 0 < scale < math.inf:  # NaN fails both comparisons
            raise ValueError(f"ratio must be >= 0 and scale > 0, both finite, got ratio={ratio}, scale={scale}")
        self.dim, self.arch, self.ratio, self.scale = dim, tuple(arch), float(ratio), float(scale)
        self.policy = _choice("policy", policy, POLICIES)
        self.remainder = _choice("remainder", remainder, REMAINDERS)
        self.source = _choice("source", source, SOURCES)
        if not normalize and source == "learned":
            raise ValueError("normalize=False is for the noise sources (uniform, normal): h's proposal is always "
                             "normalised (Eq. 4)")
        self.normalize = bool(normalize)
        self.proposal = _choice("proposal", proposal, PROPOSALS)
        if not normalize and proposal != "row":
            raise ValueError(f"proposal={proposal!r} maps a proposal to a normalised adjustment; normalize=False "
                             "adds the raw draw, so it takes only the default proposal='row'")
        self.net = build_adjuster_net(kind, dim, arch, activation, bias) if source == "learned" else None
        self.process_group = process_group
        self.compute_dtype = compute_dtype
        self._net_ddp: nn.Module | None = None
        self._compiled: CompiledStep | None = None
        self._compiled_cfg: StepConfig | None = None
        self._compile_options: dict | None = None
        self._constants: dict[tuple, Tensor] = {}  # small device tensors made once: lr's buffer, a one
        if compile:
            self.compile(mode=None if compile is True else compile)

    def compile(self, mode: str | None = None, backend: str = "inductor", dynamic: bool | None = None
                ) -> "GradientAdjuster":
        """Compile the step's arithmetic from the next call on (arguments as for ``torch.compile``; mode
        "reduce-overhead" adds CUDA graphs, whose silent fallbacks are reported in ``cudagraph_skips``).
        Overrides ``nn.Module.compile``, which would compile a forward this module does not have."""
        self._compile_options = {"mode": mode, "backend": backend, "dynamic": dynamic}
        self.__dict__["_compiled"] = None  # built on the first call, when the world size is known
        return self

    @property
    def compiled(self) -> bool:
        return self._compile_options is not None

    @property
    def cudagraph_skips(self) -> list[str]:
        """Why the compiled step could not use CUDA graphs (torch's reasons); empty when it does, or when no
        CUDA-graph mode was asked for."""
        return list(self._compiled.skips) if self._compiled is not None else []

    def __getstate__(self):  # a compiled function does not pickle or deep-copy: it is rebuilt on first use
        return {**self.__dict__, "_compiled": None, "_compiled_cfg": None, "_constants": {}}

    def wrap_ddp(self, **ddp_kwargs) -> "GradientAdjuster":
        """Wrap h in DistributedDataParallel (kwargs as for DDP) so its gradients are synchronised.
        The state dict keeps its unwrapped keys."""
        if self.net is not None:
            ddp = nn.parallel.DistributedDataParallel(self.net, process_group=self.process_group, **ddp_kwargs)
            self.__dict__["_net_ddp"] = ddp  # not a registered submodule: state_dict/parameters unchanged
        return self

    def propose(self, z: Tensor, g: Tensor) -> Tensor:
        """The normalised adjustment a_hat of h(z) (or noise) for the gradient g, by ``proposal`` ("row": per row,
        direction of h(z) with norm ratio * ||g||; "batch": norms over the rows given here, not over the ranks);
        with ``normalize=False`` the drawn noise itself (uniform on [-1, 1) or standard normal)."""
        a = self._draw(z)
        if not self.normalize:
            return a
        return normalized(a, g, self.ratio, self.proposal)

    def _draw(self, z: Tensor) -> Tensor:
        """h(z) in z's dtype (h runs in its parameters' dtype), or the noise of a noise source."""
        if self.net is not None:
            return (self._net_ddp or self.net)(z.to(next(self.net.parameters()).dtype)).to(z.dtype)
        if self.source == "uniform":
            return torch.rand_like(z) * 2 - 1
        return torch.randn_like(z)

    def backward(
        self,
        output: Tensor,
        loss_fn: Callable[[Tensor], Tensor],
        lr: float | Tensor,
        *,
        extra_loss: Tensor | None = None,
        per_sample_loss_fn: Callable[[Tensor], Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        detailed: bool = False,
    ) -> GALStats:
        """Back-propagate the (possibly adjusted) gradient of ``loss_fn(output)`` into the model and the
        gradient of the remainder into h. ``lr`` is the optimiser's current learning rate: a float, or a 0-d
        tensor on the output's device.
        ``extra_loss``: a scalar that requires grad, for terms GAL does not adjust (e.g. DETR's class and
        auxiliary losses); it is back-propagated plainly, as by ``extra_loss.backward()``, in the same single
        autograd call as the rest (DDP sees one backward pass). It is not part of the statistics: loss,
        tentative loss and remainder are those of ``loss_fn`` alone. Under DDP, with or without a
        ``process_group``, pass each rank's own extra loss as with plain DDP: it is not all-reduced, and
        DDP's gradient averaging makes it the mean of the ranks' extra losses.
        ``scaler`` (a torch.amp.GradScaler) scales all backward roots like ``scaler.scale(loss)``.
        ``detailed``: also compute the statistics that cost work on every step they are computed:
        ``adjuster_grad_norm`` and, with ``per_sample_loss_fn(z)`` -> losses of shape z.shape[0],
        ``adjusted_better``. Without it both are None (and ``per_sample_loss_fn`` is not called): ask on the
        steps you log them."""
        if extra_loss is not None and not (isinstance(extra_loss, Tensor) and extra_loss.dim() == 0
                                           and extra_loss.requires_grad):
            got = (f"shape {tuple(extra_loss.shape)}, requires_grad={extra_loss.requires_grad}"
                   if isinstance(extra_loss, Tensor) else type(extra_loss).__name__)
            raise ValueError(f"extra_loss must be a scalar tensor that requires grad, got {got}")
        if output.shape[-1:] != (self.dim,):
            raise ValueError(f"output's last dimension must be {self.dim}, got shape {tuple(output.shape)}")
        if not output.requires_grad:
            raise ValueError("output must require grad (a model output, or a leaf with requires_grad=True)")
        world = dist.get_world_size(self.process_group) if self.process_group is not None else 1
        cfg = StepConfig(self.ratio, self.scale, self.policy, self.remainder, self.normalize, self.dim, world,
                         self.proposal)
        compiled = self._compiled_step(cfg) if self.compiled else None
        track_h = detailed and self.net is not None
        h_params = [p for p in self.net.parameters() if p.requires_grad] if track_h else []
        with torch.enable_grad(), torch.autocast(output.device.type, enabled=False), \
                (compiled.watch(output.device) if compiled is not None else nullcontext()):
            # 1. z0: the output detached, in at least compute_dtype whatever the model's precision
            z0 = output.detach().to(torch.promote_types(output.dtype, self.compute_dtype))
            a = self._draw(z0)  # h's proposal (with its graph into h) or noise: eager in both modes
            if compiled is None:
                step, packed = self._eager_step(cfg, z0, a, lr, loss_fn), None
            else:
                step, packed = compiled(z0, a, self._lr_tensor(lr, z0), loss_fn)
            roots, grads = [output], [step.sent.to(output.dtype)]
            if step.path is not None:
                roots.append(step.path)
                grads.append(step.sign)
            if extra_loss is not None:
                roots.append(extra_loss)
                grads.append(self._one(extra_loss))
            if scaler is not None:
                grads = [scaler.scale(grad) for grad in grads]
            h_before = [None if p.grad is None else p.grad.detach().clone() for p in h_params]  # grads accumulate
            torch.autograd.backward(roots, grads)  # with autocast off, as the compiled backward was traced
        if packed is None:
            stats = dict(loss=step.loss, tentative_loss=step.tentative, signed_remainder=step.signed_remainder,
                         accepted=step.accepted, cosine=step.cosine)
        else:
            stats = dict(zip(PACKED, packed.unbind()))
        if detailed:
            stats["adjuster_grad_norm"] = self._grad_norm(h_params, h_before, step.loss, scaler)
            if per_sample_loss_fn is not None:
                stats["adjusted_better"] = self._adjusted_better(z0, step, lr, per_sample_loss_fn, world)
        return GALStats(**stats)

    def _eager_step(self, cfg: StepConfig, z0: Tensor, a: Tensor, lr: float | Tensor, loss_fn) -> StepResult:
        z_leaf = z0.detach().requires_grad_()
        loss = loss_fn(z_leaf)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        (g,) = torch.autograd.grad(loss, z_leaf)
        all_reduce = eager_all_reduce(self.process_group) if cfg.world > 1 else None
        return adjusted_step(cfg, z0, loss.detach(), g, a, lr, loss_fn, all_reduce)

    def _one(self, like: Tensor) -> Tensor:
        """A 0-d one of ``like``'s device and dtype, made once (the extra loss's root gradient)."""
        key = ("one", like.device, like.dtype)
        if key not in self._constants:
            self._constants[key] = torch.ones((), device=like.device, dtype=like.dtype)
        return self._constants[key]

    def _compiled_step(self, cfg: StepConfig) -> CompiledStep:
        if self._compiled is None or self._compiled_cfg != cfg:
            all_reduce = traceable_all_reduce(self.process_group) if cfg.world > 1 else None
            self.__dict__["_compiled"] = CompiledStep(cfg, all_reduce, **self._compile_options)
            self.__dict__["_compiled_cfg"] = cfg
        return self._compiled

    def _lr_tensor(self, lr: float | Tensor, like: Tensor) -> Tensor:
        """lr as a 0-d tensor of GAL's dtype on the output's device: a changing float would recompile. A float
        is written into a tensor kept for the purpose (a fill, not a host-to-device copy that would sync)."""
        if isinstance(lr, Tensor):
            return lr.to(like.device, like.dtype)  # a copy (and a host sync) only for a CPU tensor
        key = ("lr", like.device, like.dtype)
        if key not in self._constants:
            self._constants[key] = torch.zeros((), device=like.device, dtype=like.dtype)
        return self._constants[key].fill_(lr)

    def _grad_norm(self, params, before, like, scaler) -> Tensor:
        norm = _added_grad_norm(params, before, like)
        if scaler is not None and params:
            norm = norm / scaler.scale(torch.ones_like(norm))  # unscaled; the scale stays on the device
        return norm.detach()

    def _adjusted_better(self, z0, step, lr, per_sample_loss_fn, world) -> Tensor:
        """The fraction of samples with a lower trial loss with the adjusted gradient than with the plain one."""
        with torch.no_grad():
            adjusted = per_sample_loss_fn(z0 - (lr * self.scale) * step.g_adj)
            vanilla = per_sample_loss_fn(z0 - (lr * self.scale) * step.g_global)
            counts = torch.stack([(adjusted < vanilla).sum().to(z0.dtype),
                                  torch.full_like(step.loss, adjusted.numel())])
            if world > 1:
                dist.all_reduce(counts, group=self.process_group)
        return counts[0] / counts[1].clamp_min(1)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, arch={self.arch}, ratio={self.ratio}, scale={self.scale}, "
                f"policy={self.policy!r}, remainder={self.remainder!r}, source={self.source!r}"
                + ("" if self.normalize else ", normalize=False")
                + ("" if self.proposal == "row" else f", proposal={self.proposal!r}")
                + ("" if self.compute_dtype == torch.float32 else f", compute_dtype={self.compute_dtype}")
                + ("" if self._compile_options is None else f", compile={self._compile_options}"))
