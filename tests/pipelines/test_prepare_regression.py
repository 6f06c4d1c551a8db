"""The regression prepare stage: parsers, content checksum, fixtures, mirrors, failures, the CLI end to end.

All offline: the raw inputs are hand-made strings or the pipeline's own smoke fixtures.
"""
from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipelines.fetch import MIRROR_ENV
from pipelines.prepare import fixtures

from .prepare_helpers import prepare_cli, prepare_config
from pipelines.prepare import regression as R


# The first three records of the StatLib file, laid out as StatLib does (preamble, then 11 + 3 numbers).
STATLIB_3 = """\
 The Boston house-price data of Harrison, D. and Rubinfeld, D.L. 'Hedonic
 prices and the environment for clean air', J. Environ. Economics & Management,
 vol.5, 81-102, 1978.

 Variables in order:
 CRIM     per capita crime rate by town
 MEDV     Median value of owner-occupied homes in $1000's

 0.00632  18.00   2.310  0  0.5380  6.5750  65.20  4.0900   1  296.0  15.30
 396.90   4.98  24.00
 0.02731   0.00   7.070  0  0.4690  6.4210  78.90  4.9671   2  242.0  17.80
 396.90   9.14  21.60
 0.02729   0.00   7.070  0  0.4690  7.1850  61.10  4.9671   2  242.0  17.80
 392.83   4.03  34.70
"""


config = prepare_config


def cli(cwd: Path, *args: str, mirror: Path | None = None) -> subprocess.CompletedProcess:
    return prepare_cli("pipelines.prepare.regression", cwd, *args, mirror=mirror)


def table_csv(table: R.Table, columns: tuple[str, ...]) -> str:
    rows = [",".join(columns)]
    rows += [",".join(repr(float(v)) for v in (*x, t)) for x, t in zip(table.X, table.y)]
    return "\n".join(rows) + "\n"


def outputs(root: Path, name: str) -> list[Path]:
    """Whatever the stage left for ``name`` under root (processed files and raw files)."""
    found = [root / "data" / "processed" / f"{name}.{ext}" for ext in ("npz", "json")]
    found += list((root / "data" / "raw" / name).glob("*"))
    return [p for p in found if p.exists()]


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if not p.is_dir()]


# ---------------------------------------------------------------- content checksum


def test_content_sha256_is_exact_and_shape_aware():
    X, y = np.arange(6.0).reshape(3, 2), np.array([1.0, 2.0, 3.0])
    ref = R.content_sha256(X, y)
    assert ref == R.content_sha256(X.copy(order="F"), y.astype(np.float32))  # layout/dtype of the input: no
    assert len(ref) == 64
    assert R.content_sha256(X[::-1], y[::-1]) != ref  # row order is content
    assert R.content_sha256(np.nextafter(X, 10), y) != ref  # one ulp is content
    assert R.content_sha256(X.reshape(2, 3), y[:2]) != R.content_sha256(X.reshape(3, 2)[:2], y[:2])
    zero = np.zeros((1, 1))
    assert R.content_sha256(zero, np.zeros(1)) == R.content_sha256(-zero, -np.zeros(1))  # -0.0 == 0.0
    with pytest.raises(ValueError):
        R.content_sha256(X, y[:2])


# ---------------------------------------------------------------- parsers


def test_parse_statlib_boston_hand_made():
    t = R.parse_statlib_boston(STATLIB_3)
    assert t.X.shape == (3, 13) and t.y.shape == (3,)
    assert t.X.dtype == t.y.dtype == np.float64
    assert t.feature_names == R.BOSTON_COLUMNS[:-1]
    assert t.X[0].tolist() == [0.00632, 18.0, 2.31, 0, 0.538, 6.575, 65.2, 4.09, 1, 296, 15.3, 396.9, 4.98]
    assert t.X[2, 11] == 392.83 and t.X[2, 12] == 4.03
    assert t.y.tolist() == [24.0, 21.6, 34.7]


