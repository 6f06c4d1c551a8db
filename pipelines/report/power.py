"""How many runs a claim needs: the power of Student's two-sample t-test (equal variances, two-sided), the test
every claim of the claims table is judged by (stats.py's ``t``, ``p``).

The one place this is computed: the claims table (claims.py) and the preflight's cost estimate use it. Pure
functions of the numbers, no runs read:

- ``runs_needed(difference, std)``: the fewest runs per arm (equal arms) that detect ``difference`` with
  probability ``power`` at level ``alpha``;
- ``detectable(runs, std)``: the smallest difference ``runs`` per arm detect with that probability, its inverse;
- ``runs_from_t(t, p)``: the runs per arm a reported t-test had, from its t and p.

Power comes from the noncentral t distribution (exact for normal runs), not the normal approximation, which
undercounts by a run or two at the few runs per arm these claims rest on. A difference of 0 or a std of 0 has
no answer (None): no number of runs detects no difference, and with no spread the t-test itself is undefined.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import optimize
from scipy import stats

ALPHA = 0.05   # the claims table's significance level
POWER = 0.8    # the usual target: a real difference of this size is found 4 times in 5


def _pair(runs: int | tuple[int, int]) -> tuple[int, int]:
    return (runs, runs) if isinstance(runs, int) else (int(runs[0]), int(runs[1]))


def _power_nc(noncentrality: float, df: int, alpha: float) -> float:
    """P(|T| > the two-sided critical t) for T noncentral t with ``df`` degrees of freedom."""
    crit = stats.t.ppf(1 - alpha / 2, df)
    wrong_side = stats.nct.cdf(-crit, df, noncentrality)  # a significant t of the wrong sign: tiny but counted
    # scipy's nct gives nan for some tails far below 1e-9 (df 1-3, noncentrality near 14.5): that is 0 here
    return float(stats.nct.sf(crit, df, noncentrality) + (0.0 if math.isnan(wrong_side) else wrong_side))


def power(difference: float, std: float, runs: int | tuple[int, int], alpha: float = ALPHA) -> float:
    """The probability that the t-test of ``runs`` per arm (n, or (n1, n2)) finds a true ``difference`` between
    means at level ``alpha``, for runs spread with ``std``; nan where it is undefined (std 0, fewer than 3 runs)."""
    n1, n2 = _pair(runs)
    if n1 + n2 < 3 or min(n1, n2) < 1 or not std > 0:
        return math.nan
    return _power_nc(abs(difference) / (std * math.sqrt(1 / n1 + 1 / n2)), n1 + n2 - 2, alpha)


def runs_needed(difference: float, std: float, alpha: float = ALPHA, target: float = POWER) -> int | None:
    """The fewest runs per arm (both arms alike, at least 2) whose t-test detects ``difference`` with probability
    ``target`` at level ``alpha``; None for no difference or no spread (see the module's docstring)."""
    if not (math.isfinite(difference) and math.isfinite(std)) or difference == 0 or std <= 0:
        return None
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(target)
    n = max(2, math.ceil(2 * (z * std / difference) ** 2))  # the normal approximation: where to start counting
    while n > 2 and power(difference, std, n - 1, alpha) >= target:
        n -= 1
    while power(difference, std, n, alpha) < target:
        n += 1
    return n


def detectable(runs: int | tuple[int, int], std: float, alpha: float = ALPHA, target: float = POWER) -> float | None:
    """The smallest difference between means that ``runs`` per arm (n, or (n1, n2)) detect with probability
    ``target`` at level ``alpha``, for runs spread with ``std``; None with fewer than 3 runs in all (no t-test)
    or no spread."""
    n1, n2 = _pair(runs)
    if n1 + n2 < 3 or min(n1, n2) < 1 or not (math.isfinite(std) and std > 0):
        return None
    df = n1 + n2 - 2
    high = stats.t.ppf(1 - alpha / 2, df) + stats.norm.ppf(target) + 1
    while _power_nc(high, df, alpha) < target:  # few degrees of freedom: a wide bracket
        high *= 2
    noncentrality = optimize.brentq(lambda nc: _power_nc(nc, df, alpha) - target, 0, high, xtol=1e-12)
    return noncentrality * std * math.sqrt(1 / n1 + 1 / n2)


def runs_from_t(t: float | None, p: float | None, most: int = 1000) -> int | None:
    """The runs per arm (equal arms) of a reported two-sided t-test: the n whose 2n - 2 degrees of freedom give
    ``t`` the reported ``p``, within 10% (t and p are printed rounded); None where no n does or either is missing."""
    if t is None or p is None or not (math.isfinite(t) and math.isfinite(p)) or t == 0 or p <= 0:
        return None
    runs = np.arange(2, most + 1)
    with np.errstate(divide="ignore"):  # a p that underflows to 0 at some n is just far off
        off = np.abs(np.log(2 * stats.t.sf(abs(t), 2 * runs - 2) / p))  # every n at once: one scipy call
    best = int(np.argmin(off))
    return int(runs[best]) if off[best] < math.log(1.1) else None


def pooled_std(stds: tuple[float | None, float | None], runs: tuple[int, int] | None = None) -> float | None:
    """The two arms' pooled std, as the equal-variance t-test pools it: weighted by each arm's runs - 1 where
    ``runs`` are known (an arm of one run adds nothing), equal weights where not (the paper's arms); None where
    neither arm has a std."""
    weights = (1, 1) if runs is None else (runs[0] - 1, runs[1] - 1)
    parts = [(w, s) for w, s in zip(weights, stds) if w > 0 and s is not None and math.isfinite(s)]
    if not parts:
        return None
    return math.sqrt(sum(w * s * s for w, s in parts) / sum(w for w, _ in parts))
