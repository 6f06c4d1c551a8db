"""compute_dtype=torch.float64: GAL's arithmetic in double precision, and the statistics that show when float32
cannot resolve the remainder (tie, remainder_ulps, signed_remainder, adjuster_grad_norm)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gal_core import PROPOSALS, GradientAdjuster, float32_spacing


def pair(dim, arch, **kwargs):
    """A float32 and a float64 adjuster with the same h."""
    torch.manual_seed(0)
    single = GradientAdjuster(dim, arch, **kwargs)
    double = GradientAdjuster(dim, arch, compute_dtype=torch.float64, **kwargs)
    double.load_state_dict(single.state_dict())
    return single, double


def imagenet_like(seed=0):
    """Logits and cross entropy at the scale of the paper's ImageNet setting (lr 0.016, s 0.001, eps 0.001)."""
    torch.manual_seed(seed)
    z, labels = torch.randn(100, 1000) * 2, torch.randint(0, 1000, (100,))
    return z, lambda out: F.cross_entropy(out, labels)


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_float64_matches_float32_where_float32_resolves_the_remainder(proposal):
    torch.manual_seed(1)
    model = nn.Linear(6, 5)
    x, labels = torch.randn(16, 6), torch.randint(0, 5, (16,))
    loss_fn = lambda z: F.cross_entropy(z, labels)  # noqa: E731
    results = []
    for adjuster in pair(5, (8,), ratio=0.1, proposal=proposal):
        model.zero_grad()
        stats = adjuster.backward(model(x), loss_fn, 0.5, detailed=True)
        results.append((stats, [p.grad.clone() for p in model.parameters()],
                        [p.grad.clone() for p in adjuster.parameters()]))
    (s32, model32, h32), (s64, model64, h64) = results
    assert s32.remainder_ulps.item() > 1e3  # float32 resolves R here
    for name in ("loss", "tentative_loss", "remainder", "signed_remainder", "cosine", "adjuster_grad_norm"):
        assert getattr(s64, name).item() == pytest.approx(getattr(s32, name).item(), rel=1e-4), name
    assert s64.accepted.item() == s32.accepted.item() and s64.loss.dtype == torch.float64
    for a, b in zip(model32 + h32, model64 + h64):
        assert b.dtype == torch.float32  # the model and h keep their dtype
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_float64_resolves_what_float32_rounds_away():
    z, loss_fn = imagenet_like()
    single, double = pair(1000, (512, 128), ratio=1e-3, scale=1e-3)
    reference = GradientAdjuster(1000, (512, 128), ratio=1e-3, scale=1e-3).double()  # all in double
    reference.load_state_dict(single.state_dict())
    s32 = single.backward(z.clone().requires_grad_(), loss_fn, 0.016)
    s64 = double.backward(z.clone().requires_grad_(), loss_fn, 0.016)
    ref = reference.backward(z.double().requires_grad_(), loss_fn, 0.016)
    # float64: the remainder of an all-double step (h in float32 changes it by float32 rounding only)
    assert s64.signed_remainder.item() == pytest.approx(ref.signed_remainder.item(), rel=1e-5)
    assert s64.tie.item() == 0.0 and s64.remainder_ulps.item() < 1  # R is below float32's spacing at L
    # float32: the trial loss ties with the loss, so R is only the directional term, of the wrong sign here
    assert s32.tie.item() == 1.0 and s32.accepted.item() == 1.0
    assert s32.signed_remainder.item() * s64.signed_remainder.item() < 0
    assert s32.remainder.item() < 0.1 * s64.remainder.item()


def test_float64_step_sends_the_model_a_gradient_of_the_outputs_dtype():
    z, loss_fn = imagenet_like()
    _, double = pair(1000, (16,), ratio=1e-3, scale=1e-3)
    output = z.clone().requires_grad_()
    double.backward(output, loss_fn, 0.016)
    assert output.grad.dtype == torch.float32 and torch.isfinite(output.grad).all()
    assert "compute_dtype=torch.float64" in repr(double) and "compute_dtype" not in repr(pair(4, ())[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, "float64"])
def test_other_compute_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match="^compute_dtype must be torch.float32 or torch.float64, got"):
        GradientAdjuster(4, (8,), compute_dtype=dtype)


def test_tie_and_remainder_ulps_are_what_they_say():
    z, loss_fn = imagenet_like(seed=3)
    for adjuster in pair(1000, (16,), ratio=1e-3, scale=1e-3):
        stats = adjuster.backward(z.clone().requires_grad_(), loss_fn, 0.016)
        loss32 = stats.loss.float()
        spacing = torch.nextafter(loss32, torch.tensor(float("inf"))) - loss32
        assert float32_spacing(stats.loss).item() == spacing.item() > 0
        assert stats.remainder_ulps.item() == pytest.approx(stats.remainder.item() / spacing.item(), rel=1e-6)
        assert stats.tie.item() == float(stats.tentative_loss.item() == stats.loss.item())


def test_adjuster_grad_norm_is_what_this_call_adds_to_h():
    torch.manual_seed(0)
    z, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    loss_fn = lambda out: F.cross_entropy(out, labels)  # noqa: E731
    adjuster = GradientAdjuster(5, (8,), ratio=0.1)
    first = adjuster.backward(z.clone().requires_grad_(), loss_fn, 0.5, detailed=True)
    grads = [p.grad.clone() for p in adjuster.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert first.adjuster_grad_norm.item() == pytest.approx(expected.item(), rel=1e-6) and expected > 0
    second = adjuster.backward(z.clone().requires_grad_(), loss_fn, 0.5, detailed=True)  # accumulates into .grad
    assert second.adjuster_grad_norm.item() == pytest.approx(expected.item(), rel=1e-5)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    adjuster.zero_grad()
    scaled = adjuster.backward(z.clone().requires_grad_(), loss_fn, 0.5, scaler=scaler, detailed=True)
    assert scaled.adjuster_grad_norm.item() == pytest.approx(expected.item(), rel=1e-5)  # unscaled
    noise = GradientAdjuster(5, ratio=0.1, source="uniform").backward(z.clone().requires_grad_(), loss_fn, 0.5,
                                                                      detailed=True)
    assert noise.adjuster_grad_norm.item() == 0.0  # no h, no gradient
