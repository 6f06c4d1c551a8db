"""Optimiser factory: every name builds from its established implementation and steps model and h."""
import pytest
import timm.optim
import torch
from torch import nn

from gal_core import GradientAdjuster
from gal_core.optim import OPTIMIZERS, build_optimizer, param_groups

KWARGS = {"sgd": dict(lr=0.1, momentum=0.9), "lookahead": dict(lr=0.1, lookahead_k=5, lookahead_alpha=0.8),
          "adabound": dict(lr=1e-3, final_lr=0.1), "rmsproptf": dict(lr=0.016, eps=1e-3)}


@pytest.mark.parametrize("name", ["sgd", "lookahead", "adabound", "rmsproptf", "adam", "adamw", "rmsprop",
                                  "lookahead_adam"])
def test_each_optimizer_steps_model_and_adjuster(name):
    torch.manual_seed(0)
    model, adjuster = nn.Linear(3, 4), GradientAdjuster(4, (8,), ratio=0.1, policy="always")
    optimizer = build_optimizer(name, param_groups(model, adjuster), **KWARGS.get(name, dict(lr=1e-2)))
    before = [p.detach().clone() for p in [*model.parameters(), *adjuster.parameters()]]
    for _ in range(6):  # past lookahead's k so its slow-weight sync runs too
        optimizer.zero_grad()
        adjuster.backward(model(torch.randn(8, 3)), lambda z: z.pow(2).mean(), 0.1)
        optimizer.step()
    after = [*model.parameters(), *adjuster.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_lookahead_wraps_sgd_with_its_settings():
    opt = build_optimizer("lookahead", [nn.Parameter(torch.zeros(2))], lr=0.1, lookahead_k=5, lookahead_alpha=0.8)
    assert isinstance(opt, timm.optim.Lookahead) and isinstance(opt._base_optimizer, torch.optim.SGD)
    assert opt.defaults["lookahead_k"] == 5 and opt.defaults["lookahead_alpha"] == 0.8


def test_adjuster_gets_its_own_group_and_lr():
    model, adjuster = nn.Linear(3, 4), GradientAdjuster(4, (8,))
    opt = build_optimizer("rmsproptf", param_groups(model, adjuster, adjuster_lr=0.016), lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.016]
    assert opt.param_groups[1]["params"] == list(adjuster.parameters())
    assert len(param_groups(model, GradientAdjuster(4, source="normal"))) == 1


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer 'adamax'.*choose one of"):
        build_optimizer("adamax", [nn.Parameter(torch.zeros(1))])
    assert {"sgd", "lookahead", "adabound", "rmsproptf", "adam", "adamw"} <= set(OPTIMIZERS)
