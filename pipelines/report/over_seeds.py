"""What the specs of runs over seeds share (Table VII, Figs. 5, 6, 8b, the protocol study): the settings (which
runs make one dataset's row, panel or line; chosen with selection.select),
per-epoch curves (mean ± std over seeds) from history.csv, and figure saving. For the ablations (Tables VI,
VIII; Figs. 7, 8a): a setting's Outcome (final error over seeds, diverged runs told apart), the claims
'A beats B' between two settings, and notes on the settings left out for want of runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipelines.report import stats
from pipelines.report.claims import Ablation
from pipelines.report.model import Context, Number
from pipelines.report.records import MissingRuns, ReportError, RunRecord
from pipelines.report.render import fmt, ttest_text
from pipelines.report.selection import Setting

TASK = "classification"
SEED_KEY = "seed"
COLORS = {"baseline": "#d62728", "gal": "#1f77b4"}
DPI = 130  # the figures' PNG resolution


# The runs Table VII and Figs. 5 and 8b take per dataset: CIFAR with SGD (Tables I/II), ImageNet ResNet-50
# with RMSProp (Table III).
CIFAR10_SGD = Setting("CIFAR-10", {"experiment": "cifar10_sgd"}, "EfficientNet-B1, SGD", stage="train_cifar")
CIFAR100_SGD = Setting("CIFAR-100", {"experiment": "cifar100_sgd"}, "EfficientNet-B1, SGD", stage="train_cifar")
IMAGENET_R50 = Setting("ImageNet", {"experiment": "imagenet_resnet50"}, "ResNet-50, RMSProp", stage="train_imagenet")
PER_DATASET = (IMAGENET_R50, CIFAR10_SGD, CIFAR100_SGD)
MEAN_STD_NOTE = "mean ± sample std (ddof=1) over seeds; for one run (n = 1) its value alone"


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


def seeds(count: int) -> str:
    """'1 seed', '3 seeds': a legend's count of runs."""
    return f"{count} seed{'s' * (count != 1)}"


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
    """PNG and PDF; no creation date in the PDF, so the same runs give the same bytes. Every figure is laid out
    by matplotlib's constrained layout (``layout="constrained"``), so no text overlaps another at its size."""
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is not None:  # lay it out once: the PDF gets the PNG's layout, at half the cost
        fig.get_layout_engine().execute(fig)
        fig.set_layout_engine("none")
    for file in files:
        fig.savefig(file, dpi=DPI, metadata={"CreationDate": None} if file.suffix == ".pdf" else None)
    plt.close(fig)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- the ablations (Tables VI, VIII; Figs. 7, 8a): variants of the CIFAR-100 GAL presets -----------------
ERROR = "val_top1_err"       # metrics.json / history.csv: top-1 error (%) on CIFAR's test set
ERROR_TITLE = "Top-1 error (%)"
# How the authors' CIFAR script reports a run ("Best err"): its lowest test error over epochs (stats.at_best_epoch)
BEST_ERROR = {"by": ERROR, "better": "lower", "column": ERROR, "complement": False}
BEST_NOTE = ("best epoch: each run's lowest test error over its epochs, as the authors' CIFAR script reports it "
             "(\"Best err\"); optimistic, since the set that picks the epoch also scores it. The claims judge "
             "the best-epoch values")


def run_value(run: RunRecord, column: str, best: dict | None) -> float:
    """``run``'s latest ``column``, or its value at the run's best epoch by ``best`` (stats.at_best_epoch)."""
    if best is None:
        return run.latest(column)
    return run.at_best_epoch(best)


