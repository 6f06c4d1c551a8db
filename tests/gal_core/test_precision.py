"""Mixed precision: GAL's arithmetic stays float32; GradScaler scales both backward passes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gal_core import PROPOSALS, GradientAdjuster


def problem():
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    x, target = torch.randn(16, 6), torch.randint(0, 4, (16,))
    return model, x, lambda z: F.cross_entropy(z, target)


def test_bf16_output_runs_gal_in_float32():
    model, x, loss_fn = problem()
    adjuster = GradientAdjuster(4, (8,), ratio=0.1)
    seen = []
    adjuster.net.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
    output = model(x).bfloat16()
    stats = adjuster.backward(output, loss_fn, 0.1)
    assert seen == [(torch.float32, torch.float32)]
    assert stats.loss.dtype == torch.float32 and model.weight.grad.dtype == torch.float32
    # the statistics are those of the float32 step on the same (rounded) output
    reference = GradientAdjuster(4, (8,), ratio=0.1)
    reference.load_state_dict(adjuster.state_dict())
    expected = reference.backward(output.detach().float().requires_grad_(), loss_fn, 0.1)
    assert stats.to_dict() == expected.to_dict()


def test_autocast_region_does_not_lower_gal_precision():
    model, x, loss_fn = problem()
    adjuster = GradientAdjuster(4, (8,), ratio=0.1)
    seen = []
    adjuster.net.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(x)
        assert output.dtype == torch.bfloat16
        adjuster.backward(output, loss_fn, 0.1)
    assert seen == [torch.float32]
    assert all(torch.isfinite(p.grad).all() for p in [*model.parameters(), *adjuster.parameters()])


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_grad_scaler_scales_model_and_adjuster_gradients(proposal):
    runs = []
    for use_scaler in (False, True):
        model, x, loss_fn = problem()
        adjuster = GradientAdjuster(4, (8,), ratio=0.1, policy="always", proposal=proposal)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if use_scaler else None
        adjuster.backward(model(x), loss_fn, 0.1, scaler=scaler)
        runs.append([p.grad.clone() for p in [*model.parameters(), *adjuster.parameters()]])
    for plain, scaled in zip(*runs):
        torch.testing.assert_close(scaled, 1024.0 * plain)


def test_grad_scaler_step_unscales_before_the_update():
    model, x, loss_fn = problem()
    adjuster = GradientAdjuster(4, (8,), ratio=0.1)
    params = [*model.parameters(), *adjuster.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    adjuster.backward(model(x), loss_fn, 0.1, scaler=scaler)
    scaler.unscale_(optimizer)
    unscaled = [p.grad.clone() for p in params]
    model2, x2, loss_fn2 = problem()
    adjuster2 = GradientAdjuster(4, (8,), ratio=0.1)
    adjuster2.load_state_dict(adjuster.state_dict())
    adjuster2.backward(model2(x2), loss_fn2, 0.1)
    for a, b in zip(unscaled, [*model2.parameters(), *adjuster2.parameters()]):
        torch.testing.assert_close(a, b.grad)
