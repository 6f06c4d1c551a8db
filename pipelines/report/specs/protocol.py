"""The protocol study: Table V's baseline and GAL under the protocol choices the paper leaves open.

The paper gives the regression models and "Adam on CPU", nothing else; its baselines are far weaker than ours
(California R² -0.61). The stages ``protocol`` and ``protocol_eps`` (params.yaml ``protocol_grids``) rerun
baseline and GAL off our protocol, one choice at a time plus targeted points (overrides of STUDY_KEYS; run
variants such as ``epochs10``, ``scale_target-false``, ``lr0.0001``, ``batch_size1024``; GAL alone for
``method.ratio``, ``eps<x>``, against our baseline). A run is the study's when it is a run off the preset (run.json
variant not "") whose config differs from our protocol's (the dataset and method's train_regression runs:
selection.preset_config) in STUDY_KEYS alone (selection.changed); a protocol is the runs of one such point, shown
under their run.json variant. Per dataset this spec shows every protocol's baseline and GAL beside the paper's,
names the protocol whose baseline comes closest to the paper's (``distance``), t-tests GAL against the baseline
under it as Table V does, and hands the claims table each Table V claim re-checked there (claims.UnderProtocol).
A second spec draws test MAE per epoch under our protocol and the closest one, and the safeguard's acceptance.

Closeness: the root mean square, over MAE, MSE and R², of (our baseline mean - the paper's baseline mean) / the
paper's std over its runs: how many of the paper's own standard deviations away our baseline is."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipelines.report import over_seeds
from pipelines.report import stats
from pipelines.report.claims import UnderProtocol, paper_side
from pipelines.report.model import Context, Layout, Number, Rendered
from pipelines.report.paper import lookup
from pipelines.report.records import MissingRuns, ReportError, RunRecord, check_one_profile
from pipelines.report.render import UNDEFINED_NOTE, fmt, fmt_p, markdown, ttest_cell, ttest_text
from pipelines.report.selection import Setting, changed, preset_config, select
from pipelines.report.specs import table5

TASK = "regression"
TABLE = table5.SPEC
OURS = "ours"                    # our protocol: the presets' own runs (train_regression, Table V's)
# The config keys the study changes (params.yaml protocol_grids' overrides): the protocol choices the paper
# leaves open (conf/task/regression.yaml, optim/adam.yaml, data/<set>.yaml's batch) and GAL's eps
STUDY_KEYS = frozenset({"task.epochs", "task.scale_features", "task.scale_target", "optim.lr", "data.train.batch_size",
                        "method.ratio"})
ACCEPTED = "accepted"            # history.csv: the fraction of steps the safeguard accepted, per epoch
# h's movement per epoch where the task logs it (history.csv; pipelines/training/method.py): the mean norm of h's
# gradient per step, and how far h's weights moved in the epoch (absolute, relative to their norm). Shown
# when every GAL run of a protocol has them (older runs do not)
H_COLUMNS = {"adjuster_grad_norm": "‖∇h‖", "adjuster_move": "‖Δh‖", "adjuster_move_rel": "‖Δh‖/‖h‖"}
STAGES = {OURS: "train_regression", "points": "protocol", "eps": "protocol_eps"}


def by_dataset_and_method(runs: list[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    """(data.name, method.name) -> its runs, in order."""
    out: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        out.setdefault((str(run.flat.get("data.name")), str(run.flat.get("method.name"))), []).append(run)
    return out


def distance(ours: dict[str, float], paper: dict[str, dict[str, float]]) -> float:
    """RMS over the metrics of (ours - paper mean) / paper std; ``ours``: metric -> our baseline's mean,
    ``paper``: metric -> {"mean", "std"} (paper.yaml). nan where a metric lacks a value or std."""
    z = []
    for metric, value in ours.items():
        ref = paper.get(metric) or {}
        if ref.get("mean") is None or not ref.get("std") or math.isnan(value):
            return math.nan
        z.append((value - ref["mean"]) / ref["std"])
    return math.sqrt(sum(v * v for v in z) / len(z)) if z else math.nan


def closest(distances: dict[str, float]) -> str | None:
    """The protocol with the smallest distance (the first one listed on a tie); None if none is finite."""
    finite = [(d, i, name) for i, (name, d) in enumerate(distances.items()) if not math.isnan(d)]
    return min(finite)[2] if finite else None


@dataclass
class Protocol:
    name: str                                   # OURS or the run variant
    runs: dict[str, list[RunRecord]]            # method -> runs by seed; GAL-only protocols use our baseline
    own_baseline: bool                          # False: GAL alone (eps<x>), t-tested against our baseline


@dataclass
class Study:
    profile: str
    protocols: dict[str, list[Protocol]]        # dataset -> protocols, ours first, then by variant
    left_out: list[str] = field(default_factory=list)   # datasets without study runs


def gather(name: str, ctx: Context) -> Study:
    """Every dataset's protocols: our runs (Table V's) and the study's points present under runs/regression.
    MissingRuns when the study has no runs at all, or a dataset with study runs lacks ours."""
    found: dict[tuple[str, str], set[str]] = {}  # (dataset, run.json variant) -> methods
    for (ds, method), runs in by_dataset_and_method(ctx.runs(TASK)).items():
        ours = preset_config(runs)  # our protocol's config: its runs', else the one most of these runs share
        for run in runs:  # a run off the preset that changes no key outside the study's
            if run.variant and STUDY_KEYS.issuperset(changed(run, ours)):
                found.setdefault((ds, run.variant), set()).add(method)
    datasets = [ds for ds in TABLE.groups if any(d == ds for d, _ in found)]
    if not datasets:
        raise MissingRuns(name, f"runs under {ctx.task_dir(TASK)} made off the regression presets by the protocol "
                          f"study (variants like epochs10, lr0.0001, eps0.1), with our own (train_regression)",
                          f"no protocol-study runs under {ctx.task_dir(TASK)}",
                          "dvc repro protocol protocol_eps train_regression")
    paired, alone = [], []
    for ds in datasets:
        paired.append(Setting(f"{TABLE.groups[ds]} {OURS}", {"data.name": ds}, stage=STAGES[OURS]))
        for (d, variant), methods in sorted(found.items()):
            if d == ds:
                two = "baseline" in methods
                (paired if two else alone).append(Setting(f"{TABLE.groups[ds]} {variant}", {"data.name": ds},
                                                          variant=variant, stage=STAGES["points" if two else "eps"]))
    cells, _ = select(name, ctx, TASK, paired, tuple(TABLE.methods), min_seeds=2)
    if alone:
        cells.update(select(name, ctx, TASK, alone, ("gal",), min_seeds=2)[0])
    profile = check_one_profile(name, [r for runs in cells.values() for r in runs], ctx.profile)
    protocols: dict[str, list[Protocol]] = {}
    for s in [*paired, *alone]:
        ds, variant = s.where["data.name"], s.variant or OURS
        runs = {m: cells[(s.label, m)] for m in TABLE.methods if (s.label, m) in cells}
        protocols.setdefault(ds, []).append(Protocol(variant, runs, "baseline" in runs))
    return Study(profile, protocols, [TABLE.groups[ds] for ds in TABLE.groups if ds not in datasets])


class Numbers:
    """Numbers keyed <spec>/<Dataset>/<protocol>/<row>/<metric>/<op>, collected in order."""

    def __init__(self, name: str):
        self.name, self.items = name, []

    def add(self, parts: list[str], op: str, source: str, groups: list[list[RunRecord]], digits: int = 4,
            paper: Any = None, show=None) -> Number:
        values = [[r.latest(source) for r in g] for g in groups]
        value = stats.compute(op, values)
        show = show or {"n": lambda v: str(int(v)), "t": lambda v: ttest_text("t", v, values),
                        "p": lambda v: ttest_text("p", v, values)}.get(op, lambda v: fmt(v, digits))
        text = show(value)
        seeds = ", ".join(str(r.get("seed")) for r in groups[0])
        how = stats.describe(op, f"final {source}", groups, unit="seeds") + f" (seeds {seeds})"
        number = Number(key="/".join([self.name, *parts, op]), value=value, text=text, op=op, metric=source,
                        groups=groups, aggregation=how, paper=paper,
                        fields={"dataset": parts[0], "protocol": parts[1], "row": parts[2], "metric": parts[3],
                                "stat": op})
        self.items.append(number)
        return number


def paper_baseline(group: str) -> dict[str, dict[str, float]]:
    return {m.key: lookup(f"{TABLE.name}/{group}/Baseline/{m.key}") or {} for m in TABLE.metrics}


def h_columns(runs: list[RunRecord]) -> list[str]:
    """The H_COLUMNS every run's history.csv has (none where the task does not log h's movement)."""
    def has(run: RunRecord, column: str) -> bool:
        try:
            run.latest(column)
            return True
        except ReportError:
            return False
    return [c for c in H_COLUMNS if runs and all(has(r, c) for r in runs)]


@dataclass(frozen=True)
class ProtocolStudy:
    name: str = "Protocol study"
    slug: str = "protocol_study"
    kind: str = "table"

    def render(self, ctx: Context) -> Rendered:
        study = gather(self.name, ctx)
        nums = Numbers(self.name)
        rows: list[list[str]] = []
        claims: list[UnderProtocol] = []
        baselines: dict[str, str] = {}
        closest_of: dict[str, str] = {}
        h_shown: set[str] = set()
        for ds, protocols in study.protocols.items():
            group = TABLE.groups[ds]
            ours = protocols[0]
            paper = paper_baseline(group)
            rows.append([group, "paper (its protocol is not given)", "-",
                         *(fmt(paper[m.key].get("mean"), m.digits) for m in TABLE.metrics), "-",
                         *(fmt(lookup(f"{TABLE.name}/{group}/GAL/{m.key}/mean"), m.digits) for m in TABLE.metrics),
                         *(self._paper_t(group, m.key) for m in TABLE.metrics), "-"])
            means: dict[str, dict[str, dict[str, Number]]] = {}
            spreads: dict[str, dict[str, dict[str, Number]]] = {}  # protocol -> method -> metric -> std (claims' power)
            ttests: dict[str, dict[str, tuple[Number, Number]]] = {}
            distances: dict[str, float] = {}
            accepted: dict[str, Number] = {}
            h_moves: dict[str, list[Number]] = {}
            for p in protocols:
                base = p.runs["baseline"] if p.own_baseline else ours.runs["baseline"]
                gal = p.runs["gal"]
                means[p.name] = {}
                for method, runs in (("baseline", base), ("gal", gal)):
                    if method == "baseline" and not p.own_baseline:
                        continue
                    label = TABLE.methods[method]
                    means[p.name][method] = {m.key: nums.add([group, p.name, label, m.key], "mean", m.source, [runs],
                                                             m.digits) for m in TABLE.metrics}
                    spreads.setdefault(p.name, {})[method] = {
                        m.key: nums.add([group, p.name, label, m.key], "std", m.source, [runs], m.digits)
                        for m in TABLE.metrics}
                    nums.add([group, p.name, label, "runs"], "n", TABLE.metrics[0].source, [runs])
                if not p.own_baseline:
                    means[p.name]["baseline"] = means[OURS]["baseline"]
                ttests[p.name] = {m.key: tuple(nums.add([group, p.name, "t-test", m.key], op, m.source, [base, gal])
                                               for op in ("t", "p")) for m in TABLE.metrics}
                accepted[p.name] = nums.add([group, p.name, "GAL", "accepted"], "mean", ACCEPTED, [gal], 3)
                h_moves[p.name] = [nums.add([group, p.name, "GAL", c], "mean", c, [gal], show=fmt_p)  # may be ~1e-9
                                   for c in h_columns(gal)]
                h_shown.update(h_columns(gal))
                if p.own_baseline:
                    distances[p.name] = distance({k: n.value for k, n in means[p.name]["baseline"].items()}, paper)
                for b, g in zip(base, gal):
                    baselines[g.dir] = b.dir
            best = closest(distances)
            closest_of[group] = best or "-"
            for p in protocols:
                label = p.name + (" (our protocol, Table V)" if p.name == OURS else "")
                label += " **closest to the paper's baseline**" if p.name == best else ""
                label += "" if p.own_baseline else " (GAL only; baseline: ours)"
                n = f"{len(p.runs['baseline'])}+{len(p.runs['gal'])}" if p.own_baseline else f"{len(p.runs['gal'])}"
                base_cells = ([means[p.name]["baseline"][m.key].text for m in TABLE.metrics] if p.own_baseline
                              else ["= ours"] * len(TABLE.metrics))
                h_text = ", ".join(f"{H_COLUMNS[c]} {x.text}"
                                   for c, x in zip(h_columns(p.runs["gal"]), h_moves[p.name]))
                rows.append([group, label, n, *base_cells,
                             fmt(distances[p.name], 2) if p.own_baseline else "-",
                             *(means[p.name]["gal"][m.key].text for m in TABLE.metrics),
                             *(ttest_cell(*ttests[p.name][m.key]) for m in TABLE.metrics),
                             accepted[p.name].text + (f"; {h_text}" if h_text else "")])
            if best is not None:
                claims += self._claims(group, best, distances[best], means[best], ttests[best], spreads[best])
        columns = ["Dataset", "Protocol", "n", *(f"Baseline {m.title}" for m in TABLE.metrics), "Distance",
                   *(f"GAL {m.title}" for m in TABLE.metrics), *(f"t, p {m.title}" for m in TABLE.metrics),
                   "GAL: accepted" + ("; h's movement" if h_shown else "")]
        notes = self._notes(study, closest_of, h_shown)
        if any(n.op == "t" and math.isnan(n.value) for n in nums.items):
            notes.append(UNDEFINED_NOTE)
        layout = Layout(columns=columns, rows=rows, notes=notes, caption=(
            "Protocol study: Table V's baseline and GAL under protocol choices the paper leaves open (means over "
            "seeds), the protocol whose baseline comes closest to the paper's, and GAL against the baseline there"))
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=study.profile, numbers=nums.items,
                        markdown=markdown(layout), layout=layout, claims=claims, baselines=baselines)

    @staticmethod
    def _paper_t(group: str, metric: str) -> str:
        t = lookup(f"{TABLE.name}/{group}/t-test/{metric}") or {}
        return f"{fmt(t.get('t'), 2)}, {fmt_p(t.get('p'))}" if t else "-"

    @staticmethod
    def _claims(group: str, protocol: str, dist: float, means, ttests, spreads) -> list[UnderProtocol]:
        """Each Table V claim on ``group`` ('GAL better', where the paper says so), under ``protocol``."""
        out = []
        for m in TABLE.metrics:
            paper = paper_side(TABLE.name, group, tuple(TABLE.methods.values()), m.key, m.better)
            if paper is None:
                continue
            base, gal = means["baseline"][m.key], means["gal"][m.key]
            t, p = ttests[m.key]
            out.append(UnderProtocol(
                table=TABLE.name, subject=group, metric=m.title, better=m.better, paper=paper,
                ours={"baseline": base.value, "gal": gal.value, "t": t.value, "p": p.value,
                      "std_baseline": spreads["baseline"][m.key].value, "std_gal": spreads["gal"][m.key].value,
                      "n_baseline": len(t.groups[0]), "n_gal": len(t.groups[1])},
                keys=[base.key, gal.key, t.key, p.key], protocol=protocol, distance=dist,
                ttest_undefined=t.text if math.isnan(t.value) else ""))
        return out

    @staticmethod
    def _notes(study: Study, closest_of: dict[str, str], h_shown: set[str]) -> list[str]:
        notes = [
            "protocol: ours = conf/task/regression.yaml (features and target standardised, 200 epochs, Adam lr 1e-3, "
            "batch 32/32/256, eps 0.01); every other row changes what its name says (run variant; params.yaml "
            "protocol_grids); n = baseline+GAL runs (seeds); mean over seeds (std in the CSV)",
            "distance: root mean square over MAE, MSE and R² of (our baseline mean - the paper's baseline mean) / the "
            "paper's std, computed from the baseline means shown (each in provenance.json) and paper.yaml; the "
            "smallest is the protocol closest to the paper's baseline (- where the paper gives no mean or std): "
            + ", ".join(f"{g}: {p}" for g, p in closest_of.items()),
            "t, p: Student's two-sample t-test as Table V's (t = baseline minus GAL, equal variances, two-sided); "
            "GAL-only rows are tested against our protocol's baseline runs",
            "accepted: the fraction of steps whose adjusted gradient the safeguard (Alg. 1 line 7) kept, in the last "
            "epoch, mean over seeds"
            + ("; h's movement: " + ", ".join(f"{H_COLUMNS[c]} = last epoch's {c}" for c in sorted(h_shown))
               if h_shown else "; h's movement is not in these runs' histories (not logged by the task that made "
               "them), so only acceptance is shown"),
            "what this rests on: the grid in params.yaml, one choice at a time around ours plus targeted points, not a "
            "full product of the choices; it does not rule out a protocol outside the grid, a wider output of the "
            "paper's regression model, or other values lost from the paper's text. Findings describe the method as "
            "published, measured under these protocols"]
        if study.left_out:
            notes.append("no study runs for " + ", ".join(study.left_out) + " (params.yaml protocols.datasets)")
        return notes


@dataclass(frozen=True)
class ProtocolCurves:
    """Test MAE per epoch of baseline and GAL under our protocol and under the one closest to the paper's
    baselines (one column per dataset), and the safeguard's acceptance per epoch under every protocol."""

    name: str = "Protocol curves"
    slug: str = "protocol_curves"
    kind: str = "figure"
    column: str = "test_mae"

    def render(self, ctx: Context) -> Rendered:
        study = gather(self.name, ctx)
        nums = Numbers(self.name)
        panels: dict[str, dict[str, Protocol]] = {}
        rows: list[list[str]] = []
        for ds, protocols in study.protocols.items():
            group = TABLE.groups[ds]
            paper = paper_baseline(group)
            dist = {p.name: distance({m.key: stats.compute("mean", [[r.latest(m.source) for r in p.runs["baseline"]]])
                                      for m in TABLE.metrics}, paper) for p in protocols if p.own_baseline}
            best = closest(dist) or OURS
            shown = {OURS: protocols[0], **{p.name: p for p in protocols if p.name == best}}
            panels[group] = shown
            for name, p in shown.items():
                for method, runs in p.runs.items():
                    label = TABLE.methods[method]
                    mean = nums.add([group, name, label, self.column], "mean", self.column, [runs])
                    rows.append([group, name + (" (closest)" if name == best else ""), label, str(len(runs)),
                                 mean.text])
            for p in protocols:
                acc = nums.add([group, p.name, "GAL", ACCEPTED], "mean", ACCEPTED, [p.runs["gal"]], 3)
                rows.append([group, p.name, "GAL: accepted (last epoch)", str(len(p.runs["gal"])), acc.text])
        files = [f"figures/{self.slug}.png", f"figures/{self.slug}.pdf"]
        self._plot(study, panels, [ctx.out / f for f in files])
        layout = Layout(columns=["Dataset", "Protocol", "Curve", "n", "final value (mean over seeds)"], rows=rows)
        md = (f"![{self.name}: test MAE per epoch under our protocol and the closest to the paper's baselines]"
              f"({files[0]})\n\n[{self.name} as PDF]({files[1]}). Where each curve ends:\n\n" + markdown(layout))
        baselines = {g.dir: b.dir for ps in study.protocols.values() for p in ps if p.own_baseline
                     for b, g in zip(p.runs["baseline"], p.runs["gal"])}
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=study.profile, numbers=nums.items,
                        markdown=md, files=files, baselines=baselines)

    def _plot(self, study: Study, panels: dict[str, dict[str, Protocol]], files) -> None:
        plt = over_seeds.pyplot()
        n = len(panels)
        fig, axes = plt.subplots(2, n, figsize=(max(4.6 * n, 6.4), 8.0), squeeze=False, layout="constrained")
        # one style per protocol name across the datasets (past 10 the colours repeat: the line style does not)
        names = list(dict.fromkeys(p.name for ps in study.protocols.values() for p in ps))
        styles = {name: {"color": f"C{i % 10}", "ls": ("-", "--", ":")[i // 10 % 3]} for i, name in enumerate(names)}
        for col, (group, shown) in enumerate(panels.items()):
            ax = axes[0, col]
            ends = []
            for style, (name, p) in zip(("-", "--"), shown.items()):
                for method, runs in p.runs.items():
                    epochs, mean, std = over_seeds.curve(runs, self.column)
                    over_seeds.band(ax, epochs, mean, std, ls=style, color=over_seeds.COLORS[method],
                             label=f"{TABLE.methods[method]}, {name}")
                    ends.append(mean[-1])
            for method, ls in (("Baseline", ":"), ("GAL", "-.")):
                value = lookup(f"{TABLE.name}/{group}/{method}/MAE/mean")
                if value is not None:
                    ax.axhline(value, ls=ls, lw=1, color="k", label=f"paper's {method} ({value:g})")
                    ends.append(value)
            # the first epochs of an unscaled target start orders of magnitude higher: keep the ends readable
            ax.set(title=f"{group}: test MAE", xlabel="epoch", ylabel="test MAE", ylim=(0, 2 * max(ends)))
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            ax = axes[1, col]
            for p in study.protocols[next(ds for ds, g in TABLE.groups.items() if g == group)]:
                epochs, mean, std = over_seeds.curve(p.runs["gal"], ACCEPTED)
                over_seeds.band(ax, epochs, mean, std, label=p.name, lw=1.2, **styles[p.name])
            ax.set(title=f"{group}: safeguard acceptance (GAL)", xlabel="epoch", ylabel="fraction accepted",
                   ylim=(-0.03, 1.03))
            ax.grid(alpha=0.3)
        # the protocols' legend once, under the acceptance row: per panel it covered the curves
        entries = {label: handle for ax in axes[1] for handle, label in zip(*ax.get_legend_handles_labels())}
        if entries:
            fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncol=min(4, len(entries)),
                       fontsize=7, title="GAL under protocol", title_fontsize=7, frameon=False)
        fig.suptitle(f"Protocol study (profile {study.profile}): ours solid, closest to the paper's\n"
                     f"baselines dashed; mean ± std over seeds", fontsize=10)
        over_seeds.save(fig, files)


SPEC = ProtocolStudy()
FIGURE = ProtocolCurves()
