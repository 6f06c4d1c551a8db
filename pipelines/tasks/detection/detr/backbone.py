"""ResNet backbone with frozen BatchNorm, padded batches with masks, and the backbone + position encoding pair.

Module names follow DETR (``backbone.0.body.layer4...``, ``backbone.1`` the parameter-free position encoding)
so DETR's released checkpoints load with strict=True.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .position_encoding import PositionEmbeddingSine

TRAINED_STAGES = ("layer2", "layer3", "layer4")  # stem and layer1 stay frozen, as DETR with lr_backbone > 0


def pad_images(images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad CHW images (bottom and right, with zeros) to the largest height and width: (B, C, H, W) and a
    (B, H, W) mask that is True on padding (DETR's NestedTensor)."""
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    first = images[0]
    batch = first.new_zeros(len(images), first.shape[0], height, width)
    mask = torch.ones(len(images), height, width, dtype=torch.bool, device=first.device)
    for k, image in enumerate(images):
        batch[k, :, :image.shape[1], :image.shape[2]] = image
        mask[k, :image.shape[1], :image.shape[2]] = False
    return batch, mask


class Backbone(nn.Module):
    """A torchvision ResNet up to layer4 (``body``) with FrozenBatchNorm2d. ``pretrained`` loads the ImageNet
    weights DETR started from (torchvision's IMAGENET1K_V1, what ``pretrained=True`` meant in DETR's days)."""

    def __init__(self, name: str = "resnet50", pretrained: bool = False, train: bool = True,
                 dilation: bool = False):
        super().__init__()
        weights = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"] if pretrained else None
        extra = {"replace_stride_with_dilation": [False, False, True]} if dilation else {}  # DETR's DC5
        try:
            resnet = torchvision.models.get_model(name, weights=weights, norm_layer=FrozenBatchNorm2d, **extra)
        except OSError as err:  # no hub reachable (URLError is an OSError)
            raise RuntimeError(f"cannot fetch {name}'s ImageNet weights ({err}); "
                               "pass pretrained_backbone=False to start from random weights") from err
        for param_name, param in resnet.named_parameters():
            param.requires_grad_(train and param_name.startswith(TRAINED_STAGES))
        # everything but avgpool and fc, under the torchvision names (conv1, bn1, ..., layer4)
        self.body = nn.Sequential(OrderedDict(
            (child, module) for child, module in resnet.named_children() if child not in ("avgpool", "fc")))
        self.num_channels = resnet.fc.in_features  # 512 for resnet18/34, 2048 for resnet50/101

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Features (B, C, H/32, W/32) and the mask resized to them (nearest)."""
        features = self.body(images)
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, mask


class Joiner(nn.Sequential):
    """``backbone.0`` the ResNet, ``backbone.1`` the position encoding (DETR's numbering)."""

    def __init__(self, backbone: Backbone, position: PositionEmbeddingSine):
        super().__init__(backbone, position)
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features, mask = self[0](images, mask)
        return features, mask, self[1](mask).to(features.dtype)
