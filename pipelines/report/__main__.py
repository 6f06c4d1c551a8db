"""python -m pipelines.report [--runs runs] [--out reports] [--profile P | profile=P]

Renders every table and figure of pipelines.report.specs.SPECS from the run records under --runs into
--out: tables/<name>.{md,csv,tex}, tables/claims.{md,csv,tex}, figures/<name>.{png,pdf,csv}, index.md and
provenance.json. All outputs are rendered first and only then moved into place, so an error leaves the
previous reports untouched. Missing runs, mixed profiles among one table's runs, or runs of another profile
than the one asked for: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from pipelines.report.build import build
from pipelines.report.records import ReportError, display_path
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


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    try:
        rendered = build(Path(args.runs), Path(args.out), SPECS, profile=args.profile)
    except ReportError as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    verdicts = Counter(c.verdict for r in rendered for c in r.claims)
    items = ", ".join(f"{r.name} ({r.profile})" for r in rendered)
    print(f"report: wrote {items} to {display_path(Path(args.out))}/ in {time.perf_counter() - start:.1f} s; "
          f"claims: " + (", ".join(f"{n} {v}" for v, n in sorted(verdicts.items())) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
