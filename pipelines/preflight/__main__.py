"""Preflight: every training run of a profile at its real size for a few steps, with its memory, speed and
estimated device-hours, before the GPU-hours are spent.

    make preflight PROFILE=paper [DEVICE=cuda] [STAGES="train_detection ablate_eps"] [STEPS=3] [WORLD=auto]
    python -m pipelines.preflight --profile paper [--device auto|cuda|cpu] [--steps 3] [--world 1|auto]
        [--batch-per-device N] [--random-init] [--param gpus=8] [--out reports/preflight] [STAGE ...]

1. The runs: the training commands DVC would run for the profile, one per distinct configuration (plan.py).
2. The data: the workspace's prepared data where it was prepared for the profile, else data made on the fly
   in the real formats at the real image sizes, in a scratch directory removed afterwards (data.py).
3. Each run: built at full size and rehearsed by the runner's preflight mode (measure.py): STEPS training
   steps, one evaluation batch, a checkpoint save and load. Nothing is recorded: no run record, no MLflow run,
   no checkpoint under checkpoints/, DVC's state untouched.
4. The table (printed, and written to <out>.md and <out>.csv) with the device-hours each run, stage and the
   profile will take, estimated from the measured images/s and the dataset's real size and epochs, and at the
   seeds the paper's claims the run serves need (``seeds_needed``: the runs per arm a t-test needs to detect the
   paper's difference at its std, pipelines/report/power.py, from paper.yaml alone). The exit code is 1 when any
   run failed; a bad argument is one line (exit 2) before any work.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipelines.atomic import write_atomic
from pipelines.config import compose
from pipelines.errors import ConfigError, UserError, print_error
from pipelines.preflight import data as preflight_data
from pipelines.preflight.measure import Outcome, Setting, measure, one_line, random_init
from pipelines.preflight.plan import PlannedRun, plan
from pipelines.report import claims, power
from pipelines.report.comparison import ComparisonTable
from pipelines.report.specs import SPECS
from pipelines.training import identity

GiB = 1024 ** 3


@dataclass
class Row:
    """One planned run: what it is, how it ran here, what it measured."""

    run: PlannedRun
    name: str                    # the run's name without its seed
    setting: Setting | None      # None: its config did not compose
    real_world: int = 1
    real_batch: int | None = None
    epochs: int = 0
    data: DictConfig | None = None   # the dataset it reads
    sizes: tuple[int, int] = (0, 0)  # the real dataset's training and evaluation images
    outcome: Outcome | None = None
    notes: list[str] = field(default_factory=list)
    needed: int | None = None        # seeds the paper's claims it serves need (seeds_needed); None: no such claim

    @property
    def ok(self) -> bool:
        return self.outcome is not None and self.outcome.error is None and not self.nonfinite

    @property
    def nonfinite(self) -> str | None:
        m = self.outcome.measured if self.outcome else None
        return m.nonfinite if m else None

    def hours(self) -> float | None:
        """Estimated device-hours of one run: every epoch's training and evaluation at the measured rates."""
        m = self.outcome.measured if self.outcome else None
        if m is None or m.nonfinite:
            return None
        if m.unit == "epoch":
            return self.epochs * (m.median_s + m.eval_s) / 3600
        train, val = self.sizes
        return self.epochs * (train / m.images_per_s + val * m.eval_s / max(m.eval_images, 1)) / 3600


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="*", help="DVC stages or stage groups (default: every training stage)")
    parser.add_argument("--profile", default="paper", help="the profile to plan (default paper)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu: where runs whose config says auto go")
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
    parser.add_argument("--world", default="1", help="1 | auto: auto runs each config at its real world size")
    parser.add_argument("--batch-per-device", type=int, help="a smaller per-device batch (CPU: 1 keeps full "
                        "models and resolutions affordable); the estimate scales by images/s")
    parser.add_argument("--random-init", action="store_true", help="random weights where a config loads "
                        "pretrained ones (no hub access)")
    parser.add_argument("--param", action="append", default=[], help="a params.yaml value for the plan, e.g. gpus=8")
    parser.add_argument("--out", default="reports/preflight", help="where the table goes (.md and .csv)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise ConfigError(f"--steps={args.steps}: use at least 1")
    if args.batch_per_device is not None and args.batch_per_device < 1:
        raise ConfigError(f"--batch-per-device={args.batch_per_device}: use at least 1")
    if args.world not in ("1", "auto"):
        raise ConfigError(f"--world={args.world}: use 1 or auto")
    if args.device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"--device={args.device}: use auto, cuda or cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but torch sees no CUDA device; use --device=cpu")
    return args


