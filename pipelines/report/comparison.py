"""A baseline-vs-GAL table over seeds: per row group (dataset, optimiser, ...) and method, mean ± std of
each metric over seeds, Student's t-test baseline vs GAL, the paper's numbers beside ours, and one claim
"GAL better than baseline" per group and metric. Tables I, II, III and V are instances (specs/table1.py, ...).
Optionally a parameter-count column (Table III) and the rows the paper quotes from other work (paper.yaml's
"reference": shown as quoted, not rerun).

Which runs belong where comes from each run's config.yaml (dotted keys) and variant (selection.select).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from pipelines.report import stats
from pipelines.report.claims import paper_side
from pipelines.report.model import Claim, Context, Layout, Number, Rendered
from pipelines.report.paper import lookup
from pipelines.report.records import RunRecord
from pipelines.report.render import NONE, UNDEFINED_NOTE, fmt, fmt_p, markdown, pm, ttest_cell, ttest_text
from pipelines.report.selection import Setting, select


@dataclass(frozen=True)
class Metric:
    key: str                  # key segment and paper.yaml name, e.g. "MAE", "R2"
    source: str               # metrics.json / MLflow name, e.g. "test_mae"
    better: str               # "lower" or "higher": what the paper counts as GAL being better
    label: str = ""           # display name (default: key), e.g. "R²"
    digits: int = 4           # decimals shown
    epoch: str = "final"      # "final": metrics.json (the last epoch); "best": at the run's best epoch (BestEpoch)
    history: str = ""         # epoch="best": history.csv's column (default: source)
    complement: bool = False  # epoch="best": 100 minus that column (an accuracy read from an error column)

    @property
    def title(self) -> str:
        return self.label or self.key


@dataclass(frozen=True)
class BestEpoch:
    """How the authors' scripts pick a run's best epoch: the best value of one history.csv column over epochs
    (the CIFAR script's "Best err", timm's best top-1). Chosen on the evaluation set itself, so optimistic."""

    column: str = "val_top1_err"
    better: str = "lower"

    def spec(self, metric: Metric) -> dict | None:
        """stats.at_best_epoch's rule for ``metric`` (None: its final value), as provenance records it."""
        if metric.epoch == "final":
            return None
        return {"by": self.column, "better": self.better, "column": metric.history or metric.source,
                "complement": metric.complement}

    def value(self, run: RunRecord, metric: Metric) -> float:
        spec = self.spec(metric)
        if spec is None:
            return run.metric(metric.source)
        return run.at_best_epoch(spec)


@dataclass(frozen=True)
class Params:
    """A parameter-count column as the paper prints it: "23.5M" for a model, "23.5M+0.70M" with GAL's adjuster.
    Mean over seeds of the metrics.json counts ``model`` and, where non-zero, ``extra``, in millions,
    truncated (not rounded) to ``digits`` / ``extra_digits`` decimals, as the paper's "+0.70M" for an adjuster
    of 705,536 weights shows. paper.yaml holds the paper's text under <table>/<group>/<method>/<key>."""

    model: str = "params_model"
    extra: str = "params_adjuster"
    key: str = "params"
    label: str = "Params"
    digits: int = 1
    extra_digits: int | None = 2  # None: the adjuster's count as it is ("41.3M+1344", as Table IV prints it)

    @staticmethod
    def millions(count: float, digits: int) -> str:
        """1e6 units, truncated to ``digits`` decimals with integer arithmetic: 705536 -> 0.70M."""
        units = int(round(count)) // 10 ** (6 - digits)
        return f"{units / 10 ** digits:.{digits}f}M"


