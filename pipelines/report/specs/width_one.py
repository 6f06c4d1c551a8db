"""Beside Table V: what GAL can do at output width 1, with the regression runs' own numbers.

With d = 1 a row of the adjustment is a / ||a|| * eps * ||g|| = sign(a) * eps * |g|: the direction of h's output
has zero derivative, so the remainder sends h no gradient (float rounding only; tests/gal_core/test_width_one.py
proves it for every policy and remainder) and h does not learn. Shown per dataset, for the GAL runs of Table V
(last epoch, mean ± std over seeds): the norm of h's gradient (epoch mean of gal_core's adjuster_grad_norm), how
far h's weights moved in that epoch (norm of the change over the norm of the weights), the safeguard's acceptance
and the remainder in float32 spacings of L. Where GAL runs of a wider output exist (CIFAR-10, d = 10), their row
shows the same numbers for contrast."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.report import over_seeds
from pipelines.report.model import Context, Layout, Number, Rendered
from pipelines.report.records import MissingRuns, RunRecord
from pipelines.report.render import NONE, markdown, pm_numbers
from pipelines.report.selection import Setting, select

DATASETS = {"boston": "Boston", "diabetes": "Diabetes", "california": "California"}
CONTRAST = Setting("CIFAR-10, SGD (d = 10)", {"experiment": "cifar10_sgd"}, "EfficientNet-B1", stage="train_cifar",
                   task="classification")
# history.csv column (last epoch), its header, digits in scientific notation
COLUMNS = (("adjuster_grad_norm", "h's gradient norm", 2), ("adjuster_move_rel", "h's relative movement", 2),
           ("accepted", "accepted", 3), ("remainder_ulps", "|R| / float32 spacing of L", 2))


def _show(value: float, digits: int) -> str:
    if math.isnan(value):  # the std of one run
        return NONE
    return f"{value:.{digits}e}" if value and not 1e-2 <= abs(value) < 1e3 else f"{value:.{digits}g}"


def _require_columns(name: str, runs: list[RunRecord], stage: str) -> None:
    """Runs recorded before h's statistics were logged are missing runs for this table, not an error."""
    columns = [c for c, _, _ in COLUMNS]
    old = [r.dir for r in runs if not set(columns) <= set(r.columns)]
    if old:
        raise MissingRuns(name, f"GAL runs whose history.csv has {', '.join(columns)}",
                          f"{len(old)} GAL run(s) predate h's statistics (e.g. {old[0]})", f"dvc repro {stage}")


@dataclass(frozen=True)
class WidthOneTable:
    name: str = "Table V at d = 1"
    slug: str = "table5_width_one"
    kind: str = "table"

    def render(self, ctx: Context) -> Rendered:
        settings = [Setting(label, {"data.name": ds}, stage="train_regression") for ds, label in DATASETS.items()]
        cells, profile = select(self.name, ctx, "regression", settings, ("gal",))
        _require_columns(self.name, [r for s in settings for r in cells[(s.label, "gal")]], "train_regression")
        shown = list(settings)
        try:  # the contrast row is optional, and may come from another profile (image stages stay smoke-sized)
            contrast, contrast_profile = select(self.name, ctx, "classification", [CONTRAST], ("gal",))
            _require_columns(self.name, contrast[(CONTRAST.label, "gal")], CONTRAST.stage)
            cells.update(contrast)
            shown.append(CONTRAST)
        except MissingRuns:
            contrast_profile = profile
        numbers: list[Number] = []
        rows: list[list[str]] = []
        means: dict[tuple[str, str], float] = {}
        for s in shown:
            runs = cells[(s.label, "gal")]
            row = [s.label if s is not CONTRAST or contrast_profile == profile
                   else f"{s.label}, profile {contrast_profile}", str(len(runs))]
            for column, _, digits in COLUMNS:
                nums = over_seeds.final_numbers(self.name, [s.label, "GAL"], column, runs, digits=12)
                numbers += nums.values()
                means[(s.label, column)] = nums["mean"].value
                for op, num in nums.items():
                    num.text = _show(num.value, digits)
                row.append(pm_numbers(nums["mean"], nums["std"]))
            rows.append(row)
        layout = Layout(columns=["Runs", "n (seeds)", *(f"{h} (last epoch)" for _, h, _ in COLUMNS)], rows=rows,
                        caption="h's gradient and movement at output width 1 (regression, GAL runs of Table V)",
                        notes=[self._statement(settings, shown, means)])
        return Rendered(name=self.name, slug=self.slug, kind=self.kind, profile=profile, numbers=numbers,
                        markdown=markdown(layout), layout=layout)

    @staticmethod
    def _statement(settings: list[Setting], shown: list[Setting], means: dict) -> str:
        grads = ", ".join(f"{s.label} {_show(means[(s.label, 'adjuster_grad_norm')], 2)}" for s in settings)
        moves = ", ".join(f"{s.label} {_show(means[(s.label, 'adjuster_move_rel')], 2)}" for s in settings)
        accepted = ", ".join(f"{s.label} {means[(s.label, 'accepted')]:.3g}" for s in settings)
        text = ("At output width 1 a row of GAL's adjustment is sign(a) * eps * |g|: the direction of h's output has "
                "zero derivative, so the remainder sends h no gradient beyond float rounding, for every policy and "
                "remainder (tests/gal_core/test_width_one.py). Measured in the last epoch of our GAL runs (mean "
                f"over seeds): h's gradient norm {grads}; h's weights moved by {moves} of their norm; the safeguard "
                f"accepted the adjusted gradient in a fraction {accepted} of steps.")
        if CONTRAST in shown:
            text += (f" For contrast, at d = 10 ({CONTRAST.label}): gradient norm "
                     f"{_show(means[(CONTRAST.label, 'adjuster_grad_norm')], 2)}, movement "
                     f"{_show(means[(CONTRAST.label, 'adjuster_move_rel')], 2)}.")
        return text + (" GAL on a 1-output regression therefore rescales each sample's gradient by (1 ± eps), with "
                       "a sign set by h's initial weights (a random affine function of the prediction: the authors' h "
                       "has no activation; they move only by the rounding-level gradients above), when the safeguard "
                       "accepts. This does not rule out that the paper's regression model had a wider output, or "
                       "other settings lost from its text.")


SPEC = WidthOneTable()
