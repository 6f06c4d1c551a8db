"""Fig. 8a: GAL's update policies (Alg. 1), EfficientNet-B1 on CIFAR-100 with SGD: top-1 test error per epoch,
one line per policy (mean over seeds, ±std shaded): line 7 with <= (the default, the SGD preset's own runs),
line 7 with <, line 8 (always the adjusted step) and line 10 (never: the plain step). Numbers: each line's
final error (mean and std over seeds); claims: line 7 (<=) beats each other policy."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.report import over_seeds
from pipelines.report.model import Claim, Context, Layout, Number, Rendered
from pipelines.report.render import markdown
from pipelines.report.selection import select


def policy(value: str, label: str, detail: str) -> over_seeds.Setting:
    preset = value == "safeguard"
    return over_seeds.Setting(label, {"experiment": "cifar100_sgd", "method.policy": value}, detail,
                       stage="train_cifar" if preset else "ablate_policy", variant="" if preset else f"policy-{value}")


# the paper's names (Fig. 8a's legend) and method.policy's values (packages/gal_core/README.md)
POLICIES = (policy("safeguard", "Line 7 (<=)", "the adjusted step when its trial loss is <= the plain one's "
                                               "(the default)"),
            policy("strict", "Line 7 (<)", "the adjusted step when its trial loss is < the plain one's"),
            policy("always", "Line 8", "always the adjusted step"),
            policy("never", "Line 10", "never: the plain step (h still learns)"))
COLORS = ("#1f77b4", "#2ca02c", "#ff7f0e", "#7f7f7f")


@dataclass(frozen=True)
class PolicyFigure:
    name: str = "Fig. 8a"
    slug: str = "fig8a_update_policies"
    kind: str = "figure"
    column: str = over_seeds.ERROR

    def render(self, ctx: Context) -> Rendered:
        preset, others = POLICIES[0], POLICIES[1:]
        cells, profile = select(self.name, ctx, over_seeds.TASK, POLICIES, ("gal",), optional=[s.label for s in others])
        over_seeds.require_one(self.name, ctx, others, cells, "EfficientNet-B1 on CIFAR-100 (SGD) with another update policy")
        shown = [s for s in POLICIES if (s.label, "gal") in cells]
        numbers: list[Number] = []
        rows: list[list[str]] = []
        outcomes: dict[str, over_seeds.Outcome] = {}
        for s in shown:
            runs = cells[(s.label, "gal")]
            out = over_seeds.outcome([self.name, s.label], runs, key=self.column, column=self.column,
                              fields={"policy": s.label, "method.policy": s.where["method.policy"]})
            outcomes[s.label] = out
            numbers += out.numbers
            rows.append([s.label, s.where["method.policy"], s.detail, str(len(runs)), out.text])
        claims: list[Claim] = []
        for s in shown[1:]:
            claim, nums = over_seeds.versus(self.name, s.label, f"{preset.label} beats {s.label}",
                                     (s.label, outcomes[s.label]), (preset.label, outcomes[preset.label]),
                                     [self.name, "t-test", f"{preset.label} vs {s.label}", self.column])
            claims.append(claim)
            numbers += nums

        files = [f"figures/{self.slug}.png", f"figures/{self.slug}.pdf"]
        self._plot(shown, outcomes, profile, [ctx.out / f for f in files])
        notes = ["final val_top1_err (CIFAR-100's test set), mean ± sample std (ddof=1) over seeds; n = runs (seeds); "
                 "a diverged run has no final error (the row gives the epoch) and no line"]
        absent = [s for s in POLICIES if s not in shown]
        if absent:
            notes.append(over_seeds.left_out_note(absent))
        layout = Layout(columns=["Policy (Alg. 1)", "method.policy", "Update", "n",
                                 f"final {self.column} (mean ± std)"], rows=rows, notes=notes)
        md = (f"![{self.name}: top-1 test error per epoch per update policy]({files[0]})\n\n"
              f"[{self.name} as PDF]({files[1]}). Final top-1 test error (%) of each policy (over seeds):\n\n"
              + markdown(layout))
        seeds = {r.get(over_seeds.SEED_KEY): r for r in cells[(preset.label, "gal")]}
        baselines = {r.dir: seeds[r.get(over_seeds.SEED_KEY)].dir for s in shown[1:] for r in cells[(s.label, "gal")]
                     if r.get(over_seeds.SEED_KEY) in seeds}
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=md, files=files, claims=claims, baselines=baselines)

    def _plot(self, shown, outcomes, profile, files) -> None:
        plt = over_seeds.pyplot()
        fig, ax = plt.subplots(figsize=(5.8, 4.2), layout="constrained")
        for s in shown:
            out = outcomes[s.label]
            color = COLORS[POLICIES.index(s)]
            if not out.finished:  # every run diverged: nothing to draw but the legend entry
                ax.plot([], [], color=color, lw=1.8, label=f"{s.label}: {out.text}")
                continue
            epochs, mean, std = over_seeds.curve(out.finished, self.column)
            over_seeds.band(ax, epochs, mean, std, color=color, lw=2.2 if s is POLICIES[0] else 1.6,
                     label=f"{s.label} ({over_seeds.seeds(len(out.runs))}): final {out.text}")
        ax.set(xlabel="epoch", ylabel="top-1 test error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{self.name}: update policies, CIFAR-100 (EfficientNet-B1, SGD)\n"
                     f"mean ± std over seeds (profile {profile})", fontsize=10)
        over_seeds.save(fig, files)


SPEC = PolicyFigure()
