"""The arithmetic of one GAL step as a pure tensor function, shared by the eager and the compiled step.

Given the detached output z0, the loss and its gradient g there, h's proposal a (with its graph into h, or
drawn noise) and lr, it returns the gradient to send into the model, the surrogate whose gradient is h's,
and the statistics. No host synchronisation, no ``torch.autograd.grad`` and no Python branch on a tensor's
value, so ``torch.compile(..., fullgraph=True)`` traces it whole; in eager mode it is written to dispatch
few operators (one fused add for the adjustment, one root for h, scalar statistics derived on demand). The
proposal variants ("batch", "bounded"; ``proposal_map``) are plain autograd ops: clarity over op count there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

TINY = torch.finfo(torch.float32).tiny  # guards 0/0 for zero rows without changing any non-zero row
PROPOSALS = ("row", "batch", "bounded")  # how h's output becomes a_hat (see ``proposal_map``)


@dataclass(frozen=True)
class StepConfig:
    """The adjuster's settings the arithmetic needs; constant for an adjuster's lifetime (a compiled step
    specialises on them)."""

    ratio: float
    scale: float
    policy: str
    remainder: str
    normalize: bool
    dim: int
    world: int = 1
    proposal: str = "row"


class StepResult(NamedTuple):
    sent: Tensor  # the gradient for the model's output (detached, GAL's compute dtype)
    path: Tensor | None  # h's surrogate: its gradient times ``sign`` is d|R|/dh (None without a graph into h)
    sign: Tensor | None  # sign(R): the gradient to send into ``path``
    g_global: Tensor  # the plain gradient of the batch loss (g / world in global mode), detached
    g_adj: Tensor  # g_global + a_hat: the trial step is lr * scale * g_adj; detached
    loss: Tensor  # the batch's loss, tentative loss and signed remainder (detached scalars)
    tentative: Tensor
    signed_remainder: Tensor
    accepted: Tensor | bool  # the safeguard's decision (a bool mask; a constant for "always" and "never")
    cosine: Tensor  # mean over rows of cos(g, a_hat)


def normalized(a: Tensor, g: Tensor, ratio: float, proposal: str = "row") -> Tensor:
    """a_hat for the proposal a and the gradient g (``proposal_map``; "row": per row, the direction of a with
    norm ratio * ||g||, a zero row of a gives 0). "batch" takes its norms over the rows given."""
    g_norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    if proposal == "row":
        return _AddNormalized.apply(torch.zeros_like(g), a, g_norm, ratio)[0]
    return proposal_map(proposal, a, g, g_norm, ratio)


def proposal_map(proposal: str, a: Tensor, g: Tensor, g_norm: Tensor, ratio: float,
                 all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """a_hat for the variants of Eq. 4 that keep a gradient into h at output width 1 (the paper's "row" is
    fused into ``_AddNormalized``). Plain autograd ops; g and g_norm (its per-row norm) are constants.

    "batch": ratio * ||G||_F * H / ||H||_F, one norm over the whole batch: the direction of H in batch space
    is learnable at d = 1. In global mode ``all_reduce`` (differentiable) sums the squared norms over the ranks,
    and in the backward sums their gradients through ||H||_F, so each rank's h receives d(sum of the ranks'
    surrogates)/dH_rank = world * dR/dH_rank (the surrogate is world times the rank's share of R), which DDP's
    averaging turns into the single process's dR/dh. A zero H gives 0 and no gradient (as a zero row does for
    "row"); so does an H whose squared norm is below TINY.
    "bounded": per row ratio * ||g|| * tanh(r) * a / r, r = ||a||: at d = 1 ratio * |g| * tanh(h(z)). Its norm
    is below ratio * ||g|| (equal as r -> inf) and depends on r, so h gets a gradient at d = 1. tanh(r) / r is
    smooth at 0 (limit 1); r is clamped at TINY, where it is 1 to any float precision, so a zero row gives 0
    with the derivative ratio * ||g|| * I, no 0/0. Near 0 autograd's chain through a * tanh(r) / r has terms
    of the incoming gradient's size (a is of size r), not 1/r: no series branch is needed."""
    if proposal == "bounded":
        r = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(TINY)
        return a * (torch.tanh(r) / r * g_norm * ratio)
    if proposal != "batch":
        raise ValueError(f"unknown proposal {proposal!r}")
    squares = torch.stack([g.square().sum(), a.square().sum()])
    if all_reduce is not None:  # global mode: ||G||_F and ||H||_F of the global batch; H's gradient summed too
        squares = all_reduce(squares)
    g_square, a_square = squares.unbind()
    # the clamp keeps the masked branch finite; where() gives a zero H the constant 0 and no gradient
    scale = torch.where(a_square >= TINY, g_square.sqrt() * ratio / a_square.clamp_min(TINY).sqrt(), 0.0)
    return a * scale