@pytest.mark.parametrize("text, message", [
    (STATLIB_3.replace(" 396.90   9.14  21.60", " 396.90   9.14"), "expected a record of 11 then 3"),
    (STATLIB_3 + " 0.1 0.2 0.3\n", "odd number"),
    (STATLIB_3.replace("7.1850", "7.1x50"), "expected a record of 11 then 3"),
    ("<html><body>503 Service Unavailable</body></html>\n", "no data records"),
])
def test_parse_statlib_boston_rejects_broken_files(text, message):
    with pytest.raises(R.PrepareError, match=message):
        R.parse_statlib_boston(text)


def test_parse_cal_housing_data_derives_sklearn_features():
    text = ("-122.230000,37.880000,41.000000,880.000000,129.000000,322.000000,126.000000,8.325200,452600.000000\n"
            "-122.220000,37.860000,21.000000,7099.000000,1106.000000,2401.000000,1138.000000,8.301400,358500.000000\n")
    t = R.parse_cal_housing_data(text)
    assert t.feature_names == R.CALIFORNIA_COLUMNS[:-1]
    assert t.X.shape == (2, 8)
    assert t.X[0].tolist() == [8.3252, 41.0, 880 / 126, 129 / 126, 322.0, 322 / 126, 37.88, -122.23]
    assert t.X[1].tolist() == [8.3014, 21.0, 7099 / 1138, 1106 / 1138, 2401.0, 2401 / 1138, 37.86, -122.22]
    assert t.y.tolist() == [4.526, 3.585]  # medianHouseValue / 100000


@pytest.mark.parametrize("text, message", [
    ("1,2,3\n", "rows of 9 numbers"),
    ("-122.23,37.88,41,880,129,322,0,8.3252,452600\n", "households must be positive"),
    ("-122.23,37.88,41,880,129,322,126,8.3252,oops\n", "not a table of numbers"),
])
def test_parse_cal_housing_data_rejects_bad_rows(text, message):
    with pytest.raises(R.PrepareError, match=message):
        R.parse_cal_housing_data(text)


def test_parse_cal_housing_tgz_extracts_and_parses(tmp_path):
    archive = tmp_path / "cal_housing.tgz"
    archive.write_bytes(fixtures.cal_housing_tgz(rows=50, seed=3))
    t = R.parse_cal_housing_tgz(archive)
    direct = R.parse_cal_housing_data(fixtures.cal_housing_data(rows=50, seed=3).decode())
    assert t.X.shape == (50, 8)
    assert np.array_equal(t.X, direct.X) and np.array_equal(t.y, direct.y)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal_housing.tgz"]  # the extraction is cleaned up


def test_parse_table_csv_checks_header_and_rows():
    t = R.parse_statlib_boston(STATLIB_3)
    again = R.parse_table_csv(table_csv(t, R.BOSTON_COLUMNS), R.BOSTON_COLUMNS)
    assert R.content_sha256(again.X, again.y) == R.content_sha256(t.X, t.y)
    with pytest.raises(R.PrepareError, match="header"):
        R.parse_table_csv(table_csv(t, R.BOSTON_COLUMNS).replace("MEDV", "PRICE"), R.BOSTON_COLUMNS)
    with pytest.raises(R.PrepareError, match="line 3"):
        R.parse_table_csv(table_csv(t, R.BOSTON_COLUMNS).replace("21.6", "n/a"), R.BOSTON_COLUMNS)


def test_diabetes_is_442_by_10_and_matches_config(tmp_path):
    t = R.load_diabetes_table()
    assert t.X.shape == (442, 10) and t.y.shape == (442,)
    assert t.feature_names == ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
    assert R.content_sha256(t.X, t.y) == config(tmp_path, "data=diabetes").data.source.content_sha256


# ---------------------------------------------------------------- fixtures


@pytest.mark.parametrize("fmt", sorted(fixtures.MAKERS))
def test_fixtures_are_byte_deterministic(fmt, tmp_path):
    first = fixtures.make(fmt, rows=40, seed=0)
    assert fixtures.make(fmt, rows=40, seed=0) == first
    assert fixtures.make(fmt, rows=40, seed=1) != first
    a, b = tmp_path / "a" / "f", tmp_path / "b" / "f"
    assert R.write_fixture(fmt, a, rows=40, seed=0) == R.write_fixture(fmt, b, rows=40, seed=0)
    assert a.read_bytes() == b.read_bytes() == first


