"""Fig. 7: sensitivity of GAL to its hyper-parameters, EfficientNet-B1 on CIFAR-100: final top-1 test error
against eps (method.ratio), against s (method.scale) and against the adjuster's hidden widths (MLP), for SGD
(top row) and Lookahead (bottom row). Each point: mean ± std over seeds of the runs of one value; the paper's
setting (the preset's own runs) is drawn apart, the baseline's error as a dashed line where its runs exist.

A panel's points are the preset's runs and every run off the preset whose config changes only that one key
(selection.changed against the preset's own runs: method.ratio, method.scale, or method.arch of an MLP adjuster;
run.json variants eps<x>, scale<x>, mlp-<widths>), whichever values were run: a panel needs the preset and one
other."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.report import over_seeds
from pipelines.report.model import Context, Layout, Number, Rendered
from pipelines.report.records import MissingRuns, RunRecord, check_one_profile
from pipelines.report.render import markdown
from pipelines.report.selection import changed, preset_config, select

ARCHS = ("256", "256-64", "256-64-32", "256-64-32-16")   # the categories of the architecture axis, in order


@dataclass(frozen=True)
class Axis:
    key: str           # key segment, e.g. "eps"
    title: str         # axis label
    config: str        # config key of the x value: the one key its points change from the preset's config
    spelled: str       # its runs' run.json variants, in words
    stage: str         # the dvc stage that makes them ("" : the optimiser's own, Optimiser.arch_stage)
    log: bool = True
    keep: tuple[tuple[str, str], ...] = ()   # config values its points have, e.g. (("method.kind", "mlp"),)
    values: tuple[str, ...] = ()             # the x values it takes, as x_text spells them (): any


@dataclass(frozen=True)
class Optimiser:
    label: str         # key segment and row title
    experiment: str    # config experiment
    arch_stage: str    # the dvc stage of its mlp-<widths> runs


AXES = (Axis("eps", "ε (method.ratio)", "method.ratio", "eps<x>", "ablate_eps"),
        Axis("s", "s (method.scale)", "method.scale", "scale<x>", "ablate_scale"),
        Axis("architecture", "adjuster widths (MLP)", "method.arch", "mlp-<widths>", "", log=False,
             keep=(("method.kind", "mlp"),), values=ARCHS))
OPTIMISERS = (Optimiser("SGD", "cifar100_sgd", "ablate_adjuster"),  # SGD's widths: Table VIII's MLP runs
              Optimiser("Lookahead", "cifar100_lookahead", "ablate_lookahead_arch"))
COLORS = {"SGD": "#1f77b4", "Lookahead": "#9467bd"}


def x_text(axis: Axis, run: RunRecord) -> str:
    """A run's value on ``axis`` as shown and keyed: 0.001, 5, 256-64-32."""
    value = run.get(axis.config)
    return "-".join(map(str, value)) if isinstance(value, list) else f"{float(value):g}"


def on_axis(axis: Axis, run: RunRecord, preset: dict) -> bool:
    """Whether ``run`` is a point of ``axis``: its config differs from the ``preset``'s (selection.preset_config)
    in the axis's key alone, has the axis's ``keep`` values, and its x value is one the axis takes."""
    return (changed(run, preset) == [axis.config] and all(str(run.flat.get(k)) == v for k, v in axis.keep)
            and (not axis.values or x_text(axis, run) in axis.values))


@dataclass
class Point:
    setting: over_seeds.Setting
    axis: Axis
    x: str
    outcome: over_seeds.Outcome
    preset: bool


