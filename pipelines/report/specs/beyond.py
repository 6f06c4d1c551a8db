"""Beyond the paper (ours, not the paper's): can GAL's adjuster learn where the published one cannot?

At output width 1 the published proposal (Eq. 4, per row eps * ||g|| * h / ||h||) is sign(h) * eps * |g|: h gets
no gradient and GAL is a fixed rescaling (Table V at d = 1). gal_core's two variants change exactly that:
``batch`` normalises over the whole batch, so the proposal's direction in batch space is learnable; ``bounded``
scales each row by tanh(||h||), so it is differentiable in h's output. The stages ``beyond_regression`` and
``beyond_digits`` (params.yaml: beyond, beyond_arms) run four arms per test bed (baseline, the published GAL and
the two variants, the same seeds each), every run with ``study=beyond`` so none joins another table's cells.

A test bed is the runs that share their config apart from the method (selection.config_of without method.*):
Table V's sets under our protocol and under the protocol study's closest (named as the protocol study names it,
by the baseline's run variant), Digits' MLP and CNN (d = 10), and the 3-D toy per optimiser (d = 2, one point;
pipelines/toy3d.py). Per bed and arm: the final error (regression: test MAE; Digits: test error, %; the toy: the
mean z over its path, lower being a faster descent, as every arm ends in the same minimum) as mean ± std over seeds, Student's t-test against the baseline and against the
published GAL with Holm's correction over the bed's five comparisons, and in the last epoch h's gradient norm, h's
relative movement and the safeguard's acceptance. The figure shows each arm's error relative to its bed's
baseline and h's movement."""
from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass

from pipelines.report import over_seeds, stats
from pipelines.report.claims import Ours
from pipelines.report.model import Context, Layout, Number, Rendered
from pipelines.report.records import MissingRuns, ReportError, RunRecord, check_one_profile
from pipelines.report.render import fmt_g, markdown, pm_numbers, ttest_text
from pipelines.report.selection import check_same_config, check_same_data, config_of

STUDY = "beyond"
TASKS = {"regression": ("test_mae", "test MAE"), "digits": ("test_error", "test error (%)"),
         "toy3d_beyond": ("path_mean_z", "mean z over the path")}
DATASETS = {"boston": "Boston", "diabetes": "Diabetes", "california": "California"}
MODELS = {"digits_mlp": "MLP", "digits_cnn": "CNN"}
# (method.name, method.proposal) -> the arm's label; the order of the table's rows and the figure's bars
ARMS = {("baseline", None): "Baseline", ("gal", "row"): "GAL, published (row)", ("gal", "batch"): "GAL, batch",
        ("gal", "bounded"): "GAL, bounded"}
BASELINE, PUBLISHED = ("baseline", None), ("gal", "row")
H_COLUMNS = {"adjuster_grad_norm": "‖∇h‖", "adjuster_move_rel": "‖Δh‖/‖h‖", "accepted": "accepted"}
ALPHA = 0.05
STAGES = {"regression": "beyond_regression beyond_closest", "digits": "beyond_digits",
          "toy3d_beyond": "beyond_toy3d"}


@dataclass
class Bed:
    label: str                                    # e.g. "Boston, our protocol", "Digits, CNN"
    task: str
    arms: dict[tuple, list[RunRecord]]            # arm -> runs by seed


def _arm(run: RunRecord) -> tuple:
    method = str(run.flat.get("method.name"))
    return (method, None) if method == "baseline" else (method, str(run.flat.get("method.proposal", "row")))


def _label(task: str, runs: list[RunRecord]) -> str:
    first = runs[0]
    if task == "toy3d_beyond":
        return f"3-D toy, {first.flat.get('run.label')}"
    if task == "digits":
        return f"Digits, {MODELS.get(str(first.flat.get('model.name')), first.flat.get('model.name'))}"
    name = DATASETS.get(str(first.flat.get("data.name")), str(first.flat.get("data.name")))
    baseline = next((r for r in runs if _arm(r) == BASELINE), None)
    protocol = baseline.variant.removeprefix(STUDY).strip("-") if baseline is not None else ""
    return f"{name}, {'our protocol' if not protocol else f'protocol {protocol}'}"


