"""Trace one rendered number back to its runs and cross-check it against MLflow.

    python -m pipelines.audit "Table V" Boston GAL MAE          # the mean; add std, n, ... for another stat
    python -m pipelines.audit "Table V" Boston t-test MSE p
    python -m pipelines.audit "Table V/Boston/GAL/MAE/mean"     # a provenance key as is
    python -m pipelines.audit "Fig. 4" GD GAL final_z
    python -m pipelines.audit "Table I" SGD GAL error
    python -m pipelines.audit --published results/regression "Table V" Boston GAL MAE   # a published copy
    options: --reports DIR (default reports), --tracking-uri URI, --diff (print dirty runs' patches),
             --published DIR (or a profile's name: results/<name>)

Names match case-insensitively, ignoring spaces, dots, dashes and underscores ("table v" boston gal mae).
Prints the value and how it was aggregated; for each contributing run: run dir, MLflow run id, variant
(if any), git commit (+ dirty flag; for a dirty run the files its uncommitted changes touch, its untracked
files and the path of its git_diff.patch in the run record, the patch itself with --diff), data
checksums, the config diff from the matching baseline run, the `dvc repro` target; then reads each run's
metric back from MLflow (--tracking-uri, else MLFLOW_TRACKING_URI, else the tracking URI recorded in the
run's run.json, else the project default), compares it with the run record, recomputes the aggregate and
compares it with the reported value.
With --published (a copy `make publish` made: pipelines/publish.py) it reads that copy alone, never MLflow: the
report, the run records and stamp.json there. It says so, with the copy's commit, and checks instead that each
file it reads is the one published (stamp.json's sha256) and that the records give the reported value.
Exit codes: 0 cross-check OK; 1 a mismatch (or a run or MLflow run that cannot be read, a patch that does not
match its checksum in run.json, or a published file edited or missing); 2 a user error (pipelines.errors): no
such number (the message lists what exists), no readable or well-formed provenance.json (invalid JSON, a missing
key, a value of the wrong type: one line naming the file and the field, checked before anything is traced), or
no published copy (with a readable stamp.json) where --published points.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import TrackingError, UserError, run_cli
from pipelines.report import stats
from pipelines.report.records import ReportError, RunRecord, load_run


class AuditError(UserError):
    """Bad request or missing provenance: one line, exit code 2 (pipelines.errors)."""


@dataclass(frozen=True)
class Published:
    """A copy `make publish` made (pipelines/publish.py): its folder and stamp.json."""

    path: Path
    stamp: dict

    STAMP_FIELDS = {"commit": str, "command": str, "published_utc": str, "files": dict}

    @classmethod
    def open(cls, where: str) -> "Published":
        """The copy at ``where``, else at results/<where>; AuditError in one line if there is none or its
        stamp.json is unreadable or lacks a field the audit reads."""
        path = Path(where)
        if not path.is_dir() and Path("results", where).is_dir():
            path = Path("results", where)
        stamp_path = path / "stamp.json"
        if not stamp_path.is_file():
            copies = ", ".join(sorted(p.parent.as_posix() for p in Path("results").glob("*/stamp.json")))
            raise AuditError(f"no published copy at {where} (no {stamp_path}); "
                             + (f"choose one of: {copies}" if copies else "make one: make publish PROFILE=<profile>"))
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, ValueError) as err:
            raise AuditError(f"unreadable {stamp_path} ({type(err).__name__}: {err}); publish again") from None
        for name, kind in cls.STAMP_FIELDS.items():
            if not isinstance(stamp, dict) or not isinstance(stamp.get(name), kind):
                raise AuditError(f"malformed {stamp_path}: no {name} ({kind.__name__}); publish again")
        return cls(path, stamp)

    def describe(self) -> str:
        return (f"  source: the published copy {self.path.as_posix()}/, not MLflow\n"
                f"  published: commit {self.stamp['commit']}, {self.stamp['published_utc']}, by "
                f"`{self.stamp['command']}`")

    def edited(self, path: Path) -> str | None:
        """Why the file ``path`` of the copy is not the one published (missing, changed, not stamped), or None."""
        try:
            rel = path.relative_to(self.path).as_posix()
        except ValueError:  # provenance.json names a run outside the copy
            return f"{path.as_posix()} lies outside the published copy {self.path.as_posix()}/"
        want = self.stamp["files"].get(rel)
        if want is None:
            return f"{path.as_posix()} is not in {self.path.as_posix()}/stamp.json: added after publishing"
        if not path.is_file():
            return f"{path.as_posix()} is missing from the published copy"
        if hashlib.sha256(path.read_bytes()).hexdigest() != want:
            return f"{path.as_posix()} was edited after publishing (sha256 differs from stamp.json)"
        return None


def _malformed(path: Path, what: str) -> AuditError:
    return AuditError(f"malformed {path}: {what}; render the reports again: python -m pipelines.report")


def _is_texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def _is_value(value: Any) -> bool:
    """A number's value as provenance.json holds it: a number, null (nan) or "inf"/"-inf"."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number or value is None or value in ("inf", "-inf")


