"""DETR (pipelines/tasks/detection/detr): DETR-R50's state-dict layout and trainable-parameter count, padded forward,
the Hungarian matcher against brute force, the criterion's split for GAL (matching held fixed, finite at
negative sizes, empty batches, policy="never" equal to plain backward) and PostProcess."""
from __future__ import annotations

import hashlib
import itertools
import math
from urllib.error import URLError

import pytest
import torch
import torchvision
from gal_core import GradientAdjuster

from pipelines.tasks.detection.detr.backbone import pad_images
from pipelines.tasks.detection.detr.detr import PostProcess, SetCriterion, build_detr
from pipelines.tasks.detection.detr.matcher import HungarianMatcher
from pipelines.tasks.detection.detr.position_encoding import PositionEmbeddingSine

TINY = dict(backbone="resnet18", num_classes=7, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=3,
            dim_feedforward=64, dropout=0.0, num_queries=6)

# DETR-R50 (hubconf's detr_resnet50, 91 classes), measured by building DETR's own model: its state dict has
# 458 entries holding 41,631,008 values, and the sha256 of its sorted "name (shape)" lines is this digest.
DETR_R50_KEYS, DETR_R50_VALUES = 458, 41_631_008
DETR_R50_DIGEST = "01f0ab8e837e85aedd7dc8791ece86221adacfa94566d69d04365767b2a394f9"
ENCODER_KEYS = ["self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
                "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
                "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]
DECODER_KEYS = ENCODER_KEYS + [k.replace("self_attn", "multihead_attn") for k in ENCODER_KEYS[:4]] + [
    "norm3.weight", "norm3.bias"]


def detr_r50_keys() -> set[str]:
    """DETR's naming: the ResNet under backbone.0.body (no fc, FrozenBatchNorm has no num_batches_tracked)."""
    resnet = torchvision.models.resnet50().state_dict()
    keys = {f"backbone.0.body.{k}" for k in resnet if not k.startswith("fc.") and "num_batches" not in k}
    keys |= {f"transformer.encoder.layers.{i}.{k}" for i in range(6) for k in ENCODER_KEYS}
    keys |= {f"transformer.decoder.layers.{i}.{k}" for i in range(6) for k in DECODER_KEYS}
    keys |= {"transformer.decoder.norm.weight", "transformer.decoder.norm.bias", "query_embed.weight",
             "class_embed.weight", "class_embed.bias", "input_proj.weight", "input_proj.bias"}
    return keys | {f"bbox_embed.layers.{i}.{k}" for i in range(3) for k in ("weight", "bias")}


def test_detr_r50_state_dict_layout_and_trainable_parameters():
    model = build_detr(pretrained_backbone=False)
    state = model.state_dict()
    assert set(state) == detr_r50_keys()
    lines = sorted(f"{name} {tuple(value.shape)}" for name, value in state.items())
    assert (len(state), sum(v.numel() for v in state.values())) == (DETR_R50_KEYS, DETR_R50_VALUES)
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == DETR_R50_DIGEST
    assert state["class_embed.weight"].shape == (92, 256)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 41_302_368  # paper, COCO bullet
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trained_stages = tuple(f"backbone.0.body.layer{i}." for i in (2, 3, 4))
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith("backbone.0.body.") and not n.startswith(trained_stages)}
    assert "backbone.0.body.conv1.weight" in frozen and "backbone.0.body.layer1.0.conv1.weight" in frozen
    model.load_state_dict(state, strict=True)


def test_pretrained_backbone_loads_detrs_imagenet_weights(monkeypatch):
    weights = torchvision.models.ResNet18_Weights
    source = torchvision.models.resnet18().state_dict()  # a plain BatchNorm checkpoint (num_batches_tracked)
    source["conv1.weight"].fill_(0.25)
    source["bn1.running_mean"].copy_(torch.arange(64.0))
    asked = []
    monkeypatch.setattr(weights, "get_state_dict", lambda self, **kw: asked.append(self) or source)
    model = build_detr(**TINY, pretrained_backbone=True)
    assert asked == [weights.IMAGENET1K_V1]  # the weights DETR started from
    body = model.backbone[0].body
    assert torch.equal(body.conv1.weight, source["conv1.weight"])
    assert torch.equal(body.bn1.running_mean, torch.arange(64.0))

    def offline(self, **kw):
        raise URLError("no route to host")

    monkeypatch.setattr(weights, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="pretrained_backbone=False"):
        build_detr(**TINY, pretrained_backbone=True)