def gather(name: str, ctx: Context) -> tuple[list[Bed], str]:
    """The study's test beds with their arms' runs (sorted by seed), and the runs' profile. MissingRuns when the
    study has no runs, or a bed lacks an arm or a seed another arm has."""
    beds: list[Bed] = []
    missing: list[str] = []
    for task in TASKS:
        grouped: dict[str, list[RunRecord]] = {}
        for run in ctx.runs(task):
            if run.flat.get("study") == STUDY:
                bed = {k: v for k, v in config_of(run).items() if not k.startswith("method.")}
                grouped.setdefault(json.dumps(bed, sort_keys=True, default=str), []).append(run)
        for runs in grouped.values():
            arms: dict[tuple, dict] = {arm: {} for arm in ARMS}
            for run in runs:
                arm, seed = _arm(run), run.get(over_seeds.SEED_KEY)
                if arm not in arms:
                    raise ReportError(f"{name}: {run.dir} is a {STUDY} run of no known arm ({arm}); arms: "
                                      + ", ".join(ARMS.values()))
                if seed in arms[arm]:
                    raise ReportError(f"{name}: two runs for {ARMS[arm]} seed={seed}: {arms[arm][seed].dir} and "
                                      f"{run.dir}; remove one")
                arms[arm][seed] = run
            label = _label(task, runs)
            seeds = sorted({s for cell in arms.values() for s in cell})
            lacking = [f"{label}/{ARMS[a]} seed={','.join(map(str, absent))}" for a, cell in arms.items()
                       if (absent := [s for s in seeds if s not in cell])]
            missing += [f"{item} (`dvc repro {STAGES[task]}`)" for item in lacking]
            if not lacking:
                beds.append(Bed(label, task, {a: [cell[s] for s in seeds] for a, cell in arms.items()}))
    if not beds and not missing:
        raise MissingRuns(name, f"runs with study={STUDY} under {' and '.join(ctx.task_dir(t) for t in TASKS)}",
                          f"no {STUDY} runs", "dvc repro " + " ".join(STAGES.values()))
    if missing:
        raise MissingRuns(name, "every arm of a test bed on the same seeds, at least 2",
                          "missing runs: " + "; ".join(missing), "dvc repro " + " ".join(STAGES.values()))
    few = [b.label for b in beds if len(b.arms[BASELINE]) < 2]
    if few:
        raise MissingRuns(name, "at least 2 seeds per arm (a std and a t-test)", f"{', '.join(few)}: 1 seed",
                          "dvc repro " + " ".join(STAGES.values()))
    runs = [r for b in beds for cell in b.arms.values() for r in cell]
    for b in beds:
        for cell in b.arms.values():
            check_same_config(name, cell)
            check_same_data(name, cell)
    order = {label: i for i, label in enumerate(DATASETS.values())}
    beds.sort(key=lambda b: (list(TASKS).index(b.task), order.get(b.label.split(",")[0], 9), b.label))
    return beds, check_one_profile(name, runs, ctx.profile)


def comparisons(bed: Bed) -> list[tuple[tuple, tuple]]:
    """The bed's family of tests, (reference arm, arm): each GAL arm against the baseline, each variant against
    the published GAL."""
    gal = [a for a in ARMS if a != BASELINE]
    return [(BASELINE, a) for a in gal] + [(PUBLISHED, a) for a in gal if a != PUBLISHED]


@dataclass
class Result:
    """What one bed came to: Numbers by (arm, column, op), and by (reference, arm, op) for the tests."""

    bed: Bed
    finals: dict[tuple, Number]
    tests: dict[tuple, Number]


def measure(name: str, bed: Bed) -> Result:
    column, _ = TASKS[bed.task]
    finals: dict[tuple, Number] = {}
    for arm, runs in bed.arms.items():
        for col in (column, *(H_COLUMNS if arm != BASELINE else ())):
            for op, number in over_seeds.final_numbers(name, [bed.label, ARMS[arm]], col, runs, digits=4).items():
                if col != column:
                    number.text = fmt_g(number.value, 3)
                finals[(arm, col, op)] = number
    family = comparisons(bed)
    values = {arm: [r.latest(column) for r in runs] for arm, runs in bed.arms.items()}
    tests: dict[tuple, Number] = {}
    for ref, arm in family:
        pairs = [(ref, arm)] + [pair for pair in family if pair != (ref, arm)]
        groups = [bed.arms[a] for pair in pairs for a in pair]
        numbers = [[r.latest(column) for r in g] for g in groups]
        for op in ("t", "p", "p_holm"):
            used = groups[:2] if op != "p_holm" else groups
            value = stats.compute(op, numbers[:2] if op != "p_holm" else numbers)
            text = ttest_text("t" if op == "t" else "p", value, [values[ref], values[arm]])
            tests[(ref, arm, op)] = Number(
                key="/".join([name, bed.label, f"{ARMS[arm]} vs {ARMS[ref]}", column, op]), value=value, text=text,
                op=op, metric=column, groups=used,
                aggregation=stats.describe(op, f"final {column}", used, unit="seeds").replace(
                    "baseline minus GAL", f"{ARMS[ref]} minus {ARMS[arm]}"),
                fields={"setting": bed.label, "method": ARMS[arm], "versus": ARMS[ref], "metric": column, "stat": op})
    return Result(bed, finals, tests)


