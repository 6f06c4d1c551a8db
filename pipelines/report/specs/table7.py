"""Table VII: training time per image and per step (the authors' proc_time: the loader left out), baseline vs
GAL, per dataset (mean over seeds), and GAL's slowdown as the ratio GAL / baseline next to the paper's."""
from __future__ import annotations

import math
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
    # (metrics.json name, key segment), each a mean over epochs: ours (wall time per image, the loader's wait
    # included) and the authors' (proc_time: seconds per training step with the loader left out), which the
    # paper's times sit beside (paper.yaml's "time")
    metrics: tuple[tuple[str, str], ...] = (("time_per_image", "time"), ("time_per_step", "step_time"))
    paper_beside: str = "step_time"

    def render(self, ctx: Context) -> Rendered:
        cells, profile = select(self.name, ctx, over_seeds.TASK, self.settings, tuple(self.methods))
        numbers: list[Number] = []
        rows: list[list[str]] = []
        baselines: dict[str, str] = {}

        def number(label: str, row: str, metric: str, key: str, op: str, groups: list[list[RunRecord]], text,
                   paper=None) -> Number:
            value = stats.compute(op, [[r.latest(metric) for r in g] for g in groups])
            seeds = ", ".join(str(r.get(over_seeds.SEED_KEY)) for r in groups[0])
            num = Number(key=f"{self.name}/{label}/{row}/{key}/{op}", value=value, text=text(value), op=op,
                         metric=metric, groups=groups, paper=paper,
                         aggregation=stats.describe(op, metric, groups, unit="seeds") + f" (seeds {seeds})",
                         fields={"dataset": label, "method": row, "metric": metric, "stat": op})
            numbers.append(num)
            return num

        for setting in self.settings:
            label = setting.label
            base_runs, gal_runs = (cells[(label, m)] for m in self.methods)
            baselines.update({g.dir: b.dir for b, g in zip(base_runs, gal_runs)})
            paper = {method: lookup(f"{self.name}/{label}/{name}/time") for method, name in self.methods.items()}
            for method, method_name in self.methods.items():
                runs = cells[(label, method)]
                row = [label, setting.detail if method == "baseline" else "", method_name,
                       number(label, method_name, self.metrics[0][0], "time", "n", [runs], lambda v: str(int(v))).text]
                for metric, key in self.metrics:
                    beside = paper[method] if key == self.paper_beside else None
                    row.append(number(label, method_name, metric, key, "mean", [runs], seconds, beside).text)
                rows.append(row + [fmt(paper[method], 4)])
            ratios = [number(label, "ratio", metric, key, "ratio", [base_runs, gal_runs], lambda v: fmt(v, 4)).text
                      for metric, key in self.metrics]
            paper_ratio = None if None in paper.values() else paper["gal"] / paper["baseline"]
            rows.append([label, "", "GAL / Baseline", "", *ratios, fmt(paper_ratio, 4)])

        caption = ("Table VII: training time, baseline vs GAL (mean over seeds), and GAL / baseline. Runs: ImageNet "
                   "from Table III's ResNet-50 (RMSProp) runs; CIFAR-10 and CIFAR-100 from Tables I and II's SGD runs "
                   "(EfficientNet-B1).")
        notes = ["time / image: training wall time of an epoch / training images, the loader's wait included "
                 "(time_per_image); time / step: training wall time of an epoch less the loader's wait, per step "
                 "(time_per_step), as the authors' scripts time an iteration (proc_time). Each averaged over epochs "
                 "(metrics.json), then over seeds; GAL / Baseline: ratio of the two means",
                 "the paper's times (about 0.4-0.5 s, printed \"per image\") are the authors' proc_time, seconds per "
                 "iteration (batch), on their GPUs: they sit beside our time / step, which is comparable in kind, not "
                 "in hardware; compare the ratios"]
        if any(n.op == "ratio" and math.isnan(n.value) for n in numbers):
            notes.append("- in a GAL / Baseline row: the baseline's mean time is 0, so the ratio is undefined")
        layout = Layout(columns=["Dataset", "Runs", "Method", "n", "Time / image (s) (ours)",
                                 "Time / step (s) (ours)", "Time (s) (paper)"], rows=rows, caption=caption,
                        notes=notes)
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=markdown(layout), layout=layout, baselines=baselines)


SPEC = TimeTable()