def seeds_needed(stage: str, cfg: DictConfig, variant: str) -> int | None:
    """The runs per arm the paper's claims this configuration serves need, from paper.yaml alone
    (claims.runs_needed_for): the claims of the baseline-vs-GAL table made by ``stage`` whose row group the config
    is (e.g. train_cifar's experiment=cifar10_sgd: Table I's SGD claims), the most over that group's metrics;
    None where it serves no claim the paper gives a std (or t and p) for."""
    needs = [claims.runs_needed_for(spec, OmegaConf.select(cfg, spec.group_key)) for spec in SPECS
             if isinstance(spec, ComparisonTable) and spec.stage == stage and spec.variant == variant
             and OmegaConf.select(cfg, spec.group_key) in spec.groups
             and all(OmegaConf.select(cfg, k) == v for k, v in spec.where.items())]
    return max((n for n in needs if n is not None), default=None)


def setting_for(run: PlannedRun, args, scratch: Path) -> Row:
    """The run's row, with how it is rehearsed here; a config that does not compose is a failed row."""
    try:
        cfg = compose("train", run.overrides)
        variant = identity.variant(cfg)
        name = identity.run_name(cfg, variant).rsplit("-s", 1)[0]
    except UserError as err:
        return Row(run, " ".join(run.overrides), None, outcome=Outcome(error=one_line(err)))
    device = "cpu" if str(cfg.trainer.device) == "cpu" else (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    real_world = int(cfg.trainer.gpus) * int(cfg.trainer.nodes)
    world, notes = 1, []
    if real_world > 1:
        if args.world == "auto" and (device == "cpu" or torch.cuda.device_count() >= real_world):
            world = real_world
        else:
            notes.append(f"ran on 1 process for its {real_world} (no gradient all-reduce measured)")
    loader = "batch_size" in cfg.task
    real_batch = cfg.task.batch_size // real_world if loader else None
    batch = (args.batch_per_device or real_batch) if loader else None
    setting = Setting(list(run.overrides), device, world, batch,
                      (args.batch_per_device or cfg.task.eval_batch_size) if loader else None,
                      random_init(cfg) if args.random_init else [], str(scratch))
    return Row(run, name, setting, real_world, real_batch, int(cfg.task.epochs), cfg.data,
               preflight_data.real_sizes(cfg.data), notes=notes, needed=seeds_needed(run.stage, cfg, variant))


def provide_data(rows: list[Row], args, scratch: Path) -> dict[str, str]:
    """Every dataset the rows read, in the scratch root: as many images as their steps and evaluation read."""
    needs: dict[str, list] = {}
    for row in rows:
        if row.setting is None:
            continue
        s = row.setting
        have = needs.setdefault(row.data.name, [row.data, 0, 0])
        have[1] = max(have[1], args.steps * (s.batch or 1) * s.world)
        have[2] = max(have[2], (s.eval_batch or 1) * s.world)
    return {name: preflight_data.provide(data, args.profile, Path("."), scratch, train, val)
            for name, (data, train, val) in needs.items()}


def device_name(kind: str) -> str:
    if kind == "cuda":
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU, {os.cpu_count()} cores ({platform.machine()})"


def hours_text(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}"


def columns(row: Row) -> dict[str, str]:
    """The table's cells of one row."""
    s, o = row.setting, row.outcome
    m = o.measured if o else None
    cells = {"stage": row.run.stage, "run": row.name, "seeds": str(row.run.seeds),
             "device": s.device if s else "", "processes": "", "batch/device": "", "step s": "",
             "images/s/device": "", "loader wait": "", "peak memory": "", "checkpoint": "",
             "device-h/run": "", "device-h (all seeds)": "",
             "seeds needed": "" if row.needed is None else str(row.needed), "device-h (seeds needed)": ""}
    if s:
        cells["processes"] = str(s.world) if s.world == row.real_world else f"{s.world} (of {row.real_world})"
        ran = m.per_unit if m and m.unit == "step" else s.batch
        if row.real_batch is not None:
            cells["batch/device"] = str(ran) if ran == row.real_batch else f"{ran} (of {row.real_batch})"
    if m and not m.nonfinite:
        unit = "" if m.unit == "step" else "/epoch"
        cells["step s"] = f"{m.median_s:.3g}{unit} (first {m.unit_s[0]:.3g})"
        if m.unit == "step":
            timed = m.unit_s[1:] or m.unit_s
            cells["images/s/device"] = f"{m.images_per_s:.1f}"
            cells["loader wait"] = f"{100 * sum(m.wait_s[-len(timed):]) / sum(timed):.0f}%"
        cells["peak memory"] = (f"{m.peak_allocated / GiB:.2f} GiB ({m.peak_reserved / GiB:.2f} reserved)"
                                if m.peak_allocated is not None else
                                f"{m.peak_rss / GiB:.2f} GiB RSS" if m.peak_rss else "")
        cells["checkpoint"] = f"{m.checkpoint_bytes / 1e6:.3g} MB, {m.checkpoint_s:.2g} s"
    hours = row.hours()
    if hours is not None:
        cells["device-h/run"] = hours_text(hours)
        cells["device-h (all seeds)"] = hours_text(hours * row.run.seeds)
        if row.needed is not None:
            cells["device-h (seeds needed)"] = hours_text(hours * row.needed)
    error = (o.error if o else None) or (f"diverged in the first steps: {row.nonfinite}" if row.nonfinite else None)
    cells["status"] = "; ".join([f"FAILED: {error}" if error else "ok", *row.notes])
    return cells


def markdown(header: list[str], table: list[dict[str, str]]) -> str:
    keys = list(table[0])
    lines = [*header, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cells[k].replace("|", "/") for k in keys) + " |" for cells in table]
    return "\n".join(lines) + "\n"


