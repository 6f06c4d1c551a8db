"""Precision study: at each paper setting, does float32 resolve GAL's remainder?

One row per record of the `precision` stage (runs/precision/<setting>/, pipelines/precision.py): GAL's step on
random outputs of the setting's shape and scale, in float32 and float64 on the same outputs and h. Shown: how
often float32's sign of R = L(z - δ) - L + first (the sign that orients h's gradient) and its safeguard decision
agree with float64's, how often float32's trial loss ties with its loss, and the median |R| in float32 spacings
of L. A setting whose median is below one spacing *trains h on rounding*. ``rounding_note`` is the sentence
Fig. 6 shows beside its remainder curve."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.report.model import Context, Layout, Number, Rendered
from pipelines.report.records import MissingRuns, RunRecord, check_one_profile
from pipelines.report.render import markdown

TASK = "precision"
STAGE = "precision"
# setting -> its label, in the order the paper's tables go (a record of another setting follows these)
LABELS = {"cifar10_sgd": "CIFAR-10, SGD", "cifar10_lookahead": "CIFAR-10, Lookahead",
          "cifar10_adabound": "CIFAR-10, AdaBound", "cifar100_sgd": "CIFAR-100, SGD",
          "cifar100_lookahead": "CIFAR-100, Lookahead", "cifar100_adabound": "CIFAR-100, AdaBound",
          "imagenet_resnet50": "ImageNet, ResNet-50", "imagenet_efficientnet_b2": "ImageNet, EfficientNet-B2",
          "coco_detr_r50": "COCO, DETR-R50", "coco_detr_r101": "COCO, DETR-R101", "boston": "Boston",
          "diabetes": "Diabetes", "california": "California"}
# metrics.json key, column header, how to show it
COLUMNS = (("median_loss", "median L", lambda v: f"{v:.3g}"),
           ("median_remainder", "median |R| (float64)", lambda v: f"{v:.2e}"),
           ("median_remainder_ulps", "median |R| / float32 spacing of L", lambda v: f"{v:.3g}"),
           ("sign_agreement", "sign of R: float32 = float64", lambda v: f"{100 * v:.0f}%"),
           ("decision_agreement", "safeguard: float32 = float64", lambda v: f"{100 * v:.0f}%"),
           ("tie_fraction_float32", "float32 ties (L_tent = L)", lambda v: f"{100 * v:.0f}%"))


def label(run: RunRecord) -> str:
    return LABELS.get(str(run.get("setting")), str(run.get("setting")))


def ordered(runs: list[RunRecord]) -> list[RunRecord]:
    """``runs`` in the paper's order of settings (LABELS), others after them by name."""
    order = list(LABELS)
    return sorted(runs, key=lambda r: (order.index(s) if (s := str(r.get("setting"))) in order else len(order), s))


def precision_runs(ctx: Context, name: str) -> tuple[list[RunRecord], str]:
    """The study's records in the table's order and their profile; MissingRuns when there are none."""
    runs = ordered(ctx.runs(TASK))
    if not runs:
        raise MissingRuns(name, f"the precision study's records under {ctx.task_dir(TASK)}/ (one per paper setting)",
                          f"no runs under {ctx.task_dir(TASK)}", f"dvc repro {STAGE}")
    return runs, check_one_profile(name, runs, ctx.profile)


def rounding_note(ctx: Context, settings: list[str]) -> str:
    """What the precision study says about ``settings`` (e.g. the ImageNet ones Fig. 6 plots), in one paragraph."""
    runs = ordered([r for r in ctx.runs(TASK) if str(r.get("setting")) in settings])
    if not runs:
        return ("Whether float32 resolves this remainder at all is what the precision study measures; its records "
                f"are missing (make them with `dvc repro {STAGE}`).")
    parts, rounding = [], []
    for run in runs:
        m = run.metric  # a missing or non-finite metric is refused in one line, never printed as nan
        parts.append(f"{label(run)}: median |R| {m('median_remainder'):.1e} = {m('median_remainder_ulps'):.2g} "
                     f"float32 spacings of L, float32's sign of R agrees with float64's in "
                     f"{100 * m('sign_agreement'):.0f}% of {int(m('draws'))} draws, its trial loss ties with L in "
                     f"{100 * m('tie_fraction_float32'):.0f}%")
        if m("rounding"):
            rounding.append(label(run))
    verdict = (f"At {'; '.join(rounding)} the remainder is below float32's resolution at the loss: the "
               "remainder curve of a float32 run there is rounding (where L_tent ties with L, only the first-order "
               "term is left of R), h's gradient takes its sign from that rounding rather than from R, and the "
               "safeguard's L_tent <= L accepts on the tie" if rounding else
               "float32 resolves the remainder at these settings")
    return (f"Precision study (profile {runs[0].profile}, random outputs of these settings' shape and scale; table "
            f"\"Precision study\"): {'; '.join(parts)}. {verdict}. `method.compute_dtype=float64` runs GAL's "
            "arithmetic in float64.")