@pytest.mark.parametrize("fmt, rows, features", [("statlib_boston", 120, 13), ("cal_housing_tgz", 600, 8)])
def test_fixtures_parse_and_are_learnable(fmt, rows, features, tmp_path):
    path = tmp_path / "fixture"
    path.write_bytes(fixtures.make(fmt, rows=rows, seed=0))
    t = R.FORMATS[fmt](path)
    assert t.X.shape == (rows, features)
    # Least squares on standardised features, fitted on 3/4, must explain most of the held-out variance.
    A = np.column_stack([(t.X - t.X.mean(0)) / t.X.std(0), np.ones(rows)])
    k = rows * 3 // 4
    w = np.linalg.lstsq(A[:k], t.y[:k], rcond=None)[0]
    r2 = 1 - np.var(t.y[k:] - A[k:] @ w) / np.var(t.y[k:])
    assert r2 > 0.6


def test_npz_bytes_are_deterministic_and_loadable():
    arrays = {"X": np.eye(2), "y": np.array([1.0, 2.0]), "feature_names": np.array(["a", "b"])}
    data = R.npz_bytes(arrays)
    assert data == R.npz_bytes(arrays)
    with np.load(io.BytesIO(data)) as z:  # no pickles needed, as the contract's readers expect
        assert {k: z[k].tolist() for k in z.files} == {k: v.tolist() for k, v in arrays.items()}


# ---------------------------------------------------------------- the stage


@pytest.mark.parametrize("name, shape", [("boston", (120, 13)), ("california", (600, 8)), ("diabetes", (442, 10))])
def test_smoke_stage_end_to_end(name, shape, tmp_path):
    proc = cli(tmp_path, f"data={name}", "profile=smoke")
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "data" / "processed" / f"{name}.npz") as z:
        X, y, names = z["X"], z["y"], z["feature_names"]
    assert X.shape == shape and y.shape == shape[:1] and X.dtype == y.dtype == np.float64
    assert len(names) == shape[1]
    record = json.loads((tmp_path / "data" / "processed" / f"{name}.json").read_text())
    assert set(record) == {"name", "rows", "features", "content_sha256", "raw_sha256", "source", "profile",
                           "identity"}  # the npz's md5 and stage: test_data_identity.py
    assert (record["name"], record["rows"], record["features"], record["profile"]) == (name, *shape, "smoke")
    assert record["content_sha256"] == R.content_sha256(X, y)
    made = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    if name == "diabetes":  # real in every profile: checked against the config; scikit-learn's files copied
        assert record["raw_sha256"] is None
        assert made == {"data/raw/diabetes/diabetes_data_raw.csv.gz", "data/raw/diabetes/diabetes_target.csv.gz",
                        "data/processed/diabetes.npz", "data/processed/diabetes.json",
                        "data/processed/diabetes.manifest.tsv"}
    else:  # Hydra wrote nothing: only the fixture, the fetched copy and the two outputs
        raw = {"boston": "boston", "california": "cal_housing.tgz"}[name]
        assert made == {f"data/fixtures/{raw}", f"data/raw/{name}/{raw}", f"data/processed/{name}.npz",
                        f"data/processed/{name}.json", f"data/processed/{name}.manifest.tsv"}
        assert record["source"] == f"fixture:data/fixtures/{raw}"