def test_pad_images_places_images_top_left_and_masks_padding():
    a, b = torch.rand(3, 4, 6), torch.rand(3, 5, 2)
    batch, mask = pad_images([a, b])
    assert batch.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert torch.equal(batch[0, :, :4, :6], a) and torch.equal(batch[1, :, :5, :2], b)
    assert mask[0, 4].all() and not mask[0, :4].any()
    assert mask[1, :, 2:].all() and not mask[1, :, :2].any()
    assert batch[mask[:, None].expand_as(batch)].eq(0).all()


def test_sine_position_encoding_covers_each_images_own_extent():
    encode = PositionEmbeddingSine(16)
    alone = encode(torch.zeros(1, 3, 4, dtype=torch.bool))
    padded_mask = torch.ones(1, 5, 7, dtype=torch.bool)
    padded_mask[:, :3, :4] = False
    padded = encode(padded_mask)
    assert alone.shape == (1, 32, 3, 4) and padded.shape == (1, 32, 5, 7)
    torch.testing.assert_close(padded[..., :3, :4], alone)
    # channel 0 is sin(2 pi * y / H): zero on the last valid row, as DETR's normalize=True, scale=2 pi
    assert alone[0, 0, -1].abs().max() < 1e-4
    torch.testing.assert_close(alone[0, 0, 0], torch.full((4,), math.sin(2 * math.pi / 3)))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return build_detr(**TINY)


def images_and_targets():
    torch.manual_seed(1)
    images, mask = pad_images([torch.randn(3, 64, 96), torch.randn(3, 80, 56)])
    targets = [{"labels": torch.tensor([1, 6, 3]),
                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1], [0.7, 0.2, 0.4, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])}]
    return images, mask, targets


def test_forward_on_a_padded_batch(tiny):
    images, mask, _ = images_and_targets()
    out = tiny(images, mask)
    assert out["pred_logits"].shape == (2, 6, 8) and out["pred_boxes"].shape == (2, 6, 4)
    assert out["pred_boxes"].min() >= 0 and out["pred_boxes"].max() <= 1
    assert len(out["aux_outputs"]) == TINY["dec_layers"] - 1
    assert all(a["pred_logits"].shape == (2, 6, 8) and a["pred_boxes"].shape == (2, 6, 4)
               for a in out["aux_outputs"])
    from_list = tiny([images[0, :, :64, :96], images[1, :, :80, :56]])  # a list is padded the same way
    torch.testing.assert_close(from_list["pred_boxes"], out["pred_boxes"], rtol=0, atol=0)
    assert "aux_outputs" not in build_detr(**{**TINY, "dec_layers": 1}, aux_loss=False)(images, mask)


def giou(a, b):
    """GIoU of two cxcywh boxes, written out."""
    (ax0, ay0), (ax1, ay1) = (a[0] - a[2] / 2, a[1] - a[3] / 2), (a[0] + a[2] / 2, a[1] + a[3] / 2)
    (bx0, by0), (bx1, by1) = (b[0] - b[2] / 2, b[1] - b[3] / 2), (b[0] + b[2] / 2, b[1] + b[3] / 2)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def random_case(generator, queries, targets, classes=5):
    logits = torch.randn(queries, classes + 1, generator=generator, dtype=torch.float64)
    boxes = torch.rand(queries, 4, generator=generator, dtype=torch.float64) * 0.5 + 0.1
    labels = torch.randint(0, classes, (targets,), generator=generator)
    target_boxes = torch.rand(targets, 4, generator=generator, dtype=torch.float64) * 0.5 + 0.1
    return logits, boxes, {"labels": labels, "boxes": target_boxes}


@pytest.mark.parametrize("queries,targets", [(5, 3), (4, 4), (6, 1), (3, 0)])
def test_matcher_finds_the_minimum_cost_assignment(queries, targets):
    generator = torch.Generator().manual_seed(queries * 10 + targets)
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    for _ in range(5):
        logits, boxes, target = random_case(generator, queries, targets)
        prob = logits.softmax(-1)
        cost = [[-prob[q, target["labels"][t]].item() + 5 * (boxes[q] - target["boxes"][t]).abs().sum().item()
                 - 2 * giou(boxes[q].tolist(), target["boxes"][t].tolist()) for t in range(targets)]
                for q in range(queries)]
        best = min(sum(cost[q][t] for t, q in enumerate(p)) for p in itertools.permutations(range(queries), targets))
        ((rows, cols),) = matcher({"pred_logits": logits[None], "pred_boxes": boxes[None]}, [target])
        assert len(rows) == len(set(rows.tolist())) == min(queries, targets) and rows.dtype == torch.int64
        assert sorted(cols.tolist()) == list(range(targets))
        assert sum(cost[q][t] for q, t in zip(rows.tolist(), cols.tolist())) == pytest.approx(best, abs=1e-9)


