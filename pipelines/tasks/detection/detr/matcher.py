"""Hungarian matching of predictions to targets (DETR's matcher)."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import generalized_box_iou

from .box_ops import cxcywh_to_xyxy


class HungarianMatcher:
    """One-to-one assignment of queries to target boxes minimising
    ``cost_class * (-p[target class]) + cost_bbox * L1 + cost_giou * (-GIoU)``. Queries left unmatched are
    "no object". The costs of the whole batch are computed as one matrix (all queries x all targets) on the
    device, copied to the host once and split per image, as DETR does."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor) -> Tensor:
        """(P, C+1) logits and (P, 4) boxes against T targets -> (P, T) costs."""
        prob = logits.softmax(-1)
        cost_class = -prob[:, labels]  # 1 - p without the constant 1, which does not change the matching
        cost_bbox = torch.cdist(boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target_boxes))
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """outputs: pred_logits (B, Q, C+1), pred_boxes (B, Q, 4); targets: per image "labels" (T_b,) and
        "boxes" (T_b, 4). Returns per image (query indices, target indices), int64 on the CPU, of length
        min(Q, T_b), query indices ascending."""
        batch, queries = outputs["pred_logits"].shape[:2]
        labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets])
        cost = self.cost_matrix(outputs["pred_logits"].flatten(0, 1), outputs["pred_boxes"].flatten(0, 1),
                                labels, target_boxes)
        cost = cost.view(batch, queries, -1).float().cpu()
        sizes = [len(t["boxes"]) for t in targets]
        # image b's block: its own queries (row b) against its own targets (b-th column chunk)
        return [tuple(torch.as_tensor(ix, dtype=torch.int64) for ix in linear_sum_assignment(block[b]))
                for b, block in enumerate(cost.split(sizes, dim=-1))]