@dataclass(frozen=True)
class ComparisonTable:
    name: str                             # "Table V"
    slug: str                             # "table5"
    task: str                             # runs/<task>/
    caption: str
    group_key: str                        # config key naming the row group, e.g. "data.name"
    groups: dict[str, str]                # its values, in row order -> display names
    group_title: str                      # header of the group column, e.g. "Dataset"
    metrics: tuple[Metric, ...]
    method_key: str = "method.name"
    methods: dict[str, str] = field(default_factory=lambda: {"baseline": "Baseline", "gal": "GAL"})
    seed_key: str = "seed"
    where: dict[str, Any] = field(default_factory=dict)  # further config filters, e.g. {"data.name": "cifar10"}
    stage: str = ""                       # the dvc stage that makes the runs, e.g. "train_regression"
    variant: str = ""                     # run.json's variant of the runs taken ("": the presets' own runs)
    show_ttest: bool = True               # a "t, p" row per group (the claims always use the t-test)
    params: Params | None = None          # a parameter-count column before the metrics (Table III)
    references: bool = False              # append paper.yaml's <name>/reference rows, marked as quoted
    min_seeds: int = 2                    # std and t need two runs per method
    best_epoch: BestEpoch = field(default_factory=BestEpoch)  # for metrics with epoch="best"
    kind: str = "table"

    # ---- selecting and checking the runs --------------------------------------------------------------
    def _select(self, ctx: Context) -> tuple[dict[tuple[str, str], list[RunRecord]], str]:
        """(group, method) -> runs sorted by seed, and the runs' profile (selection.select)."""
        settings = [Setting(group, {**self.where, self.group_key: group}, stage=self.stage, variant=self.variant)
                    for group in self.groups]
        return select(self.name, ctx, self.task, settings, tuple(self.methods), method_key=self.method_key,
                      seed_key=self.seed_key, min_seeds=self.min_seeds)

    # ---- rendering -----------------------------------------------------------------------------------
    def render(self, ctx: Context) -> Rendered:
        cells, profile = self._select(ctx)
        base_m, gal_m = list(self.methods)
        numbers: list[Number] = []
        rows: list[list[str]] = []
        claims: list[Claim] = []
        baselines: dict[str, str] = {}

        def number(group_name: str, row: str, metric: Metric, op: str, groups: list[list[RunRecord]],
                   show: Callable[[float], str] | None = None, paper: Any = None) -> Number:
            """One number: ``op`` of ``metric`` over ``groups``, keyed <table>/<group>/<row>/<metric>/<op>;
            ``show`` formats it (default by op), ``paper`` is the paper's value (default: paper.yaml at the key)."""
            key = "/".join([self.name, group_name, row, metric.key, op])
            values = [[self.best_epoch.value(r, metric) for r in g] for g in groups]
            value = stats.compute(op, values)
            text = (show or {"n": lambda v: str(int(v)), "t": lambda v: ttest_text("t", v, values),
                             "p": lambda v: ttest_text("p", v, values)}.get(op, lambda v: fmt(v, metric.digits)))(value)
            fields = {self.group_title.lower(): group_name, "method": row, "metric": metric.key, "stat": op}
            seeds = ", ".join(str(r.get(self.seed_key)) for r in groups[0])
            what = metric.source if metric.epoch == "final" else (
                f"{'100 - ' * metric.complement}{metric.history or metric.source} at each run's best epoch by "
                f"{self.best_epoch.column}")
            how = stats.describe(op, what, groups, unit="seeds") + f" ({self.seed_key}s {seeds})"
            num = Number(key=key, value=value, text=text, op=op, metric=metric.source, groups=groups,
                         aggregation=how, paper=lookup(key) if paper is None else paper, fields=fields,
                         best_epoch=self.best_epoch.spec(metric))
            numbers.append(num)
            return num

        undefined = False  # a t-test without variance: its cell says why, a note says what that means
        for group, group_name in self.groups.items():
            base_runs, gal_runs = cells[(group, base_m)], cells[(group, gal_m)]
            for b, g in zip(base_runs, gal_runs):
                baselines[g.dir] = b.dir
            ours: dict[str, dict[str, Number]] = {}
            spread: dict[str, dict[str, Number]] = {}  # each method's std: what the claims' power needs
            for method, method_name in self.methods.items():
                runs = cells[(group, method)]
                row = [group_name, method_name, str(len(runs))]
                if self.params is not None:
                    row += self._params_cells(group_name, method_name, runs, number)
                for metric in self.metrics:
                    nums = {op: number(group_name, method_name, metric, op, [runs]) for op in ("mean", "std", "n")}
                    ours.setdefault(metric.key, {})[method] = nums["mean"]
                    spread.setdefault(metric.key, {})[method] = nums["std"]
                    paper = lookup(f"{self.name}/{group_name}/{method_name}/{metric.key}") or {}
                    row += [pm(nums["mean"].value, nums["std"].value, metric.digits),
                            pm(paper.get("mean"), paper.get("std"), metric.digits)]
                rows.append(row)
            ttest_row = [group_name, "t, p", ""] + ["", ""] * (self.params is not None)
            for metric in self.metrics:
                t, p = (number(group_name, "t-test", metric, op, [base_runs, gal_runs]) for op in ("t", "p"))
                paper = lookup(f"{self.name}/{group_name}/t-test/{metric.key}") or {}
                ttest_row += [ttest_cell(t, p), f"{fmt(paper['t'], 2)}, {fmt_p(paper['p'])}" if paper else NONE]
                undefined |= math.isnan(t.value)
                claim = self._claim(group_name, metric, ours[metric.key], t, p, spread[metric.key])
                if claim is not None:
                    claims.append(claim)
            if self.show_ttest:
                rows.append(ttest_row)
        rows += self._reference_rows()

        columns = [self.group_title, "Method", "n"]
        if self.params is not None:
            columns += [f"{self.params.label} (ours)", f"{self.params.label} (paper)"]
        for metric in self.metrics:
            columns += [f"{metric.title} (ours)", f"{metric.title} (paper)"]
        notes = ["mean ± sample std (ddof=1) over seeds; n = runs (seeds) per method",
                 "t, p: Student's two-sample t-test (scipy.stats.ttest_ind, equal variances, two-sided), "
                 "t = baseline minus GAL: positive when GAL's mean is lower"]
        if undefined and self.show_ttest:
            notes.append(UNDEFINED_NOTE)
        if self.params is not None:
            notes.append(f"{self.params.label}: mean over seeds of {self.params.model} (+ {self.params.extra} where "
                         f"non-zero), in millions, truncated as the paper prints them")
        if any(m.epoch == "best" for m in self.metrics):
            notes.append(f"best epoch: each run's epoch of best {self.best_epoch.column} on the evaluation set, as the "
                         "authors' scripts report it (the paper's numbers); optimistic, since the set that picks the "
                         "epoch also scores it. Final epoch: the run's last. The claims judge the best-epoch values, "
                         "like with like")
        if self.references:
            notes.append("quoted rows: results the paper cites from other work, shown as the paper prints them; "
                         "neither the paper nor this project reran them")
        layout = Layout(columns=columns, rows=rows, caption=self.caption, notes=notes)
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=markdown(layout), layout=layout, claims=claims, baselines=baselines)

    def _params_cells(self, group_name: str, method_name: str, runs: list[RunRecord], number) -> list[str]:
        """[ours, paper] for the params column: "23.5M" or "23.5M+0.70M", each part a Number."""
        spec = self.params
        paper = lookup(f"{self.name}/{group_name}/{method_name}/{spec.key}")
        model = number(group_name, method_name, Metric(spec.model, spec.model, better="lower"), "mean", [runs],
                       show=lambda v: Params.millions(v, spec.digits), paper=paper)
        text = model.text
        if any(r.metric(spec.extra) for r in runs):
            extra = number(group_name, method_name, Metric(spec.extra, spec.extra, better="lower"), "mean", [runs],
                           show=lambda v: "+" + (Params.millions(v, spec.extra_digits) if spec.extra_digits is not None
                                                 else str(int(round(v)))), paper=paper)
            text += extra.text
        return [text, "-" if paper is None else str(paper)]

    def _reference_rows(self) -> list[list[str]]:
        """paper.yaml's <name>/reference entries: other work's results the paper quotes (not rerun)."""
        if not self.references:
            return []
        rows = []
        for label, values in (lookup(f"{self.name}/reference") or {}).items():
            row = [label, "quoted (not rerun)", ""] + ["", "-"] * (self.params is not None)
            for metric in self.metrics:
                value = values.get(metric.key)
                row += ["", "-" if value is None else fmt(value, metric.digits)]
            rows.append(row)
        return rows

    def _claim(self, group_name: str, metric: Metric, ours: dict[str, Number], t: Number, p: Number,
               spread: dict[str, Number]) -> Claim | None:
        """The paper's claim 'GAL better' for this group and metric, if the paper reports GAL as better
        (claims.paper_side); ``spread``: each method's std Number."""
        paper = paper_side(self.name, group_name, tuple(self.methods.values()), metric.key, metric.better)
        if paper is None:
            return None
        base, gal = (ours[m] for m in self.methods)
        std_base, std_gal = (spread[m].value for m in self.methods)
        return Claim(table=self.name, subject=group_name, metric=metric.title, better=metric.better, paper=paper,
                     ours={"baseline": base.value, "gal": gal.value, "t": t.value, "p": p.value,
                           "std_baseline": std_base, "std_gal": std_gal,
                           "n_baseline": len(t.groups[0]), "n_gal": len(t.groups[1])},
                     keys=[base.key, gal.key, t.key, p.key], ttest_undefined=t.text if math.isnan(t.value) else "")