def test_matcher_batched_equals_per_image():
    generator = torch.Generator().manual_seed(7)
    cases = [random_case(generator, 8, n) for n in (3, 0, 8, 5)]
    logits, boxes = torch.stack([c[0] for c in cases]), torch.stack([c[1] for c in cases])
    targets = [c[2] for c in cases]
    matcher = HungarianMatcher(cost_class=2, cost_bbox=1, cost_giou=3)  # configurable costs
    batched = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for b, (rows, cols) in enumerate(batched):
        ((one_rows, one_cols),) = matcher({"pred_logits": logits[b:b + 1], "pred_boxes": boxes[b:b + 1]},
                                          [targets[b]])
        assert torch.equal(rows, one_rows) and torch.equal(cols, one_cols)
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)


class CountingMatcher(HungarianMatcher):
    calls = 0

    def __call__(self, outputs, targets):
        CountingMatcher.calls += 1
        return super().__call__(outputs, targets)


def test_criterion_splits_detrs_loss_and_matches_once_per_layer(tiny):
    images, mask, targets = images_and_targets()
    criterion = SetCriterion(num_classes=7, matcher=CountingMatcher())
    out = tiny(images, mask)
    CountingMatcher.calls = 0
    loss = criterion(out, targets)
    assert CountingMatcher.calls == TINY["dec_layers"]  # once per decoder layer, in the forward pass
    matching = HungarianMatcher()(out, targets)
    expected = torch.cat([out["pred_boxes"][b, rows] for b, (rows, _) in enumerate(matching)])
    target_boxes = torch.cat([t["boxes"][cols] for t, (_, cols) in zip(targets, matching)])
    assert loss.boxes.shape == (4, 4) and loss.boxes.requires_grad and torch.equal(loss.boxes, expected)
    # DETR's box loss, written out with the pairwise GIoU's diagonal (num_boxes = 4 target boxes)
    to_xyxy = lambda b: torchvision.ops.box_convert(b, "cxcywh", "xyxy")  # noqa: E731
    reference = (5 * (expected - target_boxes).abs().sum()
                 + 2 * (1 - torchvision.ops.generalized_box_iou(to_xyxy(expected), to_xyxy(target_boxes)).diag()).sum()
                 ) / 4
    torch.testing.assert_close(loss.box_loss_fn(loss.boxes), reference)
    z = torch.rand(4, 4) * 0.5 + 0.1  # any z is scored against the same matched targets, never re-matched
    torch.testing.assert_close(loss.box_loss_fn(z), (5 * (z - target_boxes).abs().sum() + 2 * (
        1 - torchvision.ops.generalized_box_iou(to_xyxy(z), to_xyxy(target_boxes)).diag()).sum()) / 4)
    assert CountingMatcher.calls == TINY["dec_layers"]
    l1_only = SetCriterion(num_classes=7, weight_bbox=1.0, weight_giou=0.0, matcher=CountingMatcher())(out, targets)
    torch.testing.assert_close(l1_only.box_loss_fn(z), (z - target_boxes).abs().sum() / 4)
    assert SetCriterion(cost_class=3.0, cost_bbox=0.5, cost_giou=4.0).matcher.cost_bbox == 0.5
    t = loss.terms
    assert all(not v.requires_grad and v.dim() == 0 for v in t.values())
    torch.testing.assert_close(t["loss"], loss.total().detach())
    torch.testing.assert_close(t["loss"], t["loss_ce"] + 5 * t["loss_bbox"] + 2 * t["loss_giou"]
                               + t["loss_ce_aux"] + 5 * t["loss_bbox_aux"] + 2 * t["loss_giou_aux"])
    torch.testing.assert_close(loss.extra_loss.detach(), t["loss"] - loss.box_loss_fn(loss.boxes).detach())
    # the class loss: no-object weighted 0.1, every query counted
    classes = torch.full((2, 6), 7)
    for b, (rows, cols) in enumerate(matching):
        classes[b, rows] = targets[b]["labels"][cols]
    weight = torch.tensor([1.0] * 7 + [0.1])
    torch.testing.assert_close(t["loss_ce"], torch.nn.functional.cross_entropy(
        out["pred_logits"].detach().transpose(1, 2), classes, weight=weight))


