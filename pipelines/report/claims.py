"""The claims table: every "GAL better than baseline" claim of the paper, with the paper's numbers, ours,
and a verdict: reproduced (same direction, p < 0.05), direction only (same direction, not significant),
not reproduced (GAL not better in our runs). The ablations' claims ("A beats B", Ablation: Tables VI, VIII,
Fig. 8a) get the same verdicts, decided by divergence where runs diverged, and "too few runs" where a side
has fewer than the 2 runs a t-test needs. A Table V claim re-checked under another regression protocol (the
protocol study's closest to the paper's baselines: UnderProtocol) is shown beside the claim's own row, with its
own verdict, by the same rule: reproduced only if GAL is better there with p < 0.05.

Each claim also says how many runs it needs (Need, from power.py): the runs per arm the paper's difference needs
at the paper's own std (else our measured one), the smallest difference our runs can detect, and whether the
claim's own numbers can support it (SUPPORT_RULE). A claim's ``paper`` and ``ours`` dicts carry, besides baseline,
gal, t and p, each arm's std (``std_baseline``, ``std_gal``; None or nan where absent) and ``ours`` each arm's runs
(``n_baseline``, ``n_gal``): the specs pass them through; ``paper_side`` reads the paper's from paper.yaml."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from pipelines.report import power
from pipelines.report.model import Claim, Layout
from pipelines.report.paper import lookup
from pipelines.report.render import NONE, UNDEFINED_NOTE, csv_value, fmt, fmt_g, fmt_p, rows_csv

VERDICTS = ("reproduced", "direction only", "not reproduced", "too few runs")
# The most runs per arm a paper that states no count is granted (Tables I-III print mean ± std alone): twice the
# 5 per arm that Table V's t and p imply, the only count the paper lets one infer. Generous on purpose: a claim
# that needs more is flagged whatever the paper's real count was.
PLAUSIBLE_RUNS = 10
SUPPORT_RULE = (
    f"supported by its own numbers: yes when the runs per arm the paper's difference needs (at the std named, "
    f"alpha {power.ALPHA:g}, power {power.POWER:g}) are no more than the paper can have used: the runs per arm of "
    f"its own t-test where it prints t and p (inferred from them: Table V's 5), else {PLAUSIBLE_RUNS} (the paper "
    f"states no count; twice Table V's, generous on purpose). Over that, it cannot be supported by its own numbers: "
    f"even if the difference is real, that many runs would show it significant less than {power.POWER:.0%} of the "
    f"time, so the paper's result owes more to luck than to its runs. A std of 0 (every run alike) leaves the "
    f"t-test undefined: no number of runs supports the claim then either. With our std (the paper gives none) the "
    f"verdict is an estimate. -: no difference (the paper prints no number for the claim) or no std")


@dataclass
class Ablation(Claim):
    """'<better> beats <other>' in an ablation, e.g. normalised noise beats unnormalised. As in Claim, ``paper``
    and ``ours`` hold the other's value under "baseline" and the claimed-better one's under "gal" (nan where
    a side has no final value); the texts are shown instead of the bare values.

    A side whose runs diverged (some or all) loses to one with fewer diverged runs: that decides the
    direction, and no t-test is made. Otherwise the means decide the direction and Student's t-test its
    significance, as for every claim; with fewer than 2 finished runs on a side the verdict is "too few runs"."""

    statement: str = ""                               # the claim, e.g. "normalised noise beats unnormalised"
    names: tuple[str, str] = ("", "")                 # (other, better) as shown
    paper_text: tuple[str, str] = ("-", "-")
    ours_text: tuple[str, str] = ("-", "-")
    diverged: tuple[float, float] = (0.0, 0.0)        # fraction of each side's runs that diverged
    diverged_at: tuple[str, str] = ("", "")           # 'epoch 3' / 'epochs 3, 4' where a side diverged
    runs: tuple[int, int] = (0, 0)                    # finished runs per side

    @property
    def decided_by_divergence(self) -> bool:
        return any(self.diverged)

    @property
    def too_few(self) -> bool:
        return not self.decided_by_divergence and min(self.runs) < 2

    @property
    def direction_reproduced(self) -> bool:
        if self.decided_by_divergence:
            return self.diverged[1] < self.diverged[0]
        return super().direction_reproduced

    @property
    def significant(self) -> bool:
        return not self.decided_by_divergence and not self.too_few and super().significant

    @property
    def verdict(self) -> str:
        if self.decided_by_divergence:
            return "reproduced" if self.direction_reproduced else "not reproduced"
        return "too few runs" if self.too_few else super().verdict

    @property
    def why(self) -> str:
        """Why there is no t-test behind the verdict ('' when there is one)."""
        if self.decided_by_divergence:
            sides = [f"{name} diverged ({where})" for name, where in zip(self.names, self.diverged_at) if where]
            return "decided by divergence: " + " and ".join(sides)
        if self.too_few:
            return f"{self.runs[0]} vs {self.runs[1]} finished runs; a t-test needs at least 2 each"
        return ""


@dataclass
class UnderProtocol(Claim):
    """A claim ("GAL better on <subject>, <metric>") checked under another protocol than the claim's own table:
    the regression protocol whose baseline comes closest to the paper's (specs/protocol.py). Shown beside the
    row of the claim with the same table, subject and metric; same verdict rule."""

    protocol: str = ""                                # the protocol's name (run variant, or "ours")
    distance: float = math.nan                        # how far its baseline is from the paper's (specs/protocol.py)


def paper_side(table: str, group: str, methods: tuple[str, str], metric: str, better: str) -> dict | None:
    """The paper's numbers of the claim 'GAL better on <group>, <metric>' (paper.yaml under ``table``/``group``/
    <method>/``metric``, ``methods`` = (baseline, GAL) as paper.yaml names them): baseline, gal, t, p, std_baseline,
    std_gal (None where the paper gives none); None where it makes no such claim (a mean missing, GAL not better)."""
    base, gal = (lookup(f"{table}/{group}/{m}/{metric}") or {} for m in methods)
    if base.get("mean") is None or gal.get("mean") is None:
        return None
    if not (gal["mean"] < base["mean"] if better == "lower" else gal["mean"] > base["mean"]):
        return None  # the paper does not claim GAL is better here
    ttest = lookup(f"{table}/{group}/t-test/{metric}") or {}
    return {"baseline": base["mean"], "gal": gal["mean"], "t": ttest.get("t"), "p": ttest.get("p"),
            "std_baseline": base.get("std"), "std_gal": gal.get("std")}


def _number(value) -> float | None:
    """A float, or None for what is no number (None, nan)."""
    return None if value is None or math.isnan(float(value)) else float(value)


@dataclass(frozen=True)
class Need:
    """What a claim's numbers let Student's t-test detect (power.py, at power.ALPHA and power.POWER)."""

    difference: float | None          # the paper's GAL minus baseline (ablation: claimed better minus other)
    std: float | None                 # the std it is judged against
    source: str                       # where the std comes from: "paper std", "paper t", "our std" or "-"
    needed: int | None                # runs per arm that difference needs (None: no difference or no std or std 0)
    paper_runs: int | None            # runs per arm of the paper's own t-test (from its t and p), where it gives one
    ours: tuple[int, int]             # our runs per arm (baseline, GAL)
    detectable: float | None          # the smallest difference our runs detect with that std

    @property
    def supported(self) -> bool | None:
        """SUPPORT_RULE; None where it cannot be applied (no difference, no std)."""
        if self.difference is None or self.std is None:
            return None
        return self.needed is not None and self.needed <= (self.paper_runs or PLAUSIBLE_RUNS)

    @property
    def support_text(self) -> str:
        if self.supported is None:
            return NONE
        limit = (f"its t-test had {self.paper_runs}" if self.paper_runs else
                 f"the paper states no count ({PLAUSIBLE_RUNS} granted)")
        if self.difference == 0:
            return "cannot be supported by its own numbers: the paper's two sides are equal"
        if self.needed is None:
            return f"cannot be supported by its own numbers: {self.source} 0 (every run alike), so no t-test"
        if self.supported:
            return f"yes: needs {self.needed} runs per arm; {limit}"
        return f"cannot be supported by its own numbers: needs {self.needed} runs per arm; {limit}"

    @property
    def our_runs(self) -> str:
        """'5', or '5/4' (baseline/GAL) where the arms differ."""
        return str(self.ours[0]) if self.ours[0] == self.ours[1] else f"{self.ours[0]}/{self.ours[1]}"


def need(claim: Claim) -> Need:
    """The claim's Need: its std from the paper's two arms (pooled), else from the paper's t at the runs its t and p
    imply, else from our runs (pooled); our runs per arm from ``ours`` (an Ablation's: its finished runs)."""
    paper, ours = claim.paper, claim.ours
    base, gal = _number(paper.get("baseline")), _number(paper.get("gal"))
    difference = None if base is None or gal is None else round(gal - base, 12)  # 0.48, not 0.4799999999999969
    paper_runs = power.runs_from_t(paper.get("t"), paper.get("p"))
    runs = tuple(int(n) if n is not None and math.isfinite(n) else 0
                 for n in (ours.get("n_baseline"), ours.get("n_gal")))
    std, source = power.pooled_std((_number(paper.get("std_baseline")), _number(paper.get("std_gal")))), "paper std"
    if std is None and paper_runs and difference is not None:  # t = difference / (std * sqrt(2 / n))
        std, source = abs(difference) / abs(paper["t"]) / math.sqrt(paper_runs / 2), "paper t"
    if std is None:
        std, source = power.pooled_std((_number(ours.get("std_baseline")), _number(ours.get("std_gal"))), runs), \
            "our std"
    if std is None:
        source = NONE
    return Need(difference=difference, std=std, source=source,
                needed=None if difference is None or std is None else power.runs_needed(difference, std),
                paper_runs=paper_runs, ours=runs,
                detectable=None if std is None else power.detectable(runs, std))


def runs_needed_for(table, group: str) -> int | None:
    """The most runs per arm any claim of ``table`` (a baseline-vs-GAL table spec: comparison.ComparisonTable)
    on ``group`` (a value of its group_key, e.g. "cifar10_sgd") needs, from paper.yaml alone (the paper's std,
    else its t and p); None where no such claim has one. What the preflight sizes a configuration's seeds by."""
    name = table.groups[group]
    needs = []
    for metric in table.metrics:
        paper = paper_side(table.name, name, tuple(table.methods.values()), metric.key, metric.better)
        if paper is not None:
            needs.append(need(Claim(table.name, name, metric.title, metric.better, paper, {}, [])).needed)
    return max((n for n in needs if n is not None), default=None)


class Ours(Claim):
    """A test of this project's own study ("Beyond the paper"), not a claim of the paper: "<arm> better than the
    baseline on <subject>, <metric>". The paper side is empty, ``ours["p"]`` is Holm-adjusted within the study's
    family of tests, and the verdict says better or not, never "reproduced". Left out of the paper's counts."""

    @property
    def verdict(self) -> str:
        if not self.direction_reproduced:
            return "ours: not better"
        return "ours: better" if self.significant else "ours: better, not significant"


def _split(claims: list[Claim]) -> tuple[list[Claim], dict[tuple[str, str, str], UnderProtocol]]:
    """(the claims, their re-checks under another protocol by (table, subject, metric)). A re-check whose own
    claim is absent (its table not rendered) stands alone: a row with no verdict under our protocol."""
    main = [c for c in claims if not isinstance(c, UnderProtocol)]
    other = {(c.table, c.subject, c.metric): c for c in claims if isinstance(c, UnderProtocol)}
    have = {(c.table, c.subject, c.metric) for c in main}
    main += [_NotRendered(c.table, c.subject, c.metric, c.better, c.paper, dict.fromkeys(c.ours, math.nan), [])
             for key, c in other.items() if key not in have]
    return main, other


class _NotRendered(Claim):
    """The claim's own table was not rendered (its runs are missing): no runs to judge it by."""

    @property
    def verdict(self) -> str:
        return "too few runs"


def _ttest(values: dict, undefined: str = "") -> str:
    """" (t 5.02, p 1.02e-03)"; where the test is undefined, why (``undefined``), or nothing (no test made)."""
    t = values.get("t")
    if t is None or math.isnan(t):
        return f" ({undefined})" if t is not None and undefined else ""
    return f" (t {fmt(t, 2)}, p {fmt_p(values['p'])})"


def _side(values: dict, digits: int = 4, undefined: str = "") -> str:
    return f"{fmt(values['baseline'], digits)} → {fmt(values['gal'], digits)}" + _ttest(values, undefined)


def _ablation_side(claim: Ablation, texts: tuple[str, str], values: dict, undefined: str = "") -> str:
    return f"{claim.names[0]}: {texts[0]} → {claim.names[1]}: {texts[1]}" + _ttest(values, undefined)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _significance(claim: Claim) -> str:
    if isinstance(claim, Ablation) and claim.why:
        return f"n/a: {claim.why}"
    if not claim.significant:
        return "no"
    return "yes" if claim.direction_reproduced else "yes (GAL significantly worse)"


def _row(c: Claim) -> list[str]:
    if isinstance(c, Ours):
        return [f"{c.table} (ours, not the paper's): {c.subject} better than the baseline, {c.metric} ({c.better})",
                "-", _side(c.ours, undefined=c.ttest_undefined), _yes(c.direction_reproduced), _significance(c),
                c.verdict]
    if isinstance(c, Ablation):
        return [f"{c.table}: {c.statement}, {c.metric} ({c.better})", _ablation_side(c, c.paper_text, c.paper),
                _ablation_side(c, c.ours_text, c.ours, c.ttest_undefined), _yes(c.direction_reproduced),
                _significance(c), c.verdict]
    return [f"{c.table}: GAL better on {c.subject}, {c.metric} ({c.better})", _side(c.paper),
            _side(c.ours, undefined=c.ttest_undefined), _yes(c.direction_reproduced), _significance(c), c.verdict]


def _under(claim: Claim, other: dict[tuple[str, str, str], UnderProtocol]) -> list[str]:
    """The two cells of a claim's re-check under the closest protocol: its numbers and its verdict."""
    c = other.get((claim.table, claim.subject, claim.metric))
    if c is None:
        return ["-", "-"]
    return [f"{c.protocol} (distance {fmt(c.distance, 2)}): {_side(c.ours, undefined=c.ttest_undefined)}", c.verdict]


def _detects(n: Need) -> str:
    return f"{fmt_g(n.detectable)} ({n.our_runs} per arm)"


def _power(claim: Claim, other: dict[tuple[str, str, str], UnderProtocol]) -> list[str]:
    """The claim's three power cells: the paper's difference and std and the runs per arm they need, the smallest
    difference our runs detect (and the closest protocol's runs, where shown), whether its numbers support it."""
    n = need(claim)
    needs = NONE if n.difference is None and n.std is None else (
        f"{fmt_g(n.difference)}, std {fmt_g(n.std)} ({n.source}) → {n.needed or NONE}")
    detects = _detects(n)
    under = other.get((claim.table, claim.subject, claim.metric))
    if under is not None:
        detects += f"; closest protocol: {_detects(need(under))}"
    return [needs, detects, n.support_text]


POWER_COLUMNS = ["Paper's difference, std → runs per arm needed", "Smallest difference ours detect",
                 "Supported by its own numbers?"]
POWER_NOTE = (f"runs per arm needed: the fewest runs per arm at which Student's t-test (two-sided, equal variances, "
              f"as above) finds the paper's difference (GAL minus baseline; ablations: claimed better minus other) "
              f"with probability {power.POWER:g} at alpha {power.ALPHA:g}, from the noncentral t distribution "
              f"(pipelines/report/power.py), for runs spread with the std named: paper std = the pooled std of the "
              f"paper's two arms; paper t = the std its t implies at the runs its t and p imply; our std = the pooled "
              f"std of our runs, where the paper gives neither; - where none exists. Smallest difference ours detect: "
              f"with that std and the runs each arm of ours has (baseline/GAL where they differ), at the same alpha "
              f"and power: a smaller true difference is more likely missed than found. - for a difference: the paper "
              f"prints no number; for runs needed or detectable: no std, a std of 0, or fewer than 3 runs in all")


def _cells(claim: Claim, other: dict[tuple[str, str, str], UnderProtocol], with_other: bool) -> list[str]:
    """A claim's row: the claim and both sides' numbers, the power cells (before the verdict they qualify), the
    verdict's cells, and the re-check's where the table shows re-checks."""
    row = _row(claim)
    return row[:3] + _power(claim, other) + row[3:] + (_under(claim, other) if with_other else [])


def layout(claims: list[Claim], extra_notes: list[str] = ()) -> Layout:
    """The claims table; ``extra_notes`` are the rendered specs' notes on what the claims rest on (e.g. the
    precision study's)."""
    claims, other = _split(claims)
    rows = [_cells(c, other, bool(other)) for c in claims]
    ours = [c for c in claims if isinstance(c, Ours)]
    counts = Counter(c.verdict for c in claims if not isinstance(c, Ours))
    summary = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if v in VERDICTS[:3] or counts[v])
    if other:
        counts = Counter(c.verdict for c in other.values())
        summary += ("; under the regression protocol closest to the paper's baselines: "
                    + ", ".join(f"{counts[v]} {v}" for v in VERDICTS[:3]))
    notes = ["means over runs; t = baseline minus GAL, two-sided p of Student's t-test (equal variances)",
             "reproduced: GAL better in our means and p < 0.05; direction only: better but not significant; "
             "not reproduced: GAL not better in our means"]
    if any(c.ttest_undefined for c in [*claims, *other.values()]):
        notes.append(UNDEFINED_NOTE)
    if any(isinstance(c, _NotRendered) for c in claims):
        notes.append("- → -: the claim's own table is not rendered (its runs are missing), so ours has no numbers; "
                     "only its re-check under another protocol is shown")
    if any(isinstance(c, Ablation) for c in claims):
        notes.append("ablation claims (\"A beats B\"): \"other → claimed better\", each side's final error over "
                     "seeds, t = other minus claimed better; a side whose runs diverged loses to one with fewer "
                     "diverged runs (no t-test then); too few runs: a side has fewer than 2 finished runs")
    if other:
        notes.append("closest protocol: each Table V claim again under the regression protocol whose baseline comes "
                     "closest to the paper's (Protocol study: its distance, in the paper's standard deviations), so a "
                     "verdict that depends on our stronger or weaker baseline shows; Table V's own columns are under "
                     "our protocol. Both are measurements of the method as published under the protocols run; they "
                     "do not rule out a protocol outside the study's grid or values lost from the paper's text")
    if ours:
        notes.append("(ours, not the paper's): tests of this project's own study (Beyond the paper), left out of the "
                     "counts above: p there is Holm-adjusted within the study's test bed; better: lower error with "
                     "that p < 0.05")
    notes += [POWER_NOTE, SUPPORT_RULE]
    notes += extra_notes
    return Layout(
        columns=["Paper's claim", "Paper: baseline → GAL", "Ours: baseline → GAL", *POWER_COLUMNS,
                 "Direction reproduced?", f"Significant (p < {claims[0].alpha if claims else 0.05:g})?", "Verdict",
                 *(["Closest protocol to the paper's baselines: baseline → GAL", "Verdict there"] if other else [])],
        rows=rows,
        caption=f"Claims: {len(claims) - len(ours)} checked; {summary}"
                + (f"; and {len(ours)} tests of our own study" if ours else "") + ".",
        notes=notes)


