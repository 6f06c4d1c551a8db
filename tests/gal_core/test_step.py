"""The checks of the GAL step (spec: GAL.md), on CPU."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gal_core import POLICIES, PROPOSALS, GradientAdjuster

from .reference import reference_step


def make_problem(seed=0, batch=16, features=6, dim=5):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, 12), nn.Tanh(), nn.Linear(12, dim))
    x, target = torch.randn(batch, features), torch.randint(0, dim, (batch,))
    return model, x, lambda z: F.cross_entropy(z, target)


def grads(module):
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("proposal", PROPOSALS)
@pytest.mark.parametrize("policy", POLICIES)
def test_ratio_zero_matches_plain_backward_bitwise(policy, proposal):
    model, x, loss_fn = make_problem()
    loss_fn(model(x)).backward()
    plain = grads(model)
    model.zero_grad()
    GradientAdjuster(5, (8,), ratio=0.0, policy=policy, proposal=proposal).backward(model(x), loss_fn, lr=0.5)
    assert all(torch.equal(a, b) for a, b in zip(plain, grads(model)))


def test_policy_never_matches_plain_backward_bitwise_with_large_ratio():
    model, x, loss_fn = make_problem()
    loss_fn(model(x)).backward()
    plain = grads(model)
    model.zero_grad()
    stats = GradientAdjuster(5, (8,), ratio=0.5, policy="never").backward(model(x), loss_fn, lr=0.5)
    assert all(torch.equal(a, b) for a, b in zip(plain, grads(model)))
    assert stats.accepted.item() == 0.0 and stats.remainder.item() > 0  # statistics still computed


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), dim=st.integers(1, 7), ratio=st.floats(0.0, 2.0), lr=st.floats(1e-3, 2.0),
       scale=st.floats(0.1, 5.0), seed=st.integers(0, 10_000), proposal=st.sampled_from(PROPOSALS))
def test_quadratic_exact_remainder_is_half_squared_step(rows, dim, ratio, lr, scale, seed, proposal):
    torch.manual_seed(seed)
    target = torch.randn(rows, dim, dtype=torch.float64)
    z = torch.randn(rows, dim, dtype=torch.float64, requires_grad=True)
    adjuster = GradientAdjuster(dim, (4,), ratio=ratio, scale=scale, remainder="exact", proposal=proposal).double()
    loss_fn = lambda out: 0.5 * ((out - target) ** 2).sum()  # noqa: E731
    stats = adjuster.backward(z, loss_fn, lr)
    g = (z - target).detach()
    a_hat = adjuster.propose(z.detach(), g)
    delta = lr * scale * (g + a_hat)
    assert stats.remainder.item() == pytest.approx(0.5 * delta.pow(2).sum().item(), rel=1e-6, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), ratio=st.floats(0.0, 3.0),
       source=st.sampled_from(["learned", "uniform", "normal"]), seed=st.integers(0, 10_000))
def test_adjustment_norm_is_ratio_times_gradient_norm_per_row(shape, ratio, source, seed):
    torch.manual_seed(seed)
    dim = shape[-1]
    z, g = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    adjuster = GradientAdjuster(dim, (3,), ratio=ratio, source=source).double()
    a_hat = adjuster.propose(z, g)
    torch.testing.assert_close(a_hat.norm(dim=-1), ratio * g.norm(dim=-1))


@pytest.mark.parametrize("proposal", PROPOSALS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("remainder", ["reference", "exact", "mean"])
@pytest.mark.parametrize("lr", [0.05, 3.0])  # a small and a too-large trial step: both decisions occur
def test_step_matches_reference_oracle(policy, remainder, lr, proposal):
    torch.manual_seed(1)
    z = torch.randn(8, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    loss_fn = lambda out: F.cross_entropy(out, target)  # noqa: E731
    adjuster = GradientAdjuster(5, (16, 8), ratio=0.3, scale=2.0, policy=policy, remainder=remainder,
                                proposal=proposal)
    oracle = reference_step(adjuster, z, loss_fn, lr)
    h_grads = torch.autograd.grad(oracle["remainder"], list(adjuster.parameters()))

    stats = adjuster.backward(z, loss_fn, lr)
    torch.testing.assert_close(stats.loss, oracle["loss"])
    torch.testing.assert_close(stats.tentative_loss, oracle["tentative"])
    torch.testing.assert_close(stats.remainder, oracle["remainder"].detach())
    assert bool(stats.accepted) == oracle["accepted"]
    torch.testing.assert_close(z.grad, oracle["sent"])  # the leaf receives exactly the sent gradient
    for p, expected in zip(adjuster.parameters(), h_grads):
        torch.testing.assert_close(p.grad, expected)
    cos = F.cosine_similarity(oracle["g"], oracle["a_hat"], dim=-1).mean()
    torch.testing.assert_close(stats.cosine, cos)


def test_safeguard_takes_both_branches_and_strict_rejects_ties():
    z = torch.zeros(1, 2, requires_grad=True)
    flat = lambda out: out.sum() * 0.0  # noqa: E731  zero gradient: L_tent == L exactly
    assert GradientAdjuster(2, ratio=0.1).backward(z, flat, 0.1).accepted.item() == 1.0
    assert GradientAdjuster(2, ratio=0.1, policy="strict").backward(z, flat, 0.1).accepted.item() == 0.0
    too_far = lambda out: (out**2).sum()  # noqa: E731  lr 10 overshoots the quadratic's minimum
    z = torch.ones(1, 2, requires_grad=True)
    assert GradientAdjuster(2, ratio=0.1).backward(z, too_far, 10.0).accepted.item() == 0.0
    assert torch.equal(z.grad, 2 * torch.ones(1, 2))  # rejected: the plain gradient is sent


@pytest.mark.parametrize("proposal", PROPOSALS)
@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 4), (4,), (3, 1)])
def test_output_shapes_batch_rows_3d_and_1d_leaf(shape, proposal):
    torch.manual_seed(0)
    dim = shape[-1]
    z = torch.randn(*shape, requires_grad=True)
    target = torch.randn(*shape)
    adjuster = GradientAdjuster(dim, (6,), ratio=0.2, policy="always", proposal=proposal)
    stats = adjuster.backward(z, lambda out: F.l1_loss(out, target), 0.1)
    assert z.grad.shape == z.shape
    assert all(math.isfinite(v) for v in stats.to_dict().values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adjuster.parameters())


def test_zero_rows_of_gradient_or_adjustment_stay_finite():
    z = torch.randn(4, 3, requires_grad=True)
    target = z.detach().clone()
    target[0] += 1.0  # only row 0 has a non-zero gradient
    adjuster = GradientAdjuster(3, (4,), ratio=0.5, policy="always")
    adjuster.backward(z, lambda out: ((out - target) ** 2).sum(), 0.1)
    assert torch.isfinite(z.grad).all() and torch.equal(z.grad[1:], torch.zeros(3, 3))
    assert all(torch.isfinite(p.grad).all() for p in adjuster.parameters())

    # a zero row of a sends h no gradient (the spec's a_hat is the constant 0 there), however large g is:
    # the clamped norm's derivative, ratio * ||g|| / TINY, overflowed h's gradient to inf in a real run
    one_zero = GradientAdjuster(3, (4,), ratio=0.5, policy="always")
    one_zero.net = RowsMasked(one_zero.net, torch.tensor([[0.0], [1.0], [1.0], [1.0]]))  # h's row 0 is 0
    far = (z.detach() + torch.tensor([[1e6], [1.0], [1.0], [1.0]])).requires_grad_()  # row 0's g is large
    loss_fn = lambda out: ((out - z.detach()) ** 2).sum()  # noqa: E731
    expected = torch.autograd.grad(reference_step(one_zero, far, loss_fn, 0.1)["remainder"],
                                   list(one_zero.parameters()))
    one_zero.backward(far, loss_fn, 0.1)
    for p, want in zip(one_zero.parameters(), expected):
        assert torch.isfinite(p.grad).all() and torch.allclose(p.grad, want, rtol=1e-4, atol=1e-6)


class RowsMasked(nn.Module):
    """h with some output rows forced to exactly 0."""

    def __init__(self, net: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.inner, self.mask = net, mask

    def forward(self, x):
        return self.inner(x) * self.mask


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_empty_batch_gives_finite_statistics(proposal):
    z = torch.zeros(0, 3, requires_grad=True)
    stats = GradientAdjuster(3, (4,), proposal=proposal).backward(z, lambda out: out.sum(), 0.1)
    assert all(math.isfinite(v) for v in stats.to_dict().values())


@pytest.mark.parametrize("proposal", PROPOSALS)
@pytest.mark.parametrize("source", ["uniform", "normal"])
def test_random_sources_have_no_parameters_and_adjust(source, proposal):
    model, x, loss_fn = make_problem()
    adjuster = GradientAdjuster(5, (8,), ratio=0.5, source=source, policy="always", proposal=proposal)
    assert list(adjuster.parameters()) == []
    loss_fn(model(x)).backward()
    plain = grads(model)
    model.zero_grad()
    stats = adjuster.backward(model(x), loss_fn, 0.1)
    assert not all(torch.equal(a, b) for a, b in zip(plain, grads(model)))
    assert -1.0 <= stats.cosine.item() <= 1.0 and stats.remainder.item() >= 0


@pytest.mark.parametrize("source, draw", [("uniform", lambda z: torch.rand_like(z) * 2 - 1),
                                          ("normal", torch.randn_like)])
def test_unnormalised_noise_is_exactly_the_drawn_noise_added_to_the_gradient(source, draw):
    torch.manual_seed(0)
    z = torch.randn(6, 5, requires_grad=True)
    target = torch.randn(6, 5)
    loss_fn = lambda out: ((out - target) ** 2).mean()  # noqa: E731
    (g,) = torch.autograd.grad(loss_fn(z), z)
    adjuster = GradientAdjuster(5, ratio=0.01, source=source, normalize=False, policy="always")
    torch.manual_seed(1)
    adjuster.backward(z, loss_fn, 0.1)
    torch.manual_seed(1)
    noise = draw(z)
    assert torch.equal(z.grad, g + noise)  # the raw draw: no eps, no ||g||
    with pytest.raises(ValueError, match="normalize=False is for the noise sources"):
        GradientAdjuster(5, (8,), normalize=False)


def test_deterministic_on_cpu():
    results = []
    for _ in range(2):
        model, x, loss_fn = make_problem(seed=3)
        torch.manual_seed(7)
        adjuster = GradientAdjuster(5, (8, 4), ratio=0.1, source="normal")
        stats = adjuster.backward(model(x), loss_fn, 0.1)
        results.append((grads(model), stats.to_dict()))
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    assert results[0][1] == results[1][1]


def test_adjusted_better_fraction_matches_per_sample_comparison():
    torch.manual_seed(2)
    z = torch.randn(32, 4, requires_grad=True)
    target = torch.randint(0, 4, (32,))
    adjuster = GradientAdjuster(4, (8,), ratio=0.8, scale=4.0)
    per_sample = lambda out: F.cross_entropy(out, target, reduction="none")  # noqa: E731
    oracle = reference_step(adjuster, z, lambda out: per_sample(out).mean(), 0.5)
    stats = adjuster.backward(z, lambda out: per_sample(out).mean(), 0.5, per_sample_loss_fn=per_sample,
                              detailed=True)
    z0, g, a_hat = z.detach(), oracle["g"], oracle["a_hat"]
    better = per_sample(z0 - 0.5 * 4.0 * (g + a_hat)) < per_sample(z0 - 0.5 * 4.0 * g)
    assert stats.adjusted_better.item() == pytest.approx(better.float().mean().item())
    assert 0.0 < stats.adjusted_better.item() < 1.0


def test_gal_trains_a_regression_model_to_a_lower_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    adjuster = GradientAdjuster(1, (16, 4), ratio=0.1)
    opt = torch.optim.Adam([*model.parameters(), *adjuster.parameters()], lr=1e-2)
    first = None
    for _ in range(200):
        opt.zero_grad()
        stats = adjuster.backward(model(x), lambda z: F.mse_loss(z, y), 1e-2)
        opt.step()
        first = stats.loss.item() if first is None else first
    assert stats.loss.item() < 0.1 * first
