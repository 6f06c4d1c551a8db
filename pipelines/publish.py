"""`make publish PROFILE=<p>`: run a profile from a clean checkout and keep what its report shows in git, in
results/<p>/, so that anyone with the checkout can read and audit the numbers without the runs or MLflow.

    python -m pipelines.publish regression -- make repro PROFILE=regression    # what `make publish` runs

In order, each step stopping everything after it:
1. The checkout must be clean (git status, with the run records' exclusions: pipelines/CONTRACT.md,
   Provenance): else one line naming what is uncommitted, exit code 2, nothing run or written.
2. COMMAND runs (its output is the terminal's); params.yaml is then put back as it was, whatever happened (the
   command switches the profile in it). A failed command: one line, its exit code, nothing published.
3. The checkout must still be the commit it started from, and clean: the runs must be that commit's.
4. The report (reports/: index.md, tables/, figures/, provenance.json) must be of profile <p> (a table may be
   smoke only where <p> runs its data at smoke size: the regression profile's image tables) and its run
   records (runs/<task>/<run>/ of every number, and their baselines) those it used.
5. All of it is copied into a work folder beside results/<p>/ (the checkout's own path written as <checkout>
   in its text files: runs' roots, data paths, sqlite stores), with dvc.lock as the command left it,
   reports/preflight.{md,csv} where `make preflight` left them, and stamp.json (commit, command, UTC time,
   machine, torch, the sha256 of every file), then renamed into place: results/<p>/ is the old copy or the
   whole new one, never a part (pipelines/atomic.py).
`python -m pipelines.audit --published results/<p> ...` traces a number from that copy.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

from pipelines.atomic import replace_dir, temp_dir_beside, write_atomic
from pipelines.errors import UserError, run_cli
from pipelines.machine import describe

STAMP = "stamp.json"
CHECKOUT = "<checkout>"  # the checkout's own path in the copy's text: where the runs ran is not part of a result
TEXT = {".json", ".yaml", ".csv", ".md", ".tex", ".txt", ".lock"}  # not git_diff.patch: its sha256 is recorded
PARAMS = "params.yaml"
LOCK = "dvc.lock"
PREFLIGHT = ("preflight.md", "preflight.csv")  # not the report stage's: what `make preflight` measured last
FINDINGS = "<!-- findings:start report={} -->"  # README's block written from a published report


class PublishError(UserError):
    """Publishing cannot go on; one line, exit code 2 (pipelines.errors)."""


class CommandFailed(Exception):
    """The command failed: one line, and the command's exit code (not a user error's 2)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------ the checkout
def uncommitted(root: Path) -> list[str]:
    """What makes the checkout dirty, as run records count it (untracked files too; the runs, mlflow.db and
    dvc.lock aside): changed tracked files, then untracked ones (a top folder for several); PublishError
    outside git."""
    from pipelines.audit import patch_files
    from pipelines.tracking import provenance

    _, dirty = provenance.git_state(root)
    if dirty is None:
        raise PublishError(f"{root} is not a git checkout (or git fails there); publish records the commit of the runs")
    if not dirty:
        return []
    diff, untracked = provenance.git_changes(root)
    by_top: dict[str, list[str]] = {}  # many untracked files in one folder are named by the folder
    for path in untracked:
        by_top.setdefault(path.split("/", 1)[0], []).append(path)
    return patch_files(diff.decode("utf-8", "replace")) + [
        paths[0] if len(paths) == 1 else f"{top}/ ({len(paths)} untracked files)" for top, paths in by_top.items()]


def head(root: Path) -> str:
    from pipelines.tracking import provenance

    return provenance.git_state(root)[0]


