"""The precision study: can float32 resolve GAL's remainder at the paper's settings?

    python -m pipelines.precision [key=value ...]      e.g. settings=[imagenet_resnet50] trials=5 profile=smoke

For each setting (pipelines/conf/task/precision.yaml) GAL's step runs on random outputs of the shape and scale
that setting's runs produce, twice on the same outputs and h: with gal_core's float32 arithmetic (the authors')
and with compute_dtype float64. lr, eps, s, h, the batch and the loss come from the setting's preset (composed
at profile=paper), through the pipelines' one GAL factory. A trial records both signed remainders
R = L(z - δ) - L + first, whose sign orients h's gradient, both safeguard decisions, whether float32's trial
loss tied with its loss, and |R| (float64) in float32 spacings of L. Each setting is one tracked run,
runs/precision/<setting>/ (history.csv: one row per trial; metrics.json: the agreement fractions and medians),
which the report's precision table reads. A setting *trains h on rounding* when the median |R| is below one
float32 spacing of L: float32 then cannot represent R in most steps. Bad keys or values: one line on stderr,
exit code 2, before anything is computed or written. It says how far it is: a line as each setting starts, one
at most every PROGRESS_INTERVAL_S while its draws run, and its result when it is done.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig, OmegaConf

from pipelines.config import CONF, compose, load_file
from pipelines.errors import ConfigError, run_cli
from pipelines.tasks.detection.detr.box_ops import l1_and_giou
from pipelines.training.method import build_adjuster
from pipelines.tracking.run import RunTracker

TASK = "precision"
LossFn = Callable[[torch.Tensor], torch.Tensor]
PROGRESS_INTERVAL_S = 60.0  # at least this long between two lines on a setting's draws
clock = time.monotonic      # tests drive it


@dataclass
class ClassificationScales:
    logit_std: float = MISSING
    loss_levels: Dict[str, List[float]] = MISSING  # by data.name


@dataclass
class DetectionScales:
    boxes_per_image: float = MISSING
    box_noise: List[float] = MISSING


@dataclass
class RegressionScales:
    residual_std: List[float] = MISSING


@dataclass
class PrecisionConf:
    settings: List[str] = MISSING
    seed: int = MISSING
    trials: int = MISSING
    smoke_trials: int = MISSING
    profile: str = MISSING
    runs_root: str = MISSING
    classification: ClassificationScales = field(default_factory=ClassificationScales)
    detection: DetectionScales = field(default_factory=DetectionScales)
    regression: RegressionScales = field(default_factory=RegressionScales)


@dataclass
class Setting:
    """One paper setting as the study draws it: the preset's GAL, lr and loss, and one output draw per level."""

    name: str
    preset: DictConfig
    dim: int
    rows: int
    levels: List[float]
    level_name: str                       # what a level is, in words
    draw: Callable[[float, torch.Generator], tuple[torch.Tensor, LossFn]]

    @property
    def lr(self) -> float:
        return float(self.preset.optim.lr)


def load_config(overrides: list[str]) -> PrecisionConf:
    """conf/task/precision.yaml with key=value overrides, type-checked; ConfigError on a bad key or value."""
    cfg: PrecisionConf = load_file(CONF / "task" / "precision.yaml", overrides, PrecisionConf)
    if not cfg.settings:
        raise ConfigError("settings is empty: name at least one paper setting, e.g. settings=[imagenet_resnet50]")
    if cfg.trials < 1 or cfg.smoke_trials < 1:
        raise ConfigError(f"trials={cfg.trials}, smoke_trials={cfg.smoke_trials}: use integers of at least 1")
    return cfg


def compose_preset(setting: str) -> DictConfig:
    """``experiment=<setting>_gal`` at profile=paper: the paper's hyper-parameters as the project sets them."""
    try:
        return compose("train", [f"experiment={setting}_gal", "profile=paper"])
    except ConfigError as err:
        raise ConfigError(f"setting {setting!r}: no preset conf/experiment/{setting}_gal.yaml ({err})") from None


def _positive(values: List[float], what: str) -> List[float]:
    if not values or any(not v > 0 for v in values):
        raise ConfigError(f"{what}={values}: use a non-empty list of positive numbers")
    return list(values)