def test_box_loss_stays_finite_for_negative_widths_and_heights(tiny):
    images, mask, targets = images_and_targets()
    loss = SetCriterion(num_classes=7)(tiny(images, mask), targets)
    z = loss.boxes.detach().clone()
    z[0, 2], z[1, 3], z[2, 2:] = -0.3, -1e-3, torch.tensor([-0.2, 0.0])
    z.requires_grad_()
    value = loss.box_loss_fn(z)
    (grad,) = torch.autograd.grad(value, z)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    stepped = loss.box_loss_fn(loss.boxes.detach() - 10.0 * torch.ones(4, 4))  # a huge trial step
    assert torch.isfinite(stepped)


def test_gal_never_gives_exactly_the_plain_gradients(tiny):
    images, mask, targets = images_and_targets()
    targets[1] = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}  # one empty image
    criterion = SetCriterion(num_classes=7)
    torch.manual_seed(2)
    adjuster = GradientAdjuster(4, (64, 16), ratio=0.01, scale=1, policy="never")

    def gradients(gal: bool) -> dict[str, torch.Tensor]:
        tiny.zero_grad(set_to_none=True)
        loss = criterion(tiny(images, mask), targets)
        if gal:
            adjuster.backward(loss.boxes, loss.box_loss_fn, 0.1, extra_loss=loss.extra_loss)
        else:
            loss.total().backward()
        return {n: p.grad.clone() for n, p in tiny.named_parameters() if p.requires_grad}

    plain, gal = gradients(False), gradients(True)
    assert plain.keys() == gal.keys() and len(plain) > 0
    assert all(torch.equal(plain[n], gal[n]) for n in plain), [n for n in plain if not torch.equal(plain[n], gal[n])]
    assert all(p.grad is None for p in tiny.parameters() if not p.requires_grad)  # stem and layer1 frozen
    assert any(g.abs().sum() > 0 for n, g in gal.items() if n.startswith("backbone.0.body.layer2"))


def test_gal_step_on_a_batch_without_objects(tiny):
    images, mask, _ = images_and_targets()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    loss = SetCriterion(num_classes=7)(tiny(images, mask), empty)
    assert loss.boxes.shape == (0, 4) and loss.boxes.requires_grad
    box_loss = loss.box_loss_fn(loss.boxes)
    assert box_loss.item() == 0 and box_loss.requires_grad
    adjuster = GradientAdjuster(4, (64, 16), ratio=0.01, scale=1)
    stats = adjuster.backward(loss.boxes, loss.box_loss_fn, 0.1, extra_loss=loss.extra_loss).to_dict()
    assert all(math.isfinite(v) for v in stats.values())
    grads = {n: p.grad for n, p in tiny.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["class_embed.weight"].abs().sum() > 0  # the class loss (all no-object) still trains
    assert all(torch.isfinite(v) for v in loss.terms.values())


def test_postprocess_gives_absolute_xyxy_boxes_and_keeps_label_ids():
    logits = torch.full((2, 2, 92), -10.0)
    logits[0, 0, 90], logits[0, 1, 91], logits[0, 1, 3] = 5.0, 9.0, 1.0  # query 1: no-object wins; 3 is best real
    logits[1, :, 1] = 2.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0]], [[0.5, 0.5, 1.0, 1.0]] * 2])
    results = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200], [30, 40]]))
    assert results[0]["labels"].tolist() == [90, 3] and results[1]["labels"].tolist() == [1, 1]
    prob = logits.softmax(-1)
    torch.testing.assert_close(results[0]["scores"], torch.stack([prob[0, 0, 90], prob[0, 1, 3]]))
    torch.testing.assert_close(results[0]["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 0.0, 100.0, 100.0]]))
    torch.testing.assert_close(results[1]["boxes"], torch.tensor([[0.0, 0.0, 40.0, 30.0]] * 2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_a_gal_step_runs_under_bf16_autocast(tiny, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare fp32 with fp32
    images, mask, targets = images_and_targets()
    criterion = SetCriterion(num_classes=7)
    with torch.no_grad():
        on_cpu = criterion(tiny(images, mask), targets).terms
    model, criterion = tiny.cuda(), criterion.cuda()
    images, mask = images.cuda(), mask.cuda()
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    with torch.no_grad():
        on_cuda = criterion(model(images, mask), targets).terms
    for name, value in on_cpu.items():
        torch.testing.assert_close(on_cuda[name].cpu(), value, rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = criterion(model(images, mask), targets)
    adjuster = GradientAdjuster(4, (64, 16), ratio=0.01, scale=1).cuda()
    stats = adjuster.backward(loss.boxes, loss.box_loss_fn, 1e-4, extra_loss=loss.extra_loss).to_dict()
    assert all(math.isfinite(v) for v in stats.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in adjuster.parameters())
