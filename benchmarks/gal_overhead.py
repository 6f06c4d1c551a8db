"""Training-step time of GAL against plain ``loss.backward()``, interleaved in one process.

CPU default (issue goal <= 1.03): a ResNet-18 on 32x32 inputs, batch 128, 10 classes, adjuster 100-32-16.
GPU (goal <= 1.01):  python -m benchmarks.gal_overhead --device cuda --model resnet50 --image-size 224 \
                       --classes 1000 --arch 512,128 --amp [--mode compiled|graphed]
Plain and GAL steps alternate on the same model, so drift in machine load hits both alike; the printed
ratio is the median over step pairs of (GAL step time / plain step time). ``--mode`` runs GAL's step eagerly
(default), compiled (GradientAdjuster(compile=True)) or compiled with CUDA graphs ("reduce-overhead"); the
model itself stays eager in every mode.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from gal_core import GradientAdjuster

MODES = {"eager": False, "compiled": True, "graphed": "reduce-overhead"}  # --mode -> GradientAdjuster(compile=)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--arch", default="100,32,16", help="adjuster hidden widths")
    parser.add_argument("--pairs", type=int, default=20, help="measured (plain, GAL) step pairs")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast + channels_last (GPU recipe)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--mode", choices=list(MODES), default="eager", help="how GAL's step runs")
    return parser.parse_args(argv)


def _extra_cost_on_output_ms(adjuster, logits_shape, device, labels, repeats=200) -> float:
    """Time of adjuster.backward minus plain backward on a leaf output: GAL's cost without model noise."""
    z = torch.randn(*logits_shape, device=device, requires_grad=True)
    loss_fn = lambda out: F.cross_entropy(out, labels)  # noqa: E731

    def timed(fn) -> float:
        for _ in range(10):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats * 1e3

    return timed(lambda: adjuster.backward(z, loss_fn, 0.05)) - timed(lambda: loss_fn(z).backward())


def interleaved(step, pairs: int, warmup: int) -> tuple[list[float], list[float], list[float]]:
    """(plain times, GAL times, GAL / plain per pair) of ``step(use_gal)``, after ``warmup`` pairs; the order
    within a pair alternates, so drift in machine load hits both alike."""
    for _ in range(warmup):
        step(False), step(True)
    plain, gal = [], []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        times = {use_gal: step(use_gal) for use_gal in order}
        plain.append(times[False])
        gal.append(times[True])
    return plain, gal, [g / p for g, p in zip(gal, plain)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.amp else torch.contiguous_format
    model = timm.create_model(args.model, num_classes=args.classes).to(device, memory_format=memory_format)
    compile_option = {"compile": MODES[args.mode]} if MODES[args.mode] else {}  # eager: the default
    adjuster = GradientAdjuster(args.classes, tuple(int(w) for w in args.arch.split(",")), ratio=1e-3,
                                **compile_option).to(device)
    optimizer = torch.optim.SGD([*model.parameters(), *adjuster.parameters()], lr=0.05, momentum=0.9)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    loss_fn = lambda logits: F.cross_entropy(logits, labels)  # noqa: E731

    def step(use_gal: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(images)
        if use_gal:
            adjuster.backward(logits, loss_fn, optimizer.param_groups[0]["lr"])
        else:
            loss_fn(logits.float()).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    plain, gal, ratios = interleaved(step, args.pairs, args.warmup)
    extra_ms = _extra_cost_on_output_ms(adjuster, logits_shape=(args.batch, args.classes), device=device,
                                        labels=labels)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "model": args.model, "image_size": args.image_size,
        "batch": args.batch, "classes": args.classes, "arch": args.arch, "amp": args.amp, "pairs": args.pairs,
        "mode": args.mode, "cudagraph_skips": getattr(adjuster, "cudagraph_skips", []),  # [] before gal_core had it
        "plain_median_s": statistics.median(plain), "gal_median_s": statistics.median(gal),
        "median_pair_ratio": statistics.median(ratios),
        "pair_ratio_quartiles": [round(q, 4) for q in statistics.quantiles(ratios, n=4)],
        "gal_extra_ms_per_step": extra_ms,  # GAL's own work, measured alone on a leaf output
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
