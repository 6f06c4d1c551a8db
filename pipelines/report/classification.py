"""What the classification specs beyond Tables I-III share (Table VII, Figs. 5, 6, 8b): the settings (which
runs under runs/classification/ make one dataset's row, panel or line), a selector that checks them as
ComparisonTable does, per-epoch curves (mean ± std over seeds) from history.csv, and figure saving.

Which runs belong where comes from each run's config.yaml (dotted keys), never from directory names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.report import stats
from pipelines.report.model import Context, Number
from pipelines.report.records import ReportError, RunRecord, check_one_profile
from pipelines.report.render import fmt

TASK = "classification"
METHOD_KEY = "method.name"
SEED_KEY = "seed"
COLORS = {"baseline": "#d62728", "gal": "#1f77b4"}


@dataclass(frozen=True)
class Setting:
    label: str                                 # key segment and paper.yaml name, e.g. "CIFAR-10"
    where: dict[str, Any] = field(default_factory=dict)  # config filters, e.g. {"data.name": "cifar10"}
    detail: str = ""                           # which runs, in words, e.g. "EfficientNet-B1, SGD"

    def matches(self, run: RunRecord) -> bool:
        return all(str(run.get(k)) == str(v) for k, v in self.where.items())

    @property
    def filters(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.where.items())


# The runs Table VII and Figs. 5 and 8b take per dataset: CIFAR with SGD (Tables I/II), ImageNet ResNet-50
# with RMSProp (Table III).
CIFAR10_SGD = Setting("CIFAR-10", {"experiment": "cifar10_sgd"}, "EfficientNet-B1, SGD")
CIFAR100_SGD = Setting("CIFAR-100", {"experiment": "cifar100_sgd"}, "EfficientNet-B1, SGD")
IMAGENET_R50 = Setting("ImageNet", {"experiment": "imagenet_resnet50"}, "ResNet-50, RMSProp")
PER_DATASET = (IMAGENET_R50, CIFAR10_SGD, CIFAR100_SGD)

Cells = dict[tuple[str, str], list[RunRecord]]


def select(name: str, ctx: Context, settings: tuple[Setting, ...], methods: tuple[str, ...],
           optional: tuple[str, ...] = ()) -> tuple[Cells, str]:
    """(setting label, method) -> runs sorted by seed, and the runs' profile. Within a setting every method
    needs the same seeds. Settings named in ``optional`` may lack runs altogether (then they are left out).
    ReportError for no runs, mixed profiles, duplicate or missing runs."""
    where = ctx.task_dir(TASK)
    cells: dict[tuple[str, str], dict[Any, RunRecord]] = {(s.label, m): {} for s in settings for m in methods}
    chosen: list[RunRecord] = []
    for run in ctx.runs(TASK):
        setting = next((s for s in settings if s.matches(run)), None)
        method = str(run.get(METHOD_KEY))
        if setting is None or method not in methods:
            continue
        cell = cells[(setting.label, method)]
        seed = run.get(SEED_KEY)
        if seed in cell:
            raise ReportError(f"{name}: two runs for {setting.label}/{method} {SEED_KEY}={seed}: {cell[seed].dir} "
                              f"and {run.dir}; remove one")
        cell[seed] = run
        chosen.append(run)
    wanted = "; ".join(f"{s.label} ({s.filters})" for s in settings)
    if not chosen:
        raise ReportError(f"{name}: no runs under {where} for {wanted} x {METHOD_KEY} in {{{', '.join(methods)}}}; "
                          f"make them first (dvc repro)")
    profile = check_one_profile(name, chosen, ctx.profile)
    missing = []
    for s in settings:
        seeds = sorted({seed for m in methods for seed in cells[(s.label, m)]})
        if not seeds:
            if s.label in optional:
                for m in methods:
                    del cells[(s.label, m)]
            else:
                missing.append(f"{s.label}/{','.join(methods)}: no runs ({s.filters})")
            continue
        for m in methods:
            lacking = [str(seed) for seed in seeds if seed not in cells[(s.label, m)]]
            if lacking:
                missing.append(f"{s.label}/{m} {SEED_KEY}={','.join(lacking)} ({s.filters})")
    if missing:
        raise ReportError(f"{name}: missing runs under {where}: {'; '.join(missing)} (every {METHOD_KEY} needs "
                          f"the same {SEED_KEY}s within a setting); make them first (dvc repro)")
    return {key: [cell[seed] for seed in sorted(cell)] for key, cell in cells.items()}, profile


def final_numbers(name: str, row: list[str], column: str, runs: list[RunRecord], digits: int = 4,
                  ops: tuple[str, ...] = ("mean", "std")) -> dict[str, Number]:
    """``op`` -> Number of each run's latest ``column`` (metrics.json, else history.csv's last row) over
    ``runs``, keyed <name>/<row...>/<column>/<op>: the values a figure's curves end at."""
    seeds = ", ".join(str(r.get(SEED_KEY)) for r in runs)
    out = {}
    for op in ops:
        value = stats.compute(op, [[r.latest(column) for r in runs]])
        out[op] = Number(
            key="/".join([name, *row, column, op]), value=value,
            text=str(int(value)) if op == "n" else fmt(value, digits), op=op, metric=column, groups=[runs],
            aggregation=stats.describe(op, f"final {column}", [runs], unit="seeds") + f" ({SEED_KEY}s {seeds})",
            fields={"setting": row[0], "method": row[1] if len(row) > 1 else "", "metric": column, "stat": op})
    return out


def curve(runs: list[RunRecord], column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, mean, std) of history.csv's ``column`` over ``runs`` at the epochs every run has
    (std: ddof=1, nan for one run)."""
    per_run = []
    for run in runs:
        rows = run.history()
        if rows and column not in rows[0]:
            raise ReportError(f"{run.dir}/history.csv has no column {column!r} (has {', '.join(rows[0])})")
        per_run.append({int(float(r["epoch"])): float(r[column]) for r in rows if r.get(column) not in (None, "")})
    epochs = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    if not epochs:
        raise ReportError(f"no epoch with {column!r} common to {', '.join(r.dir for r in runs)}")
    values = np.array([[p[e] for e in epochs] for p in per_run])
    std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.full(len(epochs), np.nan)
    return np.array(epochs), values.mean(axis=0), std


def band(ax, epochs, mean, std, **kwargs) -> None:
    """A mean line with a ±std band (no band where std is nan); whole epochs on the x axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    line, = ax.plot(epochs, mean, **kwargs)
    if not np.all(np.isnan(std)):
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)


def save(fig, files: list[Path]) -> None:
    """PNG and PDF; no creation date in the PDF, so the same runs give the same bytes."""
    import matplotlib.pyplot as plt

    for file in files:
        fig.savefig(file, dpi=130, metadata={"CreationDate": None} if file.suffix == ".pdf" else None)
    plt.close(fig)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
