"""Optimisers by name, from established implementations (torch, timm, AdaBound's reference package).

Needs the ``optim`` extra (``pip install gal-core[optim]``) for lookahead, rmsproptf and adabound.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn


def _timm(name: str):
    try:
        import timm.optim
    except ImportError as err:
        raise ImportError(f"optimizer {name!r} needs timm: pip install 'gal-core[optim]'") from err
    return timm.optim


def _adabound(params, **kw) -> torch.optim.Optimizer:
    try:
        import adabound
    except ImportError as err:
        raise ImportError("optimizer 'adabound' needs the adabound package: pip install 'gal-core[optim]'") from err

    class AdaBound(adabound.AdaBound):
        def step(self, closure=None):
            # The reference implementation uses add_'s deprecated (Number, Tensor) overload; same maths.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="This overload of add", category=UserWarning)
                return super().step(closure)

    return AdaBound(params, **kw)


_FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,  # plain (heavy-ball) momentum unless nesterov=True is passed
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "rmsproptf": lambda params, **kw: _timm("rmsproptf").RMSpropTF(params, **kw),
    "adabound": _adabound,
}
OPTIMIZERS = (*_FACTORIES, "lookahead", *(f"lookahead_{name}" for name in _FACTORIES))


def build_optimizer(name: str, param_groups: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
    """``name`` in OPTIMIZERS; ``lookahead`` is Lookahead over SGD and ``lookahead_<base>`` over any base,
    configured by ``lookahead_k`` and ``lookahead_alpha``. Other kwargs go to the base optimiser."""
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")
    if key.startswith("lookahead"):
        lookahead = {"k": kwargs.pop("lookahead_k", 5), "alpha": kwargs.pop("lookahead_alpha", 0.5)}
        base = build_optimizer(key.removeprefix("lookahead").lstrip("_") or "sgd", param_groups, **kwargs)
        return _timm(key).Lookahead(base, **lookahead)
    return _FACTORIES[key](param_groups, **kwargs)


def param_groups(model: nn.Module, adjuster: nn.Module, adjuster_lr: float | None = None) -> list[dict]:
    """The model's parameters, then h's in a group of their own (with its own lr when given)."""
    groups = [{"params": list(model.parameters())}]
    adjuster_params = list(adjuster.parameters())
    if adjuster_params:
        groups.append({"params": adjuster_params, **({"lr": adjuster_lr} if adjuster_lr is not None else {})})
    return groups
