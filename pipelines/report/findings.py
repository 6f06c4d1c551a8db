"""What we found, written from a report: which of the paper's claims ran for real (any profile but smoke) and
under which protocol, what reproduced, the measured reasons the report holds (output width 1, the protocol study's
closest baselines, float32's resolution), and what has not run for real and what it needs. It reads only a report
folder's files (provenance.json, tables/*.csv, and preflight.csv where one was copied there), so a published
report gives the same text on any machine.

    python -m pipelines.report.findings [--report results/regression] [--readme README.md] [--check]

rewrites README.md's block between ``<!-- findings:start report=<folder> -->`` and ``<!-- findings:end -->`` from
the report in <folder> (the folder the block names, unless --report names another); --check changes nothing and
exits 1 when the block is not what the report gives. Where the folder the block names does not exist yet, the
block says that no report of real runs is published (a folder named with --report must exist). The report stage
opens index.md with the same findings, without the source line (pipelines/report/build.py).

Smoke numbers are never findings: a table rendered from smoke runs counts as not run for real, and a report made
only of smoke runs says so before anything else.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.atomic import write_atomic
from pipelines.errors import run_cli
from pipelines.report.claims import VERDICTS
from pipelines.report.records import ReportError
from pipelines.report.render import fmt, fmt_g
from pipelines.report.specs import SPECS, precision, protocol, table5, width_one

SMOKE = "smoke"
DEFAULT_SOURCE = "results/regression"   # where `make publish PROFILE=regression` puts its report
START = re.compile(r"^<!-- findings:start report=(\S+) -->$", re.M)
END = "<!-- findings:end -->"
WIDTH = 116  # the repository's Markdown width, so the README's source stays readable
# What makes a table real, by the task of its runs: the regression-sized tasks run on a CPU under the
# regression profile, the image tasks need the paper profile's GPUs. A table of both (Table V at d = 1, whose
# CIFAR-10 row is an optional contrast) is real under the regression profile.
NEEDS = {"regression": "regression", "precision": "regression", "toy3d": "regression", "digits": "regression",
         "toy3d_beyond": "regression",
         "classification": "paper", "detection": "paper"}
MAKE = {"regression": "`make repro PROFILE=regression` (CPU)", "paper": "`make repro PROFILE=paper` (GPUs)"}
OURS = "ours"  # claims.csv verdicts of our own study's tests begin so (claims.Ours)
# The protocol a task's runs follow, as the claims are read under it.
PROTOCOL = {"regression": "under our protocol (`pipelines/conf/task/regression.yaml`; the paper gives only the "
                          "models and \"Adam on CPU\")",
            "classification": "under the paper's recipe (`pipelines/report/recipe.yaml`: each value's source)",
            "detection": "under DETR's recipe as the paper runs it (`pipelines/conf/experiment/coco_detr_*`)"}


@dataclass
class Report:
    """The files of one rendered report that the findings read."""

    folder: Path
    profiles: dict[str, str]          # table or figure -> the profile its runs come from (provenance.json)
    numbers: dict[str, dict]          # provenance.json's numbers
    runs: dict[str, dict]             # provenance.json's runs
    claims: list[dict]                # tables/claims.csv: the paper's claims
    preflight: list[dict] | None      # preflight.csv's rows, where the folder holds one
    ours: list[dict] = ()             # tables/claims.csv: the tests of our own study (claims.Ours: Beyond the paper)

    def table(self, slug: str) -> list[dict]:
        """tables/<slug>.csv's rows; none where the table was not rendered."""
        return _csv(self.folder / "tables" / f"{slug}.csv") or []

    def tasks(self, name: str) -> set[str]:
        """The tasks (runs/<task>/...) whose runs a table or figure's numbers aggregate."""
        return {Path(run["dir"]).parent.name for key, n in self.numbers.items() if key.split("/")[0] == name
                for run in n["runs"]}


