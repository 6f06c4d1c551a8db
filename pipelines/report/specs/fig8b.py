"""Fig. 8b: how often the adjusted update beats the plain one: the fraction of training samples whose loss
after the adjusted trial step is lower than after the plain step (history.csv's adjusted_better), per
epoch, one line per dataset, mean over seeds (±std shaded). Numbers: each line's final value (mean and std
over seeds)."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.report import over_seeds
from pipelines.report.model import Context, Layout, Number, Rendered
from pipelines.report.render import markdown, pm
from pipelines.report.selection import select


@dataclass(frozen=True)
class FractionFigure:
    name: str = "Fig. 8b"
    slug: str = "fig8b_adjusted_better"
    kind: str = "figure"
    settings: tuple[over_seeds.Setting, ...] = (over_seeds.CIFAR10_SGD, over_seeds.CIFAR100_SGD, over_seeds.IMAGENET_R50)  # lines
    column: str = "adjusted_better"
    ylabel: str = "samples where the adjusted step is better"
    method: str = "gal"
    method_name: str = "GAL"

    def render(self, ctx: Context) -> Rendered:
        cells, profile = select(self.name, ctx, over_seeds.TASK, self.settings, (self.method,))
        numbers: list[Number] = []
        rows: list[list[str]] = []
        finals: dict[str, Number] = {}
        for s in self.settings:
            runs = cells[(s.label, self.method)]
            nums = over_seeds.final_numbers(self.name, [s.label, self.method_name], self.column, runs)
            finals[s.label] = nums["mean"]
            numbers += nums.values()
            rows.append([s.label, s.detail, str(len(runs)), pm(nums["mean"].value, nums["std"].value)])
        files = [f"figures/{self.slug}.png", f"figures/{self.slug}.pdf"]
        self._plot(cells, finals, profile, [ctx.out / f for f in files])
        layout = Layout(columns=["Dataset", "Runs", "n (seeds)", f"final {self.column} (mean ± std)"], rows=rows,
                        notes=[over_seeds.MEAN_STD_NOTE])
        md = (f"![{self.name}: {self.column} per epoch]({files[0]})\n\n"
              f"[{self.name} as PDF]({files[1]}). Final value of each line (GAL runs, over seeds):\n\n"
              + markdown(layout))
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=md, files=files)

    def _plot(self, cells, finals, profile, files) -> None:
        plt = over_seeds.pyplot()
        fig, ax = plt.subplots(figsize=(5.6, 4.0), layout="constrained")
        for s in self.settings:
            runs = cells[(s.label, self.method)]
            epochs, mean, std = over_seeds.curve(runs, self.column)
            over_seeds.band(ax, epochs, mean, std, lw=1.8,
                     label=f"{s.label} ({s.detail}, {over_seeds.seeds(len(runs))}): final {finals[s.label].text}")
        ax.set(xlabel="epoch", ylabel=self.ylabel, ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{self.name}: GAL's adjusted update better than the plain one\n"
                     f"mean ± std over seeds (profile {profile})", fontsize=10)
        over_seeds.save(fig, files)


SPEC = FractionFigure()