# what audit() reads of a number's entry: field -> (its check, what it must be)
ENTRY_FIELDS = {
    "value": (_is_value, "a number, null or \"inf\""),
    "text": (lambda v: isinstance(v, str), "a string"),
    "aggregation": (lambda v: isinstance(v, str), "a string"),
    "op": (lambda v: isinstance(v, str) and v in stats.OPS, f"one of {', '.join(stats.OPS)}"),
    "metric": (lambda v: isinstance(v, str) and bool(v), "a metric name"),
    "groups": (lambda v: isinstance(v, list) and bool(v) and all(_is_texts(g) and g for g in v),
               "a list of lists of run dirs"),
    "runs": (lambda v: isinstance(v, list) and all(isinstance(r, dict) and isinstance(r.get("dir"), str) for r in v),
             "a list of {\"dir\": run dir, ...}"),
    "dvc_repro": (_is_texts, "a list of stage names"),
    "files": (_is_texts, "a list of file names"),
}
BEST_FIELDS = {"by": str, "column": str, "better": str, "complement": bool}
TWO_GROUPS = ("t", "p", "ratio")  # the ops of two groups (baseline, GAL)
PAIRS = ("p_holm",)  # the ops of a family of pairs of groups, the adjusted pair first; every other op takes one


def check_provenance(path: Path, prov: Any) -> None:
    """AuditError naming ``path`` and the field unless ``prov`` has the shape the audit reads: a mapping of
    numbers and a mapping of runs (run dir -> {"baseline": run dir or null, ...})."""
    if not isinstance(prov, dict) or not isinstance(prov.get("numbers"), dict):
        raise _malformed(path, "no mapping \"numbers\" at the top")
    runs = prov.get("runs", {})
    if not isinstance(runs, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("baseline"), (str, type(None))) for r in runs.values()):
        raise _malformed(path, "\"runs\" is not a mapping of run dir to {\"baseline\": run dir or null, ...}")


def check_entry(path: Path, key: str, entry: Any) -> None:
    """AuditError naming ``path``, the number and the field unless ``entry`` holds every field audit() reads,
    of its type, and its groups name only its runs."""
    where = f"numbers[{json.dumps(key, ensure_ascii=False)}]"
    if not isinstance(entry, dict):
        raise _malformed(path, f"{where} is not a mapping")
    for name, (valid, want) in ENTRY_FIELDS.items():
        if name not in entry:
            raise _malformed(path, f"{where} has no {name!r}")
        if not valid(entry[name]):
            raise _malformed(path, f"{where}.{name} is {json.dumps(entry[name])[:60]}, not {want}")
    best = entry.get("best_epoch")
    if best is not None and not (isinstance(best, dict)
                                 and all(isinstance(best.get(k), t) for k, t in BEST_FIELDS.items())):
        raise _malformed(path, f"{where}.best_epoch is not {{\"by\", \"column\", \"better\", \"complement\"}}")
    count = len(entry["groups"])
    if entry["op"] in PAIRS:
        if count < 2 or count % 2:
            raise _malformed(path, f"{where}.groups holds {count} groups; {entry['op']} takes pairs of groups")
    elif count != (groups := 2 if entry["op"] in TWO_GROUPS else 1):
        raise _malformed(path, f"{where}.groups holds {count} groups; {entry['op']} takes {groups}")
    dirs = {run["dir"] for run in entry["runs"]}
    stray = [d for group in entry["groups"] for d in group if d not in dirs]
    if stray:
        raise _malformed(path, f"{where}.groups names {stray[0]}, which is not in its runs")


