"""Run names: the variant names every difference from the preset, in short stable tokens."""
from __future__ import annotations

import pytest

from tests.pipelines.train_helpers import name_of

NOISE = ("method.source=uniform", "method.arch=null", "method.kind=null", "method.bias=null")


@pytest.mark.parametrize("overrides, name", [
    ((), "cifar100_sgd-gal-s0"),
    (("method.ratio=0.001",), "cifar100_sgd-gal-eps0.001-s0"),
    (("method.scale=5",), "cifar100_sgd-gal-scale5-s0"),  # not "s5": s<k> is the seed
    (("method.arch=[256,64]",), "cifar100_sgd-gal-mlp-256,64-s0"),
    (("method.kind=cnn", "method.arch=[256]"), "cifar100_sgd-gal-cnn-256-s0"),
    (("method.policy=strict", "seed=3"), "cifar100_sgd-gal-policy-strict-s3"),
    (("trainer.gpus=2", "trainer.device=cpu"), "cifar100_sgd-gal-s0"),  # where a run goes is not what it is
    (("trainer.precision=bf16",), "cifar100_sgd-gal-precision-bf16-s0"),  # how it computes is (the preset: fp32)
    (NOISE, "cifar100_sgd-gal-src-uniform-s0"),  # h's settings are null by rule for noise: not named
    ((*NOISE, "method.normalize=false"), "cifar100_sgd-gal-norm-false-src-uniform-s0"),
    (("method.compute_dtype=float64",), "cifar100_sgd-gal-dtype-float64-s0"),
    (("method.compute_dtype=float32",), "cifar100_sgd-gal-s0"),  # the default: the preset's own run
])
def test_run_names(overrides, name):
    assert name_of("experiment=cifar100_sgd_gal", *overrides) == name
