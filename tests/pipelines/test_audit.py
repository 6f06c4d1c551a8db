"""pipelines.audit on runs made by the real RunTracker in a git checkout: a dirty run's changed and
untracked files and its patch (--diff), a patch that no longer matches run.json, and user errors in one
line (exit code 2) while a mismatch stays exit code 1, a malformed provenance.json among them."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipelines import audit
from pipelines.errors import UserError
from pipelines.tracking.run import RunTracker

KEY = "Table V/Boston/GAL/MAE/mean"
GAL = "runs/regression/boston-gal-s0"
BASE = "runs/regression/boston-baseline-s0"


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=root, check=True,
                   capture_output=True)


def track(name: str, method: str, mae: float, variant: str = "") -> str:
    with RunTracker("regression", name, {"method": {"name": method}, "seed": 0}, profile="smoke", stage=f"train@{name}",
                    variant=variant) as tracker:
        tracker.log_final({"test_mae": mae})
    return tracker.run_id


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A checkout with a clean baseline run and a dirty GAL run (an edit and an untracked file), an sqlite
    store at its root, and a provenance.json whose one number is the mean of the two."""
    root = tmp_path_factory.mktemp("site")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.as_posix()}/mlflow.db")
        for var in ("DVC_ROOT", "DVC_STAGE"):
            mp.delenv(var, raising=False)
        git(root, "init", "-q")
        (root / ".gitignore").write_text("/reports/\n")
        (root / "train.py").write_text("lr = 0.1\n")
        git(root, "add", ".")
        git(root, "commit", "-q", "-m", "init")
        ids = {BASE: track("boston-baseline-s0", "baseline", 3.0)}
        (root / "train.py").write_text("lr = 0.2\n")
        (root / "notes.md").write_text("")
        ids[GAL] = track("boston-gal-s0", "gal", 2.0, variant="eps0.001")
    entry = {"value": 2.5, "text": "2.50", "paper": None, "aggregation": "mean over 2 runs of test_mae", "op": "mean",
             "metric": "test_mae", "groups": [[BASE, GAL]], "dvc_repro": [f"train@{Path(d).name}" for d in ids],
             "runs": [{"dir": d, "mlflow_run_id": i} for d, i in ids.items()], "files": ["tables/table5.md"]}
    prov = {"numbers": {KEY: entry}, "runs": {BASE: {"baseline": None}, GAL: {"baseline": BASE}}}
    (root / "reports").mkdir()
    (root / "reports/provenance.json").write_text(json.dumps(prov))
    return root


@pytest.fixture
def at_site(site, monkeypatch):
    monkeypatch.chdir(site)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # each run.json names its store
    return site


def test_dirty_run_shows_its_changes_and_patch(at_site, capsys):
    assert audit.main(["Table V", "Boston", "GAL", "MAE"]) == 0
    out = capsys.readouterr().out
    gal = out[out.index(f"  {GAL}\n"):]
    assert "    variant: eps0.001\n" in gal and "(dirty: uncommitted changes)\n" in gal
    assert "      changed: train.py\n      untracked: notes.md\n" in gal
    assert f"      patch: {GAL}/git_diff.patch  (--diff prints it)\n" in gal
    assert out.count("changed:") == 1 and "(clean)" in out[:out.index(f"  {GAL}\n")]  # the baseline is clean
    assert "+lr = 0.2" not in out and "method.name: baseline -> gal" in out and "MLflow cross-check: OK" in out

    assert audit.main(["Table V", "Boston", "GAL", "MAE", "--diff"]) == 0
    out = capsys.readouterr().out
    assert f"      patch: {GAL}/git_diff.patch\n        diff --git a/train.py b/train.py\n" in out
    assert "        -lr = 0.1\n        +lr = 0.2\n" in out and "MLflow cross-check: OK" in out