def totals(rows: list[Row]) -> list[str]:
    """One line per stage and the profile's total, per device type: at the planned seeds, and at the seeds the
    claims need (a configuration that serves no claim with a paper std counted at its planned seeds)."""
    by_stage: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for row in rows:
        if row.hours() is not None:
            hours = by_stage[(row.run.stage, row.setting.device)]
            hours[0] += row.hours() * row.run.seeds
            hours[1] += row.hours() * (row.needed or row.run.seeds)
    lines = ["| stage | device | runs | estimated device-hours | runs, device-hours at the seeds the claims need |",
             "|---|---|---|---|---|"]
    for stage in dict.fromkeys(r.run.stage for r in rows):
        for device in ("cuda", "cpu"):
            if (stage, device) in by_stage:
                ours = [r for r in rows if r.run.stage == stage]
                planned, needed = by_stage[(stage, device)]
                lines.append(f"| {stage} | {device} | {sum(r.run.seeds for r in ours)} | {hours_text(planned)} | "
                             f"{sum(r.needed or r.run.seeds for r in ours)}, {hours_text(needed)} |")
    for device in ("cuda", "cpu"):
        planned, needed = (sum(h[k] for (_, d), h in by_stage.items() if d == device) for k in (0, 1))
        if planned:
            ours = [r for r in rows if r.setting and r.setting.device == device]
            lines.append(f"| **all** | {device} | {sum(r.run.seeds for r in ours)} | **{hours_text(planned)}** | "
                         f"{sum(r.needed or r.run.seeds for r in ours)}, **{hours_text(needed)}** |")
    return lines


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    try:
        args = parse(argv)
        runs = plan(args.profile, args.stages, args.param)
    except UserError as err:
        return print_error("preflight", err)
    scratch = Path(tempfile.mkdtemp(prefix="gal-preflight-"))
    try:
        rows = [setting_for(run, args, scratch) for run in runs]
        print(f"preflight of {args.profile}: {len(rows)} distinct configurations ({sum(r.run.seeds for r in rows)} "
              f"runs), {args.steps} steps each", flush=True)
        sources = provide_data(rows, args, scratch)
        for k, row in enumerate(rows, 1):
            if row.setting is not None:
                row.outcome = measure(row.setting, args.steps, scratch)
            cells = columns(row)
            print(f"[{k}/{len(rows)}] {row.run.stage} {row.name}: {cells['status']}"
                  + (f" ({cells['step s']} s/step, {cells['peak memory']})" if row.ok else ""), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    devices = sorted({r.setting.device for r in rows if r.setting})
    took = time.monotonic() - started
    header = [f"# Preflight of the {args.profile} profile",
              "",
              f"`python -m pipelines.preflight {' '.join(argv if argv is not None else sys.argv[1:])}`: "
              f"{len(rows)} distinct configurations ({sum(r.run.seeds for r in rows)} runs), {args.steps} training "
              f"steps each, in {took / 60:.1f} min on " + "; ".join(device_name(d) for d in devices) + ".",
              "Data: " + ", ".join(f"{name} {how}" for name, how in sources.items()) + ".",
              "Estimates: epochs x (real training images / measured images/s per device + real evaluation images x "
              "measured evaluation time per image), per device; they assume the measured rates hold at the real "
              "batch and world size. Step times are medians after the first step.",
              "Seeds needed: the runs per arm Student's t-test needs to detect the paper's difference at the "
              f"paper's std (alpha {power.ALPHA:g}, power {power.POWER:g}; pipelines/report/power.py, from "
              "paper.yaml), the most over the claims of the table row this configuration makes (e.g. cifar10_sgd: "
              "Table I's SGD claims); blank where it makes no claim the paper gives a std for. Device-h (seeds "
              "needed) = seeds needed x device-h/run."]
    table = [columns(row) for row in rows]
    text = markdown(header, table) + "\n" + "\n".join(totals(rows)) + "\n"
    failed = [row for row in rows if not row.ok]
    out = Path(args.out)
    write_atomic(out.with_suffix(".md"), text)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    write_atomic(out.with_suffix(".csv"), buf.getvalue())
    print("\n" + text, flush=True)
    print(f"{len(failed)} of {len(rows)} configurations failed" if failed else f"all {len(rows)} configurations ran",
          f"({out.with_suffix('.md')}, {took / 60:.1f} min)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
