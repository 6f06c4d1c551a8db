"""Fetch + prepare stage for the regression sets of Table V: Boston, Diabetes, California housing.

    python -m pipelines.prepare.regression data=boston profile=smoke [root=.]

Profile ``regression`` (data_source: canonical) downloads ``data.source.url``, or, when env GAL_DATA_MIRROR
names a mirror, takes the first of ``data.source.files`` the mirror holds: the raw file or the already-parsed
table as CSV. Either way the parsed table is accepted only if its content_sha256 equals
``data.source.content_sha256``, which is what makes a CSV from anywhere as trustworthy as the raw file.
Profile ``smoke`` (data_source: fixtures) writes small synthetic files in the same raw formats into
data/fixtures/ (pipelines.prepare.fixtures) and fetches them through the same mirror code path, verified
by the checksum the generator reports; their content is synthetic, so the real content check is skipped.
Diabetes ships with scikit-learn and is real (and checked) in both profiles; the two files
load_diabetes reads are copied into data/raw/diabetes/ as the record of the input.

Outputs under ``root``: data/raw/<name>/<file>, data/processed/<name>.npz (X, y, feature_names),
data/processed/<name>.json (CONTRACT.md; with the npz's identity) and data/processed/<name>.manifest.tsv
(pipelines.hashing). A failed run leaves none of them (a run that fails must not leave
an older table looking like its result): one line on stderr, exit code 2 (pipelines.errors).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipelines.atomic import write_atomic, write_if_changed
from pipelines.fetch import MIRROR_ENV, FetchError, extract, fetch
from pipelines.hashing import digest, manifest_path, record_identity
from pipelines.prepare import fixtures
from pipelines.errors import ConfigError
from pipelines.prepare.stage import PrepareError, content_sha256, hydra_entry, npz_bytes, run_stage

BOSTON_COLUMNS = ("CRIM", "ZN", "INDUS", "CHAS", "NOX", "RM", "AGE", "DIS", "RAD", "TAX", "PTRATIO", "B",
                  "LSTAT", "MEDV")  # StatLib order; the last is the target
CALIFORNIA_COLUMNS = ("MedInc", "HouseAge", "AveRooms", "AveBedrms", "Population", "AveOccup", "Latitude",
                      "Longitude", "MedHouseVal")  # scikit-learn's fetch_california_housing order + target
CAL_HOUSING_DATA = "cal_housing.data"  # the table inside cal_housing.tgz (CaliforniaHousing/cal_housing.data)
STATLIB_LINES = (11, 3)  # numbers per line of one StatLib Boston record


class Table(NamedTuple):
    X: np.ndarray  # float64, rows x features
    y: np.ndarray  # float64, rows
    feature_names: tuple[str, ...]


# ---------------------------------------------------------------- parsers: one per file format


def parse_statlib_boston(text: str) -> Table:
    """The StatLib ``boston`` file: a free-text preamble, then one record per two lines (11 + 3 numbers)."""
    lines = text.splitlines()
    # The preamble has no fixed length we can rely on: data start at the first line made only of numbers.
    start = next((i for i, line in enumerate(lines) if _numbers(line.split()) is not None), None)
    if start is None:
        raise PrepareError("no data records found: not a StatLib boston file (an HTML error page?)")
    body = [(i + 1, line.split()) for i, line in enumerate(lines[start:], start) if line.strip()]
    if len(body) % 2:
        raise PrepareError(f"{len(body)} data lines, an odd number: each StatLib record spans two lines")
    rows = []
    for (n1, first), (n2, second) in zip(body[::2], body[1::2]):
        values = _numbers(first + second)
        if (len(first), len(second)) != STATLIB_LINES or values is None:
            raise PrepareError(f"lines {n1}-{n2}: expected a record of 11 then 3 numbers, got "
                               f"{first[:11]!r} / {second[:3]!r}")
        rows.append(values)
    return _table(np.array(rows, dtype=np.float64), BOSTON_COLUMNS)


def parse_cal_housing_data(text: str) -> Table:
    """cal_housing.data (9 comma-separated numbers a row) -> scikit-learn's 8 derived features + target.

    Same arithmetic as sklearn.datasets.fetch_california_housing, so the values agree to the bit.
    """
    try:
        raw = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise PrepareError(f"{CAL_HOUSING_DATA}: not a table of numbers: {e}") from None
    if raw.shape[0] == 0 or raw.shape[1] != 9:
        raise PrepareError(f"{CAL_HOUSING_DATA}: expected rows of 9 numbers, got shape {raw.shape}")
    lon, lat, age, rooms, bedrooms, population, households, income, value = raw.T
    if not np.all(households > 0):
        raise PrepareError(f"{CAL_HOUSING_DATA}: households must be positive (row {np.argmin(households) + 1})")
    X = np.column_stack([income, age, rooms / households, bedrooms / households, population,
                         population / households, lat, lon])
    y = value / 100000.0  # scikit-learn's MedHouseVal is in units of 100,000 dollars
    return _table(np.column_stack([X, y]), CALIFORNIA_COLUMNS)


def parse_cal_housing_tgz(archive: Path) -> Table:
    """cal_housing.tgz: extracted safely (pipelines.fetch.extract) into a temporary directory, then parsed."""
    archive = Path(archive)
    with tempfile.TemporaryDirectory(prefix=".cal_housing.", dir=archive.parent) as tmp:
        found = sorted(extract(archive, Path(tmp) / "x").rglob(CAL_HOUSING_DATA))
        if len(found) != 1:
            raise PrepareError(f"{archive.name}: expected one {CAL_HOUSING_DATA} inside, found {len(found)}")
        return parse_cal_housing_data(_text(found[0]))


def parse_table_csv(text: str, columns: tuple[str, ...]) -> Table:
    """An already-parsed table as CSV: a header naming ``columns`` (target last), then rows of numbers."""
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if header != list(columns):
        raise PrepareError(f"CSV header {header[:len(columns) + 1]} is not the expected {list(columns)}")
    rows = []
    for n, row in enumerate(reader, 2):
        values = _numbers(row) if len(row) == len(columns) else None
        if values is None:
            if not row:
                continue  # a blank line, e.g. at the end
            raise PrepareError(f"CSV line {n}: expected {len(columns)} numbers, got {row[:len(columns) + 1]}")
        rows.append(values)
    if not rows:
        raise PrepareError("CSV has a header but no rows")
    return _table(np.array(rows, dtype=np.float64), columns)


def load_diabetes_table() -> Table:
    """Diabetes as shipped in scikit-learn, with raw (unscaled) features and target."""
    from sklearn.datasets import load_diabetes  # imported here: only this dataset needs scikit-learn

    d = load_diabetes(scaled=False)
    return _table(np.column_stack([d.data, d.target]), tuple(d.feature_names) + ("target",))


def copy_diabetes_files(raw_dir: Path, created: list[Path]) -> None:
    """Copy the files load_diabetes reads from the scikit-learn install into raw_dir, as the stage's record
    of its input (and so data/raw/diabetes exists like the other sets' raw folders)."""
    from importlib import resources

    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    for filename in (d.data_filename, d.target_filename):
        created.append(raw_dir / filename)
        with resources.as_file(resources.files(d.data_module) / filename) as src:
            _fetch(Path(src).resolve().as_uri(), raw_dir / filename, None, mirror="")


def _numbers(tokens: list[str]) -> list[float] | None:
    try:
        return [float(t) for t in tokens] if tokens else None
    except ValueError:
        return None


def _table(data: np.ndarray, columns: tuple[str, ...]) -> Table:
    if not np.all(np.isfinite(data)):
        raise PrepareError("the table holds NaN or infinite values")
    data = np.ascontiguousarray(data, dtype=np.float64)
    return Table(np.ascontiguousarray(data[:, :-1]), data[:, -1].copy(), tuple(columns[:-1]))


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a CSV saved by a spreadsheet may start with a BOM
    except UnicodeDecodeError as e:
        raise PrepareError(f"not a text file ({e.reason} at byte {e.start})") from None


FORMATS = {  # data.source.files[*].format -> parser of the fetched file
    "statlib_boston": lambda path: parse_statlib_boston(_text(path)),
    "boston_csv": lambda path: parse_table_csv(_text(path), BOSTON_COLUMNS),
    "cal_housing_tgz": parse_cal_housing_tgz,
    "california_csv": lambda path: parse_table_csv(_text(path), CALIFORNIA_COLUMNS),
}


# ---------------------------------------------------------------- getting the file


def fetch_source(source, raw_dir: Path, mirror: str | None) -> tuple[dict, Path, str]:
    """Fetch the real file into raw_dir: (files entry used, its path, where it came from)."""
    names = ", ".join(e.name for e in source.files)
    if not mirror:
        entry = source.files[0]  # what the canonical URL serves
        try:
            return entry, _fetch(source.url, raw_dir / entry.name, _checksum(entry), mirror=""), source.url
        except FetchError as e:
            raise FetchError(f"{e}; to work offline set {MIRROR_ENV} to a directory holding one of: {names}"
                             ) from None
    for entry in source.files:  # a mirror may hold the raw file or the parsed table: take the first found
        if not _mirror_may_have(mirror, entry.name):
            continue
        try:
            path = _fetch(_url_named(source.url, entry.name), raw_dir / entry.name, _checksum(entry), mirror)
        except FetchError as e:
            if str(e).startswith("HTTP 404"):  # an http(s) mirror only tells by answering
                continue
            raise
        return entry, path, f"mirror:{entry.name}"
    raise PrepareError(f"none of {names} found in mirror {mirror} ({MIRROR_ENV}); put one there, or unset "
                       f"{MIRROR_ENV} to download {source.url}")


def _fetch(url: str, dest: Path, checksum: str | None, mirror: str) -> Path:
    if checksum is None:
        # fetch() keeps an existing file it cannot verify; a stale one (e.g. a smoke fixture) must not
        # survive, so a file without a raw checksum is fetched afresh (the content check then guards it).
        dest.unlink(missing_ok=True)
    return fetch(url, dest, checksum=checksum, mirror=mirror)


def _checksum(entry) -> str | None:
    return f"sha256:{entry.sha256}" if entry.get("sha256") else None


def _url_named(url: str, name: str) -> str:
    # fetch() looks a file up in a mirror by its URL's basename; this URL ends in ``name`` and is never opened.
    return urllib.parse.urljoin(url, urllib.parse.quote(name))


def _mirror_may_have(mirror: str, name: str) -> bool:
    parts = urllib.parse.urlsplit(mirror)
    if parts.scheme in ("http", "https"):
        return True
    base = Path(urllib.request.url2pathname(parts.path)) if parts.scheme == "file" else Path(mirror)
    return (base / name).is_file()


# ---------------------------------------------------------------- writing


# ---------------------------------------------------------------- the stage


def prepare(cfg, created: list[Path]) -> dict:
    """Run the stage for cfg.data; return the sidecar record. Appends every output path to ``created``."""
    data, name, root = cfg.data, cfg.data.name, Path(cfg.root)
    if cfg.data_source not in ("canonical", "fixtures"):
        raise ConfigError(f"data_source must be canonical or fixtures, got {cfg.data_source!r}")
    source = data.source
    npz, sidecar = root / "data" / "processed" / f"{name}.npz", root / "data" / "processed" / f"{name}.json"
    created += [npz, sidecar, manifest_path(sidecar)]
    for old in (npz, sidecar, manifest_path(sidecar)):
        old.unlink(missing_ok=True)

    synthetic = False
    if source.format == "sklearn_diabetes":
        copy_diabetes_files(root / "data" / "raw" / name, created)
        table, raw_sha256 = load_diabetes_table(), None  # two raw files, none of them "the" raw file
        import sklearn

        origin = f"scikit-learn {sklearn.__version__}: sklearn.datasets.load_diabetes(scaled=False)"
    elif source.format == "file":
        unknown = [e.format for e in source.files if e.format not in FORMATS]
        if unknown:
            raise ConfigError(f"unknown file format {unknown[0]!r}; known: {', '.join(FORMATS)}")
        raw_dir = root / "data" / "raw" / name
        created += [raw_dir / e.name for e in source.files]
        try:
            if cfg.data_source == "fixtures":
                entry, synthetic = source.files[0], True
                mirror = root / "data" / "fixtures"
                checksum = write_fixture(entry.format, mirror / entry.name, data.fixture.rows, data.fixture.seed)
                path = _fetch(_url_named(source.url, entry.name), raw_dir / entry.name, checksum, str(mirror))
                origin = f"fixture:data/fixtures/{entry.name}"
            else:
                entry, path, origin = fetch_source(source, raw_dir, os.environ.get(MIRROR_ENV) or None)
        finally:
            try:
                (raw_dir / ".partial").rmdir()  # fetch()'s resume area: kept only while it holds a partial file
            except OSError:
                pass
        for other in source.files:  # leave raw_dir holding only this run's file
            if other.name != entry.name:
                (raw_dir / other.name).unlink(missing_ok=True)
        try:
            table = FORMATS[entry.format](path)
        except PrepareError as e:
            raise PrepareError(f"cannot parse {origin}: {e}") from None
        raw_sha256 = digest(path, "sha256")
    else:
        raise ConfigError(f"data.source.format must be file or sklearn_diabetes, got {source.format!r}")

    content = content_sha256(table.X, table.y)
    if not synthetic:
        want = source.get("content_sha256")
        if not want:
            raise ConfigError("data.source.content_sha256 is not set: the real table cannot be verified")
        if content != want:
            raise PrepareError(f"content checksum mismatch for {origin}: the parsed {table.X.shape[0]} x "
                               f"{table.X.shape[1]} table has content_sha256 {content}, expected {want}; "
                               "the file is corrupt, edited or not the canonical data")
    record = {"name": name, "rows": int(table.X.shape[0]), "features": int(table.X.shape[1]),
              "content_sha256": content, "raw_sha256": raw_sha256, "source": origin, "profile": cfg.profile}
    write_atomic(npz, npz_bytes({"X": table.X, "y": table.y, "feature_names": np.array(table.feature_names)}))
    record["identity"] = record_identity(npz, stage=f"prepare@{name}")
    write_atomic(sidecar, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return record


def write_fixture(fmt: str, path: Path, rows: int, seed: int) -> str:
    """Write the smoke fixture for ``fmt`` at ``path``; return its checksum for fetch()."""
    try:
        content = fixtures.make(fmt, rows=rows, seed=seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    write_if_changed(path, content)
    return f"sha256:{hashlib.sha256(content).hexdigest()}"


def run(cfg) -> int:
    return run_stage(cfg.data.get("name", "?"), lambda created: prepare(cfg, created), lambda r: (
        f"{r['rows']} x {r['features']} from {r['source']} -> data/processed/{r['name']}.npz "
        f"(content_sha256 {r['content_sha256'][:12]}...)"))


if __name__ == "__main__":
    hydra_entry(run)
