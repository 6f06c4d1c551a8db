"""GAL from config, one way: the ``method`` config group -> a GradientAdjuster (or None for plain
training), and the optimiser over the model's and the adjuster's parameters. The only constructor call
of GradientAdjuster in pipelines/: every key of ``method`` acts or is refused here."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from gal_core import GradientAdjuster
from gal_core.optim import build_optimizer
from pipelines.errors import ConfigError

# method.<key> -> GradientAdjuster argument; name and gal are the method's identity, adjuster_lr goes to
# the optimiser's adjuster group.
ADJUSTER_ARGS = {"arch": "arch", "ratio": "ratio", "scale": "scale", "policy": "policy", "remainder": "remainder",
                 "source": "source", "normalize": "normalize", "kind": "kind", "activation": "activation",
                 "bias": "bias", "compute_dtype": "compute_dtype", "proposal": "proposal"}
GAL_KEYS = {"name", "gal", "adjuster_lr", *ADJUSTER_ARGS}
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # method.compute_dtype -> GAL's arithmetic
NETWORK_KEYS = ("arch", "kind", "activation", "bias", "adjuster_lr")  # settings of h, the learned adjuster
# GALStats every task logs per epoch (means over the epoch's steps): remainder, cos(g, â), acceptance; how often
# the trial loss ties with the loss exactly; |R| in float32 spacings of L (mean of the per-step ratio: below 1,
# float32 cannot resolve R); the norm of h's gradient (at output width 1 it is rounding only)
# logged every step: the tasks ask GAL for its detailed statistics (adjuster_grad_norm, adjusted_better)
STEP_STATS = ("remainder", "cosine", "accepted", "tie", "remainder_ulps", "adjuster_grad_norm")


def _plain(config: Any) -> dict:
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)


def build_adjuster(method: Mapping | DictConfig, dim: int, process_group=None) -> GradientAdjuster | None:
    """The adjuster ``method`` describes for outputs of width ``dim``; None when method.gal is false."""
    method = _plain(method)
    if not method.get("gal"):
        extra = sorted(set(method) - {"name", "gal"})
        if extra:
            raise ConfigError(f"method.{extra[0]} has no effect without GAL (method.gal=false): remove it")
        return None
    unknown = sorted(set(method) - GAL_KEYS)
    if unknown:
        raise ConfigError(f"method.{unknown[0]} is not a GAL setting; known: {', '.join(sorted(GAL_KEYS))}")
    if method.get("source", "learned") != "learned":  # noise in place of h: no network to configure
        idle = [k for k in NETWORK_KEYS if method.get(k) is not None]
        if idle:
            names = ", ".join(f"method.{k}" for k in idle)
            raise ConfigError(f"method.source={method['source']} draws noise, so {names} would not act: set "
                              + " ".join(f"method.{k}=null" for k in idle))
    elif method.get("arch") is None:
        raise ConfigError("method.arch (the adjuster's hidden widths) is not set: the presets set it per dataset")
    for key in ("ratio", "scale"):
        if isinstance(method.get(key), bool) or not isinstance(method.get(key), (int, float)):
            raise ConfigError(f"method.{key}={method.get(key)!r}: use a number")
    kwargs = {ADJUSTER_ARGS[k]: v for k, v in method.items() if k in ADJUSTER_ARGS and v is not None}
    kwargs["arch"] = tuple(kwargs.get("arch", ()))
    if "compute_dtype" in kwargs:
        if not isinstance(kwargs["compute_dtype"], str) or kwargs["compute_dtype"] not in COMPUTE_DTYPES:
            raise ConfigError(f"method.compute_dtype={kwargs['compute_dtype']!r}: use float32 or float64")
        kwargs["compute_dtype"] = COMPUTE_DTYPES[kwargs["compute_dtype"]]
    lr = method.get("adjuster_lr")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"method.adjuster_lr={lr!r}: use a positive number, or null for the model's lr")
    try:
        return GradientAdjuster(dim, **kwargs, process_group=process_group)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"method: {str(err).splitlines()[0]}") from None


def check(cfg: DictConfig) -> None:
    """Build GAL and the optimiser once on a one-parameter stand-in, so a bad method or optim key is
    refused before any data is read."""
    stand_in = nn.Linear(1, 1)
    build_optimizer_for(cfg.optim, [{"params": list(stand_in.parameters())}], build_adjuster(cfg.method, 1),
                        cfg.method)


def build_optimizer_for(optim: DictConfig, model_groups: Iterable[dict], adjuster: nn.Module | None,
                        method: DictConfig, no_decay_1d: bool = False) -> torch.optim.Optimizer:
    """``optim.name`` with every other ``optim`` key as its argument, over the model's parameter groups
    and, with GAL, the adjuster's in groups of its own (at method.adjuster_lr when set); with ``no_decay_1d``
    h's biases get no weight decay, as the authors' ImageNet code exempts them with the model's."""
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in _plain(optim).items() if k != "name"}
    groups = list(model_groups)
    if adjuster is not None:
        lr = method.get("adjuster_lr")
        own = {"lr": lr} if lr is not None else {}
        params = list(adjuster.parameters())
        if no_decay_1d:
            groups += [group for group in ({"params": [p for p in params if p.ndim > 1], **own},
                                           {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0,
                                            **own}) if group["params"]]
        else:
            groups.append({"params": params, **own})
    try:
        return build_optimizer(optim.name, groups, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optim={optim.name}: {str(err).splitlines()[0]}") from None


def adjuster_snapshot(adjuster: nn.Module) -> torch.Tensor:
    """h's weights as one flat tensor on their device (a copy); empty for a noise source."""
    params = [p.detach().flatten() for p in adjuster.parameters()]
    return torch.cat(params) if params else torch.zeros(0)


def adjuster_movement(adjuster: nn.Module, start: torch.Tensor) -> dict[str, float]:
    """How far h's weights moved since ``start`` (adjuster_snapshot): the norm of the change, and that norm
    over the start's (0 without h); one host copy."""
    change = torch.linalg.vector_norm(adjuster_snapshot(adjuster) - start)
    relative = change / torch.linalg.vector_norm(start).clamp_min(torch.finfo(start.dtype).tiny)
    move, move_rel = torch.stack([change, relative]).tolist()
    return {"adjuster_move": move, "adjuster_move_rel": move_rel}
