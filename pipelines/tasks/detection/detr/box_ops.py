"""Box helpers shared by the matcher and the criterion (boxes are normalised cxcywh, as DETR predicts them)."""
import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou_loss


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """cxcywh -> xyxy with w and h clamped at 0: a GAL trial step (z - delta) can push a width or height
    below zero, where the GIoU would be meaningless or 0/0. Sigmoid outputs (w, h > 0) are unchanged."""
    return box_convert(torch.cat([boxes[..., :2], boxes[..., 2:].clamp(min=0)], dim=-1), "cxcywh", "xyxy")


def l1_and_giou(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Sums over matched pairs (N x 4 each) of the L1 distance and of 1 - GIoU (elementwise, not pairwise).
    With N = 0 both are zeros that stay connected to ``pred``'s graph."""
    l1 = (pred - target).abs().sum()
    giou = generalized_box_iou_loss(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target), reduction="sum")
    return l1, giou