class _AddNormalized(torch.autograd.Function):
    """g + ratio * ||g|| * u per row, u = a / ||a|| (Eq. 4 added to g), with a hand-written backward.

    Per row the output's derivative in a is c (I - u u^T), c = ratio * ||g|| / ||a||: the backward is one
    projection, c * (grad - u (u . grad)), where autograd's chain through norm, clamp, division and product
    dispatches about fifteen small ops. Where ||a|| is below the clamp (a == 0) it gives 0, as for a zero row
    of a the spec's a_hat is the constant 0: the clamped formula's derivative there, c = ratio * ||g|| / TINY,
    is about 1e38 and overflowed h's gradient to inf (a real Boston run, raw target, epoch 197). g and ||g||
    are constants. Returns (g_adj, u); u is not differentiable."""

    @staticmethod
    def forward(ctx, g: Tensor, a: Tensor, g_norm: Tensor, ratio: float):
        a_norm = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(TINY)
        unit = a / a_norm
        ctx.save_for_backward(unit, a_norm, g_norm)
        ctx.ratio = ratio
        ctx.mark_non_differentiable(unit)
        return torch.addcmul(g, unit, g_norm, value=ratio), unit

    @staticmethod
    def backward(ctx, grad: Tensor, _unit_grad):
        unit, a_norm, g_norm = ctx.saved_tensors
        along = torch.linalg.vecdot(unit, grad).unsqueeze(-1)
        projected = torch.addcmul(grad, unit, along, value=-1)  # grad - u (u . grad)
        scale = torch.where(a_norm > TINY, g_norm / a_norm * ctx.ratio, 0.0)  # 0 where a's row is 0
        return None, projected * scale, None, None


