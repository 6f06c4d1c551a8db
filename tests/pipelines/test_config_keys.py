"""Every logged ``method.*`` and ``optim.*`` key of every task acts or is refused: changing one either changes
what the task builds (the adjuster, the optimiser and its hyper-parameters) or fails in one line."""
from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from pipelines.errors import UserError
from pipelines.tasks.classification import task as classification
from pipelines.tasks.regression import task as regression
from pipelines.training import identity, launch, runner
from tests.pipelines.train_helpers import train_config, with_data

ALTERNATIVES = {"policy": "always", "remainder": "exact", "source": "uniform", "kind": "cnn", "activation": "relu",
                "name": "adamw", "adjuster_lr": 0.5, "arch": [8], "compute_dtype": "float64"}


def changed(key: str, value):
    """Another valid-looking value for ``key``."""
    last = key.rsplit(".", 1)[-1]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, list):
        return [value[0] / 2, *value[1:]] if value and isinstance(value[0], float) else [8]
    return ALTERNATIVES.get(last, "other")


def fingerprint(task) -> str:
    """What the keys under test can change: the adjuster (architecture and settings) and the optimiser."""
    opt = task.optimizer
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
    return f"{type(opt).__name__} {groups} {getattr(opt, 'defaults', None)} {task.adjuster!r}"


def build(task_cls, cfg):
    runner.check(cfg, task_cls)
    identity.variant(cfg)
    torch.manual_seed(0)
    return fingerprint(task_cls(cfg, launch.setup(cfg.trainer)))


def walk(task_cls, root, experiment: str, *extra: str):
    base = train_config(f"root={root}", f"experiment={experiment}", *extra)
    reference = build(task_cls, base)
    flat = OmegaConf.to_container(base, resolve=True)
    outcomes = {}
    for group in ("method", "optim"):
        for key, value in flat[group].items():
            new = changed(key, value)
            text = "[" + ",".join(map(str, new)) + "]" if isinstance(new, list) else new
            cfg = train_config(f"root={root}", f"experiment={experiment}", *extra, f"{group}.{key}={text}")
            try:
                outcomes[f"{group}.{key}"] = "changes" if build(task_cls, cfg) != reference else "IGNORED"
            except UserError:
                outcomes[f"{group}.{key}"] = "refused"
    return outcomes


def test_regression_keys_act_or_are_refused(tmp_path):
    (tmp_path / "data" / "processed").mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data" / "processed" / "boston.npz", X=rng.normal(size=(40, 13)), y=rng.normal(size=40))
    outcomes = {experiment: walk(regression.Regression, tmp_path, experiment)
                for experiment in ("boston_gal", "boston_baseline")}
    for found in outcomes.values():
        assert all(v != "IGNORED" for v in found.values()), found
    assert len(outcomes["boston_gal"]) == 17 and outcomes["boston_baseline"].keys() >= {"method.gal", "optim.lr"}


def test_classification_keys_act_or_are_refused(tmp_path, prepared_cifar10):
    with_data(tmp_path, prepared_cifar10)
    for experiment in ("cifar10_sgd_gal", "cifar10_lookahead_baseline", "cifar10_adabound_gal"):
        outcomes = walk(classification.Classification, tmp_path, experiment, "task.max_steps=1")
        assert all(v != "IGNORED" for v in outcomes.values()), (experiment, outcomes)
    gal = walk(classification.Classification, tmp_path, "cifar10_sgd_gal", "task.max_steps=1")
    assert {k for k, v in gal.items() if v == "changes"} >= {"method.ratio", "method.scale", "method.policy",
                                                            "method.remainder", "method.kind", "method.arch",
                                                            "method.activation", "method.bias", "method.adjuster_lr",
                                                            "method.compute_dtype",
                                                            "optim.lr", "optim.momentum", "optim.weight_decay"}