@dataclass
class Outcome:
    """One setting's runs and what they came to: the final ``column`` of the runs that finished (mean, std, n
    over seeds) and the epoch each diverged run stopped at (RunRecord.diverged_epoch). A diverged run has no
    final metrics, so it is never averaged in: the text says how many diverged and where."""

    runs: list[RunRecord]
    finished: list[RunRecord]
    diverged: list[RunRecord]
    stats: dict[str, Number]          # "mean", "std", "n" over the finished runs ({} when every run diverged)
    epochs: list[Number]              # each diverged run's epoch, in seed order
    text: str
    best: dict | None = None          # the runs' values are at their best epoch by this rule (None: final)

    @property
    def numbers(self) -> list[Number]:
        return [*self.stats.values(), *self.epochs]

    @property
    def keys(self) -> list[str]:
        """Provenance keys of what decides a comparison: the mean, else the diverged epochs."""
        return [*([self.stats["mean"].key] if "mean" in self.stats else []), *(n.key for n in self.epochs)]

    @property
    def mean(self) -> float:
        return self.stats["mean"].value if "mean" in self.stats else math.nan

    @property
    def diverged_fraction(self) -> float:
        return len(self.diverged) / len(self.runs)


def diverged_where(runs: list[RunRecord]) -> str:
    """'epoch 3' when the runs diverged at the same epoch, else each seed's: 'epochs 3, 4'."""
    epochs = [r.diverged_epoch for r in runs]
    return f"epoch {epochs[0]}" if len(set(epochs)) == 1 else "epochs " + ", ".join(map(str, epochs))


def outcome(prefix: list[str], runs: list[RunRecord], *, key: str = ERROR, column: str = ERROR, digits: int = 2,
            fields: dict[str, str] | None = None, paper: Any = None, best: dict | None = None) -> Outcome:
    """The Outcome of ``runs`` (one setting, sorted by seed): Numbers keyed <prefix...>/<key>/<op> (the finished
    runs' latest ``column``, or with ``best`` their value at the best epoch; ``paper``: the paper's value beside
    the mean) and <prefix...>/diverged_epoch/seed<k> (op value, metrics.json diverged_epoch)."""
    finished = [r for r in runs if r.diverged_epoch is None]
    diverged = [r for r in runs if r.diverged_epoch is not None]
    fields = fields or {}
    stats_: dict[str, Number] = {}
    seeds = ", ".join(str(r.get(SEED_KEY)) for r in finished)
    for op in ("mean", "std", "n") if finished else ():
        value = stats.compute(op, [[run_value(r, column, best) for r in finished]])
        what = f"final {column}" if best is None else f"{column} at each run's best epoch by {best['by']}"
        stats_[op] = Number(
            key="/".join([*prefix, key, op]), value=value, text=str(int(value)) if op == "n" else fmt(value, digits),
            op=op, metric=column, groups=[finished], paper=paper if op == "mean" else None,
            aggregation=stats.describe(op, what, [finished], unit="seeds") + f" ({SEED_KEY}s {seeds})"
            + (f"; {len(diverged)} diverged run(s) left out" if diverged else ""),
            fields={**fields, "metric": column, "stat": op}, best_epoch=best)
    epochs = [Number(
        key="/".join([*prefix, "diverged_epoch", f"seed{r.get(SEED_KEY)}"]), value=float(r.diverged_epoch),
        text=str(r.diverged_epoch), op="value", metric="diverged_epoch", groups=[[r]],
        aggregation=f"the epoch the run diverged at (run.json status diverged; metrics.json diverged_epoch), "
                    f"{SEED_KEY} {r.get(SEED_KEY)}",
        fields={**fields, "metric": "diverged_epoch", "stat": f"seed{r.get(SEED_KEY)}"}) for r in diverged]
    ours = ""
    if finished:
        std = stats_["std"].value
        ours = stats_["mean"].text if math.isnan(std) else f"{stats_['mean'].text} ± {stats_['std'].text}"
    if not diverged:
        text = ours
    elif not finished:
        text = f"diverged ({diverged_where(diverged)})"
    else:
        text = f"{len(diverged)} of {len(runs)} diverged ({diverged_where(diverged)}); others {ours}"
    return Outcome(runs=runs, finished=finished, diverged=diverged, stats=stats_, epochs=epochs, text=text, best=best)