def test_smoke_stage_is_deterministic(tmp_path):
    for sub in ("a", "b"):
        assert R.run(config(tmp_path / sub, "data=california")) == 0
    for rel in ("data/fixtures/cal_housing.tgz", "data/processed/california.npz", "data/processed/california.json"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


@pytest.mark.parametrize("name, fmt, csv_name, columns", [
    ("boston", "statlib_boston", "boston_house_prices.csv", R.BOSTON_COLUMNS),
    ("california", "cal_housing_tgz", "california_housing.csv", R.CALIFORNIA_COLUMNS),
])
def test_csv_mirror_verified_by_content_checksum(name, fmt, csv_name, columns, tmp_path, monkeypatch, capsys):
    # Stand-in "real" table: a fixture parsed by the raw parser; the config's checksum is set to its content.
    raw = tmp_path / "raw_fixture"
    raw.write_bytes(fixtures.make(fmt, rows=30, seed=5))
    table = R.FORMATS[fmt](raw)
    content = R.content_sha256(table.X, table.y)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / csv_name).write_text(table_csv(table, columns))
    root = tmp_path / "out"
    assert R.run(config(root, f"data={name}")) == 0  # a smoke run first: its raw file must not linger
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    cfg = config(root, f"data={name}", "profile=regression", f"data.source.content_sha256={content}")
    assert R.run(cfg) == 0, capsys.readouterr().err
    record = json.loads((root / "data" / "processed" / f"{name}.json").read_text())
    assert (record["source"], record["content_sha256"], record["profile"]) == (f"mirror:{csv_name}", content,
                                                                               "regression")
    assert [p.name for p in (root / "data" / "raw" / name).iterdir()] == [csv_name]

    # The same CSV with one value changed: rejected by the content checksum, and nothing is left behind.
    capsys.readouterr()
    text = (mirror / csv_name).read_text().splitlines()
    text[2] = text[2].replace(text[2].split(",")[1], "9" + text[2].split(",")[1], 1)
    (mirror / csv_name).write_text("\n".join(text) + "\n")
    assert R.run(cfg) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepare {name}: content checksum mismatch for mirror:{csv_name}")
    assert err.count("\n") == 1
    assert outputs(root, name) == []


def test_tampered_csv_cli_one_line_error(tmp_path):
    table = R.parse_statlib_boston(STATLIB_3)
    (tmp_path / "boston_house_prices.csv").write_text(table_csv(table, R.BOSTON_COLUMNS).replace("21.6", "21.7"))
    proc = cli(tmp_path, "data=boston", "profile=regression",
               f"data.source.content_sha256={R.content_sha256(table.X, table.y)}", mirror=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("prepare boston: content checksum mismatch") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    assert files_under(tmp_path / "data") == []


def test_real_checksum_rejects_a_wrong_archive_in_the_mirror(tmp_path):
    # A fixture archive where the real cal_housing.tgz should be: the raw sha256 from the config rejects it.
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "cal_housing.tgz").write_bytes(fixtures.cal_housing_tgz(rows=20))
    proc = cli(tmp_path, "data=california", "profile=regression", mirror=tmp_path / "mirror")
    assert proc.returncode == 2
    assert proc.stderr.startswith("prepare california: checksum mismatch") and proc.stderr.count("\n") == 1
    assert files_under(tmp_path / "data") == []


def test_corrupt_fixture_in_mirror_fails_and_removes_outputs(tmp_path, monkeypatch, capsys):
    assert R.run(config(tmp_path, "data=boston")) == 0  # outputs of an earlier good run
    (tmp_path / "data" / "raw" / "boston" / "boston").unlink()  # else fetch() keeps this verified copy
    real_write = R.write_fixture

    def write_then_corrupt(fmt, path, rows, seed):
        checksum = real_write(fmt, path, rows, seed)
        path.write_bytes(path.read_bytes().replace(b"0", b"1", 1))  # the mirror copy is now damaged
        return checksum

    monkeypatch.setattr(R, "write_fixture", write_then_corrupt)
    capsys.readouterr()
    assert R.run(config(tmp_path, "data=boston")) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare boston: checksum mismatch") and err.count("\n") == 1
    assert outputs(tmp_path, "boston") == []  # the earlier run's outputs are gone too: no stale table


def test_mirror_without_the_files_names_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path))
    assert R.run(config(tmp_path / "out", "data=california", "profile=regression")) == 2
    err = capsys.readouterr().err
    assert "none of cal_housing.tgz, 5976036, california_housing.csv found in mirror" in err
    assert files_under(tmp_path / "out") == []


def test_bad_config_exits_2(tmp_path, capsys):
    assert R.run(config(tmp_path, "data=boston", "data_source=elsewhere")) == 2
    assert capsys.readouterr().err.startswith("prepare boston: bad config: data_source must be")
