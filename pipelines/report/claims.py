"""The claims table: every "GAL better than baseline" claim of the paper, with the paper's numbers, ours,
and a verdict: reproduced (same direction, p < 0.05), direction only (same direction, not significant),
not reproduced (GAL not better in our runs). The ablations' claims ("A beats B", Ablation: Tables VI, VIII,
Fig. 8a) get the same verdicts, decided by divergence where runs diverged, and "too few runs" where a side
has fewer than the 2 runs a t-test needs. A Table V claim re-checked under another regression protocol (the
protocol study's closest to the paper's baselines: UnderProtocol) is shown beside the claim's own row, with its
own verdict, by the same rule: reproduced only if GAL is better there with p < 0.05."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from pipelines.report.model import Claim, Layout
from pipelines.report.render import UNDEFINED_NOTE, csv_value, fmt, fmt_p, rows_csv

VERDICTS = ("reproduced", "direction only", "not reproduced", "too few runs")


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


def layout(claims: list[Claim], extra_notes: list[str] = ()) -> Layout:
    """The claims table; ``extra_notes`` are the rendered specs' notes on what the claims rest on (e.g. the
    precision study's)."""
    claims, other = _split(claims)
    rows = [_row(c) + (_under(c, other) if other else []) for c in claims]
    counts = Counter(c.verdict for c in claims)
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
    notes += extra_notes
    return Layout(
        columns=["Paper's claim", "Paper: baseline → GAL", "Ours: baseline → GAL", "Direction reproduced?",
                 f"Significant (p < {claims[0].alpha if claims else 0.05:g})?", "Verdict",
                 *(["Closest protocol to the paper's baselines: baseline → GAL", "Verdict there"] if other else [])],
        rows=rows,
        caption=f"Claims: {len(claims)} checked; {summary}.",
        notes=notes)


def _under_csv(claim: Claim, other: dict[tuple[str, str, str], UnderProtocol]) -> list:
    c = other.get((claim.table, claim.subject, claim.metric))
    if c is None:
        return [""] * 8
    return [c.protocol, csv_value(c.distance), *(csv_value(c.ours[k]) for k in ("baseline", "gal", "t", "p")),
            c.verdict, "; ".join(c.keys)]


def to_csv(claims: list[Claim]) -> str:
    claims, other = _split(claims)
    columns = ["table", "subject", "metric", "better", "paper_baseline", "paper_gal", "paper_t", "paper_p",
               "ours_baseline", "ours_gal", "ours_t", "ours_p", "direction_reproduced", "significant", "verdict",
               "provenance_keys", "claim", "why", "closest_protocol", "closest_distance", "closest_baseline",
               "closest_gal", "closest_t", "closest_p", "closest_verdict", "closest_provenance_keys"]
    rows = [[c.table, c.subject, c.metric, c.better,
             *("" if c.paper.get(k) is None else c.paper[k] for k in ("baseline", "gal", "t", "p")),
             *(csv_value(c.ours[k]) for k in ("baseline", "gal", "t", "p")),
             c.direction_reproduced, c.significant, c.verdict, "; ".join(c.keys), _row(c)[0],
             getattr(c, "why", ""), *_under_csv(c, other)] for c in claims]
    return rows_csv(columns, rows)
