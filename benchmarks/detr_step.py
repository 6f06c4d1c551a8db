"""DETR training-step time with GAL on the matched boxes against plain backward, interleaved in one process.

CPU (small):  python -m benchmarks.detr_step --height 320 --width 480 --pairs 6
GPU (goal GAL/plain <= 1.01):  python -m benchmarks.detr_step --device cuda --pairs 30
The step is the detection task's: forward, matching once per decoder layer, GAL's backward with the class
and auxiliary losses as extra_loss (or plain backward of the same total), gradient clipping 0.1, AdamW with
DETR's two learning rates. Synthetic images (batch of ``--batch``, ``--height`` x ``--width``, DETR's
800 x 1066 scale by default) with ``--objects`` random boxes each, DETR-R50 at random init (offline).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from benchmarks.gal_overhead import interleaved
from gal_core import GradientAdjuster
from pipelines.tasks.detection.task import model_param_groups
from pipelines.tasks.detection.detr.detr import SetCriterion, build_detr


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch", type=int, default=2, help="images per step (DETR: 2 per GPU)")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1066)
    parser.add_argument("--objects", type=int, default=7, help="boxes per image (COCO: about 7 on average)")
    parser.add_argument("--pairs", type=int, default=20, help="measured (plain, GAL) step pairs")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_detr(backbone=args.backbone, num_classes=91).to(device)
    adjuster = GradientAdjuster(4, (64, 16), ratio=0.01, scale=1.0).to(device)  # PAPER: Table IV's GAL
    groups = [*model_param_groups(model, lr_backbone=1e-5), {"params": list(adjuster.parameters())}]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4)
    criterion = SetCriterion(91).to(device)
    images = torch.randn(args.batch, 3, args.height, args.width, device=device)
    mask = torch.zeros(args.batch, args.height, args.width, dtype=torch.bool, device=device)
    centres = torch.rand(args.batch, args.objects, 2) * 0.6 + 0.2
    sizes = torch.rand(args.batch, args.objects, 2) * 0.3 + 0.05
    targets = [{"labels": torch.randint(1, 91, (args.objects,), device=device),
                "boxes": torch.cat([centres[i], sizes[i]], dim=1).to(device)} for i in range(args.batch)]

    def step(use_gal: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        parts = criterion(model(images, mask), targets)
        if use_gal:
            adjuster.backward(parts.boxes, parts.box_loss_fn, optimizer.param_groups[0]["lr"],
                              extra_loss=parts.extra_loss)
        else:
            (parts.box_loss_fn(parts.boxes) + parts.extra_loss).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    plain, gal, ratios = interleaved(step, args.pairs, args.warmup)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "backbone": args.backbone,
        "batch": args.batch, "image": [args.height, args.width], "objects": args.objects, "pairs": args.pairs,
        "plain_median_s": statistics.median(plain), "gal_median_s": statistics.median(gal),
        "median_pair_ratio": statistics.median(ratios),
        "pair_ratio_quartiles": [round(q, 4) for q in statistics.quantiles(ratios, n=4)],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