def _norm(name: str) -> str:
    return re.sub(r"[\s._\-]", "", name.replace("²", "2").casefold())


def resolve(numbers: dict[str, Any], parts: list[str]) -> str:
    """The provenance key that ``parts`` name; AuditError listing the choices where they stop matching.
    When the parts stop at a number's statistics, 'mean' is taken if there is one, else the first."""
    parts = [p for part in parts for p in part.split("/") if p]
    keys = [key.split("/") for key in numbers]
    prefix: list[str] = []
    for depth, part in enumerate(parts):
        choices = list(dict.fromkeys(k[depth] for k in keys if k[:depth] == prefix and len(k) > depth))
        match = [c for c in choices if _norm(c) == _norm(part)]
        if not match:
            where = f" under {'/'.join(prefix)!r}" if prefix else ""
            what = "table or figure" if depth == 0 else "entry"
            raise AuditError(f"no {what} {part!r}{where}; choose one of: {', '.join(choices) or '(none)'}")
        prefix.append(match[0])
        if "/".join(prefix) in numbers:
            if depth + 1 < len(parts):
                raise AuditError(f"{'/'.join(prefix)!r} is a number; nothing lies below it "
                                 f"(extra: {' '.join(parts[depth + 1:])})")
            return "/".join(prefix)
    choices = list(dict.fromkeys(k[len(prefix)] for k in keys if k[:len(prefix)] == prefix and len(k) > len(prefix)))
    leaves = [c for c in choices if "/".join([*prefix, c]) in numbers]
    if choices and len(leaves) == len(choices):  # only statistics left: default to the mean
        return "/".join([*prefix, "mean" if "mean" in leaves else leaves[0]])
    where = f"'{'/'.join(prefix)}' needs one more name" if prefix else "name a table or figure"
    raise AuditError(f"{where}; choose one of: {', '.join(choices)}")


