"""Training throughput of the project's classification trainer (pipelines/tasks/classification/task.py): images/s
of plain training and of GAL training, and GAL's overhead, on the real config and code path (issue 4).

CPU (small, runs here):  python -m benchmarks.classification_throughput --batch 16 --steps 2 --pairs 3
GPU (the goals):         python -m benchmarks.classification_throughput --device cuda --batch 128 --steps 50 \
                           --pairs 5
Goals (issue 4, on GPU): GAL time / plain time <= 1.01; plain images/s within 10% of timm's own train.py on
the same model, batch and precision (that comparison is not automated here: run timm's train.py by hand).

Writes a synthetic prepared CIFAR-10 (random uint8 32x32 images, the prepare stage's on-disk format) into a
temporary root, composes conf/train.yaml with experiment=cifar10_sgd_baseline and cifar10_sgd_gal
(profile=paper, so no smoke sizes; model.pretrained=false, offline), builds one ``Classification`` task per method and
calls ``train_epoch`` directly (no evaluation, no MLflow, no checkpoints). After one warm-up epoch each,
plain and GAL epochs of ``--steps`` steps alternate (the order flips every pair), so drift in machine load
hits both alike. Reported: per-method median images/s (the trainer's own ``images_per_s``: loader wait,
device resize to ``--image-size``, forward, backward, optimiser step) and the median over pairs of
GAL time per image / plain time per image. On CUDA the config's auto precision is bf16 autocast with
channels_last, the GPU recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parents[1] / "pipelines" / "conf"
METHODS = {"plain": "cifar10_sgd_baseline", "gal": "cifar10_sgd_gal"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="efficientnet_b1", help="timm model name (model.name)")
    parser.add_argument("--image-size", type=int, default=224, help="task.image_size (CIFAR is resized on device)")
    parser.add_argument("--batch", type=int, default=16, help="task.batch_size")
    parser.add_argument("--steps", type=int, default=2, help="training steps per epoch (task.max_steps)")
    parser.add_argument("--pairs", "--epoch-pairs", "--epochs-pairs", dest="pairs", type=int, default=3,
                        help="measured (plain, GAL) epoch pairs, after one warm-up epoch each")
    parser.add_argument("--workers", type=int, default=None,
                        help="task.workers (default: 0 on cpu, the config's value on cuda)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="trainer.compile=true: GAL's compiled step")
    return parser.parse_args(argv)


def write_cifar10(root: Path, train: int, test: int, seed: int = 0) -> None:
    """A synthetic prepared CIFAR-10 in the prepare stage's format: data/processed/cifar10/*.npy + sidecar."""
    rng = np.random.default_rng(seed)
    folder = root / "data" / "processed" / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        np.save(folder / f"{split}_images.npy", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        np.save(folder / f"{split}_labels.npy", rng.integers(0, 10, n).astype(np.int64))
    sidecar = {"classes": 10, "train": train, "test": test, "synthetic": True}
    (root / "data" / "processed" / "cifar10.json").write_text(json.dumps(sidecar))


def compose_config(experiment: str, root: Path, args: argparse.Namespace) -> DictConfig:
    overrides = [f"experiment={experiment}", "profile=paper", f"root={root}", f"model.name={args.model}",
                 "model.pretrained=false", f"task.batch_size={args.batch}", f"task.max_steps={args.steps}",
                 f"task.image_size={args.image_size}", f"trainer.device={args.device}", "trainer.gpus=1",
                 "trainer.nodes=1", "task.log_every=0", f"trainer.compile={args.compile}"]
    if args.workers is not None:
        overrides.append(f"task.workers={args.workers}")
    elif args.device == "cpu":
        overrides.append("task.workers=0")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def build_trainers(args: argparse.Namespace, root: Path) -> dict:
    from pipelines.training import launch
    from pipelines.tasks.classification.task import Classification

    cfgs = {method: compose_config(experiment, root, args) for method, experiment in METHODS.items()}
    cfg = cfgs["plain"]
    if cfg.profile != "paper" or cfg.task.max_steps != args.steps or cfg.task.image_size != args.image_size:
        raise RuntimeError(f"the composed config is not the one asked for: profile={cfg.profile}, "
                           f"max_steps={cfg.task.max_steps}, image_size={cfg.task.image_size}")
    if cfg.task.deterministic:  # as runner.run() does before building the task
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    if cfgs["plain"].method.gal or not cfgs["gal"].method.gal:
        raise RuntimeError("the experiments do not compose to one plain and one GAL run")
    procs = launch.setup(cfg.trainer)  # one process: no torch.distributed
    return {method: Classification(c, procs) for method, c in cfgs.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("LOCAL_RANK", "WORLD_SIZE"):  # never pick up a surrounding torchrun
        os.environ.pop(name, None)
    with tempfile.TemporaryDirectory(prefix="gal-throughput-") as tmp:
        root = Path(tmp)
        write_cifar10(root, train=args.batch * args.steps, test=10)
        trainers = build_trainers(args, root)
        trainer, gal_cfg = trainers["plain"], trainers["gal"].cfg
        cfg = trainer.cfg
        rows: dict[str, list[dict]] = {"plain": [], "gal": []}
        for method, t in trainers.items():  # warm-up: allocator, cudnn autotuning, loader start-up
            t.train_epoch(0)
        for i in range(args.pairs):
            order = ("plain", "gal") if i % 2 == 0 else ("gal", "plain")
            for method in order:
                rows[method].append(trainers[method].train_epoch(i + 1))
        del trainers  # data loaders and files go before the folder does
    plain = [r["images_per_s"] for r in rows["plain"]]
    gal = [r["images_per_s"] for r in rows["gal"]]
    ratios = [g["time_per_image"] / p["time_per_image"] for g, p in zip(rows["gal"], rows["plain"])]
    device = torch.device(args.device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "experiments": METHODS, "model": cfg.model.name, "image_size": cfg.task.image_size,
        "batch": cfg.task.batch_size,
        "steps_per_epoch": args.steps, "pairs": args.pairs, "workers": cfg.task.workers,
        "precision": "bf16" if trainer.autocast["enabled"] else "fp32",
        "channels_last": trainer.preprocess.memory_format == torch.channels_last,
        "gal": {"ratio": gal_cfg.method.ratio, "scale": gal_cfg.method.scale,
                "arch": list(gal_cfg.method.arch), "optim": gal_cfg.optim.name},
        "plain_images_per_s": statistics.median(plain), "gal_images_per_s": statistics.median(gal),
        "median_pair_ratio": statistics.median(ratios),  # GAL time / plain time, per epoch pair
        "pair_ratios": [round(r, 4) for r in ratios],
        "plain_images_per_s_all": [round(v, 3) for v in plain], "gal_images_per_s_all": [round(v, 3) for v in gal],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