def _test_cell(result: Result, ref: tuple, arm: tuple) -> str:
    t, p, holm = (result.tests[(ref, arm, op)] for op in ("t", "p", "p_holm"))
    if math.isnan(t.value):
        return t.text
    return f"t {t.text}, p {p.text}, Holm {holm.text}"


def verdict(result: Result, arm: tuple) -> str:
    """'better' / 'worse' than the baseline with Holm p < ALPHA, else 'no difference shown'."""
    holm = result.tests[(BASELINE, arm, "p_holm")]
    t = result.tests[(BASELINE, arm, "t")]
    if math.isnan(holm.value) or holm.value >= ALPHA:
        return "no difference shown"
    return "better" if t.value > 0 else "worse"


@dataclass(frozen=True)
class BeyondTable:
    name: str = "Beyond the paper"
    slug: str = "beyond_the_paper"
    kind: str = "table"

    def render(self, ctx: Context) -> Rendered:
        beds, profile = gather(self.name, ctx)
        results = [measure(self.name, bed) for bed in beds]
        rows, numbers = [], []
        for result in results:
            column, title = TASKS[result.bed.task]
            numbers += [*result.finals.values(), *result.tests.values()]
            for arm in ARMS:
                f = result.finals
                rows.append([
                    result.bed.label, ARMS[arm], str(len(result.bed.arms[arm])),
                    f"{title}: {pm_numbers(f[(arm, column, 'mean')], f[(arm, column, 'std')])}",
                    "-" if arm == BASELINE else _test_cell(result, BASELINE, arm),
                    "-" if arm in (BASELINE, PUBLISHED) else _test_cell(result, PUBLISHED, arm),
                    *("-" if arm == BASELINE else pm_numbers(f[(arm, c, "mean")], f[(arm, c, "std")])
                      for c in H_COLUMNS)])
        layout = Layout(
            columns=["Test bed", "Arm", "n (seeds)", "Final error (mean ± std)", "vs baseline", "vs published GAL",
                     *(f"{h} (last epoch)" for h in H_COLUMNS.values())],
            rows=rows, caption=f"{self.name} (ours): can the adjuster learn where the published one cannot?",
            notes=[f"profile {profile}; ours, not the paper's: the paper has no such study",
                   "t = reference minus arm (positive: the arm's error is lower), two-sided p of Student's t-test "
                   "(equal variances); Holm: p adjusted by Holm's step-down method over the bed's five tests (three "
                   "GAL arms against the baseline, two variants against the published GAL)",
                   "‖∇h‖: epoch mean of the norm of h's gradient per step; ‖Δh‖/‖h‖: how far h's weights moved in the "
                   "last epoch over their norm; accepted: fraction of the last epoch's steps the safeguard accepted; "
                   "the 3-D toy (one run of a few hundred steps, no epochs): the same over the whole run, and its "
                   "\"batch\" equals \"row\" (one point is one row)",
                   summary(results)])
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=markdown(layout), layout=layout, claims=[c for r in results for c in claims(r)])


def claims(result: Result) -> list[Ours]:
    """Each GAL arm against the baseline on the bed's error, as a row of the claims table marked as ours (p:
    Holm's)."""
    column, title = TASKS[result.bed.task]
    out = []
    for arm in [a for a in ARMS if a != BASELINE]:
        sides = {side: {op: result.finals[(a, column, op)] for op in ("mean", "std")}
                 for side, a in (("baseline", BASELINE), ("gal", arm))}
        t, holm = result.tests[(BASELINE, arm, "t")], result.tests[(BASELINE, arm, "p_holm")]
        out.append(Ours(
            table="Beyond the paper", subject=f"{result.bed.label}: {ARMS[arm]}", metric=title, better="lower",
            paper={"baseline": None, "gal": None, "t": None, "p": None},
            ours={"baseline": sides["baseline"]["mean"].value, "gal": sides["gal"]["mean"].value, "t": t.value,
                  "p": holm.value, "n_baseline": len(result.bed.arms[BASELINE]), "n_gal": len(result.bed.arms[arm]),
                  **{f"std_{side}": numbers["std"].value for side, numbers in sides.items()}},
            keys=[sides["baseline"]["mean"].key, sides["gal"]["mean"].key, t.key, holm.key],
            ttest_undefined=t.text if math.isnan(t.value) else ""))
    return out