def _show(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def config_diff(run_flat: dict[str, Any], base_flat: dict[str, Any]) -> list[str]:
    """'key: baseline -> run' for every flattened key whose value differs (absent shown as <absent>)."""
    lines = []
    for key in sorted(set(run_flat) | set(base_flat)):
        a, b = base_flat.get(key, "<absent>"), run_flat.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: {_show(a)} -> {_show(b)}")
    return lines


def patch_files(patch: str) -> list[str]:
    """The files a run's git_diff.patch changes, as git names them (quoted if unusual) in its headers."""
    files = []
    for line in patch.splitlines():
        if line.startswith("diff --git "):  # no renames: "a/P b/P", or '"a/P" "b/P"': two equal halves
            rest = line[len("diff --git "):]
            first = rest[:(len(rest) - 1) // 2]
            files.append(first[2:] if first.startswith("a/") else '"' + first[3:] if first.startswith('"a/')
                         else first)
    return files


def _print_changes(run: RunRecord, show_diff: bool, problems: list[str]) -> None:
    """A dirty run's uncommitted changes: files changed, untracked files, the patch's path (and text)."""
    from pipelines.tracking import record

    sha = run.meta.get("git_diff_sha256")
    if sha is None:
        print("      (no diff recorded: the run predates diff recording)")
        return
    shown = f"{run.dir}/{record.DIFF_FILE}"
    try:
        patch = (run.path / record.DIFF_FILE).read_bytes()
    except OSError:
        problems.append(f"{run.dir}: run.json records a git diff but {record.DIFF_FILE} is missing; "
                        "rerun that run")
        print(f"      patch: {shown} (missing)")
        return
    if hashlib.sha256(patch).hexdigest() != sha:
        problems.append(f"{shown} does not match git_diff_sha256 in run.json: the record was edited; rerun that run")
    text = patch.decode("utf-8", "replace")
    print(f"      changed: {', '.join(patch_files(text)) or '(no tracked file)'}")
    if run.meta.get("git_untracked"):
        print(f"      untracked: {', '.join(run.meta['git_untracked'])}")
    print(f"      patch: {shown}" + ("" if show_diff else "  (--diff prints it)"))
    if show_diff:
        print("\n".join(f"        {line}" for line in text.splitlines()))


def _tracking_uri(meta: dict[str, Any], override: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the run's recorded URI, else the project default."""
    from pipelines.tracking import store

    recorded = meta.get("tracking_uri")
    if recorded and "***" in recorded:  # a redacted password: only the caller can supply the real URI
        recorded = None
    return override or os.environ.get("MLFLOW_TRACKING_URI") or recorded or store.tracking_uri()


def audit(key: str, entry: dict[str, Any], runs: dict[str, Any], tracking_override: str | None = None,
          show_diff: bool = False, published: Published | None = None) -> int:
    """Print the trace of one number; 0 if MLflow agrees with the run records and the reported value (with
    ``published``: if the copy's files are those published and its records give the reported value)."""
    from pipelines.tracking import store
    from pipelines.tracking.record import RECORD_FILES

    root = published.path if published else Path()  # provenance names run dirs relative to the report's cwd

    metric, op, best = entry["metric"], entry["op"], entry.get("best_epoch")
    # a value at each run's best epoch comes from both sides' per-epoch histories
    columns = (best["by"], best["column"]) if best else ()
    what = f"{metric} at the best epoch by {best['by']}" if best else metric
    value = math.nan if entry["value"] is None else float(entry["value"])
    paper = "" if entry.get("paper") is None else f"   (paper: {entry['paper']})"
    print(f"{key} = {entry['text']}{paper}")
    if published:
        print(published.describe())
    print(f"  how: {entry['aggregation']}")
    print(f"  exact value: {value!r}")
    print(f"  remake: dvc repro {' '.join(entry['dvc_repro'])}" if entry["dvc_repro"] else
          "  remake: (runs made outside DVC)")
    print(f"  rendered in: {', '.join(entry['files'])}")
    print(f"contributing runs ({len(entry['runs'])}):")

    problems: list[str] = []
    if published:
        problems += filter(None, [published.edited(root / "provenance.json")])
    logged: dict[str, float] = {}
    for item in entry["runs"]:
        run_dir = item["dir"]
        print(f"  {(root / run_dir).as_posix()}")
        if published:  # each file of the record as published: the four of every record, and any other stamped
            stamped = {Path(rel).name for rel in published.stamp["files"] if Path(rel).parent == Path(run_dir)}
            problems += filter(None, (published.edited(root / run_dir / name)
                                      for name in sorted(stamped | set(RECORD_FILES))))
        try:
            run = load_run(root / run_dir)
        except ReportError as err:
            problems.append(str(err))
            print(f"    cannot read the run record: {err}")
            continue
        meta = run.meta
        dirty = {True: " (dirty: uncommitted changes)", False: " (clean)"}.get(meta.get("git_dirty"),
                                                                               " (dirty: unknown)")
        print(f"    MLflow run: {meta.get('mlflow_run_id')} (experiment {meta.get('mlflow_experiment_id')})")
        if meta.get("variant"):
            print(f"    variant: {meta['variant']}")
        print(f"    git commit: {meta.get('git_commit')}{dirty}")
        if meta.get("git_dirty") is True:
            _print_changes(run, show_diff, problems)
        checksums = meta.get("data_checksums") or {}
        print("    data: " + ("; ".join(f"{p} {c}" for p, c in checksums.items()) or "(none recorded)"))
        base_dir = (runs.get(run_dir) or {}).get("baseline")
        if base_dir is None:
            print("    config diff: none (a baseline run)")
        else:
            if published:
                problems += filter(None, [published.edited(root / base_dir / "config.yaml")])
            try:
                diff = config_diff(run.flat, load_run(root / base_dir).flat)
                print(f"    config diff from baseline {(root / base_dir).as_posix()} (baseline -> this run):")
                print("\n".join(f"      {line}" for line in diff) if diff else "      (identical)")
            except ReportError as err:
                problems.append(str(err))
                print(f"    config diff: cannot read the baseline run: {err}")
        stage = meta.get("stage")
        print(f"    dvc repro target: {stage}" + ("  (made outside DVC)" if stage in (None, "manual") else ""))

        if meta.get("mlflow_run_id") != item.get("mlflow_run_id"):
            problems.append(f"{run_dir} now holds MLflow run {meta.get('mlflow_run_id')}, the report used "
                            f"{item.get('mlflow_run_id')}: the reports are stale; rerun python -m pipelines.report")
        try:  # metrics.json's value, else history.csv's last row's (as MLflow's latest value)
            recorded: Any = run.at_best_epoch(best) if best else run.latest(metric)
        except ReportError:
            recorded = None
        if published:  # the copy is the source: its records must give the reported value
            print(f"    {what}: run record {_show(recorded)}")
            if recorded is None:
                problems.append(f"{run.dir}: its record has no {what!r}")
            else:
                logged[run_dir] = float(recorded)
            continue
        try:
            values = store.logged_metrics(meta.get("mlflow_run_id"), _tracking_uri(meta, tracking_override),
                                          histories=columns)
        except TrackingError as err:
            problems.append(f"{run_dir}: {err}")
            print(f"    {what}: run record {_show(recorded)}; MLflow: unreadable")
            continue
        try:
            mlflow_value = stats.at_best_epoch(best, values) if best else values.get(metric)
        except (KeyError, ValueError):  # a history MLflow lacks
            mlflow_value = None
        print(f"    {what}: run record {_show(recorded)}; MLflow {_show(mlflow_value)}")
        if mlflow_value is None:
            problems.append(f"{run_dir}: MLflow run {meta.get('mlflow_run_id')} has no metric {what!r}")
        elif recorded is None or not stats.same(float(recorded), mlflow_value):
            record = "history.csv" if best else "metrics.json"
            problems.append(f"{run_dir}: {what} is {_show(recorded)} in {record} but {_show(mlflow_value)} "
                            f"in MLflow run {meta.get('mlflow_run_id')}")
        else:
            logged[run_dir] = mlflow_value

    check, source = ("Published copy check", "the published records") if published else ("MLflow cross-check", "MLflow")
    problems = list(dict.fromkeys(problems))  # a baseline several runs share is named once
    if not problems:
        recomputed = stats.compute(op, [[logged[d] for d in group] for group in entry["groups"]])
        if not stats.same(recomputed, value):
            problems.append(f"{op} recomputed from {source} is {recomputed!r} but the report shows {value!r}: "
                            + ("the copy is inconsistent; publish again" if published else
                               "the reports are stale; rerun python -m pipelines.report"))
        elif published:
            print(f"{check}: OK ({len(logged)} runs' records and provenance.json as published at commit "
                  f"{published.stamp['commit'][:12]}; {op} recomputed from the records = {recomputed:.10g})")
            return 0
        else:
            print(f"{check}: OK ({len(logged)} runs' {what} match their run records; "
                  f"{op} recomputed from MLflow = {recomputed:.10g})")
            return 0
    print(f"{check}: MISMATCH ({len(problems)} problem{'s' * (len(problems) != 1)})")
    for problem in problems:
        print(f"  - {problem}")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help='e.g. "Table V" Boston GAL MAE, or a provenance key')
    parser.add_argument("--reports", default=None, help="where provenance.json is (default: reports)")
    parser.add_argument("--tracking-uri", default=None, help="read every run from this MLflow store")
    parser.add_argument("--published", default=None, metavar="DIR",
                        help="trace the number in a published copy (make publish) instead, without MLflow: "
                             "its folder, or a profile's name for results/<name>")
    parser.add_argument("--diff", action="store_true", help="print the git diff of each dirty run")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.published and (args.reports or args.tracking_uri):
        parser.error("--published reads the copy's own report and records: leave out --reports and --tracking-uri")

    def run() -> int:  # 1 for a mismatch is a result; a user error is one line and exit code 2
        published = Published.open(args.published) if args.published else None
        path = (published.path if published else Path(args.reports or "reports")) / "provenance.json"
        if published and not path.is_file():
            raise AuditError(f"no {path}: the published copy is not whole; publish it again (make publish)")
        if not path.is_file():
            copies = sorted(p.parent.as_posix() for p in Path("results").glob("*/stamp.json"))
            hint = f", or audit a published copy: --published {copies[0]}" if copies else ""
            raise AuditError(f"no {path}; render the reports first: python -m pipelines.report{hint}")
        try:
            prov = json.loads(path.read_text())
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError included
            raise AuditError(f"unreadable {path} ({type(err).__name__}: {err}); render the reports again: "
                             "python -m pipelines.report") from None
        check_provenance(path, prov)
        key = resolve(prov["numbers"], args.names)
        check_entry(path, key, prov["numbers"][key])
        return audit(key, prov["numbers"][key], prov.get("runs", {}), args.tracking_uri, args.diff, published)

    return run_cli("audit", run)


if __name__ == "__main__":
    sys.exit(main())