def _files(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_clean(root: Path) -> str:
    """The commit HEAD is at; PublishError naming the uncommitted files of a dirty checkout."""
    dirty = uncommitted(root)
    if dirty:
        raise PublishError(f"the checkout has uncommitted changes ({_files(dirty)}): commit them (or stash them) "
                           "and publish again; a published result is made by one commit")
    return head(root)


# ------------------------------------------------------------------------------------------------ the command
def run_command(command: list[str]) -> int:
    """``command``'s exit code. It runs in a process group of its own, and a SIGINT, SIGTERM or SIGHUP this
    process gets goes to all of that group (make, DVC, the fan-out, the runs: make passes nothing on), then the
    command is waited for."""
    try:
        child = subprocess.Popen(command, process_group=0)
    except OSError as err:
        raise PublishError(f"cannot run {shlex.join(command)}: {err.strerror or err}") from None
    try:
        return child.wait()
    except KeyboardInterrupt as err:
        if child.poll() is None:
            os.killpg(child.pid, getattr(err, "signum", signal.SIGINT))
        child.wait()
        raise


def run_restoring(root: Path, command: list[str]) -> int:
    """Run ``command``, then put params.yaml back as it was before it (also after a failure or a signal)."""
    params = root / PARAMS
    before = params.read_bytes() if params.is_file() else None
    try:
        return run_command(command)
    finally:
        if before is not None and (not params.is_file() or params.read_bytes() != before):
            write_atomic(params, before)
            print(f"publish: {PARAMS} put back as it was before the run", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ the report
def report_files(reports: Path) -> list[Path]:
    """Every file the report stage writes under ``reports`` (pipelines/report/build.py), and `make preflight`'s
    measurements where there are some (the findings read their GPU-hours), relative to ``reports``."""
    from pipelines.report.build import DIRS, TOPS

    found = [Path(name) for name in (*TOPS, *PREFLIGHT) if (reports / name).is_file()]
    for sub in DIRS:
        found += sorted(p.relative_to(reports) for p in (reports / sub).rglob("*") if p.is_file())
    return found


def _run_dir(reports: Path, name: Any) -> str:
    """A run dir as provenance.json names it: relative to the checkout, inside it; PublishError otherwise."""
    path = PurePosixPath(str(name))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise PublishError(f"{reports / 'provenance.json'} names the run {name}, outside the checkout: publish "
                           "needs a report made from run records inside it (python -m pipelines.report --runs runs)")
    return path.as_posix()


def _smoke_by_design(root: Path, reports: Path, prov: dict, profile: str) -> set[str]:
    """The tables ``profile`` itself runs at smoke size: every run behind them read data whose data_profile for
    ``profile`` sets the profile to smoke (the regression profile's image stages). Such a table is smoke in that
    profile's report by design (and labelled so); any other smoke table is stale. A run or an entry that cannot
    be read is not shown to be by design."""
    import yaml

    from pipelines.config import CONF
    from pipelines.report.records import ReportError, load_run

    def at_smoke(run_dir: str) -> bool:
        try:
            conf = CONF / "data_profile" / f"{load_run(root / run_dir).config['data']['name']}_{profile}.yaml"
            return conf.is_file() and (yaml.safe_load(conf.read_text()) or {}).get("profile") == "smoke"
        except (ReportError, OSError, TypeError, KeyError, yaml.YAMLError):
            return False

    runs: dict[str, bool] = {}  # run dir -> at smoke; a run is behind several tables
    tables: dict[str, bool] = {}
    try:
        for key, entry in prov["numbers"].items():
            table = key.split("/")[0]
            for run in entry["runs"]:
                run_dir = _run_dir(reports, run["dir"])
                if run_dir not in runs:
                    runs[run_dir] = at_smoke(run_dir)
                tables[table] = tables.get(table, True) and runs[run_dir]
    except (TypeError, KeyError, AttributeError):
        return set()
    return {table for table, smoke in tables.items() if smoke}


def used_runs(root: Path, reports: Path, profile: str) -> dict[str, str | None]:
    """Run dir -> the MLflow run id the report used, for every run behind a number of the report and every
    baseline it diffs against; PublishError unless the report is whole, of ``profile`` (_smoke_by_design), and its records
    are still those runs."""
    from pipelines.audit import check_entry, check_provenance
    from pipelines.report.records import ReportError, load_run

    path = reports / "provenance.json"
    if not path.is_file():
        raise PublishError(f"no {path}: the command made no report; nothing published")
    try:
        prov = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PublishError(f"unreadable {path} ({type(err).__name__}); nothing published") from None
    check_provenance(path, prov)
    others = {name: p for name, p in (prov.get("profiles") or {}).items() if p != profile}
    if "smoke" in others.values():
        by_design = _smoke_by_design(root, reports, prov, profile)
        others = {name: p for name, p in others.items() if not (p == "smoke" and name in by_design)}
    if others:
        name, other = next(iter(others.items()))
        raise PublishError(f"{path}: {name} is of profile {other}, not {profile} ({len(others)} of "
                           f"{len(prov.get('profiles') or {})} tables and figures); make repro PROFILE={profile} "
                           "remakes them")
    runs: dict[str, str | None] = {}
    for key, entry in prov["numbers"].items():
        check_entry(path, key, entry)
        for run in entry["runs"]:
            runs[_run_dir(reports, run["dir"])] = run.get("mlflow_run_id")
    for run_dir, info in prov.get("runs", {}).items():
        runs.setdefault(_run_dir(reports, run_dir), info.get("mlflow_run_id"))
        if info.get("baseline"):
            runs.setdefault(_run_dir(reports, info["baseline"]), prov["runs"].get(info["baseline"], {}).get(
                "mlflow_run_id"))
    for run_dir, run_id in runs.items():
        try:
            meta = load_run(root / run_dir).meta
        except ReportError as err:
            raise PublishError(f"{err}; the report needs it; nothing published") from None
        if run_id is not None and meta.get("mlflow_run_id") != run_id:
            raise PublishError(f"{run_dir} now holds MLflow run {meta.get('mlflow_run_id')}, the report used {run_id}: "
                               "the reports are stale; make the report again (dvc repro report)")
    return dict(sorted(runs.items()))


def record_files(run_dir: Path) -> list[Path]:
    """A run record's files (a dirty run's diff and untracked list too), as the audit reads them."""
    from pipelines.tracking.record import DIFF_FILE, RECORD_FILES, UNTRACKED_FILE

    return [run_dir / name for name in (*RECORD_FILES, DIFF_FILE, UNTRACKED_FILE) if (run_dir / name).is_file()]


# ------------------------------------------------------------------------------------------------ the stamp
def copy_file(src: Path, dst: Path, root: Path) -> None:
    """``src`` to ``dst``, the checkout's path in a text file written as <checkout> (a run's root, its data's
    paths, its sqlite store)."""
    data = src.read_bytes()
    if src.suffix in TEXT:
        for path in {str(root.resolve()), str(root.absolute())}:
            data = data.replace(path.encode(), CHECKOUT.encode())
    dst.write_bytes(data)
    shutil.copystat(src, dst)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ publishing
def publish(profile: str, command: list[str], root: Path, reports: Path, dest: Path, invocation: str) -> Path:
    """Steps 1-5 of the module's docstring; the published folder. PublishError (or the command's failure,
    as CommandFailed) leaves ``dest`` as it was."""
    from pipelines.profile import check

    check(profile)
    commit = check_clean(root)
    code = run_restoring(root, command)
    if code != 0:
        raise CommandFailed(f"{shlex.join(command)} failed (exit code {code}); nothing published", code)
    now, dirty = head(root), uncommitted(root)
    if now != commit or dirty:
        change = f"HEAD moved from {commit[:12]} to {now[:12]}" if now != commit else \
            f"uncommitted changes appeared: {_files(dirty)}"
        raise PublishError(f"the checkout changed while the profile ran ({change}); nothing published: the runs may "
                           "mix two versions; commit, then publish again (DVC reruns only what changed)")
    runs = used_runs(root, reports, profile)

    tmp = temp_dir_beside(dest)
    try:
        copies = [(reports / rel, rel) for rel in report_files(reports)]
        copies += [(f, Path(run_dir) / f.name) for run_dir in runs for f in record_files(root / run_dir)]
        if (root / LOCK).is_file():
            copies.append((root / LOCK, Path(LOCK)))
        for src, rel in copies:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            copy_file(src, tmp / rel, root)
        stamp = {"profile": profile, "commit": commit, "command": invocation, "run": shlex.join(command),
                 "makeflags": os.environ.get("MAKEFLAGS") or None,
                 "published_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "machine": describe(), "runs": len(runs),
                 "files": {rel.as_posix(): sha256(tmp / rel) for _, rel in sorted(copies, key=lambda c: c[1])}}
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1, ensure_ascii=False) + "\n")
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m pipelines.publish", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s PROFILE [--reports DIR] [--to DIR] -- COMMAND [ARG ...]")
    parser.add_argument("profile")
    parser.add_argument("--reports", default="reports", help="the report's folder (default: reports)")
    parser.add_argument("--to", default="results", help="where results/<profile>/ goes (default: results)")
    ours, command = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(ours)
    if not command:
        parser.error("no COMMAND after --: give the command that runs the profile, e.g. make repro PROFILE=regression")

    def run() -> int:
        dest = Path(args.to) / args.profile
        try:
            publish(args.profile, command, Path.cwd(), Path(args.reports), dest,
                    shlex.join(["python", "-m", "pipelines.publish", *argv]))
        except CommandFailed as err:
            print(f"publish: {err}", file=sys.stderr)
            return err.code
        readme = Path("README.md")
        then = " and rewrite README.md's findings from it (python -m pipelines.report.findings)" if \
            readme.is_file() and FINDINGS.format(dest.as_posix()) in readme.read_text() else ""
        print(f"publish: {dest}/ holds the {args.profile} report, its run records and {STAMP}; "
              f"commit it (git add {dest}){then}")
        return 0

    return run_cli("publish", run, interrupted=f"nothing published; {PARAMS} put back")


if __name__ == "__main__":
    sys.exit(main())