def summary(results: list[Result]) -> str:
    """The study's verdict in one paragraph, from its numbers."""
    parts = []
    for arm in [a for a in ARMS if a != BASELINE]:
        better = [r.bed.label for r in results if verdict(r, arm) == "better"]
        worse = [r.bed.label for r in results if verdict(r, arm) == "worse"]
        moved = sorted(((r.finals[(arm, "adjuster_move_rel", "mean")], r.bed.label) for r in results),
                       key=lambda pair: pair[0].value)
        low, high = moved[0], moved[-1]
        parts.append(f"{ARMS[arm]}: better than the baseline (Holm p < {ALPHA:g}) on "
                     f"{'; '.join(better) if better else 'no test bed'}, worse on {'; '.join(worse) if worse else 'none'}"
                     f"; h moved by {low[0].text} ({low[1]}) to {high[0].text} ({high[1]}) of its norm in the last "
                     "epoch")
    return "Verdict: " + ". ".join(parts) + "."


@dataclass(frozen=True)
class BeyondFigure:
    name: str = "Beyond the paper (figure)"
    slug: str = "beyond_the_paper"
    kind: str = "figure"

    def render(self, ctx: Context) -> Rendered:
        beds, profile = gather(self.name, ctx)
        results = [measure(self.name, bed) for bed in beds]
        files = [f"figures/{self.slug}.png", f"figures/{self.slug}.pdf"]
        numbers = [n for r in results for (arm, col, op), n in r.finals.items()
                   if col in (TASKS[r.bed.task][0], "adjuster_move_rel") and op in ("mean", "std")]
        self._plot(results, profile, [ctx.out / f for f in files])
        md = (f"![{self.name}: each arm's final error relative to its test bed's baseline, and h's movement]"
              f"({files[0]})\n\n[{self.name} as PDF]({files[1]}). Left: each arm's error less its bed's baseline "
              "mean, over that mean's size (mean ± std over seeds; below 0 is better). Right: how far h's weights "
              "moved in the last epoch (the toy: the run), over their norm (log scale; the published GAL at d = 1 "
              "moves by rounding only).")
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=md, files=files)

    def _plot(self, results: list[Result], profile: str, files) -> None:
        plt = over_seeds.pyplot()
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.75 * len(results) + 2.5), layout="constrained")
        fig.get_layout_engine().set(w_pad=0.3)  # the panels' edge tick labels clear of each other
        colors = ("#7f7f7f", "#1f77b4", "#2ca02c", "#ff7f0e")
        height = 0.8 / len(ARMS)
        for i, arm in enumerate(ARMS):
            ys = [k + (i - (len(ARMS) - 1) / 2) * height for k in range(len(results))]
            ratio, spread, move = [], [], []
            for r in results:
                column = TASKS[r.bed.task][0]
                base = r.finals[(BASELINE, column, "mean")].value
                mean, std = (r.finals[(arm, column, op)].value for op in ("mean", "std"))
                ratio.append((mean - base) / abs(base) if base else math.nan)
                spread.append(std / abs(base) if base else math.nan)
                move.append(r.finals[(arm, "adjuster_move_rel", "mean")].value if arm != BASELINE else math.nan)
            left.errorbar(ratio, ys, xerr=spread, fmt="o", color=colors[i], capsize=3, label=ARMS[arm])
            if arm != BASELINE:
                right.barh(ys, [max(m, 1e-12) for m in move], height, color=colors[i])
        labels = [textwrap.fill(r.bed.label, 28) for r in results]  # long protocol names on several lines
        for ax in (left, right):
            ax.set_yticks(range(len(results)), labels if ax is left else [""] * len(results))
            ax.invert_yaxis()
            ax.grid(alpha=0.3, axis="x")
        left.axvline(0, color="black", lw=0.8)
        left.set(xlabel="error's change from the baseline's mean,\nrelative (± std; below 0 is better)")
        right.set(xscale="log", xlim=(1e-13, None), xlabel="h's movement over its norm,\nlast epoch (floor 1e-12)")
        fig.legend(loc="outside lower center", ncols=len(ARMS), fontsize=8)
        fig.suptitle(f"Beyond the paper (ours): error and h's movement per arm, mean over seeds "
                     f"(profile {profile})", fontsize=10)
        over_seeds.save(fig, files)


SPEC = BeyondTable()
FIGURE = BeyondFigure()
