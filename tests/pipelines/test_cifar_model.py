"""The CIFAR presets build the authors' network: efficientnet_pytorch's `EfficientNet.from_pretrained(
'efficientnet-b1')` is timm's tf_efficientnet_b1 with the AutoAugment TF weights ("same" padding, dropout 0.2,
drop-connect 0.2), pretrained in the paper profile; `model=efficientnet_b1` still composes as a variant.
Offline: nothing is downloaded (pretrained=False builds)."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Conv2dSame

from gal_core import count_parameters
from pipelines.tasks.classification import task as classification
from pipelines.training import identity
from tests.pipelines.train_helpers import train_config as config

PRESETS = [f"{data}_{optim}_{method}" for data in ("cifar10", "cifar100")
           for optim in ("sgd", "lookahead", "adabound") for method in ("baseline", "gal")]


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_profile_uses_the_authors_efficientnet_b1(preset):
    model = config(f"experiment={preset}", "profile=paper").model
    assert (model.name, model.pretrained, model.drop_rate, model.drop_path_rate) == \
        ("tf_efficientnet_b1.aa_in1k", True, 0.2, 0.2)


def test_smoke_profile_keeps_its_stand_in():
    model = config("experiment=cifar10_sgd_gal").model
    assert (model.name, model.pretrained) == ("test_efficientnet", False)


def test_the_tag_is_the_autoaugment_tf_port():
    cfg = timm.models.get_pretrained_cfg("tf_efficientnet_b1.aa_in1k")
    assert cfg.url.endswith("/tf_efficientnet_b1_aa-ea7a6ee0.pth")  # efficientnet_pytorch's url_map: ckptsaug
    assert timm.models.get_pretrained_cfg("tf_efficientnet_b1").tag != "aa_in1k"  # so the tag must be named


@pytest.mark.parametrize("classes, params", [(10, 6_525_994), (100, 6_641_284)])
def test_the_built_network_is_tensorflow_efficientnet_b1(classes, params):
    net = classification.build_model(config("experiment=cifar100_sgd_gal", "profile=paper", "model.pretrained=false"),
                                     classes)
    assert isinstance(net.conv_stem, Conv2dSame)  # TF "same" padding on the strided convs
    assert sum(isinstance(x, Conv2dSame) for x in net.modules()) == 5  # stem + 4 stride-2 depthwise convs
    assert net.bn1.eps == 1e-3 and net.bn1.momentum == 0.01  # TF BatchNorm epsilon and momentum (0.99 in TF's terms)
    assert net.drop_rate == 0.2 and net.blocks[-1][-1].drop_path.drop_prob > 0.18
    assert count_parameters(net) == params
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 224, 224)).shape == (1, classes)


def test_efficientnet_b1_is_still_an_override():
    cfg = config("experiment=cifar100_sgd_gal", "profile=paper", "model=efficientnet_b1")
    assert (cfg.model.name, cfg.model.pretrained, cfg.model.drop_path_rate) == ("efficientnet_b1", True, 0.2)
    assert "efficientnet_b1" in identity.variant(cfg)  # a variant run, named by the model
