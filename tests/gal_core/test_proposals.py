"""The ``proposal`` option: the paper's per-row map ("row", Eq. 4) and the two variants that give h a gradient at
output width 1, "batch" (one Frobenius norm over the batch) and "bounded" (ratio * ||g|| * tanh(||a||) per row).

The variants' gradient into h against autograd of R is checked in test_step.py (the reference oracle, every
proposal), 2 gloo processes against 1 in test_ddp.py and the compiled step against the eager one in
test_compile.py."""
import pytest
import torch
import torch.nn.functional as F

from gal_core import PROPOSALS, REMAINDERS, SOURCES, GradientAdjuster
from gal_core.step import normalized

from .test_width_one import h_gradient_norm, h_moved

VARIANTS = ("batch", "bounded")
RATIO = 0.7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("remainder", REMAINDERS)
@pytest.mark.parametrize("proposal", VARIANTS)
def test_variants_give_h_a_gradient_at_width_one(proposal, remainder, dtype):
    row = h_gradient_norm(1, "safeguard", remainder, dtype)
    one = h_gradient_norm(1, "safeguard", remainder, dtype, proposal)
    wide = h_gradient_norm(3, "safeguard", remainder, dtype, proposal)
    assert row <= 1000 * torch.finfo(dtype).eps * wide  # the paper's map: rounding only
    assert one > 1e-2 * wide and wide > 1e-8  # of the order of the wide step's, far above rounding


@pytest.mark.parametrize("proposal", VARIANTS)
def test_h_learns_at_width_one_with_the_variants(proposal):
    assert h_moved(1, proposal) > 1e-6  # "row" stays below 1e-9 (test_width_one.py)


def proposal_and_draw(proposal, source, shape):
    """a_hat from ``propose`` and the proposal a it was made from (h's output, or the same noise)."""
    torch.manual_seed(0)
    z, g = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    adjuster = GradientAdjuster(shape[-1], (3,), ratio=RATIO, source=source, proposal=proposal).double()
    torch.manual_seed(1)
    a_hat = adjuster.propose(z, g)
    torch.manual_seed(1)
    return a_hat, adjuster._draw(z), g


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 4), (9, 1)])
@pytest.mark.parametrize("source", SOURCES)
def test_batch_proposal_has_the_batch_gradients_norm_along_h(source, shape):
    a_hat, a, g = proposal_and_draw("batch", source, shape)
    torch.testing.assert_close(a_hat.norm(), RATIO * g.norm())  # ||a_hat||_F = ratio * ||G||_F
    torch.testing.assert_close(a_hat, a * (RATIO * g.norm() / a.norm()))  # a positive multiple of H
    if shape[-1] == 1:  # rows are not sign(a) * ratio * |g|: their sizes follow |a|
        assert not torch.allclose(a_hat.abs(), RATIO * g.abs())


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 4), (9, 1)])
@pytest.mark.parametrize("source", SOURCES)
def test_bounded_proposal_is_tanh_of_the_rows_norm_along_the_row(source, shape):
    a_hat, a, g = proposal_and_draw("bounded", source, shape)
    r, g_norm = a.norm(dim=-1, keepdim=True), g.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(a_hat.norm(dim=-1, keepdim=True), RATIO * g_norm * torch.tanh(r))
    torch.testing.assert_close(a_hat, a / r * (RATIO * g_norm * torch.tanh(r)))  # a_i's direction
    assert (a_hat.norm(dim=-1, keepdim=True) < RATIO * g_norm).all()  # bounded by the paper's norm
    if shape[-1] == 1:
        torch.testing.assert_close(a_hat, RATIO * g.abs() * torch.tanh(a))


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_zero_proposal_gives_zero_and_finite_gradients(proposal):
    g = torch.randn(4, 3, dtype=torch.float64)
    a = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    a_hat = normalized(a, g, RATIO, proposal)
    assert torch.equal(a_hat, torch.zeros_like(g))
    (grad,) = torch.autograd.grad(a_hat, a, torch.ones_like(a_hat))
    # "row" and "batch" have no direction at 0: no gradient (as the spec's constant 0). "bounded" is smooth
    # there, with derivative ratio * ||g_i|| * I per row
    expected = RATIO * g.norm(dim=-1, keepdim=True).expand_as(g) if proposal == "bounded" else torch.zeros_like(g)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_step_with_a_zero_h_is_finite(proposal):
    torch.manual_seed(0)
    z, target = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3)
    adjuster = GradientAdjuster(3, (4,), ratio=0.5, policy="always", proposal=proposal)
    with torch.no_grad():
        adjuster.net.layers[-1].weight.zero_()
        adjuster.net.layers[-1].bias.zero_()  # h's output is exactly 0
    loss_fn = lambda out: F.mse_loss(out, target)  # noqa: E731
    (plain,) = torch.autograd.grad(loss_fn(z), z)
    stats = adjuster.backward(z, loss_fn, 0.1)
    assert all(v == v and abs(v) < float("inf") for v in stats.to_dict().values())
    assert all(torch.isfinite(p.grad).all() for p in adjuster.parameters())
    assert torch.equal(z.grad, plain)  # a_hat = 0: the plain gradient