def _classification(name: str, preset: DictConfig, scales: ClassificationScales) -> Setting:
    classes, rows = int(preset.data.num_classes), int(preset.task.batch_size)
    data = str(preset.data.name)
    if data not in scales.loss_levels:
        raise ConfigError(f"classification.loss_levels has no entry for {data} (setting {name})")
    smoothing = float(preset.task.label_smoothing)
    std = scales.logit_std

    def draw(level: float, gen: torch.Generator):
        labels = torch.randint(0, classes, (rows,), generator=gen)
        noise = std * torch.randn(rows, classes, generator=gen)
        onehot = F.one_hot(labels, classes).float()
        loss_fn = lambda z: F.cross_entropy(z, labels, label_smoothing=smoothing)  # noqa: E731
        # the label's margin, by bisection: the mean loss (convex in the margin) falls as it grows, without label
        # smoothing all the way; with it, up to its minimum (found by ternary search), past which it rises again
        low, high = -50.0, 200.0
        if smoothing:
            a, b = low, high
            for _ in range(80):
                m1, m2 = a + (b - a) / 3, b - (b - a) / 3
                a, b = (m1, b) if loss_fn(noise + m1 * onehot).item() > loss_fn(noise + m2 * onehot).item() else (a, m2)
            high = (a + b) / 2
            floor = loss_fn(noise + high * onehot).item()
            if level < floor:
                raise ConfigError(f"classification.loss_levels: {level} is below the least loss {floor:.3f} that "
                                  f"{name}'s label smoothing {smoothing} allows at logit_std {std}")
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if loss_fn(noise + mid * onehot).item() > level else (low, mid)
        return noise + high * onehot, loss_fn

    return Setting(name, preset, classes, rows, _positive(scales.loss_levels[data], "classification.loss_levels"),
                   "cross entropy", draw)


def _detection(name: str, preset: DictConfig, scales: DetectionScales) -> Setting:
    rows = max(1, round(int(preset.task.batch_size) * scales.boxes_per_image))
    weights = preset.task.loss

    def draw(noise: float, gen: torch.Generator):
        centres = 0.2 + 0.6 * torch.rand(rows, 2, generator=gen)
        target = torch.cat([centres, 0.05 + 0.45 * torch.rand(rows, 2, generator=gen)], dim=1)
        boxes = (target + noise * torch.randn(rows, 4, generator=gen)).clamp(1e-3, 1 - 1e-3)

        def loss_fn(z):  # DETR's box loss over the matched boxes, normalised by their count (detr.py)
            l1, giou = l1_and_giou(z, target.to(z.dtype))
            return (weights.bbox * l1 + weights.giou * giou) / rows
        return boxes, loss_fn

    return Setting(name, preset, 4, rows, _positive(list(scales.box_noise), "detection.box_noise"),
                   "box noise", draw)


def _regression(name: str, preset: DictConfig, scales: RegressionScales) -> Setting:
    rows = int(preset.data.train.batch_size)

    def draw(residual: float, gen: torch.Generator):
        target = torch.randn(rows, 1, generator=gen)
        return target + residual * torch.randn(rows, 1, generator=gen), lambda z: F.mse_loss(z, target.to(z.dtype))

    return Setting(name, preset, 1, rows, _positive(list(scales.residual_std), "regression.residual_std"),
                   "residual std", draw)


def build_setting(cfg: PrecisionConf, name: str) -> Setting:
    preset = compose_preset(name)
    kind = str(preset.task.name)
    if kind == "classification":
        return _classification(name, preset, cfg.classification)
    if kind == "detection":
        return _detection(name, preset, cfg.detection)
    if kind == "regression":
        return _regression(name, preset, cfg.regression)
    raise ConfigError(f"setting {name!r} is a {kind} preset; the study covers classification, detection and "
                      f"regression")


def adjusters(setting: Setting, seed: int):
    """The preset's GAL twice, float32 and float64 arithmetic, with the same h (the one factory builds both)."""
    method = OmegaConf.to_container(setting.preset.method, resolve=True)
    torch.manual_seed(seed)
    single = build_adjuster({**method, "compute_dtype": "float32"}, setting.dim)
    double = build_adjuster({**method, "compute_dtype": "float64"}, setting.dim)
    double.load_state_dict(single.state_dict())
    return single, double