def _under_csv(claim: Claim, other: dict[tuple[str, str, str], UnderProtocol]) -> list:
    c = other.get((claim.table, claim.subject, claim.metric))
    if c is None:
        return [""] * 8
    return [c.protocol, csv_value(c.distance), *(csv_value(c.ours[k]) for k in ("baseline", "gal", "t", "p")),
            c.verdict, "; ".join(c.keys)]


def _cell(value) -> str:
    """A CSV cell: None and nan empty."""
    return "" if value is None else csv_value(value)


def _power_csv(claim: Claim, other: dict[tuple[str, str, str], UnderProtocol]) -> list:
    n = need(claim)
    under = other.get((claim.table, claim.subject, claim.metric))
    closest = need(under) if under is not None else None
    return [_cell(n.difference), _cell(n.std), n.source, _cell(n.needed), _cell(n.paper_runs), n.our_runs,
            _cell(n.detectable), _cell(n.supported), n.support_text if n.supported is not None else "",
            closest.our_runs if closest else "", _cell(closest.detectable) if closest else ""]


def to_csv(claims: list[Claim]) -> str:
    """claims.csv: one row per claim. Columns are only ever appended (findings.py reads published copies made
    before the latest ones)."""
    claims, other = _split(claims)
    columns = ["table", "subject", "metric", "better", "paper_baseline", "paper_gal", "paper_t", "paper_p",
               "ours_baseline", "ours_gal", "ours_t", "ours_p", "direction_reproduced", "significant", "verdict",
               "provenance_keys", "claim", "why", "closest_protocol", "closest_distance", "closest_baseline",
               "closest_gal", "closest_t", "closest_p", "closest_verdict", "closest_provenance_keys",
               # how many runs the claim needs (power.py; the table's notes)
               "claimed_difference", "std_used", "std_source", "runs_needed_per_arm", "paper_runs_per_arm",
               "our_runs_per_arm", "detectable_difference", "supported_by_own_numbers", "support_why",
               "closest_our_runs_per_arm", "closest_detectable_difference"]
    rows = [[c.table, c.subject, c.metric, c.better,
             *("" if c.paper.get(k) is None else c.paper[k] for k in ("baseline", "gal", "t", "p")),
             *(csv_value(c.ours[k]) for k in ("baseline", "gal", "t", "p")),
             c.direction_reproduced, c.significant, c.verdict, "; ".join(c.keys), _row(c)[0],
             getattr(c, "why", ""), *_under_csv(c, other), *_power_csv(c, other)] for c in claims]
    return rows_csv(columns, rows)