def test_edited_or_missing_patch_is_a_mismatch(at_site, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(at_site / "runs", work / "runs")
    shutil.copytree(at_site / "reports", work / "reports")
    monkeypatch.chdir(work)
    patch = Path(GAL, "git_diff.patch")
    patch.write_bytes(patch.read_bytes().replace(b"0.2", b"0.3"))
    assert audit.main(["Table V", "Boston", "GAL", "MAE"]) == 1
    out = capsys.readouterr().out
    assert "MLflow cross-check: MISMATCH (1 problem)" in out
    assert f"  - {GAL}/git_diff.patch does not match git_diff_sha256 in run.json: the record was edited" in out
    patch.unlink()
    assert audit.main(["Table V", "Boston", "GAL", "MAE"]) == 1
    out = capsys.readouterr().out
    assert f"      patch: {GAL}/git_diff.patch (missing)" in out and "git_diff.patch is missing; rerun" in out

    meta_path = Path(GAL, "run.json")  # a record from before diffs were kept
    meta = json.loads(meta_path.read_text())
    meta["git_diff_sha256"] = None
    meta_path.write_text(json.dumps(meta))
    assert audit.main(["Table V", "Boston", "GAL", "MAE"]) == 0
    assert "(dirty: uncommitted changes)\n      (no diff recorded" in capsys.readouterr().out


def test_user_errors_are_one_line_with_exit_code_2(at_site, tmp_path, capsys):
    assert issubclass(audit.AuditError, UserError)
    assert audit.main(["Table IX"]) == 2
    assert capsys.readouterr().err == "audit: no table or figure 'Table IX'; choose one of: Table V\n"
    assert audit.main(["Table V", "--reports", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.endswith("provenance.json; render the reports first: python -m pipelines.report\n")
    (tmp_path / "provenance.json").write_text("{not json")
    assert audit.main(["Table V", "--reports", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"audit: unreadable {tmp_path}/provenance.json (JSONDecodeError: ") and err.count("\n") == 1


def _with(**fields):
    """provenance.json's data with the audited number's ``fields`` replaced."""
    return lambda prov: {**prov, "numbers": {KEY: {**prov["numbers"][KEY], **fields}}}


def _without(field: str):
    return lambda prov: {**prov, "numbers": {KEY: {k: v for k, v in prov["numbers"][KEY].items() if k != field}}}


ENTRY = f'malformed {{path}}: numbers["{KEY}"]'
# id -> (how provenance.json is broken: bytes from its text, or new data from its data; how the one line starts)
MALFORMED = {
    "truncated": (lambda text: text[:len(text) // 2].encode(), "unreadable {path} (JSONDecodeError: "),
    "empty": (lambda text: b"", "unreadable {path} (JSONDecodeError: "),
    "not-utf8": (lambda text: b"\xff\xfe{", "unreadable {path} (UnicodeDecodeError: "),
    "a-list": (lambda prov: [prov], 'malformed {path}: no mapping "numbers" at the top;'),
    "numbers-a-list": (lambda prov: {**prov, "numbers": list(prov["numbers"])}, "malformed {path}: no mapping "),
    "runs-a-list": (lambda prov: {**prov, "runs": [GAL]}, 'malformed {path}: "runs" is not a mapping of run dir'),
    "baseline-a-number": (lambda prov: {**prov, "runs": {GAL: {"baseline": 3}}}, 'malformed {path}: "runs" is not'),
    "entry-a-string": (lambda prov: {**prov, "numbers": {KEY: "2.5"}}, f"{ENTRY} is not a mapping;"),
    "no-metric": (_without("metric"), f"{ENTRY} has no 'metric';"),
    "no-runs": (_without("runs"), f"{ENTRY} has no 'runs';"),
    "value-text": (_with(value="2.5x"), f'{ENTRY}.value is "2.5x", not a number, null or "inf";'),
    "unknown-op": (_with(op="median"), f'{ENTRY}.op is "median", not one of mean, '),
    "groups-flat": (_with(groups=[BASE, GAL]), f"{ENTRY}.groups is "),
    "groups-two": (_with(groups=[[BASE], [GAL]]), f"{ENTRY}.groups holds 2 groups; mean takes 1;"),
    "groups-stray": (_with(groups=[[BASE, "runs/regression/x"]]),
                     f"{ENTRY}.groups names runs/regression/x, which is not in its runs;"),
    "run-without-dir": (_with(runs=[{"mlflow_run_id": "1"}]), f"{ENTRY}.runs is "),
    "files-a-string": (_with(files="tables/table5.md"), f"{ENTRY}.files is "),
    "best-epoch-a-list": (_with(best_epoch=["val_top1_err"]), f"{ENTRY}.best_epoch is not "),
}
TEXT_BREAKS = ("truncated", "empty", "not-utf8")


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_provenance_is_one_line_naming_it(at_site, tmp_path, capsys, case):
    """Invalid JSON, keys missing, values of the wrong type: one line naming the file (and the field), exit code
    2, before anything is traced; never a traceback."""
    breaks, message = MALFORMED[case]
    text = (at_site / "reports/provenance.json").read_text()
    path = tmp_path / "provenance.json"
    path.write_bytes(breaks(text) if case in TEXT_BREAKS else json.dumps(breaks(json.loads(text))).encode())
    assert audit.main(["Table V", "Boston", "GAL", "MAE", "--reports", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"audit: {message.format(path=path)}"), captured.err
    assert captured.err.endswith("; render the reports again: python -m pipelines.report\n")


def test_patch_files():
    patch = ("diff --git a/train.py b/train.py\n--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-diff --git a/x b/x\n"
             "diff --git a/my dir/a b.txt b/my dir/a b.txt\nnew file mode 100644\n"
             'diff --git "a/caf\\303\\251.py" "b/caf\\303\\251.py"\n')
    assert audit.patch_files(patch) == ["train.py", "my dir/a b.txt", '"caf\\303\\251.py"']
