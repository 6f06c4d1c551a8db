"""Fig. 6: GAL's statistics per epoch (history.csv, epoch means of gal_core's GALStats) for the ImageNet GAL
runs (ResNet-50; EfficientNet-B2 too when its runs exist), mean over seeds (±std shaded):
- remainder: |L(z-δ) - L + <δ, g>|, the first-order Taylor remainder of the trial step δ = lr s (g + â) at the
  output z, with g = dL/dz and â the adjustment (the first-order term averaged as method.remainder says);
- cosine: cos(g, â), between the plain gradient and the adjustment, averaged over the output rows.
Numbers: each curve's final value (mean and std over seeds). Beside them, what the precision study (specs/
precision.py) says about these settings: whether float32 resolves this remainder at all."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.report import over_seeds
from pipelines.report.model import Context, Layout, Number, Rendered
from pipelines.report.render import fmt_g, markdown, pm_numbers
from pipelines.report.selection import select
from pipelines.report.specs.precision import rounding_note

MODELS = (over_seeds.Setting("ResNet-50", {"experiment": "imagenet_resnet50"}, "ImageNet, RMSProp", stage="train_imagenet"),
          over_seeds.Setting("EfficientNet-B2", {"experiment": "imagenet_efficientnet_b2"}, "ImageNet",
                      stage="train_imagenet"))


@dataclass(frozen=True)
class GalStatsFigure:
    name: str = "Fig. 6"
    slug: str = "fig6_remainder_cosine"
    kind: str = "figure"
    settings: tuple[over_seeds.Setting, ...] = MODELS
    optional: tuple[str, ...] = ("EfficientNet-B2",)   # shown when its GAL runs exist
    # history.csv column, its name in text, its name on the plot (matplotlib mathtext)
    columns: tuple[tuple[str, str, str], ...] = (
        ("remainder", "remainder |L(z-δ) - L + ⟨δ, g⟩|",
         r"remainder $|L(z-\delta) - L + \langle\delta, g\rangle|$"),
        ("cosine", "cos(g, â)", r"$\cos(g, \hat{a})$"))
    method: str = "gal"
    method_name: str = "GAL"

    def render(self, ctx: Context) -> Rendered:
        cells, profile = select(self.name, ctx, over_seeds.TASK, self.settings, (self.method,), optional=self.optional)
        shown = [s for s in self.settings if (s.label, self.method) in cells]
        numbers: list[Number] = []
        rows: list[list[str]] = []
        finals: dict[tuple[str, str], Number] = {}
        for s in shown:
            runs = cells[(s.label, self.method)]
            row = [s.label, s.detail, str(len(runs))]
            for column, _, _ in self.columns:
                nums = over_seeds.final_numbers(self.name, [s.label, self.method_name], column, runs)
                for num in nums.values():  # the remainder is ~1e-8 at ImageNet: significant digits, not decimals
                    num.text = fmt_g(num.value)
                finals[(s.label, column)] = nums["mean"]
                numbers += nums.values()
                row.append(pm_numbers(nums["mean"], nums["std"]))
            rows.append(row)
        files = [f"figures/{self.slug}.png", f"figures/{self.slug}.pdf"]
        self._plot(cells, shown, finals, profile, [ctx.out / f for f in files])
        layout = Layout(columns=["Model", "Runs", "n (seeds)",
                                 *(f"final {text} (mean ± std)" for _, text, _ in self.columns)], rows=rows,
                        notes=[over_seeds.MEAN_STD_NOTE])
        md = (f"![{self.name}: GAL's remainder and cos(g, â) per epoch]({files[0]})\n\n"
              f"[{self.name} as PDF]({files[1]}). Final value of each curve (GAL runs, over seeds):\n\n"
              + markdown(layout) + "\n" + rounding_note(ctx, [str(s.where["experiment"]) for s in shown]) + "\n")
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=md, files=files)

    def _plot(self, cells, shown, finals, profile, files) -> None:
        plt = over_seeds.pyplot()
        n = len(self.columns)
        fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.8), squeeze=False, layout="constrained")
        for ax, (column, _, ylabel) in zip(axes[0], self.columns):
            for s in shown:
                runs = cells[(s.label, self.method)]
                epochs, mean, std = over_seeds.curve(runs, column)
                over_seeds.band(ax, epochs, mean, std, lw=1.8,
                         label=f"{s.label} ({over_seeds.seeds(len(runs))}): final {finals[(s.label, column)].text}")
            # the formula is on the y axis; the title names the column (the formula there crowded the suptitle)
            ax.set(title=f"{column} per epoch", xlabel="epoch", ylabel=f"{ylabel} (epoch mean)")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{self.name}: GAL on ImageNet, mean ± std over seeds (profile {profile})")
        over_seeds.save(fig, files)


SPEC = GalStatsFigure()
