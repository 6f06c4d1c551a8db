"""Every logged ``method.*`` and ``optim.*`` key of every task acts or is refused: changing one either changes
what the task builds (the adjuster, the optimiser and its hyper-parameters) or fails in one line; and a key the
preset does not have (added with + or ++) is refused in one line naming it, unless it acts."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipelines.errors import ConfigError, UserError
from pipelines.tasks.classification import task as classification
from pipelines.tasks.digits import task as digits
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
    assert len(outcomes["boston_gal"]) == 18 and outcomes["boston_baseline"].keys() >= {"method.gal", "optim.lr"}


def test_digits_keys_act_or_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"train": 40, "test": 20}
    split = {f"X_{part}": rng.integers(0, 17, size=(rows, 64)).astype(float) for part, rows in sizes.items()}
    split.update({f"y_{part}": rng.integers(0, 10, size=rows) for part, rows in sizes.items()})
    (tmp_path / "data" / "processed").mkdir(parents=True)
    np.savez(tmp_path / "data" / "processed" / "digits.npz", **split)
    for experiment in ("digits_cnn_gal", "digits_mlp_baseline"):
        found = walk(digits.Digits, tmp_path, experiment)
        assert found and all(v != "IGNORED" for v in found.values()), found


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


# ------------------------------------------------------------------------------------------- added keys
def checked(root, experiment: str, *overrides: str) -> str:
    """The run's variant after the checks the runner makes on the config alone (no data read)."""
    cfg = train_config(f"root={root}", f"experiment={experiment}", *overrides)
    runner.check(cfg, runner.task_class(cfg.task.name), here=False)
    return identity.variant(cfg)


@pytest.mark.parametrize("experiment, added, message", [
    ("boston_gal", "+task.epochz=3", "task.epochz: experiment=boston_gal has no such setting, so nothing would read "
                                     "it; did you mean task.epochs?"),
    ("boston_gal", "++epochs=3", "did you mean task.epochs?"),
    ("boston_gal", "+data.model.hiden=[8]", "did you mean data.model.hidden?"),
    ("boston_gal", "+trainer.devices=2", "did you mean trainer.device?"),
    ("boston_baseline", "++task.lr_backbone=0.1", "task.lr_backbone: experiment=boston_baseline has no such setting"),
    ("boston_gal", "+task.augment={hflip: 0.5}", "task.augment.hflip: experiment=boston_gal has no such setting"),
    ("cifar10_sgd_gal", "+task.augment.hflp=0.1", "did you mean task.augment.hflip?"),
    ("cifar10_sgd_gal", "+model.hidden_dim=8", "model.hidden_dim: experiment=cifar10_sgd_gal has no such setting"),
    ("coco_detr_r50_gal", "+model.pretrained=true", "did you mean model.pretrained_backbone?"),
])
def test_a_key_the_preset_lacks_is_refused_in_one_line_with_the_closest_key(tmp_path, experiment, added, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        checked(tmp_path, experiment, added)


@pytest.mark.parametrize("experiment", ["boston_gal", "cifar10_sgd_baseline", "coco_detr_r50_gal"])
def test_every_part_of_the_config_refuses_a_key_added_beside_its_own(tmp_path, experiment):
    """One typo per mapping of the config (top level, task, task.augment, data.model, trainer, model, ...)."""
    leaves = identity._leaves(OmegaConf.to_container(train_config(f"experiment={experiment}")))
    first = {}
    for key in leaves:
        if not key.startswith(identity.OPEN):
            first.setdefault(key.rpartition(".")[0], key)
    assert len(first) >= 5, first
    for key in first.values():
        with pytest.raises(ConfigError, match=re.escape(f"{key}x: experiment={experiment} has no such setting, "
                                                        f"so nothing would read it; did you mean {key}?")):
            checked(tmp_path, experiment, f"+{key}x=1")


@pytest.mark.parametrize("experiment, overrides, variant", [
    ("boston_gal", ("++task.epochs=3",), "epochs3"),  # ++ on a key the preset has: an ordinary override
    ("boston_gal", ("optim=sgd",), None),  # optim.momentum: the optimiser's arguments, their own rule
    ("boston_gal", ("data=diabetes",), None),  # another data set brings its own keys
    ("cifar10_sgd_gal", ("data=cifar100",), None),
    ("imagenet_resnet50_gal", ("+model.bn_momentum=0.01",), "bn_momentum0.01"),  # read where set
    ("cifar10_sgd_gal", ("model=efficientnet_b1",), None),
])
def test_keys_that_act_beyond_the_preset_are_kept(tmp_path, experiment, overrides, variant):
    found = checked(tmp_path, experiment, *overrides)
    assert variant is None or found == variant
