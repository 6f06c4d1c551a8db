"""Fig. 4: the 3-D toy. One column per optimiser; top: contours of the surface with the baseline and GAL
paths (start marked), bottom: z against step. Numbers: each run's final z (shown in the legends)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.report import over_seeds
from pipelines.report.model import Context, Layout, Number, Rendered
from pipelines.report.records import ReportError, RunRecord
from pipelines.report.render import fmt, markdown
from pipelines.report.selection import Setting, select
from pipelines.surface import surface

COLORS = {"baseline": "#e8302a", "gal": "#33c7ff"}  # red, sky blue: both outlined in black on the map
STYLE = {"baseline": "-", "gal": "--"}


@dataclass(frozen=True)
class Toy3dFigure:
    name: str = "Fig. 4"
    slug: str = "fig4_toy3d"
    task: str = "toy3d"
    stage: str = "toy3d"       # the dvc stage that makes the runs
    kind: str = "figure"
    optimizers: tuple[str, ...] = ("gd", "lookahead", "rmsprop", "adam", "adabound")  # columns, in order
    methods: dict[str, str] = field(default_factory=lambda: {"baseline": "Baseline", "gal": "GAL"})
    metric: str = "final_z"
    span: tuple[float, float] = (-3.5, 3.5)  # the plotted square never exceeds this (paths may leave it)

    def _select(self, ctx: Context) -> tuple[dict[tuple[str, str], RunRecord], str]:
        """(optimizer, method) -> its one run (selection.select), and the runs' profile."""
        settings = [Setting(opt, {"optimizer": opt}, stage=self.stage) for opt in self.optimizers]
        cells, profile = select(self.name, ctx, self.task, settings, tuple(self.methods), method_key="method")
        for (opt, method), runs in cells.items():
            if len(runs) > 1:
                raise ReportError(f"{self.name}: {len(runs)} runs for {opt}/{method} ({', '.join(r.dir for r in runs)})"
                                  f"; it shows one path each: remove all but one")
        return {key: runs[0] for key, runs in cells.items()}, profile

    @staticmethod
    def _settings(run: RunRecord) -> str:
        """'lr 0.1, 100 steps; GAL eps 0.2, s 1', then the optimiser's further settings on a second line."""
        get = run.flat.get
        text = f"lr {get('run.lr'):g}, {get('run.steps')} steps; GAL eps {get('run.ratio'):g}, s {get('run.scale'):g}"
        prefix = f"{run.flat.get('optimizer')}_"  # lookahead_k -> k
        extra = {k.rsplit(".", 1)[-1].removeprefix(prefix): v for k, v in run.flat.items()
                 if k.startswith("run.kwargs.")}
        if extra:
            text += "\noptimiser: " + ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}"
                                                for k, v in extra.items())
        return text

    def render(self, ctx: Context) -> Rendered:
        cells, profile = self._select(ctx)
        numbers: list[Number] = []
        rows: list[list[str]] = []
        paths: dict[tuple[str, str], dict[str, list[float]]] = {}
        for opt in self.optimizers:
            label = str(cells[(opt, "gal")].get("run.label"))
            row = [label, self._settings(cells[(opt, "gal")]).replace("\n", "; ")]
            for method, method_name in self.methods.items():
                run = cells[(opt, method)]
                xyz = {c: run.series(c, x="step") for c in ("x", "y", "z")}
                paths[(opt, method)] = {"step": list(xyz["x"]), **{c: list(v.values()) for c, v in xyz.items()}}
                value = run.metric(self.metric)
                numbers.append(Number(
                    key=f"{self.name}/{label}/{method_name}/{self.metric}", value=value, text=fmt(value, 3),
                    op="value", metric=self.metric, groups=[[run]], aggregation=f"{self.metric} of the one run",
                    fields={"optimizer": label, "method": method_name, "metric": self.metric, "stat": "value"}))
                row.append(numbers[-1].text)
            rows.append(row)

        files = [f"figures/{self.slug}.png", f"figures/{self.slug}.pdf"]
        self._plot(cells, paths, [ctx.out / f for f in files])
        layout = Layout(columns=["Optimiser", "Settings", "final z (Baseline)", "final z (GAL)"], rows=rows)
        md = (f"![{self.name}: 3-D toy, baseline vs GAL]({files[0]})\n\n"
              f"[{self.name} as PDF]({files[1]}). Final z of each path (lower is better):\n\n" + markdown(layout))
        baselines = {cells[(o, "gal")].dir: cells[(o, "baseline")].dir for o in self.optimizers}
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=md, files=files, baselines=baselines)

    def _plot(self, cells, paths, files) -> None:
        import numpy as np
        from matplotlib import patheffects

        plt = over_seeds.pyplot()

        coords = [v for p in paths.values() for c in ("x", "y") for v in p[c]]
        coords += [v for o in self.optimizers for v in cells[(o, "gal")].get("start")]
        lo = max(min(*coords, -1.5) - 0.25, self.span[0])
        hi = min(max(*coords, 1.5) + 0.25, self.span[1])
        grid = np.linspace(lo, hi, 301)
        gx, gy = np.meshgrid(grid, grid)
        gz = surface(np.stack([gx, gy], axis=-1))
        outline = [patheffects.withStroke(linewidth=4.2, foreground="black")]

        n = len(self.optimizers)
        with plt.rc_context({"font.size": 10, "axes.titlesize": 10.5, "legend.fontsize": 8.5}):
            fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 1.2, 7.6), squeeze=False, layout="constrained",
                                     gridspec_kw={"height_ratios": [1.25, 1]})
            for col, opt in enumerate(self.optimizers):
                gal_run = cells[(opt, "gal")]
                label = gal_run.get("run.label")
                top, bottom = axes[0, col], axes[1, col]
                image = top.imshow(gz, extent=(lo, hi, lo, hi), origin="lower", cmap="viridis",
                                   interpolation="bilinear")
                top.contour(gx, gy, gz, levels=14, colors="k", linewidths=0.35, alpha=0.45)
                for method, name in self.methods.items():
                    p = paths[(opt, method)]
                    final = cells[(opt, method)].metric(self.metric)
                    top.plot(p["x"], p["y"], STYLE[method], color=COLORS[method], lw=2.2, path_effects=outline,
                             label=f"{name}: final z {fmt(final, 3)}")
                    top.plot(p["x"][-1], p["y"][-1], "o", color=COLORS[method], mec="k", mew=1.2, ms=7)
                    bottom.plot(p["step"], p["z"], STYLE[method], color=COLORS[method], lw=1.8, label=name)
                top.plot(*gal_run.get("start"), marker="*", color="white", mec="k", ms=16, ls="", label="start")
                top.set(title=f"{label}\n{self._settings(gal_run)}", xlabel="x", ylabel="y",
                        xlim=(lo, hi), ylim=(lo, hi))
                top.legend(loc="lower left", framealpha=0.9)
                bottom.set(title=f"{label}: z per step", xlabel="step", ylabel="z(x, y)")
                bottom.grid(alpha=0.3)
                bottom.legend(loc="upper right")
            fig.colorbar(image, ax=axes[0, :], label="z(x, y)", fraction=0.02, pad=0.01)  # beside the maps' row
            fig.suptitle(f"{self.name}: 3-D toy z = -sin(x²) cos(3y²) exp(-(xy)²) - exp(-(x+y)²), baseline vs GAL "
                         f"(profile {cells[(self.optimizers[0], 'gal')].profile})", fontsize=12.5)
            over_seeds.save(fig, files)


SPEC = Toy3dFigure()
