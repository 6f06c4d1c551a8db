"""Constructor and call validation, statistics conversion, parameter counts from the paper."""
import subprocess
import sys
from importlib.metadata import requires

import pytest
import torch

from gal_core import GradientAdjuster, count_parameters


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy="sometimes"), "policy must be one of"),
    (dict(remainder="taylor"), "remainder must be one of"),
    (dict(source="laplace"), "source must be one of"),
    (dict(proposal="frobenius"), "proposal must be one of"),
    (dict(source="uniform", normalize=False, proposal="batch"), "normalize=False adds the raw draw"),
    (dict(kind="rnn"), "unknown adjuster kind"),
    (dict(activation="swish2"), "unknown activation"),
    (dict(ratio=-0.1), "ratio must be >= 0"),
    (dict(scale=0.0), "scale > 0"),
    (dict(ratio=float("nan")), "ratio must be >= 0"),
    (dict(arch=(8, 0)), "must be positive"),
])
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradientAdjuster(4, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(ratio=float("inf")), dict(scale=float("inf")),
                                    dict(arch=(2.5,)), dict(arch=(True,))])
def test_degenerate_settings_are_refused_at_construction(kwargs):
    """eps=inf used to pass here and fail only in the first step; a width of True or 2.5 built some network."""
    with pytest.raises(ValueError, match=r"ratio must be >= 0 and scale > 0, both finite|must be positive integers"):
        GradientAdjuster(4, **kwargs)


def test_bad_calls_are_clear_errors():
    adjuster = GradientAdjuster(4)
    with pytest.raises(ValueError, match="last dimension must be 4"):
        adjuster.backward(torch.zeros(2, 3, requires_grad=True), lambda z: z.sum(), 0.1)
    with pytest.raises(ValueError, match="must require grad"):
        adjuster.backward(torch.zeros(2, 4), lambda z: z.sum(), 0.1)
    with pytest.raises(ValueError, match="must return a scalar"):
        adjuster.backward(torch.zeros(2, 4, requires_grad=True), lambda z: z.sum(0), 0.1)


@pytest.mark.parametrize("extra_loss, got", [
    (torch.ones(2, requires_grad=True), r"got shape \(2,\), requires_grad=True$"),
    (torch.tensor(1.0), r"got shape \(\), requires_grad=False$"),
    (0.5, "got float$"),
])
def test_bad_extra_loss_is_a_one_line_error(extra_loss, got):
    z = torch.zeros(2, 4, requires_grad=True)
    with pytest.raises(ValueError, match="^extra_loss must be a scalar tensor that requires grad, " + got) as error:
        GradientAdjuster(4).backward(z, lambda out: out.sum(), 0.1, extra_loss=extra_loss)
    assert "\n" not in str(error.value) and z.grad is None  # raised before any backward pass


def test_stats_to_dict_gives_floats():
    adjuster = GradientAdjuster(3, (4,))
    stats = adjuster.backward(torch.randn(5, 3, requires_grad=True), lambda z: z.pow(2).mean(), 0.1)
    values = stats.to_dict()
    default = {"loss", "tentative_loss", "remainder", "accepted", "cosine", "signed_remainder", "tie", "remainder_ulps"}
    assert set(values) == default and stats.adjuster_grad_norm is None and stats.adjusted_better is None
    assert all(type(v) is float for v in values.values())
    assert all(not t.requires_grad for t in (stats.loss, stats.tentative_loss, stats.remainder))
    detailed = adjuster.backward(torch.randn(5, 3, requires_grad=True), lambda z: z.pow(2).mean(), 0.1,
                                 per_sample_loss_fn=lambda z: z.pow(2).mean(-1), detailed=True)
    assert set(detailed.to_dict()) == default | {"adjuster_grad_norm", "adjusted_better"}


@pytest.mark.parametrize("dim, arch, kind, weights_only, expected", [
    (4, (64, 16), "mlp", True, 1344),  # DETR "+1344" (Table IV)
    (100, (256, 64, 32), "mlp", True, 47_232),  # Table VIII 47.2K
    (100, (256,), "mlp", True, 51_200),  # Table VIII 51.2K
    (100, (256, 64), "mlp", True, 48_384),  # Table VIII 48.3K
    (100, (256, 64, 32, 16), "mlp", True, 46_144),  # Table VIII 46.1K
    (1000, (512, 128), "mlp", True, 705_536),  # Table III ResNet-50 +0.70M
    (1000, (512, 256), "mlp", True, 899_072),  # Table III EfficientNet-B2 +0.90M
    (100, (256,), "cnn", False, 28_160),  # Table VIII CNN 28.1K
    (100, (256, 64), "cnn", False, 156_480),  # 156.4K
    (100, (256, 64, 32), "cnn", False, 171_744),  # 171.7K
    (100, (256, 64, 32, 16), "cnn", False, 174_768),  # 174.7K
])
def test_paper_adjuster_sizes(dim, arch, kind, weights_only, expected):
    assert count_parameters(GradientAdjuster(dim, arch, kind=kind), weights_only=weights_only) == expected


def test_bias_and_activation_options():
    plain = GradientAdjuster(4, (64, 16))
    assert count_parameters(plain) == 1344 + 64 + 16 + 4
    assert count_parameters(GradientAdjuster(4, (64, 16), bias=False)) == 1344
    relu = GradientAdjuster(4, (64, 16), activation="relu")
    assert sum(isinstance(m, torch.nn.ReLU) for m in relu.modules()) == 2
    assert not any(isinstance(m, torch.nn.ReLU) for m in plain.modules())


def test_cnn_adjuster_keeps_shape():
    adjuster = GradientAdjuster(10, (8, 4), kind="cnn", ratio=0.1, policy="always")
    z = torch.randn(3, 2, 10, requires_grad=True)
    adjuster.backward(z, lambda out: out.pow(2).mean(), 0.1)
    assert z.grad.shape == z.shape and all(p.grad is not None for p in adjuster.parameters())


def test_state_dict_round_trip_with_weights_only_load(tmp_path):
    adjuster = GradientAdjuster(5, (8,))
    torch.save(adjuster.state_dict(), tmp_path / "h.pt")
    restored = GradientAdjuster(5, (8,))
    restored.load_state_dict(torch.load(tmp_path / "h.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(adjuster.parameters(), restored.parameters()))


def test_library_depends_on_torch_only():
    core = [r for r in requires("gal-core") if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].strip() for r in core] == ["torch"]
    script = "import sys, gal_core; assert not {'timm', 'adabound'} & set(sys.modules)"  # optim extra is lazy
    subprocess.run([sys.executable, "-c", script], check=True)
