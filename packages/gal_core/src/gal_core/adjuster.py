"""The GAL step: replaces ``loss.backward()`` with an adjusted, safeguarded backward pass."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .modules import build_adjuster_net

POLICIES = ("safeguard", "strict", "always", "never")
REMAINDERS = ("reference", "exact", "mean")
SOURCES = ("learned", "uniform", "normal")
COMPUTE_DTYPES = (torch.float32, torch.float64)
_TINY = torch.finfo(torch.float32).tiny  # guards 0/0 for zero rows without changing any non-zero row


@dataclass(frozen=True)
class GALStats:
    """Detached statistics of one GAL step; all stay on the device until ``to_dict`` is called."""

    loss: Tensor
    tentative_loss: Tensor
    remainder: Tensor
    accepted: Tensor
    cosine: Tensor
    # L_tent - L + first, the remainder before |.|: its sign orients h's gradient
    signed_remainder: Tensor
    # 1.0 when L_tent == L exactly: then the safeguard accepts (policy "safeguard") on a rounding tie
    tie: Tensor
    # |R| in units of float32's spacing at L (nextafter(L) - L): below 1, float32 cannot resolve R
    remainder_ulps: Tensor
    # norm of the gradient this call added to h's parameters (after DDP's averaging, unscaled); 0 without h
    adjuster_grad_norm: Tensor
    adjusted_better: Tensor | None = None

    def to_dict(self) -> dict[str, float]:
        """Floats for logging, in one device-to-host copy."""
        names = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        values = torch.stack([getattr(self, name).float() for name in names]).tolist()
        return dict(zip(names, values))


def _row_cosine(u: Tensor, v: Tensor) -> Tensor:
    norms = torch.linalg.vector_norm(u, dim=-1) * torch.linalg.vector_norm(v, dim=-1)
    return (u * v).sum(-1) / norms.clamp_min(_TINY)


def float32_spacing(value: Tensor) -> Tensor:
    """The gap from float32(value) to the next float32 towards +inf: the resolution float32 has at value."""
    value = value.float()
    return torch.nextafter(value, torch.full_like(value, float("inf"))) - value


def _added_grad_norm(params: list[Tensor], before: list[Tensor | None], like: Tensor) -> Tensor:
    """Norm of what one backward call added to ``params``' .grad (``before``: the grads it found)."""
    added = [p.grad if b is None else p.grad - b for p, b in zip(params, before) if p.grad is not None]
    # one fused (foreach) norm over all of h's tensors, not a kernel per tensor: this runs every step
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

    ``compute_dtype``: the precision of GAL's arithmetic (g, the trial loss, the remainder, the safeguard):
    torch.float32 (default; what the authors' code computes) or torch.float64, for settings where the trial
    step's remainder is below float32's resolution at the loss (see ``GALStats.remainder_ulps``). h itself
    runs in its parameters' dtype; the gradient sent into the model is cast back to the output's dtype.
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
        kind: str = "mlp",
        activation: str | None = None,
        bias: bool = True,
        process_group: dist.ProcessGroup | None = None,
        compute_dtype: torch.dtype = torch.float32,
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
        self.net = build_adjuster_net(kind, dim, arch, activation, bias) if source == "learned" else None
        self.process_group = process_group
        self.compute_dtype = compute_dtype
        self._net_ddp: nn.Module | None = None

    def wrap_ddp(self, **ddp_kwargs) -> "GradientAdjuster":
        """Wrap h in DistributedDataParallel (kwargs as for DDP) so its gradients are synchronised.
        The state dict keeps its unwrapped keys."""
        if self.net is not None:
            ddp = nn.parallel.DistributedDataParallel(self.net, process_group=self.process_group, **ddp_kwargs)
            self.__dict__["_net_ddp"] = ddp  # not a registered submodule: state_dict/parameters unchanged
        return self

    def propose(self, z: Tensor, g: Tensor) -> Tensor:
        """The normalised adjustment a_hat: per row, direction of h(z) (or noise) with norm ratio * ||g||;
        with ``normalize=False`` the drawn noise itself (uniform on [-1, 1) or standard normal)."""
        if self.net is not None:  # h runs in its parameters' dtype; its proposal joins GAL's arithmetic
            a = (self._net_ddp or self.net)(z.to(next(self.net.parameters()).dtype)).to(z.dtype)
        elif self.source == "uniform":
            a = torch.rand_like(z) * 2 - 1
        else:
            a = torch.randn_like(z)
        if not self.normalize:
            return a
        unit = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(_TINY)
        return unit * (self.ratio * torch.linalg.vector_norm(g, dim=-1, keepdim=True))

    def backward(
        self,
        output: Tensor,
        loss_fn: Callable[[Tensor], Tensor],
        lr: float | Tensor,
        *,
        extra_loss: Tensor | None = None,
        per_sample_loss_fn: Callable[[Tensor], Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> GALStats:
        """Back-propagate the (possibly adjusted) gradient of ``loss_fn(output)`` into the model and the
        gradient of the remainder into h. ``lr`` is the optimiser's current learning rate.
        ``extra_loss``: a scalar that requires grad, for terms GAL does not adjust (e.g. DETR's class and
        auxiliary losses); it is back-propagated plainly, as by ``extra_loss.backward()``, in the same single
        autograd call as the rest (DDP sees one backward pass). It is not part of the statistics: loss,
        tentative loss and remainder are those of ``loss_fn`` alone. Under DDP, with or without a
        ``process_group``, pass each rank's own extra loss as with plain DDP: it is not all-reduced, and
        DDP's gradient averaging makes it the mean of the ranks' extra losses.
        ``per_sample_loss_fn(z)`` -> losses of shape z.shape[0] adds the adjusted_better statistic.
        ``scaler`` (a torch.amp.GradScaler) scales all backward roots like ``scaler.scale(loss)``."""
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
        with torch.enable_grad(), torch.autocast(output.device.type, enabled=False):
            # 1. the plain gradient g = dL/dz at z0, in at least compute_dtype whatever the model's precision
            z0 = output.detach().to(torch.promote_types(output.dtype, self.compute_dtype)).requires_grad_()
            loss = loss_fn(z0)
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            (g,) = torch.autograd.grad(loss, z0)
            z0, loss = z0.detach(), loss.detach()
            # In global mode the batch loss is the mean of the ranks' losses, so its gradient is g / world.
            g_global = g / world if world > 1 else g
            # 2-3. adjusted gradient and the trial step
            adjustment = self.propose(z0, g_global)
            delta = (lr * self.scale) * (g_global + adjustment)
            tentative = loss_fn(z0 - delta)
            first = (delta * g_global).sum()
            rows = g.numel() // self.dim
            cosine_sum = _row_cosine(g, adjustment.detach()).sum()
            better_count, samples = self._better_count(z0, delta.detach(), lr, g_global, per_sample_loss_fn)
            # 4. batch-level quantities, reduced over the process group in one collective
            totals = torch.stack([loss, tentative.detach(), first.detach(), cosine_sum, better_count,
                                  torch.full_like(loss, rows), torch.full_like(loss, samples)])
            if world > 1:
                dist.all_reduce(totals, group=self.process_group)
            loss_sum, tentative_sum, first_sum, cosine_sum, better_count, rows_total, samples_total = totals
            first_norm = self._first_order_divisor(rows_total)
            inner = tentative_sum / world - loss_sum / world + first_sum / first_norm
            # d|inner|/dh summed over ranks, times world because DDP averages h's gradients
            remainder_grad_path = torch.sign(inner) * (tentative + world * first / first_norm)
            # 5. safeguard as a tensor mask; no host synchronisation
            accepted = self._accept(tentative_sum, loss_sum)
            if self.policy == "never":
                sent = g
            else:
                sent = torch.where(accepted, g + world * adjustment.detach(), g)
        roots, grads = [output], [sent.to(output.dtype)]
        if self.net is not None:
            roots.append(remainder_grad_path)
            grads.append(torch.ones_like(remainder_grad_path))
        if extra_loss is not None:
            roots.append(extra_loss)
            grads.append(torch.ones_like(extra_loss))
        if scaler is not None:
            grads = [scaler.scale(grad) for grad in grads]
        h_params = [p for p in self.net.parameters() if p.requires_grad] if self.net is not None else []
        h_before = [None if p.grad is None else p.grad.detach().clone() for p in h_params]  # grads accumulate
        torch.autograd.backward(roots, grads)
        h_grad_norm = _added_grad_norm(h_params, h_before, loss_sum)
        if scaler is not None and h_params:
            h_grad_norm = h_grad_norm / grads[1]  # grads[1] is the scaler's scale
        loss_mean = loss_sum / world
        return GALStats(
            loss=loss_mean,
            tentative_loss=tentative_sum / world,
            remainder=inner.abs().detach(),
            accepted=accepted.float(),
            cosine=cosine_sum / rows_total.clamp_min(1),
            signed_remainder=inner.detach(),
            tie=(tentative_sum == loss_sum).float(),
            remainder_ulps=inner.abs().detach() / float32_spacing(loss_mean).clamp_min(_TINY),  # finite at L = 0
            adjuster_grad_norm=h_grad_norm.detach(),
            adjusted_better=better_count / samples_total.clamp_min(1) if per_sample_loss_fn else None,
        )

    def _first_order_divisor(self, rows: Tensor) -> Tensor | float:
        """'exact' sums delta*g; 'reference' (authors' CIFAR/ImageNet code) averages it over rows;
        'mean' (authors' 3-D toy) over all elements."""
        if self.remainder == "exact":
            return 1.0
        return rows.clamp_min(1) * (self.dim if self.remainder == "mean" else 1)

    def _accept(self, tentative_sum: Tensor, loss_sum: Tensor) -> Tensor:
        if self.policy == "safeguard":
            return tentative_sum <= loss_sum
        if self.policy == "strict":
            return tentative_sum < loss_sum
        return torch.full_like(loss_sum, self.policy == "always", dtype=torch.bool)

    def _better_count(self, z0, delta, lr, g_global, per_sample_loss_fn) -> tuple[Tensor, int]:
        """How many samples have a lower trial loss with the adjusted gradient than with the plain one."""
        zero = z0.new_zeros(())
        if per_sample_loss_fn is None:
            return zero, 0
        with torch.no_grad():
            adjusted = per_sample_loss_fn(z0 - delta)
            vanilla = per_sample_loss_fn(z0 - (lr * self.scale) * g_global)
        return (adjusted < vanilla).sum().to(zero.dtype), adjusted.numel()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, arch={self.arch}, ratio={self.ratio}, scale={self.scale}, "
                f"policy={self.policy!r}, remainder={self.remainder!r}, source={self.source!r}"
                + ("" if self.normalize else ", normalize=False")
                + ("" if self.compute_dtype == torch.float32 else f", compute_dtype={self.compute_dtype}"))
