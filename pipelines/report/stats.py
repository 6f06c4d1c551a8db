"""The aggregations a rendered number can be: each op maps groups of per-run values to one number.

The report computes every number through ``compute`` and records the op in provenance; the audit calls
``compute`` again on the values MLflow holds, so both sides share one definition.

- mean: arithmetic mean over the runs (seeds) of one group.
- std: *sample* standard deviation, ddof=1 (numpy.std(..., ddof=1)): the unbiased-variance estimate,
  as a table of "mean ± std over runs" is usually read; needs at least 2 runs.
- n: number of runs.
- t, p: Student's two-sample t-test with equal variances (scipy.stats.ttest_ind(a, b, equal_var=True)),
  two-sided p, where a is the baseline group and b the GAL group; so t > 0 means the baseline's mean is
  larger (for MAE/MSE: GAL is better), as in the paper's Table V.
- p_holm: Holm's step-down adjustment of one t-test's p within its family: groups (a1, b1, a2, b2, ...) are the
  family's pairs, the pair adjusted first; a pair whose test is undefined counts as p = 1 in the others'.
- ratio: mean of the second group over mean of the first (GAL's mean over the baseline's, Table VII).
- value: the single run's value as is (figures' per-run numbers).

A run's value is its final one, or (``at_best_epoch``) one history column at the epoch where another is best,
as the authors' scripts report a run: the report and the audit share that rule too.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np
from scipy import stats as _scipy_stats

Groups = Sequence[Sequence[float]]


def _ttest(groups: Groups) -> tuple[float, float]:
    baseline, gal = (np.asarray(g, dtype=float) for g in groups)
    with warnings.catch_warnings():  # zero variance in both groups: scipy warns and returns nan (tables say why)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = _scipy_stats.ttest_ind(baseline, gal, equal_var=True)
    return float(result.statistic), float(result.pvalue)


def _holm(groups: Groups) -> float:
    if len(groups) < 2 or len(groups) % 2:
        raise ValueError(f"'p_holm' takes the family's pairs of groups, the adjusted pair first; got {len(groups)}")
    ps = [_ttest(groups[i:i + 2])[1] for i in range(0, len(groups), 2)]
    if math.isnan(ps[0]):
        return math.nan
    ps = [1.0 if math.isnan(p) else p for p in ps]
    adjusted, running = {}, 0.0
    for rank, i in enumerate(sorted(range(len(ps)), key=lambda i: ps[i])):  # ascending, ties in family order
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted[0]


def _one(groups: Groups) -> np.ndarray:
    if len(groups) != 1:
        raise ValueError(f"expected one group of values, got {len(groups)}")
    return np.asarray(groups[0], dtype=float)


def _ratio(groups: Groups) -> float:
    if len(groups) != 2:
        raise ValueError(f"'ratio' takes two groups (baseline, GAL), got {len(groups)}")
    baseline, gal = (float(np.mean(np.asarray(g, dtype=float))) for g in groups)
    return gal / baseline if baseline != 0 else math.nan


def _single(groups: Groups) -> float:
    values = _one(groups)
    if values.size != 1:
        raise ValueError(f"'value' takes exactly one run, got {values.size}")
    return float(values[0])


OPS: dict[str, Callable[[Groups], float]] = {
    "mean": lambda g: float(np.mean(_one(g))),
    "std": lambda g: float(np.std(_one(g), ddof=1)) if _one(g).size > 1 else math.nan,
    "n": lambda g: float(_one(g).size),
    "t": lambda g: _ttest(g)[0],
    "p": lambda g: _ttest(g)[1],
    "p_holm": _holm,
    "ratio": _ratio,
    "value": _single,
}

DESCRIBE = {
    "mean": "mean over {n} runs of {metric}",
    "std": "sample std (ddof=1) over {n} runs of {metric}",
    "n": "number of runs with {metric}",
    "t": "Student's t (ttest_ind, equal variances), baseline minus GAL, {n} vs {m} runs of {metric}",
    "p": "two-sided p of Student's t-test (ttest_ind, equal variances), {n} vs {m} runs of {metric}",
    "p_holm": "Holm-adjusted two-sided p of Student's t-test, {n} vs {m} runs of {metric}, in a family of {k} tests",
    "ratio": "mean of {metric} over {m} GAL runs divided by its mean over {n} baseline runs",
    "value": "{metric} of the one run",
}


def compute(op: str, groups: Groups) -> float:
    """The number ``op`` makes of ``groups`` (lists of per-run values); ValueError for an unknown op."""
    if op not in OPS:
        raise ValueError(f"unknown aggregation {op!r}; known: {', '.join(OPS)}")
    return OPS[op](groups)


def describe(op: str, metric: str, groups: Groups, unit: str = "runs") -> str:
    """A sentence saying how the number was made, e.g. 'mean over 5 runs of test_mae'."""
    sizes = [len(g) for g in groups] + [0, 0]
    return DESCRIBE[op].format(n=sizes[0], m=sizes[1], k=len(groups) // 2, metric=metric).replace("runs", unit)


def same(a: float, b: float) -> bool:
    """Equal up to float round-off (nan equals nan): what the audit accepts as 'the same number'."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def at_best_epoch(best_epoch: dict, histories: dict[str, dict[float, float]]) -> float:
    """A run's value at its best epoch: ``best_epoch`` = {"by": the column that picks the epoch, "better":
    "lower" or "higher", "column": the column read there, "complement": 100 minus it}; ``histories``: column ->
    {epoch: value}. Ties go to the earliest epoch."""
    chooser = histories[best_epoch["by"]]
    pick = min if best_epoch["better"] == "lower" else max
    epoch = pick(sorted(chooser), key=chooser.get)
    value = histories[best_epoch["column"]][epoch]
    return 100 - value if best_epoch["complement"] else value