def _csv(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(folder: Path, provenance: dict[str, Any] | None = None, preflight: bool = True) -> Report:
    """The report in ``folder``; ``provenance``: its provenance.json already in memory (the report stage's)."""
    if provenance is None:
        path = folder / "provenance.json"
        if not path.is_file():
            raise ReportError(f"{folder.as_posix()} holds no report (no provenance.json); name the folder of a "
                              "report rendered by `python -m pipelines.report`")
        try:
            provenance = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ReportError(f"{path.as_posix()} is not valid JSON ({err}); render the report again") from None
    missing = [key for key in ("profiles", "numbers", "runs") if key not in provenance]
    if missing:
        raise ReportError(f"{folder.as_posix()}/provenance.json lacks {', '.join(missing)}; render the report again")
    rows = _csv(folder / "tables" / "claims.csv") or []
    ours = [c for c in rows if c["verdict"].startswith(OURS)]
    return Report(folder, provenance["profiles"], provenance["numbers"], provenance["runs"],
                  [c for c in rows if c not in ours], _csv(folder / "preflight.csv") if preflight else None, ours)


def wrap(text: str) -> str:
    """``text``'s lines wrapped at WIDTH, a list item's continuation indented under its text (Markdown)."""
    out = []
    for line in text.split("\n"):
        lead = re.match(r"^(> |\s*- |\s*)", line).group(1)
        follow = lead if lead.startswith(">") else " " * len(lead)
        whole = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\0"), line)  # a code span stays on one line
        out.append(textwrap.fill(whole, WIDTH, subsequent_indent=follow, break_long_words=False,
                                 break_on_hyphens=False).replace("\0", " ") if line.strip() else line)
    return "\n".join(out)


def _names(items: list[str]) -> str:
    return ", ".join(items) if items else "none"


def _in_order(values) -> list[str]:
    return list(dict.fromkeys(values))


def _counts(verdicts: list[str]) -> str:
    """'0 of 9 reproduced (2 direction only, 7 not reproduced)'."""
    counts = Counter(verdicts)
    rest = [f"{counts[v]} {v}" for v in VERDICTS[1:] if counts[v]]
    return f"{counts['reproduced']} of {len(verdicts)} reproduced" + (f" ({', '.join(rest)})" if rest else "")


def _runs_each(report: Report, claims: list[dict]) -> str:
    """'5 + 5 runs per claim': the sizes of the two groups of runs each claim's t-test compares."""
    sizes = {tuple(len(g) for g in report.numbers[key]["groups"]) for c in claims
             for key in c["provenance_keys"].split("; ") if key in report.numbers
             and len(report.numbers[key]["groups"]) == 2}
    if not sizes:
        return ""
    if len(sizes) == 1:
        a, b = next(iter(sizes))
        return f"{a} + {b} runs per claim"
    totals = sorted(sum(s) for s in sizes)
    return f"{totals[0]} to {totals[-1]} runs per claim"


def _need(report: Report, name: str) -> str:
    return "regression" if "regression" in {NEEDS.get(task, "paper") for task in report.tasks(name)} else "paper"


def ran(report: Report, real: list[str], where: str) -> list[str]:
    """Which claims ran for real, from which profile, on how many runs and under which protocol."""
    claimed = [t for t in _in_order(c["table"] for c in report.claims) if t in real]
    if not real:
        return ["- **Run for real:** nothing yet: every table and figure here comes from the `smoke` profile."]
    parts = []
    for name in claimed:
        rows = [c for c in report.claims if c["table"] == name]
        what = f"{', '.join(_in_order(c['subject'] for c in rows))}; {', '.join(_in_order(c['metric'] for c in rows))}"
        protocols = [PROTOCOL[t] for t in sorted(report.tasks(name)) if t in PROTOCOL]
        runs = _runs_each(report, rows)
        parts.append(f"{name} (profile `{report.profiles[name]}`): {len(rows)} claims ({what})"
                     + (f", {runs}" if runs else "") + (f", {'; '.join(protocols)}" if protocols else ""))
    others = [n for n in real if n not in claimed]
    lines = ["- **Run for real:** " + ("; ".join(parts) + "." if parts else "no claim of the paper.")]
    if others:
        lines.append(f"  Also from real runs: {', '.join(others)}.")
    if parts:
        lines.append(f"  Claim by claim, with the paper's numbers beside ours: `{where}tables/claims.md`.")
    return lines


def reproduced(report: Report, real: list[str]) -> list[str]:
    """Verdict counts per real table, and under the protocol closest to the paper's baselines where it was run."""
    lines = []
    for name in _in_order(c["table"] for c in report.claims):
        rows = [c for c in report.claims if c["table"] == name]
        if name not in real:
            continue
        line = f"{name}: {_counts([c['verdict'] for c in rows])}"
        rechecked = [c for c in rows if c.get("closest_verdict")]
        if rechecked:
            closest = {c["subject"]: c for c in rechecked}
            shown = "; ".join(f"{s}: `{c['closest_protocol']}`, {fmt(float(c['closest_distance']), 2)} of the paper's "
                              "standard deviations" if c["closest_distance"] else f"{s}: `{c['closest_protocol']}`"
                              for s, c in closest.items())
            line += (f"; under the protocol whose baseline comes closest to the paper's ({shown}): "
                     f"{_counts([c['closest_verdict'] for c in rechecked])}")
        lines.append(line)
    if not lines:
        return []
    return ["- **Reproduced** (GAL better than the baseline with p < 0.05, Student's t over seeds; direction only: "
            "better, not significant; not reproduced: not better): " + "; ".join(lines) + "."]


def _width_one(report: Report) -> str:
    rows = [r for r in report.table(width_one.SPEC.slug)
            if r["setting"] in width_one.DATASETS.values() and r["stat"] == "mean"]

    def shown(metric: str) -> str:
        return ", ".join(f"{r['setting']} {r['text']}" for r in rows if r["metric"] == metric)

    if not rows:
        return ""
    return ("*Output width 1.* Table V's models predict one number; the remainder then sends h no gradient beyond "
            "float rounding (`tests/gal_core/test_width_one.py`), so h does not learn and GAL, when the safeguard "
            "accepts, rescales each sample's gradient by 1 ± eps. Measured in the last epoch: h's gradient norm "
            f"{shown('adjuster_grad_norm')}; h's weights moved by {shown('adjuster_move_rel')} of their norm; the "
            f"fraction of steps the safeguard accepted: {shown('accepted')} ({width_one.SPEC.name}).")


def _protocol(report: Report) -> str:
    rows = report.table(protocol.SPEC.slug)
    if not rows:
        return ""
    studied = []
    for ds in _in_order(r["dataset"] for r in rows):
        points = _in_order(r["protocol"] for r in rows if r["dataset"] == ds and r["row"] == "Baseline")
        eps = [p for p in _in_order(r["protocol"] for r in rows if r["dataset"] == ds) if p not in points]
        studied.append(f"{ds}: {len(points)} protocols"
                       + (f" and {len(eps)} value{'s' * (len(eps) > 1)} of eps for GAL alone" if eps else ""))
    base = [c for c in report.claims if c["table"] == table5.SPEC.name and c["metric"] in ("R²", "R2")]
    contrast = "; ".join(f"{c['subject']} {fmt_g(float(c['paper_baseline']))} vs {fmt_g(float(c['ours_baseline']))}"
                         for c in base
                         if c["paper_baseline"] and c["ours_baseline"])
    return ("*Protocol.* The paper gives Table V's models and \"Adam on CPU\", nothing else"
            + (f" (baseline R², the paper's vs ours: {contrast})" if contrast else "")
            + f". The protocol study reran baseline and GAL off our protocol ({'; '.join(studied)}; "
            f"{protocol.SPEC.name}); the verdicts under the protocol closest to the paper's baselines are above.")


def _precision(report: Report) -> str:
    ulps = {r["setting"]: float(r["value"]) for r in report.table(precision.SPEC.slug)
            if r["metric"] == "median_remainder_ulps" and r["value"]}
    if not ulps:
        return ""
    rounding = {s: u for s, u in ulps.items() if u < 1}  # the precision study's rule: below one float32 spacing
    resolved = sorted(u for u in ulps.values() if u >= 1)
    text = "*float32.* On random outputs of each paper setting's shape and scale (Precision study): "
    if rounding:
        text += (f"at {', '.join(f'{s} (median |R| {fmt_g(u)} float32 spacings of L)' for s, u in rounding.items())} "
                 "GAL's remainder is below float32's resolution at the loss, so a float32 run there trains h on "
                 "rounding")
        if resolved:
            text += f"; the other {len(resolved)} settings resolve it" if len(resolved) > 1 else \
                "; the other setting resolves it"
    else:
        text += "every setting's remainder is above float32's resolution at the loss"
    if resolved:
        span = fmt_g(resolved[0]) + (f" to {fmt_g(resolved[-1])}" if resolved[-1] != resolved[0] else "")
        text += f" (median |R| {span} spacings)"
    return text + "."


def why(report: Report, real: list[str]) -> list[str]:
    """The measured reasons the report holds from real runs: output width 1, protocol, float32."""
    shown = [text for name, make in ((width_one.SPEC.name, _width_one), (protocol.SPEC.name, _protocol),
                                     (precision.SPEC.name, _precision)) if name in real and (text := make(report))]
    return ["- **Why, measured:**", *(f"  - {text}" for text in shown)] if shown else []


def _gpu_hours(report: Report, where: str) -> str:
    rows = [r for r in report.preflight or [] if r.get("device") == "cuda"]
    if rows:
        hours = sum(float(r["device-h (all seeds)"].replace(",", "")) for r in rows if r["device-h (all seeds)"])
        failed = sum(r["status"].startswith("FAILED") for r in rows)
        return (f"a GPU preflight (`{where}preflight.csv`) estimates {hours:,.0f} GPU-hours for its "
                f"{sum(int(r['seeds']) for r in rows)} runs" + (f", {failed} configurations failing" if failed else ""))
    why_not = "the preflight here ran on a CPU, whose device-hours say nothing of GPUs" if report.preflight else \
        "no GPU preflight is part of this report"
    return (f"GPU-hours not measured yet ({why_not}; `make preflight PROFILE=paper DEVICE=cuda` estimates them: "
            "`docs/preflight.md`)")


def not_run(report: Report, names: list[str], where: str) -> list[str]:
    """What has not run for real: per need (profile), its tables and figures and how many claims they hold."""
    lines = []
    smoke = [n for n in names if report.profiles.get(n) == SMOKE]
    for need in ("regression", "paper"):
        group = [n for n in smoke if _need(report, n) == need]
        if not group:
            continue
        claims = sum(c["table"] in group for c in report.claims)
        line = f"  - {', '.join(group)}" + (f" ({claims} claims)" if claims else "") + f": {MAKE[need]}"
        lines.append(line + ("; " + _gpu_hours(report, where) if need == "paper" else "") + ".")
    skipped = [n for n in names if n not in report.profiles]
    if skipped:
        lines.append(f"  - Skipped, their runs missing from the report: {_names(skipped)}.")
    if not lines:
        return []
    head = "- **Not yet run for real**" + (" (in this report from the `smoke` profile: fixture-sized data, numbers "
                                           "that mean nothing about the paper)" if smoke else "") + ":"
    return [head, *lines]


def findings(report: Report, where: str = "", names: list[str] | None = None, banner: bool = True) -> str:
    """The findings of ``report`` as Markdown. ``where``: the report folder as the reader sees it ('' from within
    it); ``names``: the tables and figures the report renders (default: every spec's); ``banner``: open a report of
    smoke runs alone with a warning (index.md has its own)."""
    names = [s.name for s in SPECS] if names is None else names
    real = [n for n in names if report.profiles.get(n, SMOKE) != SMOKE]
    lines = []
    if not real and banner:
        lines += ["> [!WARNING]", "> **SMOKE: every number in this report comes from fixture-sized data and means "
                  "nothing about the paper; nothing below is a finding.**", ""]
    lines += (ran(report, real, where) + reproduced(report, real) + why(report, real) + beyond(report, real)
              + not_run(report, names, where))
    return wrap("\n".join(lines)) + "\n"


def beyond(report: Report, real: list[str]) -> list[str]:
    """The verdict of our own study, when it ran for real: per arm, the test beds where it beat the baseline."""
    rows = [c for c in report.ours if c["table"] in real]
    if not rows:
        return []
    by_arm: dict[str, list[dict]] = {}
    for c in rows:
        by_arm.setdefault(c["subject"].split(": ", 1)[1], []).append(c)
    parts = []
    for arm, tests in by_arm.items():
        better = [c["subject"].split(": ", 1)[0] for c in tests if c["verdict"] == f"{OURS}: better"]
        parts.append(f"{arm} beat the baseline on {len(better)} of {len(tests)} test beds"
                     + (f" ({'; '.join(better)})" if better else ""))
    return [f"- **Beyond the paper (ours, not a claim of the paper):** can the adjuster learn where the published one "
            f"cannot? With Holm's correction at p < 0.05: {'; '.join(parts)} (`Beyond the paper` in the report)."]


def source_line(report: Report, source: str) -> str:
    """Which report the README's block was written from: its folder, profiles and git commits."""
    by_profile: dict[str, list[str]] = {}
    for name, profile in report.profiles.items():
        by_profile.setdefault(profile, []).append(name)
    profiles = "; ".join(f"`{p}`: {len(shown)} tables and figures" for p, shown in sorted(by_profile.items()))
    runs = report.runs.values()
    commits = sorted({str(r.get("git_commit") or "unknown")[:7] for r in runs})
    dirty = sum(r.get("git_dirty") is True for r in runs)
    return wrap(f"*Written by `python -m pipelines.report.findings` from the report in `{source}/` (profiles "
                f"{profiles}; {len(report.runs)} runs from git commit{'s' * (len(commits) > 1)} {', '.join(commits)}"
                + (f", {dirty} with uncommitted changes" if dirty else "") + "); do not edit by hand.*") + "\n\n"


def not_published(source: str) -> str:
    """The block while no report is published in ``source``: no finding, and what will write one."""
    return wrap(f"**No report of real runs is published in this repository yet** (`{source}/` does not exist at "
                "this commit), so this section states no finding about the paper. `make repro` with the default "
                "`smoke` profile shows only that every stage runs: its numbers mean nothing about the paper. Table V's "
                "real protocol runs on a CPU (`make repro PROFILE=regression`); the image tables need the `paper` "
                "profile on GPUs. A published report (`make publish PROFILE=regression`, `docs/publishing.md`) "
                "rewrites this section: which claims ran for real and under which protocol, what reproduced, the "
                "measured reasons, and what is not yet run.") + "\n"


def block(root: Path, source: str) -> str:
    """The README block's text from the report in ``root / source``."""
    folder = root / source
    if not folder.exists():
        return not_published(source)
    report = load(folder)
    return source_line(report, source) + findings(report, where=f"{source}/")


def spliced(readme: str, root: Path, source: str | None = None) -> str:
    """``readme`` with its findings block rewritten from ``source`` (default: the report the block names)."""
    starts = list(START.finditer(readme))
    if len(starts) != 1 or readme.count(END) != 1 or readme.index(END) < starts[0].end():
        raise ReportError(f"README needs exactly one `<!-- findings:start report=<folder> -->` line followed by one "
                          f"`{END}` line; found {len(starts)} start and {readme.count(END)} end markers")
    source = (source or starts[0].group(1)).rstrip("/")
    return (readme[:starts[0].start()] + f"<!-- findings:start report={source} -->\n" + block(root, source)
            + readme[readme.index(END):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.report.findings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", help="the report folder to write from (default: the one README's block names, "
                                         f"e.g. {DEFAULT_SOURCE})")
    parser.add_argument("--readme", default="README.md", help="the file holding the block (default: README.md)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the block is out of date")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        readme = Path(args.readme)
        if not readme.is_file():
            raise ReportError(f"{args.readme} does not exist; name the file holding the findings block with --readme")
        if args.report and not (readme.parent / args.report).is_dir():  # a typo must not read "not published"
            raise ReportError(f"no report folder {args.report} beside {args.readme}; name one rendered by "
                              "`python -m pipelines.report`")
        text = readme.read_text()
        new = spliced(text, readme.parent, args.report)
        if args.check:
            if new != text:
                print(f"findings: {args.readme}'s block is not what its report gives; run "
                      "`python -m pipelines.report.findings`", file=sys.stderr)
                return 1
            return 0
        if new != text:
            write_atomic(readme, new)
        print(f"findings: {args.readme}'s block is {'rewritten' if new != text else 'up to date'}")
        return 0

    return run_cli("findings", run)


if __name__ == "__main__":
    sys.exit(main())
