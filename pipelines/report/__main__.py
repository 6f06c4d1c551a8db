"""python -m pipelines.report [--runs runs] [--out reports] [--profile P | profile=P]

Renders every table and figure of pipelines.report.specs.SPECS from the run records under --runs into
--out: tables/<name>.{md,csv,tex}, tables/claims.{md,csv,tex}, figures/<name>.{png,pdf,csv}, index.md and
provenance.json. All outputs are rendered first and only then moved into place, so an error leaves the
previous reports untouched. A table or figure whose runs are missing is skipped: index.md and the output say
which runs it needs and the command that makes them. Inconsistent runs (mixed profiles, runs of another
profile than the one asked for, two runs for one seed, differing configs or data within one aggregate, a metric
that is not a finite number), no runs for any table or figure, or an --out that cannot be a directory of
reports (a file, below a file, not writable): one line on stderr, exit code 2. Runs of one aggregate from
different git commits are taken and flagged under their table (and in provenance.json).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from pipelines.errors import run_cli
from pipelines.report.build import build
from pipelines.report.model import Rendered, Skipped
from pipelines.report.records import display_path
from pipelines.report.specs import SPECS


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", help="run records root (default: runs)")
    parser.add_argument("--out", default="reports", help="reports directory (default: reports)")
    parser.add_argument("--profile", default=None,
                        help="require every run to come from this profile (default: any one per table)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="runs=, out= or profile= as in the other stages' Hydra-style overrides")
    args = parser.parse_args(argv)
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in ("runs", "out", "profile"):
            parser.error(f"unknown override {item!r}; expected runs=, out= or profile=")
        setattr(args, key, value)
    return args


def report(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    items = build(Path(args.runs), Path(args.out), SPECS, profile=args.profile)
    rendered = [item for item in items if isinstance(item, Rendered)]
    verdicts = Counter(c.verdict for r in rendered for c in r.claims)
    names = ", ".join(f"{r.name} ({r.profile})" for r in rendered)
    print(f"report: wrote {names} to {display_path(Path(args.out))}/ in {time.perf_counter() - start:.1f} s; "
          f"claims: " + (", ".join(f"{n} {v}" for v, n in sorted(verdicts.items())) or "none"))
    for item in items:
        if isinstance(item, Skipped):
            print(f"report: skipped {item.name}: {item.missing}; make them with `{item.make}`")


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    return run_cli("report", lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