def claims_note(ctx: Context) -> str | None:
    """One sentence for the claims table's notes: where float32 trains h on rounding; None without records."""
    runs = ordered(ctx.runs(TASK))
    if not runs:
        return None
    rounding = [r for r in runs if r.metric("rounding")]
    resolved = [r for r in runs if not r.metric("rounding")]

    def span(rs: list[RunRecord], key: str, percent: bool = False) -> str:  # "a-b" over settings, or "a"
        show = (lambda v: f"{100 * v:.0f}") if percent else (lambda v: f"{v:.2g}")
        low, high = (show(f(r.metric(key) for r in rs)) for f in (min, max))
        return low if low == high else f"{low}-{high}"
    text = f"Precision study (profile {runs[0].profile}; random outputs of each setting's shape and scale): "
    if rounding:
        text += (f"at {'; '.join(label(r) for r in rounding)} GAL's remainder is below float32's resolution at the "
                 f"loss (median |R| {span(rounding, 'median_remainder_ulps')} float32 spacings of L; float32's sign "
                 f"of R agrees with float64's in {span(rounding, 'sign_agreement', True)}% of draws, its trial loss "
                 f"ties with L in {span(rounding, 'tie_fraction_float32', True)}%), so h is trained on rounding there, "
                 "the safeguard accepts on ties, and Fig. 6's remainder curve is rounding")
    else:
        text += "float32 resolves GAL's remainder at every setting studied"
    if rounding and resolved:
        text += (f"; at the other {len(resolved)} settings float32 resolves it (sign agreement "
                 f"{span(resolved, 'sign_agreement', True)}%)")
    return text + "."


@dataclass(frozen=True)
class PrecisionTable:
    name: str = "Precision study"
    slug: str = "precision"
    kind: str = "table"

    def render(self, ctx: Context) -> Rendered:
        runs, profile = precision_runs(ctx, self.name)
        numbers: list[Number] = []
        rows: list[list[str]] = []
        for run in runs:
            gal = run.flat
            row = [label(run), f"{gal['output.rows']} x {gal['output.dim']}",
                   f"{gal['gal.lr'] * gal['gal.scale']:.3g}", f"{gal['gal.ratio']:g}"]
            for metric, _, show in COLUMNS:
                value = run.metric(metric)
                numbers.append(Number(
                    key=f"{self.name}/{label(run)}/{metric}", value=value, text=show(value), op="value",
                    metric=metric, groups=[[run]],
                    aggregation=f"{metric} of the one precision-study run ({int(run.metric('draws'))} draws)",
                    fields={"setting": label(run), "metric": metric, "stat": "value"}))
                row.append(numbers[-1].text)
            row += ["rounding" if run.metric("rounding") else "resolved", str(int(run.metric("draws")))]
            rows.append(row)
        rounding = [label(r) for r in runs if r.metric("rounding")]
        notes = [
            "Each row: GAL's step (the setting's preset: lr, eps, s, h, batch, loss) on random outputs of the shape "
            "and scale its runs produce (pipelines/conf/task/precision.yaml: logits at chance, mid- and "
            "late-training cross entropy; DETR's matched boxes at three noise levels; regression predictions at "
            "three residual sizes), once with float32 arithmetic (the authors') and once with float64, same "
            "outputs and h. lr is the schedule's base lr, its largest after warm-up; R shrinks with the step.",
            "R = L(z - δ) - L + first orients h's gradient by its sign; float32 resolves it only where |R| exceeds "
            "float32's spacing at L (about 5e-7 at L = 5). A tie L_tent = L in float32 makes R the first-order "
            "term alone and the safeguard accept.",
            ("Median |R| below one float32 spacing of L (float32 cannot represent R in most steps, so h is "
             f"trained on rounding): {'; '.join(rounding)}." if rounding else
             "Every setting's median |R| is above one float32 spacing of L."),
            "Random outputs stand in for a trained network's: the study does not rule out that real outputs of a "
            "setting are larger or smaller than drawn here.",
        ]
        layout = Layout(columns=["Setting", "output (rows x d)", "lr s", "eps",
                                 *(header for _, header, _ in COLUMNS), "verdict", "draws"],
                        rows=rows, caption="Precision study: float32 against float64 on GAL's remainder at each "
                                           "paper setting", notes=notes)
        note = claims_note(ctx)
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=markdown(layout), layout=layout, claims_notes=[note] if note else [])


SPEC = PrecisionTable()