def versus(table: str, subject: str, statement: str, other: tuple[str, Outcome], better: tuple[str, Outcome],
           key: list[str], paper: tuple[Any, Any] = (None, None), metric: str = ERROR_TITLE,
           digits: int = 2) -> tuple[Ablation, list[Number]]:
    """The claim '<better> beats <other>' (lower error) and its t-test Numbers (<key...>/<op>: Student's t of
    other minus better, and p), made when both sides finished with at least 2 runs each. ``other`` and
    ``better``: (name shown, Outcome); ``paper``: the paper's (other, better) values or texts."""
    (other_name, a), (better_name, b) = other, better
    numbers: list[Number] = []
    t = p = math.nan
    undefined = ""
    if not a.diverged and not b.diverged and len(a.finished) >= 2 and len(b.finished) >= 2:
        groups = [a.finished, b.finished]
        assert a.best == b.best, "a claim compares values taken the same way"
        best = b.best  # both sides' values as their Outcomes took them
        what = f"final {ERROR}" if best is None else f"{ERROR} at each run's best epoch"
        values = [[run_value(r, ERROR, best) for r in g] for g in groups]
        for op in ("t", "p"):
            value = stats.compute(op, values)
            numbers.append(Number(
                key="/".join([*key, op]), value=value, text=ttest_text(op, value, values), op=op,
                metric=ERROR, groups=groups,
                aggregation=stats.describe(op, what, groups, unit="seeds").replace(
                    "baseline minus GAL", f"{other_name} minus {better_name}"),
                fields={"metric": ERROR, "stat": op}, best_epoch=best))
        t, p = (n.value for n in numbers)
        undefined = numbers[0].text if math.isnan(t) else ""
    paper_values = [v if isinstance(v, (int, float)) else None for v in paper]
    claim = Ablation(
        table=table, subject=subject, metric=metric + (", best epoch" if b.best else ""), better="lower",
        paper={"baseline": paper_values[0], "gal": paper_values[1], "t": None, "p": None},
        ours={"baseline": a.mean, "gal": b.mean, "t": t, "p": p, "n_baseline": len(a.finished),
              "n_gal": len(b.finished), **{f"std_{side}": o.stats["std"].value if o.stats else math.nan
                                           for side, o in (("baseline", a), ("gal", b))}},
        keys=[*a.keys, *b.keys, *(n.key for n in numbers)], statement=statement, names=(other_name, better_name),
        paper_text=tuple("-" if v is None else fmt(v, digits) if isinstance(v, (int, float)) else str(v)
                         for v in paper),
        ours_text=(a.text, b.text), diverged=(a.diverged_fraction, b.diverged_fraction),
        runs=(len(a.finished), len(b.finished)), ttest_undefined=undefined,
        diverged_at=tuple(diverged_where(side.diverged) if side.diverged else "" for side in (a, b)))
    return claim, numbers


def left_out_note(settings: Sequence[Setting], detail=lambda s: s.label) -> str:
    """'left out, no runs: <row> (variant v; `dvc repro <stage>`), ...' for a table's notes."""
    parts = [f"{detail(s)} (variant {s.variant or 'none: the preset'}; `dvc repro {s.stage}`)" for s in settings]
    return "left out, no runs yet: " + "; ".join(parts)


def require_one(name: str, ctx: Context, settings: Sequence[Setting], cells: dict, what: str,
                method: str = "gal") -> None:
    """MissingRuns (the spec is skipped) unless at least one of ``settings`` (optional in ``select``) has runs."""
    if any((s.label, method) in cells for s in settings):
        return
    stages = list(dict.fromkeys(s.stage for s in settings))
    wanted = "; ".join(f"{s.label} ({s.filters})" for s in settings)
    raise MissingRuns(name, f"runs under {ctx.task_dir(TASK)} of {what}: at least one of {wanted}",
                      f"no runs under {ctx.task_dir(TASK)} of {what} (wanted at least one of: {wanted})",
                      " ".join(["dvc repro", *stages]))
