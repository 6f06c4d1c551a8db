"""A baseline-vs-GAL table over seeds: per row group (dataset, optimiser, ...) and method, mean ± std of
each metric over seeds, Student's t-test baseline vs GAL, the paper's numbers beside ours, and one claim
"GAL better than baseline" per group and metric. Table V is one instance (specs/table5.py); Tables I-III
are meant to be others.

Which runs belong where comes from each run's config.yaml (dotted keys), never from directory names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.report import stats
from pipelines.report.model import Claim, Context, Layout, Number, Rendered
from pipelines.report.paper import lookup
from pipelines.report.records import ReportError, RunRecord, check_one_profile
from pipelines.report.render import fmt, fmt_p, markdown, pm


@dataclass(frozen=True)
class Metric:
    key: str                  # key segment and paper.yaml name, e.g. "MAE", "R2"
    source: str               # metrics.json / MLflow name, e.g. "test_mae"
    better: str               # "lower" or "higher": what the paper counts as GAL being better
    label: str = ""           # display name (default: key), e.g. "R²"
    digits: int = 4           # decimals shown

    @property
    def title(self) -> str:
        return self.label or self.key


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
    show_ttest: bool = True               # a "t, p" row per group (the claims always use the t-test)
    min_seeds: int = 2                    # std and t need two runs per method
    kind: str = "table"

    # ---- selecting and checking the runs --------------------------------------------------------------
    def _select(self, ctx: Context) -> tuple[dict[tuple[str, str], list[RunRecord]], str]:
        """(group, method) -> runs sorted by seed, and the runs' profile; ReportError for mixed profiles,
        missing or duplicate runs."""
        runs = [r for r in ctx.runs(self.task)
                if all(str(r.get(k)) == str(v) for k, v in self.where.items())
                and str(r.get(self.group_key)) in self.groups and str(r.get(self.method_key)) in self.methods]
        where = ctx.task_dir(self.task)
        if not runs:
            raise ReportError(
                f"{self.name}: no runs under {where} for {self.group_key} in {{{', '.join(self.groups)}}} x "
                f"{self.method_key} in {{{', '.join(self.methods)}}}; make them first (dvc repro)")
        profile = check_one_profile(self.name, runs, ctx.profile)
        cells: dict[tuple[str, str], dict[Any, RunRecord]] = {(g, m): {} for g in self.groups for m in self.methods}
        for run in runs:
            cell = cells[(str(run.get(self.group_key)), str(run.get(self.method_key)))]
            seed = run.get(self.seed_key)
            if seed in cell:
                raise ReportError(f"{self.name}: two runs for {run.get(self.group_key)}/{run.get(self.method_key)} "
                                  f"{self.seed_key}={seed}: {cell[seed].dir} and {run.dir}; remove one")
            cell[seed] = run
        seeds = sorted({seed for cell in cells.values() for seed in cell})
        missing = []
        for (group, method), cell in cells.items():
            lacking = [s for s in seeds if s not in cell]
            if lacking:
                missing.append(f"{group}/{method} {self.seed_key}={','.join(map(str, lacking))}")
        if missing:
            raise ReportError(f"{self.name}: missing runs under {where}: {'; '.join(missing)} "
                              f"(every {self.group_key} x {self.method_key} needs {self.seed_key}s "
                              f"{','.join(map(str, seeds))}); make them first (dvc repro)")
        if len(seeds) < self.min_seeds:
            raise ReportError(f"{self.name}: {len(seeds)} {self.seed_key}(s) per method under {where}; "
                              f"mean ± std and the t-test need at least {self.min_seeds}")
        return {key: [cell[s] for s in seeds] for key, cell in cells.items()}, profile

    # ---- rendering -----------------------------------------------------------------------------------
    def render(self, ctx: Context) -> Rendered:
        cells, profile = self._select(ctx)
        base_m, gal_m = list(self.methods)
        numbers: list[Number] = []
        rows: list[list[str]] = []
        claims: list[Claim] = []
        baselines: dict[str, str] = {}

        def number(group_name: str, row: str, metric: Metric, op: str, groups: list[list[RunRecord]]) -> Number:
            """One number: ``op`` of ``metric`` over ``groups``, keyed <table>/<group>/<row>/<metric>/<op>."""
            key = "/".join([self.name, group_name, row, metric.key, op])
            value = stats.compute(op, [[r.metric(metric.source) for r in g] for g in groups])
            text = {"n": lambda v: str(int(v)), "t": lambda v: fmt(v, 2), "p": fmt_p}.get(
                op, lambda v: fmt(v, metric.digits))(value)
            fields = {self.group_title.lower(): group_name, "method": row, "metric": metric.key, "stat": op}
            seeds = ", ".join(str(r.get(self.seed_key)) for r in groups[0])
            how = stats.describe(op, metric.source, groups, unit="seeds") + f" ({self.seed_key}s {seeds})"
            num = Number(key=key, value=value, text=text, op=op, metric=metric.source, groups=groups,
                         aggregation=how, paper=lookup(key), fields=fields)
            numbers.append(num)
            return num

        for group, group_name in self.groups.items():
            base_runs, gal_runs = cells[(group, base_m)], cells[(group, gal_m)]
            for b, g in zip(base_runs, gal_runs):
                baselines[g.dir] = b.dir
            ours: dict[str, dict[str, Number]] = {}
            for method, method_name in self.methods.items():
                runs = cells[(group, method)]
                row = [group_name, method_name, str(len(runs))]
                for metric in self.metrics:
                    nums = {op: number(group_name, method_name, metric, op, [runs]) for op in ("mean", "std", "n")}
                    ours.setdefault(metric.key, {})[method] = nums["mean"]
                    paper = lookup(f"{self.name}/{group_name}/{method_name}/{metric.key}") or {}
                    row += [pm(nums["mean"].value, nums["std"].value, metric.digits),
                            pm(paper.get("mean"), paper.get("std"), metric.digits)]
                rows.append(row)
            ttest_row = [group_name, "t, p", ""]
            for metric in self.metrics:
                t, p = (number(group_name, "t-test", metric, op, [base_runs, gal_runs]) for op in ("t", "p"))
                paper = lookup(f"{self.name}/{group_name}/t-test/{metric.key}") or {}
                ttest_row += [f"{t.text}, {p.text}",
                              f"{fmt(paper['t'], 2)}, {fmt_p(paper['p'])}" if paper else "-"]
                claim = self._claim(group_name, metric, ours[metric.key], t, p)
                if claim is not None:
                    claims.append(claim)
            if self.show_ttest:
                rows.append(ttest_row)

        columns = [self.group_title, "Method", "n"]
        for metric in self.metrics:
            columns += [f"{metric.title} (ours)", f"{metric.title} (paper)"]
        notes = ["mean ± sample std (ddof=1) over seeds; n = runs (seeds) per method",
                 "t, p: Student's two-sample t-test (scipy.stats.ttest_ind, equal variances, two-sided), "
                 "t = baseline minus GAL: positive when GAL's mean is lower"]
        layout = Layout(columns=columns, rows=rows, caption=self.caption, notes=notes)
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=markdown(layout), layout=layout, claims=claims, baselines=baselines)

    def _claim(self, group_name: str, metric: Metric, ours: dict[str, Number], t: Number, p: Number) -> Claim | None:
        """The paper's claim 'GAL better' for this group and metric, if the paper reports GAL as better."""
        base_m, gal_m = self.methods.values()
        paper_base = lookup(f"{self.name}/{group_name}/{base_m}/{metric.key}/mean")
        paper_gal = lookup(f"{self.name}/{group_name}/{gal_m}/{metric.key}/mean")
        if paper_base is None or paper_gal is None:
            return None
        if not (paper_gal < paper_base if metric.better == "lower" else paper_gal > paper_base):
            return None  # the paper does not claim GAL is better here
        base, gal = (ours[m] for m in self.methods)
        paper_t = lookup(f"{self.name}/{group_name}/t-test/{metric.key}") or {}
        return Claim(table=self.name, subject=group_name, metric=metric.title, better=metric.better,
                     paper={"baseline": paper_base, "gal": paper_gal, "t": paper_t.get("t"), "p": paper_t.get("p")},
                     ours={"baseline": base.value, "gal": gal.value, "t": t.value, "p": p.value},
                     keys=[base.key, gal.key, t.key, p.key])
