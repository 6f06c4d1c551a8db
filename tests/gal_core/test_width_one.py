"""Output width 1 (regression): a row of the adjustment is sign(a) * eps * |g|, so the direction of h's output has
zero derivative and the remainder sends h no gradient (float rounding only), for every policy and remainder.
At width > 1 it does: the step is not degenerate there. The "batch" and "bounded" proposals give h a gradient at
width 1 too (tests/gal_core/test_proposals.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gal_core import POLICIES, REMAINDERS, GradientAdjuster


def h_gradient_norm(dim: int, policy: str, remainder: str, dtype: torch.dtype, proposal: str = "row") -> float:
    """h's gradient norm after one step on a regression-shaped problem: a linear model, MSE, batch 32."""
    torch.manual_seed(0)
    model = nn.Linear(6, dim).to(dtype)
    x, target = torch.randn(32, 6, dtype=dtype), torch.randn(32, dim, dtype=dtype)
    adjuster = GradientAdjuster(dim, (16, 4), ratio=0.01, policy=policy, remainder=remainder,
                                proposal=proposal).to(dtype)
    stats = adjuster.backward(model(x), lambda z: F.mse_loss(z, target), 0.1, detailed=True)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in adjuster.parameters()]))
    assert stats.adjuster_grad_norm.item() == pytest.approx(norm.item(), rel=1e-6)
    return norm.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("remainder", REMAINDERS)
@pytest.mark.parametrize("policy", POLICIES)
def test_h_gets_no_gradient_at_width_one(policy, remainder, dtype):
    wide = [h_gradient_norm(dim, policy, remainder, dtype) for dim in (2, 3)]
    one = h_gradient_norm(1, policy, remainder, dtype)
    # relative to the same step at width 2 or 3: within a thousand units of the dtype's rounding, i.e. it
    # shrinks with the precision (float32 ~1e-8 of it, float64 ~1e-15), while the wide gradients are not small
    assert one <= 1000 * torch.finfo(dtype).eps * min(wide)
    assert min(wide) > 1e-8


def h_moved(dim: int, proposal: str = "row") -> float:
    """How far h's weights move (relative) in 50 SGD steps of model and h together."""
    torch.manual_seed(0)
    model = nn.Linear(6, dim)
    adjuster = GradientAdjuster(dim, (16, 4), ratio=0.01, proposal=proposal)
    start = torch.cat([p.detach().flatten().clone() for p in adjuster.parameters()])
    optimizer = torch.optim.SGD([*model.parameters(), *adjuster.parameters()], lr=0.1)
    for _ in range(50):
        x, target = torch.randn(32, 6), torch.randn(32, dim)
        optimizer.zero_grad()
        adjuster.backward(model(x), lambda z: F.mse_loss(z, target), 0.1)
        optimizer.step()
    end = torch.cat([p.detach().flatten() for p in adjuster.parameters()])
    return ((end - start).norm() / start.norm()).item()


def test_h_does_not_move_at_width_one_but_does_at_width_two():
    """h's weights stay where they started at d=1 (up to rounding)."""
    moved = {dim: h_moved(dim) for dim in (1, 2)}
    assert moved[1] < 1e-9 and moved[2] > 1e-6, moved
