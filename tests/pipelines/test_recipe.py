"""Every paper preset composes to the values pipelines/report/recipe.yaml gives for it (with their sources), so a
later edit of a config cannot drift from the documented recipe silently."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from pipelines.config import compose
from pipelines.report import recipe

CASES = [(s["key"], preset, method, s["value"]) for s in recipe.settings() for preset in s["presets"]
         for method in ("baseline", "gal")]


@pytest.mark.parametrize("key, preset, method, value", CASES, ids=[f"{c[1]}_{c[2]}-{c[0]}" for c in CASES])
def test_every_paper_preset_composes_to_its_documented_value(key, preset, method, value):
    cfg = compose("train", [f"experiment={preset}_{method}", "profile=paper"])
    assert OmegaConf.select(cfg, key, default="<missing>") == value


def test_every_setting_names_its_source_and_the_index_shows_it():
    for setting in recipe.settings():
        assert setting["source"].strip() and setting["presets"], setting
    table = recipe.markdown()
    assert table.count("\n") == len(recipe.settings()) + 2
    assert "`task.label_smoothing` | imagenet_resnet50, imagenet_efficientnet_b2 | 0.1 |" in table


@pytest.mark.parametrize("exempt", [True, False])
def test_with_no_weight_decay_bias_norm_hs_biases_take_no_weight_decay_as_the_authors_imagenet_code(exempt):
    from pipelines.training.method import build_adjuster, build_optimizer_for

    cfg = compose("train", ["experiment=imagenet_resnet50_gal", "profile=smoke"])
    adjuster = build_adjuster(cfg.method, 10)
    optimizer = build_optimizer_for(cfg.optim, [], adjuster, cfg.method, no_decay_1d=exempt)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert len(decay) == len(list(adjuster.parameters()))
    for p in adjuster.parameters():
        assert decay[id(p)] == (0.0 if exempt and p.ndim == 1 else cfg.optim.weight_decay)
    assert {group["lr"] for group in optimizer.param_groups} == {cfg.method.adjuster_lr}


def test_resnet50_drops_every_residual_branch_at_one_rate_as_the_authors_timm():
    from timm.layers import DropPath
    from timm.models.resnet import Bottleneck

    from pipelines.tasks.classification.task import build_model

    model = build_model(compose("train", ["experiment=imagenet_resnet50_gal", "profile=paper"]), 1000)
    blocks = [b for b in model.modules() if isinstance(b, Bottleneck)]
    assert len(blocks) == 16
    assert all(isinstance(b.drop_path, DropPath) and b.drop_path.drop_prob == 0.2 for b in blocks)
