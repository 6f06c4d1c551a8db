"""DETR (Carion et al., 2020): the model, its set criterion arranged for GAL, and the COCO post-processing.

How the criterion splits DETR's loss for GAL (paper, COCO: GAL adjusts "the 4 box coordinates"):

* The Hungarian matching is computed once per decoder layer, in the criterion's forward, without gradients.
  GAL evaluates the box loss at trial points z - delta; re-matching there would change the loss being
  minimised, so every later evaluation keeps these matchings.
* ``boxes``: the final decoder layer's matched predictions, (N, 4) normalised cxcywh after the sigmoid,
  gathered from ``pred_boxes`` so they stay in the graph. These rows are what GAL adjusts (dim 4).
* ``box_loss_fn(z)``: DETR's box loss of z against the matched targets,
  (w_L1 * sum |z - t| + w_GIoU * sum (1 - GIoU(z, t))) / num_boxes, where num_boxes is the number of
  target boxes averaged over ranks (when torch.distributed is initialised) and clamped at 1, as DETR.
  It is finite for any z: widths and heights are clamped at 0 before the GIoU. With N = 0 it is a zero
  that stays connected to the graph.
* ``extra_loss``: everything GAL does not adjust, back-propagated plainly: the final layer's class loss
  (cross entropy over all queries, no-object weight ``eos_coef``) and every auxiliary decoder layer's full
  loss (class + box terms with its own matching).
* The class loss is the weighted sum of the queries' cross entropies divided by their total weight averaged
  over ranks. DETR divides by each rank's own total weight, so its gradient depends on how a batch is split
  between GPUs; with one process the two are the same, and with many ours equals one process on the global
  batch (as num_boxes does for the box loss).

So ``box_loss_fn(boxes) + extra_loss`` is exactly DETR's total loss (``DetrLoss.total()``, the baseline),
and GAL's step is ``adjuster.backward(loss.boxes, loss.box_loss_fn, lr, extra_loss=loss.extra_loss)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from .backbone import Backbone, Joiner, pad_images
from .box_ops import l1_and_giou
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine
from .transformer import Transformer


class MLP(nn.Module):
    """Linear layers with ReLU between them (the box head: ``bbox_embed.layers.N``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class DETR(nn.Module):
    """Backbone -> 1x1 input projection -> transformer -> per decoder layer, class logits (num_classes + 1,
    the last is no-object) and sigmoid boxes (normalised cxcywh, relative to each image's unpadded size)."""

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries, self.aux_loss = num_queries, aux_loss
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone

    def forward(self, images: Tensor | list[Tensor], mask: Tensor | None = None) -> dict:
        """images (B, 3, H, W) normalised, with mask (B, H, W) True on padding (None: no padding), or a list
        of CHW images (padded here). Returns pred_logits (B, Q, C+1), pred_boxes (B, Q, 4) and, with
        aux_loss, aux_outputs: the same pair for every decoder layer but the last."""
        if isinstance(images, (list, tuple)):
            images, mask = pad_images(list(images))
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
        features, mask, pos = self.backbone(images, mask)
        hs = self.transformer(self.input_proj(features), mask, self.query_embed.weight, pos)
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()  # (layers, B, Q, .)
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])]
        return out


@dataclass
class DetrLoss:
    """One batch's loss, split for GAL (see the module docstring)."""

    boxes: Tensor                           # (N, 4) final-layer matched predictions, in the graph
    box_loss_fn: Callable[[Tensor], Tensor]  # z (N, 4) -> scalar, matching held fixed
    extra_loss: Tensor                      # scalar in the graph: final class loss + all auxiliary losses
    terms: dict[str, Tensor]                # detached, for logging (no host synchronisation)

    def total(self) -> Tensor:
        """DETR's total loss, for plain (baseline) training."""
        return self.box_loss_fn(self.boxes) + self.extra_loss


