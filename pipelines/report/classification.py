"""What the classification specs beyond Tables I-III share (Table VII, Figs. 5, 6, 8b): the settings (which
runs under runs/classification/ make one dataset's row, panel or line; chosen with selection.select),
per-epoch curves (mean ± std over seeds) from history.csv, and figure saving.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.report import stats
from pipelines.report.model import Number
from pipelines.report.records import ReportError, RunRecord
from pipelines.report.render import fmt
from pipelines.report.selection import Setting

TASK = "classification"
SEED_KEY = "seed"
COLORS = {"baseline": "#d62728", "gal": "#1f77b4"}


# The runs Table VII and Figs. 5 and 8b take per dataset: CIFAR with SGD (Tables I/II), ImageNet ResNet-50
# with RMSProp (Table III).
CIFAR10_SGD = Setting("CIFAR-10", {"experiment": "cifar10_sgd"}, "EfficientNet-B1, SGD", stage="train_cifar")
CIFAR100_SGD = Setting("CIFAR-100", {"experiment": "cifar100_sgd"}, "EfficientNet-B1, SGD", stage="train_cifar")
IMAGENET_R50 = Setting("ImageNet", {"experiment": "imagenet_resnet50"}, "ResNet-50, RMSProp", stage="train_imagenet")
PER_DATASET = (IMAGENET_R50, CIFAR10_SGD, CIFAR100_SGD)


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
    per_run = [run.series(column) for run in runs]
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
