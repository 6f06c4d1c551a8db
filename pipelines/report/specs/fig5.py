"""Fig. 5: validation loss against epoch, baseline vs GAL, one panel per dataset (mean over seeds, ±std
shaded). Numbers: each curve's final validation loss (mean and std over seeds)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.report import over_seeds
from pipelines.report.model import Context, Layout, Number, Rendered
from pipelines.report.render import markdown, pm
from pipelines.report.selection import select


# DETR's loss of each val image on its own (class + box terms of every decoder layer), averaged over images
COCO_R50 = over_seeds.Setting("COCO", {"experiment": "coco_detr_r50"}, "DETR-R50, AdamW", stage="train_detection",
                       task="detection")


@dataclass(frozen=True)
class CurvesFigure:
    name: str = "Fig. 5"
    slug: str = "fig5_val_loss"
    kind: str = "figure"
    settings: tuple[over_seeds.Setting, ...] = (over_seeds.CIFAR10_SGD, over_seeds.CIFAR100_SGD, over_seeds.IMAGENET_R50, COCO_R50)  # panels
    methods: dict[str, str] = field(default_factory=lambda: {"baseline": "Baseline", "gal": "GAL"})
    column: str = "val_loss"   # history.csv column plotted; its final value is metrics.json's
    ylabel: str = "validation loss"

    def render(self, ctx: Context) -> Rendered:
        cells, profile = select(self.name, ctx, over_seeds.TASK, self.settings, tuple(self.methods))
        numbers: list[Number] = []
        rows: list[list[str]] = []
        finals: dict[tuple[str, str], dict[str, Number]] = {}
        for s in self.settings:
            for method, method_name in self.methods.items():
                runs = cells[(s.label, method)]
                nums = over_seeds.final_numbers(self.name, [s.label, method_name], self.column, runs, ops=("mean", "std", "n"))
                finals[(s.label, method)] = nums
                numbers += nums.values()
                rows.append([s.label, s.detail, method_name, nums["n"].text,
                             pm(nums["mean"].value, nums["std"].value)])
        files = [f"figures/{self.slug}.png", f"figures/{self.slug}.pdf"]
        self._plot(cells, finals, profile, [ctx.out / f for f in files])
        layout = Layout(columns=["Dataset", "Runs", "Method", "n", f"final {self.column} (mean ± std)"], rows=rows,
                        notes=[over_seeds.MEAN_STD_NOTE])
        md = (f"![{self.name}: {self.ylabel} per epoch, baseline vs GAL]({files[0]})\n\n"
              f"[{self.name} as PDF]({files[1]}). Final {self.column} of each curve (over seeds):\n\n"
              + markdown(layout))
        baselines = {g.dir: b.dir for s in self.settings
                     for b, g in zip(cells[(s.label, "baseline")], cells[(s.label, "gal")])}
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=md, files=files, baselines=baselines)

    def _plot(self, cells, finals, profile, files) -> None:
        plt = over_seeds.pyplot()
        n = len(self.settings)
        fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False, layout="constrained")
        for ax, s in zip(axes[0], self.settings):
            for method, method_name in self.methods.items():
                runs = cells[(s.label, method)]
                epochs, mean, std = over_seeds.curve(runs, self.column)
                final = finals[(s.label, method)]["mean"].text
                over_seeds.band(ax, epochs, mean, std, color=over_seeds.COLORS[method], lw=1.8,
                         label=f"{method_name} ({over_seeds.seeds(len(runs))}): final {final}")
            ax.set(title=f"{s.label} ({s.detail})", xlabel="epoch", ylabel=self.ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{self.name}: {self.ylabel}, baseline vs GAL, mean ± std over seeds (profile {profile})")
        over_seeds.save(fig, files)


SPEC = CurvesFigure()