def adjusted_step(cfg: StepConfig, z0: Tensor, loss: Tensor, g: Tensor, a: Tensor, lr: float | Tensor,
                  loss_fn: Callable[[Tensor], Tensor],
                  all_reduce: Callable[[Tensor], Tensor] | None = None) -> StepResult:
    """One GAL step after g: the adjustment, the trial step, the remainder's gradient path and the safeguard
    (GAL.md, steps 2-5). ``all_reduce`` sums a tensor over the process group (global mode, world > 1)."""
    world = cfg.world
    g_global = g / world if world > 1 else g  # the batch loss is the mean of the ranks' losses
    rows = g.numel() // cfg.dim
    # 2-3. a_hat = ratio * a * ||g|| / ||a|| per row, added to g in one fused op ("row", the paper's)
    g_norm = torch.linalg.vector_norm(g_global, dim=-1, keepdim=True)
    if cfg.normalize and cfg.proposal == "row":
        g_adj, unit = _AddNormalized.apply(g_global, a, g_norm, cfg.ratio)
        a_hat = None
    else:  # another proposal map, or the raw draw as the adjustment (noise sources only)
        a_hat = proposal_map(cfg.proposal, a, g_global, g_norm, cfg.ratio, all_reduce) if cfg.normalize else a
        g_adj = g_global + a_hat
        # every map keeps a's direction per row (a non-negative multiple of a): the cosine below holds for all
        unit = a.detach() / torch.linalg.vector_norm(a.detach(), dim=-1, keepdim=True).clamp_min(TINY)
    step = lr * cfg.scale
    delta = g_adj * step
    tentative = loss_fn(z0 - delta)
    first = (delta * g_global).sum()
    # cos(g, a_hat) = g . u / ||g|| per row: a_hat is a non-negative multiple of u (0 where ||g|| is 0)
    if cfg.normalize and cfg.ratio == 0:  # a_hat is 0
        cos_sum = torch.zeros_like(loss)
    else:
        cos_sum = (torch.linalg.vecdot(g_global, unit) / g_norm.squeeze(-1).clamp_min(TINY)).sum()
    # 4. batch-level quantities: in global mode one packed all-reduce
    tentative_value = tentative.detach()
    if world > 1:
        totals = all_reduce(torch.stack([loss, tentative_value, first.detach(), cos_sum,
                                         torch.full_like(loss, rows)]))
        loss_sum, tentative_sum, first_sum, cos_sum, rows_total = totals.unbind()
        first_norm = _first_order_divisor(cfg, rows_total)
        signed_remainder = tentative_sum / world - loss_sum / world + first_sum / first_norm
        # d|inner|/dh summed over ranks, times world because DDP averages h's gradients
        path = tentative + first * (world / first_norm) if a.requires_grad else None
        loss_mean, tentative_mean, rows_total = loss_sum / world, tentative_sum / world, rows_total.clamp_min(1)
    else:
        loss_sum, tentative_sum = loss, tentative_value
        first_norm = _first_order_divisor(cfg, max(rows, 1))
        first_value = first.detach() if cfg.remainder == "exact" else first.detach() / first_norm
        signed_remainder = tentative_value - loss + first_value
        path = torch.add(tentative, first, alpha=1 / first_norm) if a.requires_grad else None
        loss_mean, tentative_mean, rows_total = loss, tentative_value, max(rows, 1)
    # 5. the safeguard as a tensor mask; no host synchronisation
    if cfg.policy in ("safeguard", "strict"):
        accepted = tentative_sum <= loss_sum if cfg.policy == "safeguard" else tentative_sum < loss_sum
    else:
        accepted = cfg.policy == "always"
    g_adj_value = g_adj.detach()
    # the model's gradient: g, or g + a_hat (in global mode world * a_hat, as DDP averages over ranks)
    if world == 1:
        adjusted = g_adj_value
    elif a_hat is None:
        adjusted = torch.addcmul(g, unit, g_norm, value=cfg.ratio * world)
    else:
        adjusted = torch.add(g, a_hat.detach(), alpha=world)
    if cfg.policy == "never":
        sent = g
    elif cfg.policy == "always":
        sent = adjusted
    else:
        sent = torch.where(accepted, adjusted, g)
    return StepResult(sent=sent, path=path, sign=None if path is None else torch.sign(signed_remainder),
                      g_global=g_global, g_adj=g_adj_value, loss=loss_mean, tentative=tentative_mean,
                      signed_remainder=signed_remainder, accepted=accepted, cosine=cos_sum / rows_total)


def _first_order_divisor(cfg: StepConfig, rows):
    """'exact' sums delta*g; 'reference' (authors' CIFAR/ImageNet code) averages it over rows;
    'mean' (authors' 3-D toy) over all elements."""
    if cfg.remainder == "exact":
        return 1
    return rows * cfg.dim if cfg.remainder == "mean" else rows


def eager_all_reduce(group: dist.ProcessGroup) -> Callable[[Tensor], Tensor]:
    """Sums a tensor over the group: in place for statistics; differentiable for a tensor that requires grad
    (the "batch" proposal's norm of H, whose gradient must reach every rank's h)."""
    def reduce(tensor: Tensor) -> Tensor:
        if tensor.requires_grad:
            return _SumOverRanks.apply(tensor, group)
        dist.all_reduce(tensor, group=group)
        return tensor
    return reduce


class _SumOverRanks(torch.autograd.Function):
    """A differentiable all-reduce (sum): the gradient of each rank's input is the sum of the ranks' output
    gradients. (torch.distributed.nn.functional.all_reduce does this too, but is deprecated in recent torch.)"""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def traceable_all_reduce(group: dist.ProcessGroup) -> Callable[[Tensor], Tensor]:
    """The functional all-reduce, which torch.compile traces into its graph (the in-place one breaks it); it is
    differentiable (its backward sums the gradients over the ranks), as the "batch" proposal needs."""
    from torch.distributed import _functional_collectives as funcol

    return lambda tensor: funcol.all_reduce(tensor, "sum", group)
