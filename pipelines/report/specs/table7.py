"""Table VII: training time per image, baseline vs GAL, per dataset (mean over seeds), and GAL's slowdown as
the ratio GAL / baseline next to the paper's."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.report import over_seeds
from pipelines.report import stats
from pipelines.report.model import Context, Layout, Number, Rendered
from pipelines.report.paper import lookup
from pipelines.report.records import RunRecord
from pipelines.report.render import fmt, markdown
from pipelines.report.selection import select


def seconds(value: float) -> str:
    """Four significant digits: 0.3907, 0.0001234, 1.234e-05."""
    return f"{value:.4g}"


@dataclass(frozen=True)
class TimeTable:
    name: str = "Table VII"
    slug: str = "table7"
    kind: str = "table"
    settings: tuple[over_seeds.Setting, ...] = over_seeds.PER_DATASET
    methods: dict[str, str] = field(default_factory=lambda: {"baseline": "Baseline", "gal": "GAL"})
    metric: str = "time_per_image"   # metrics.json: training wall time per training image (s), mean over epochs
    key: str = "time"                # key segment and paper.yaml name

    def render(self, ctx: Context) -> Rendered:
        cells, profile = select(self.name, ctx, over_seeds.TASK, self.settings, tuple(self.methods))
        numbers: list[Number] = []
        rows: list[list[str]] = []
        baselines: dict[str, str] = {}

        def number(label: str, row: str, op: str, groups: list[list[RunRecord]], text, paper=None) -> Number:
            value = stats.compute(op, [[r.latest(self.metric) for r in g] for g in groups])
            seeds = ", ".join(str(r.get(over_seeds.SEED_KEY)) for r in groups[0])
            num = Number(key=f"{self.name}/{label}/{row}/{self.key}/{op}", value=value, text=text(value), op=op,
                         metric=self.metric, groups=groups, paper=paper,
                         aggregation=stats.describe(op, self.metric, groups, unit="seeds") + f" (seeds {seeds})",
                         fields={"dataset": label, "method": row, "metric": self.metric, "stat": op})
            numbers.append(num)
            return num

        for setting in self.settings:
            label = setting.label
            base_runs, gal_runs = (cells[(label, m)] for m in self.methods)
            baselines.update({g.dir: b.dir for b, g in zip(base_runs, gal_runs)})
            paper: dict[str, float] = {}
            for method, method_name in self.methods.items():
                runs = cells[(label, method)]
                paper[method] = lookup(f"{self.name}/{label}/{method_name}/{self.key}")
                n = number(label, method_name, "n", [runs], lambda v: str(int(v)))
                mean = number(label, method_name, "mean", [runs], seconds, paper[method])
                rows.append([label, setting.detail if method == "baseline" else "", method_name, n.text, mean.text,
                             fmt(paper[method], 4)])
            ratio = number(label, "ratio", "ratio", [base_runs, gal_runs], lambda v: fmt(v, 4))
            paper_ratio = None if None in paper.values() else paper["gal"] / paper["baseline"]
            rows.append([label, "", "GAL / Baseline", "", ratio.text, fmt(paper_ratio, 4)])

        caption = ("Table VII: training time per image (s), baseline vs GAL (mean over seeds), and GAL / baseline. "
                   "Runs: ImageNet from Table III's ResNet-50 (RMSProp) runs; CIFAR-10 and CIFAR-100 from Tables "
                   "I and II's SGD runs (EfficientNet-B1).")
        notes = [f"ours: {self.metric} = training wall time of an epoch / training images, averaged over epochs "
                 "(metrics.json), then over seeds; GAL / Baseline: ratio of the two means",
                 "the paper's absolute times (about 0.4-0.5 s \"per image\") are far above the per-image time of "
                 "these models and most likely seconds per iteration (batch), on other hardware: compare the "
                 "ratio GAL / Baseline (the paper's column is computed from its two times), not the times"]
        layout = Layout(columns=["Dataset", "Runs", "Method", "n", "Time / image (s) (ours)",
                                 "Time (s) (paper)"], rows=rows, caption=caption, notes=notes)
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=markdown(layout), layout=layout, baselines=baselines)


SPEC = TimeTable()
