"""power.py: the runs per arm a two-sample t-test needs, the smallest difference given runs, and their
undefined cases, checked against textbook values and against the noncentral t directly."""
from __future__ import annotations

import math

import pytest
from scipy import stats

from pipelines.report import power


def by_hand(d: float, n1: int, n2: int, alpha: float = 0.05) -> float:
    """The two-sided equal-variance t-test's power at standardised difference ``d``, straight from scipy."""
    df, nc = n1 + n2 - 2, d / math.sqrt(1 / n1 + 1 / n2)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)


@pytest.mark.parametrize("d, n", [(1.0, 17), (0.5, 64), (0.2, 394), (0.8, 26)])
def test_textbook_sample_sizes(d, n):
    """Cohen's tables (and G*Power) at alpha .05, power .8, two-sided: more than the normal approximation's."""
    assert power.runs_needed(d, 1.0) == n
    assert power.runs_needed(-d, 1.0) == n                  # the sign of the difference does not matter
    assert power.runs_needed(3 * d, 3.0) == n               # only difference / std does
    normal = 2 * ((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / d) ** 2
    assert n > normal                                       # the t-test pays for estimating the std


@pytest.mark.parametrize("d", [0.3, 0.84, 1.7, 3.18, 5.0, 16.0])
def test_runs_needed_is_the_first_n_that_reaches_the_power(d):
    n = power.runs_needed(d, 1.0)
    assert n >= 2 and by_hand(d, n, n) >= 0.8
    assert n == 2 or by_hand(d, n - 1, n - 1) < 0.8


def test_monotone():
    diffs = [0.1, 0.2, 0.5, 1, 2, 4]
    needed = [power.runs_needed(d, 1.0) for d in diffs]
    assert needed == sorted(needed, reverse=True) and needed[0] > needed[-1]
    assert [power.runs_needed(1.0, s) for s in (0.5, 1, 2)] == sorted(power.runs_needed(1.0, s) for s in (0.5, 1, 2))
    detectable = [power.detectable(n, 1.0) for n in (2, 3, 5, 10, 30)]
    assert detectable == sorted(detectable, reverse=True)


@pytest.mark.parametrize("d", [0.25, 0.5, 1.0, 2.5])
def test_detectable_inverts_runs_needed(d):
    n = power.runs_needed(2 * d, 2.0)                      # a difference of 2d at std 2
    assert n > 2
    assert power.detectable(n, 2.0) <= 2 * d < power.detectable(n - 1, 2.0)
    assert by_hand(power.detectable(n, 2.0) / 2.0, n, n) == pytest.approx(0.8, abs=1e-9)


def test_unequal_arms():
    found = power.detectable((4, 6), 3.0)
    assert by_hand(found / 3.0, 4, 6) == pytest.approx(0.8, abs=1e-9)
    assert power.detectable((5, 5), 3.0) < found < power.detectable((4, 4), 3.0)
    assert power.detectable((1, 2), 1.0) > 0                 # 3 runs in all: one degree of freedom, a wide answer


def test_no_difference_no_spread_or_no_degree_of_freedom_is_none_never_nan():
    assert power.runs_needed(0.0, 1.0) is None               # no number of runs detects no difference
    assert power.runs_needed(1.0, 0.0) is None               # no spread: the t-test is undefined
    assert power.runs_needed(math.nan, 1.0) is None and power.runs_needed(1.0, math.nan) is None
    assert power.detectable(5, 0.0) is None
    assert power.detectable(1, 1.0) is None and power.detectable((0, 2), 1.0) is None  # fewer than 3 runs
    assert math.isnan(power.power(1.0, 0.0, 5))


def test_runs_from_t_reads_the_papers_table5_tests():
    """Table V's t and p (paper.yaml) imply 5 runs per arm: the 8 degrees of freedom that turn t into p."""
    for t, p in [(5.02, 1.02e-03), (12.13, 1.97e-06), (-5.78, 4.14e-04)]:
        assert power.runs_from_t(t, p) == 5
    assert power.runs_from_t(5.02, 0.5) is None              # no n gives that p for that t
    assert power.runs_from_t(None, 1e-3) is None and power.runs_from_t(5.0, None) is None


def test_pooled_std():
    assert power.pooled_std((0.3, 0.4)) == pytest.approx(math.sqrt((0.09 + 0.16) / 2))
    assert power.pooled_std((0.3, 0.4), (3, 5)) == pytest.approx(math.sqrt((2 * 0.09 + 4 * 0.16) / 6))
    assert power.pooled_std((math.nan, 0.4), (1, 3)) == pytest.approx(0.4)  # one run: no std, no weight
    assert power.pooled_std((None, None)) is None and power.pooled_std((math.nan, math.nan), (1, 1)) is None