@dataclass(frozen=True)
class SensitivityFigure:
    name: str = "Fig. 7"
    slug: str = "fig7_sensitivity"
    kind: str = "figure"
    column: str = over_seeds.ERROR

    def _stage(self, opt: Optimiser, axis: Axis) -> str:
        return axis.stage or opt.arch_stage

    def _settings(self, ctx: Context) -> tuple[dict[str, over_seeds.Setting], dict[tuple[str, str], list[over_seeds.Setting]]]:
        """The presets (optimiser -> its setting) and (optimiser, axis) -> the settings of its other values: one
        per run.json variant of the GAL runs whose config puts them on the axis (``on_axis``; the preset's
        config: its own runs', else the one most of the optimiser's GAL runs share)."""
        presets = {o.label: over_seeds.Setting(f"{o.label} preset", {"experiment": o.experiment}, "the paper's setting",
                                        stage="train_cifar") for o in OPTIMISERS}
        variants: dict[tuple[str, str], list[over_seeds.Setting]] = {}
        runs = [r for r in ctx.runs(over_seeds.TASK) if str(r.flat.get("method.name")) == "gal"]
        for o in OPTIMISERS:
            own = [r for r in runs if str(r.flat.get("experiment")) == o.experiment]
            preset = preset_config(own)
            for axis in AXES:
                found = sorted({r.variant for r in own if r.variant and on_axis(axis, r, preset)})
                variants[(o.label, axis.key)] = [
                    over_seeds.Setting(f"{o.label} {v}", {"experiment": o.experiment}, f"variant {v}",
                                stage=self._stage(o, axis), variant=v) for v in found]
        return presets, variants

    def render(self, ctx: Context) -> Rendered:
        presets, variants = self._settings(ctx)
        lacking = [(f"{o.label}/{a.key}: no value but the preset's (variants {a.spelled})",
                    self._stage(o, a)) for o in OPTIMISERS for a in AXES if not variants[(o.label, a.key)]]
        settings = [*presets.values(), *(s for group in variants.values() for s in group)]
        needs = (f"runs under {ctx.task_dir(over_seeds.TASK)} with experiment in {{"
                 f"{', '.join(o.experiment for o in OPTIMISERS)}}} x method.name=gal: the preset's own and at least "
                 "one other value per panel (variants eps<x>, scale<x>, mlp-<widths>)")
        try:
            cells, _ = select(self.name, ctx, over_seeds.TASK, settings, ("gal",))
        except MissingRuns as err:
            if not lacking:
                raise
            stages = [*err.make.split()[2:], *(s for _, s in lacking)]
            raise MissingRuns(self.name, needs, f"{err.missing}; {'; '.join(t for t, _ in lacking)}",
                              " ".join(["dvc repro", *dict.fromkeys(stages)])) from None
        if lacking:
            raise MissingRuns(self.name, needs, f"missing runs under {ctx.task_dir(over_seeds.TASK)}: "
                              + "; ".join(t for t, _ in lacking),
                              " ".join(["dvc repro", *dict.fromkeys(s for _, s in lacking)]))
        base_settings = [over_seeds.Setting(f"{o.label} baseline", {"experiment": o.experiment}, stage="train_cifar")
                         for o in OPTIMISERS]
        base_cells, _ = select(self.name, ctx, over_seeds.TASK, base_settings, ("baseline",),
                               optional=[s.label for s in base_settings])
        profile = check_one_profile(self.name, [r for c in (cells, base_cells) for runs in c.values() for r in runs],
                                    ctx.profile)

        numbers: list[Number] = []
        rows: list[list[str]] = []
        panels: dict[tuple[str, str], list[Point]] = {}
        baselines_out: dict[str, over_seeds.Outcome] = {}
        for o in OPTIMISERS:
            preset = presets[o.label]
            for axis in AXES:
                points = []
                for s in [preset, *variants[(o.label, axis.key)]]:
                    runs = cells[(s.label, "gal")]
                    x = x_text(axis, runs[0])
                    out = over_seeds.outcome([self.name, o.label, axis.key, x], runs, key=self.column, column=self.column,
                                      fields={"optimiser": o.label, "axis": axis.key, "value": x})
                    points.append(Point(s, axis, x, out, s is preset))
                points.sort(key=lambda p, axis=axis: float(p.x) if axis.log else
                            ARCHS.index(p.x) if p.x in ARCHS else len(ARCHS))
                panels[(o.label, axis.key)] = points
                for p in points:
                    numbers += p.outcome.numbers
                    rows.append([o.label, axis.key, p.x, "the paper's setting (preset)" if p.preset else
                                 p.setting.detail, str(len(p.outcome.runs)), p.outcome.text])
            if (f"{o.label} baseline", "baseline") in base_cells:
                runs = base_cells[(f"{o.label} baseline", "baseline")]
                out = over_seeds.outcome([self.name, o.label, "baseline"], runs, key=self.column, column=self.column,
                                  fields={"optimiser": o.label, "axis": "baseline", "value": ""})
                baselines_out[o.label] = out
                numbers += out.numbers
                rows.append([o.label, "baseline", "-", "baseline (no GAL), dashed line", str(len(runs)), out.text])

        files = [f"figures/{self.slug}.png", f"figures/{self.slug}.pdf"]
        self._plot(panels, baselines_out, profile, [ctx.out / f for f in files])
        notes = ["final val_top1_err (CIFAR-100's test set), mean ± sample std (ddof=1) over seeds; n = runs (seeds); "
                 "a diverged run has no final error (its row gives the epoch; a point whose runs all diverged is "
                 "drawn as x at the top of its panel)",
                 "the paper's setting: SGD eps 0.01, s 1, widths 256-64-32; Lookahead eps 0.001, s 5, widths "
                 "256-64-32 (the presets cifar100_sgd_gal, cifar100_lookahead_gal); every other point changes that "
                 "one value"]
        layout = Layout(columns=["Optimiser", "Axis", "Value", "Runs", "n", f"final {self.column} (mean ± std)"],
                        rows=rows, notes=notes)
        md = (f"![{self.name}: top-1 test error against eps, s and the adjuster's widths]({files[0]})\n\n"
              f"[{self.name} as PDF]({files[1]}). Final top-1 test error (%) of each point (over seeds):\n\n"
              + markdown(layout))
        baselines = {}
        for o in OPTIMISERS:  # the preset's runs against the baseline's, the other values' against the preset's
            base = {r.get(over_seeds.SEED_KEY): r for r in base_cells.get((f"{o.label} baseline", "baseline"), [])}
            own = {r.get(over_seeds.SEED_KEY): r for r in cells[(presets[o.label].label, "gal")]}
            baselines.update({r.dir: base[seed].dir for seed, r in own.items() if seed in base})
            baselines.update({r.dir: own[r.get(over_seeds.SEED_KEY)].dir for a in AXES for s in variants[(o.label, a.key)]
                              for r in cells[(s.label, "gal")] if r.get(over_seeds.SEED_KEY) in own})
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=md, files=files, baselines=baselines)

    def _plot(self, panels, baselines, profile, files) -> None:
        import numpy as np
        from matplotlib.ticker import NullFormatter

        plt = over_seeds.pyplot()
        fig, axes = plt.subplots(len(OPTIMISERS), len(AXES), figsize=(4.4 * len(AXES), 3.7 * len(OPTIMISERS)),
                                 squeeze=False, layout="constrained")
        for row, o in enumerate(OPTIMISERS):
            for col, axis in enumerate(AXES):
                ax, points = axes[row, col], panels[(o.label, axis.key)]
                xs = [float(p.x) if axis.log else i for i, p in enumerate(points)]
                done = [(x, p) for x, p in zip(xs, points) if p.outcome.finished]
                std = [p.outcome.stats["std"].value for _, p in done]
                ax.errorbar([x for x, _ in done], [p.outcome.mean for _, p in done],
                            yerr=np.nan_to_num(np.array(std, dtype=float)), fmt="o-", color=COLORS[o.label],
                            capsize=3, lw=1.6, ms=5, label="GAL (mean ± std over seeds)")
                for x, p in zip(xs, points):
                    if p.preset and p.outcome.finished:
                        ax.plot(x, p.outcome.mean, "*", ms=16, color="gold", mec="k", ls="",
                                label=f"paper's setting ({p.x}): {p.outcome.text}")
                    if not p.outcome.finished:
                        ax.plot(x, 0.97, "x", ms=9, mew=2, color="#d62728", transform=ax.get_xaxis_transform(),
                                ls="", label=f"{p.x}: {p.outcome.text}")
                if o.label in baselines and baselines[o.label].finished:
                    ax.axhline(baselines[o.label].mean, ls="--", color=over_seeds.COLORS["baseline"], lw=1.3,
                               label=f"baseline: {baselines[o.label].text}")
                if axis.log:
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_xticks(xs)
                ax.set_xticklabels([p.x for p in points], rotation=0 if axis.log else 15)
                ax.margins(x=0.12)
                ax.set(title=f"{o.label}: error vs {axis.title}", xlabel=axis.title, ylabel="top-1 test error (%)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"{self.name}: sensitivity of GAL, CIFAR-100 (EfficientNet-B1), mean ± std over seeds "
                     f"(profile {profile})")
        over_seeds.save(fig, files)


SPEC = SensitivityFigure()