class SetCriterion(nn.Module):
    """DETR's Hungarian loss: class cross entropy (weight ``weight_ce``) plus ``weight_bbox`` * L1 and
    ``weight_giou`` * (1 - GIoU) on matched boxes, for the final and every auxiliary decoder layer. The
    matcher is a HungarianMatcher with the ``cost_*`` weights unless one is given. Defaults are DETR's."""

    def __init__(self, num_classes: int = 91, cost_class: float = 1.0, cost_bbox: float = 5.0,
                 cost_giou: float = 2.0, eos_coef: float = 0.1, weight_ce: float = 1.0, weight_bbox: float = 5.0,
                 weight_giou: float = 2.0, matcher: HungarianMatcher | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher(cost_class, cost_bbox, cost_giou)
        self.weight_ce, self.weight_bbox, self.weight_giou = weight_ce, weight_bbox, weight_giou
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef  # down-weights the many "no object" queries
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, outputs: dict, targets: list[dict], over_ranks: bool = True) -> DetrLoss:
        """outputs from DETR; targets: per image "labels" (T_b,) int64 and "boxes" (T_b, 4) normalised cxcywh,
        on the outputs' device. ``over_ranks`` False normalises by this call's own targets and queries."""
        layers = [outputs, *outputs.get("aux_outputs", [])]  # final layer first
        matchings = [self.matcher(layer, targets) for layer in layers]  # once per layer, no grad
        num_boxes, class_weight = self._normalisers(targets, outputs["pred_logits"], over_ranks)

        boxes, target_boxes = self._matched(outputs["pred_boxes"], targets, matchings[0])

        def box_loss_fn(z: Tensor) -> Tensor:
            l1, giou = l1_and_giou(z, target_boxes)
            return (self.weight_bbox * l1 + self.weight_giou * giou) / num_boxes

        loss_ce = self._class_loss(outputs["pred_logits"], targets, matchings[0]) / class_weight
        extra_loss = self.weight_ce * loss_ce
        aux = torch.zeros(3, device=boxes.device)  # unweighted aux sums: ce, L1, GIoU
        for layer, matching in zip(layers[1:], matchings[1:]):
            ce = self._class_loss(layer["pred_logits"], targets, matching) / class_weight
            l1, giou = l1_and_giou(*self._matched(layer["pred_boxes"], targets, matching))
            l1, giou = l1 / num_boxes, giou / num_boxes
            extra_loss = extra_loss + self.weight_ce * ce + self.weight_bbox * l1 + self.weight_giou * giou
            aux = aux + torch.stack([ce, l1, giou]).detach()
        with torch.no_grad():
            l1, giou = (x / num_boxes for x in l1_and_giou(boxes.detach(), target_boxes))
            total = box_loss_fn(boxes.detach()) + extra_loss.detach()
        terms = {"loss_ce": loss_ce.detach(), "loss_bbox": l1, "loss_giou": giou, "loss_ce_aux": aux[0],
                 "loss_bbox_aux": aux[1], "loss_giou_aux": aux[2], "loss": total}
        return DetrLoss(boxes, box_loss_fn, extra_loss, terms)

    @staticmethod
    def _matched(pred_boxes: Tensor, targets: list[dict], matching) -> tuple[Tensor, Tensor]:
        """(N, 4) predictions (in the graph) and their (N, 4) targets, image by image in matching order."""
        batch_idx, query_idx = _query_index(matching, pred_boxes.device)
        target_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, matching)])
        return pred_boxes[batch_idx, query_idx], target_boxes

    def _class_loss(self, logits: Tensor, targets: list[dict], matching) -> Tensor:
        """Weighted cross entropy summed over all queries: matched ones against their target's label, the
        others against no-object."""
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        matched = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, matching)])
        classes[_query_index(matching, logits.device)] = matched.to(logits.device)
        return F.cross_entropy(logits.transpose(1, 2), classes, weight=self.empty_weight.to(logits.dtype),
                               reduction="sum")

    def _normalisers(self, targets: list[dict], logits: Tensor, over_ranks: bool) -> tuple[Tensor, Tensor]:
        """(number of target boxes, total class-loss weight of the queries), each per rank and (``over_ranks``)
        averaged over ranks so every rank normalises alike; the box count at least 1. Every target is matched to one query
        (at most num_queries per image), the other queries weigh eos_coef."""
        queries = logits.shape[1]
        matched = sum(min(len(t["labels"]), queries) for t in targets)
        no_object = float(self.empty_weight[-1])
        counts = torch.tensor([float(sum(len(t["labels"]) for t in targets)),
                               matched + (len(targets) * queries - matched) * no_object], device=logits.device)
        if over_ranks and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            counts = counts / dist.get_world_size()
        return counts[0].clamp(min=1), counts[1].to(logits.dtype)


def _query_index(matching, device: torch.device) -> tuple[Tensor, Tensor]:
    """(image index, query index) of every matched query, in matching order."""
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matching)])
    query_idx = torch.cat([q for q, _ in matching])
    return batch_idx.to(device), query_idx.to(device)


class PostProcess(nn.Module):
    """DETR outputs -> per image {"scores", "labels", "boxes"} for COCO evaluation: softmax over classes,
    the best real class of each query (no-object dropped; label ids unchanged) and its score, boxes in
    absolute xyxy pixels of the size given (each image's original size for evaluation)."""

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """target_sizes (B, 2): (height, width) per image."""
        scores, labels = outputs["pred_logits"].softmax(-1)[..., :-1].max(-1)
        boxes = box_convert(outputs["pred_boxes"], "cxcywh", "xyxy")
        height, width = target_sizes.unbind(1)
        boxes = boxes * torch.stack([width, height, width, height], dim=1)[:, None, :].to(boxes.dtype)
        return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]


def build_detr(backbone: str = "resnet50", num_classes: int = 91, hidden_dim: int = 256, nheads: int = 8,
               enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
               num_queries: int = 100, pretrained_backbone: bool = False, aux_loss: bool = True,
               train_backbone: bool = True, dilation: bool = False) -> DETR:
    """DETR with a torchvision ResNet (resnet18/34/50/101). Defaults are DETR-R50 for COCO (91 = largest
    category id + 1, so 92 logits). ``train_backbone`` False freezes the whole ResNet (DETR's
    lr_backbone = 0); ``dilation`` True is DETR's DC5 variant."""
    body = Backbone(backbone, pretrained=pretrained_backbone, train=train_backbone, dilation=dilation)
    joined = Joiner(body, PositionEmbeddingSine(hidden_dim // 2, normalize=True, scale=2 * math.pi))
    transformer = Transformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout)
    return DETR(joined, transformer, num_classes, num_queries, aux_loss=aux_loss)