def trial(setting: Setting, pair, level: float, gen: torch.Generator) -> dict[str, float]:
    """One draw at one output level: both steps on the same outputs; what float32 gets right."""
    z, loss_fn = setting.draw(level, gen)
    stats = []
    for adjuster in pair:
        adjuster.zero_grad(set_to_none=True)
        stats.append(adjuster.backward(z.clone().requires_grad_(), loss_fn, setting.lr))
    single, double = (s.to_dict() for s in stats)
    return {"level": level, "loss": double["loss"], "remainder_float64": double["signed_remainder"],
            "remainder_float32": single["signed_remainder"], "remainder_ulps": double["remainder_ulps"],
            "sign_agree": float(math.copysign(1, single["signed_remainder"]) ==
                                math.copysign(1, double["signed_remainder"])),
            "decision_agree": float(single["accepted"] == double["accepted"]),
            "tie_float32": single["tie"], "accepted_float64": double["accepted"]}


def draws(setting: Setting, pair, trials: int, gen: torch.Generator, label: str) -> list[dict[str, float]]:
    """``trials`` trials at each of the setting's levels, with a line on how many are done every
    PROGRESS_INTERVAL_S (an ImageNet setting's draws take minutes)."""
    total, rows, shown = trials * len(setting.levels), [], clock()
    for level in setting.levels:
        for _ in range(trials):
            rows.append(trial(setting, pair, level, gen))
            if clock() - shown >= PROGRESS_INTERVAL_S and len(rows) < total:
                print(f"{label}: {len(rows)}/{total} draws", flush=True)
                shown = clock()
    return rows


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """The setting's final metrics over all its trials."""
    mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731
    ulps = statistics.median(r["remainder_ulps"] for r in rows)
    return {"sign_agreement": mean("sign_agree"), "decision_agreement": mean("decision_agree"),
            "tie_fraction_float32": mean("tie_float32"), "accepted_float64": mean("accepted_float64"),
            "median_remainder": statistics.median(abs(r["remainder_float64"]) for r in rows),
            "median_remainder_ulps": ulps, "median_loss": statistics.median(r["loss"] for r in rows),
            "rounding": float(ulps < 1), "draws": float(len(rows))}


def study(cfg: PrecisionConf) -> None:
    settings = [build_setting(cfg, name) for name in cfg.settings]  # every preset composes before any compute
    trials = cfg.smoke_trials if cfg.profile == "smoke" else cfg.trials
    for number, setting in enumerate(settings, start=1):
        label = f"[{number}/{len(settings)}] {setting.name}"
        print(f"{label}: {trials * len(setting.levels)} draws of {setting.rows} x {setting.dim} outputs "
              f"({setting.level_name} {', '.join(f'{v:g}' for v in setting.levels)})", flush=True)
        pair = adjusters(setting, cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        method = setting.preset.method
        config = {"task": TASK, "setting": setting.name, "preset": f"{setting.name}_gal",
                  "output": {"rows": setting.rows, "dim": setting.dim, "levels": setting.levels,
                             "level": setting.level_name, "loss": str(setting.preset.task.name)},
                  "gal": {"lr": setting.lr, "ratio": float(method.ratio), "scale": float(method.scale),
                          "arch": list(method.arch), "remainder": str(method.remainder),
                          "policy": str(method.policy)},
                  "trials": trials, "seed": cfg.seed, "profile": cfg.profile}
        with RunTracker(TASK, setting.name, config, profile=cfg.profile, step_name="trial",
                        runs_root=Path(cfg.runs_root)) as tracker:
            rows = draws(setting, pair, trials, gen, label)
            for i, row in enumerate(rows, start=1):
                tracker.log_epoch(i, row)
            final = summarise(rows)
            tracker.log_final(final)
        print(f"{label}: sign of R agrees {final['sign_agreement']:6.1%}, decision "
              f"{final['decision_agreement']:6.1%}, float32 ties {final['tie_fraction_float32']:6.1%}, median |R| "
              f"{final['median_remainder']:.2e} = {final['median_remainder_ulps']:.3g} spacings of L "
              f"({'rounding' if final['rounding'] else 'resolved'}; {len(rows)} draws)", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    return run_cli("precision", lambda: study(load_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
