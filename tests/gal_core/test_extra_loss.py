"""extra_loss: terms GAL does not adjust, back-propagated plainly in the same single backward call."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gal_core import POLICIES, PROPOSALS, GradientAdjuster


class TwoHeads(nn.Module):
    """A shared trunk with the adjusted head (width 5) and a second head for the extra loss (as DETR)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.head, self.aux = nn.Linear(12, 5), nn.Linear(12, 3)

    def forward(self, x):
        features = self.trunk(x)
        return self.head(features), self.aux(features)


def problem():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=generator)
    target = torch.randint(0, 5, (16,), generator=generator)
    aux_target = torch.randn(16, 3, generator=generator)
    return x, lambda z: F.cross_entropy(z, target), lambda a: F.mse_loss(a, aux_target)


def run(adjuster=None, with_main=True, with_extra=True, **kwargs):
    """One step on a fresh model: plain backward of the chosen terms (adjuster None) or the GAL step.
    Returns the model's gradients (zeros where none), h's gradients and the statistics."""
    model = TwoHeads()
    x, loss_fn, extra_fn = problem()
    output, aux = model(x)
    extra = extra_fn(aux) if with_extra else None
    stats, h_grads = None, []
    if adjuster is None:
        ((loss_fn(output) if with_main else 0) + (extra if with_extra else 0)).backward()
    else:
        stats = adjuster.backward(output, loss_fn, 0.1, extra_loss=extra, **kwargs)
        h_grads = [p.grad.clone() for p in adjuster.parameters()]
        adjuster.zero_grad()
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()], h_grads, stats


@pytest.mark.parametrize("kwargs", [dict(ratio=0.5, policy="never"), dict(ratio=0.0)])
def test_gal_off_matches_plain_backward_of_the_sum_bitwise(kwargs):
    plain, _, _ = run()
    model_grads, _, _ = run(GradientAdjuster(5, (8,), **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(plain, model_grads))


@pytest.mark.parametrize("proposal", PROPOSALS)
@pytest.mark.parametrize("policy", ["safeguard", "always"])
def test_gal_on_adds_the_extra_gradient_and_leaves_h_and_statistics_alone(policy, proposal):
    torch.manual_seed(3)
    adjuster = GradientAdjuster(5, (8,), ratio=0.5, policy=policy, proposal=proposal)
    adjusted, h_adjusted, stats_adjusted = run(adjuster, with_extra=False)
    combined, h_combined, stats_combined = run(adjuster)
    extra_only, _, _ = run(with_main=False)
    plain, _, _ = run(with_extra=False)
    assert stats_combined.accepted.item() == 1.0  # the adjustment is really applied...
    assert not torch.allclose(adjusted[0], plain[0])  # ...and changes the trunk's gradient
    assert all(extra.abs().sum() > 0 for extra in extra_only[:2])  # the extra loss reaches the shared trunk
    for got, a, b in zip(combined, adjusted, extra_only):
        torch.testing.assert_close(got, a + b)
    assert all(torch.equal(a, b) for a, b in zip(h_adjusted, h_combined))
    assert stats_combined.to_dict() == stats_adjusted.to_dict()


def test_one_autograd_backward_call_per_step(monkeypatch):
    calls = []
    backward = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: calls.append(1) or backward(*a, **k))
    for policy in POLICIES:
        run(GradientAdjuster(5, (8,), ratio=0.5, policy=policy))
    assert len(calls) == len(POLICIES)


def test_grad_scaler_scales_the_extra_loss_too():
    torch.manual_seed(3)
    adjuster = GradientAdjuster(5, (8,), ratio=0.5, policy="always")
    state = {k: v.clone() for k, v in adjuster.state_dict().items()}
    plain_model, plain_h, _ = run(adjuster)
    adjuster.load_state_dict(state)
    scaled_model, scaled_h, _ = run(adjuster, scaler=torch.amp.GradScaler("cpu", init_scale=512.0))
    for plain, scaled in zip(plain_model + plain_h, scaled_model + scaled_h):
        torch.testing.assert_close(scaled, 512.0 * plain)