def test_bounded_derivative_is_exact_through_zero_and_tiny_rows():
    """tanh(r) / r at r -> 0: no 0/0 and no blow-up; finite differences agree, also across a zero row."""
    torch.manual_seed(0)
    g = torch.randn(5, 3, dtype=torch.float64)
    a = torch.randn(5, 3, dtype=torch.float64)
    a[1], a[2], a[3] = 0.0, 1e-200, 1e-9  # a zero row, one far below float32's range, a small one
    g_norm = g.norm(dim=-1, keepdim=True)
    assert torch.autograd.gradcheck(lambda a: normalized(a, g, RATIO, "bounded"), (a.requires_grad_(),))
    with torch.no_grad():  # value: ratio * ||g|| * a (1 - r^2 / 3 + ...) near 0, to float64's precision
        torch.testing.assert_close(normalized(a, g, RATIO, "bounded")[1:4], RATIO * g_norm[1:4] * a[1:4],
                                   rtol=1e-15, atol=0)


def test_batch_derivative_matches_finite_differences():
    torch.manual_seed(0)
    g = torch.randn(4, 3, dtype=torch.float64)
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: normalized(a, g, RATIO, "batch"), (a,))


def test_row_proposal_is_the_papers_step_bit_for_bit():
    """A frozen copy of Eq. 4 and the trial step: the default proposal (and "row" given explicitly) reproduces
    its bits, so adding the option changed nothing for the paper's setting."""
    torch.manual_seed(0)
    z, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    loss_fn = lambda out: F.cross_entropy(out, target)  # noqa: E731
    h_grads = []
    for kwargs in ({}, {"proposal": "row"}):
        torch.manual_seed(1)
        adjuster = GradientAdjuster(5, (8,), ratio=0.3, scale=2.0, policy="always", remainder="exact", **kwargs)
        leaf = z.clone().requires_grad_()
        stats = adjuster.backward(leaf, loss_fn, 0.1)
        h_grads.append([p.grad for p in adjuster.parameters()])
        # the frozen formula
        z0 = z.clone().requires_grad_()
        loss = loss_fn(z0)
        (g,) = torch.autograd.grad(loss, z0)
        with torch.no_grad():
            a = adjuster.net(z)
            unit = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            g_adj = torch.addcmul(g, unit, torch.linalg.vector_norm(g, dim=-1, keepdim=True), value=0.3)
            delta = g_adj * (0.1 * 2.0)
            tentative = loss_fn(z - delta)
            signed_remainder = tentative - loss + (delta * g).sum()
        assert torch.equal(leaf.grad, g_adj)
        assert torch.equal(stats.tentative_loss, tentative)
        assert torch.equal(stats.signed_remainder, signed_remainder)
    assert all(torch.equal(a, b) for a, b in zip(*h_grads))


def test_proposal_in_repr_only_when_not_the_papers():
    assert "proposal" not in repr(GradientAdjuster(4, (8,)))
    assert "proposal='bounded'" in repr(GradientAdjuster(4, (8,), proposal="bounded"))
