"""The claims table: every "GAL better than baseline" claim of the paper, with the paper's numbers, ours,
and a verdict: reproduced (same direction, p < 0.05), direction only (same direction, not significant),
not reproduced (GAL not better in our runs)."""
from __future__ import annotations

from collections import Counter

from pipelines.report.model import Claim, Layout
from pipelines.report.render import fmt, fmt_p, rows_csv


def _side(values: dict, digits: int = 4) -> str:
    text = f"{fmt(values['baseline'], digits)} → {fmt(values['gal'], digits)}"
    if values.get("t") is not None:
        text += f" (t {fmt(values['t'], 2)}, p {fmt_p(values['p'])})"
    return text


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _significance(claim: Claim) -> str:
    if not claim.significant:
        return "no"
    return "yes" if claim.direction_reproduced else "yes (GAL significantly worse)"


def layout(claims: list[Claim]) -> Layout:
    rows = [[f"{c.table}: GAL better on {c.subject}, {c.metric} ({c.better})", _side(c.paper), _side(c.ours),
             _yes(c.direction_reproduced), _significance(c), c.verdict] for c in claims]
    counts = Counter(c.verdict for c in claims)
    summary = ", ".join(f"{counts[v]} {v}" for v in ("reproduced", "direction only", "not reproduced"))
    return Layout(
        columns=["Paper's claim", "Paper: baseline → GAL", "Ours: baseline → GAL", "Direction reproduced?",
                 f"Significant (p < {claims[0].alpha if claims else 0.05:g})?", "Verdict"],
        rows=rows,
        caption=f"Claims: {len(claims)} checked; {summary}.",
        notes=["means over runs; t = baseline minus GAL, two-sided p of Student's t-test (equal variances)",
               "reproduced: GAL better in our means and p < 0.05; direction only: better but not significant; "
               "not reproduced: GAL not better in our means"])


def to_csv(claims: list[Claim]) -> str:
    columns = ["table", "subject", "metric", "better", "paper_baseline", "paper_gal", "paper_t", "paper_p",
               "ours_baseline", "ours_gal", "ours_t", "ours_p", "direction_reproduced", "significant", "verdict",
               "provenance_keys"]
    rows = [[c.table, c.subject, c.metric, c.better,
             *("" if c.paper.get(k) is None else c.paper[k] for k in ("baseline", "gal", "t", "p")),
             *(repr(c.ours[k]) for k in ("baseline", "gal", "t", "p")),
             c.direction_reproduced, c.significant, c.verdict, "; ".join(c.keys)] for c in claims]
    return rows_csv(columns, rows)
