"""Prepared data are checked against the identity their prepare stage recorded, cheaply, at every run start.

The prepare stage records the output's md5 (the value runs record) in its sidecar and a manifest of (path,
size, mtime_ns, md5) beside it; ``data_checksum`` then stats the files instead of reading them, fails in one
line when a file was edited, added or removed, and rehashes everything with GAL_DATA_CHECK=full.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipelines import hashing
from pipelines.errors import TrackingError
from pipelines.hashing import manifest_path, record_identity
from pipelines.tracking import provenance
from pipelines.tracking.provenance import data_checksum

from .prepare_helpers import prepare_config
from .train_helpers import train, train_env, with_data


def old_checksum(path: Path) -> str:
    """data_checksum as it was before identities: what run records hold, so they stay comparable."""
    md5 = lambda p: hashlib.md5(p.read_bytes()).hexdigest()  # noqa: E731
    if path.is_file():
        return "md5:" + md5(path)
    h = hashlib.md5()
    for p in sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()):
        h.update(f"{p.relative_to(path).as_posix()}\0{md5(p)}\n".encode())
    return "md5:" + h.hexdigest()


def prepared(root: Path, stage: str = "prepare_toy") -> Path:
    """data/processed/toy/ (three files, one in a subfolder) with its sidecar and manifest, as a stage writes."""
    out = root / "data" / "processed" / "toy"
    (out / "sub").mkdir(parents=True)
    for rel, content in {"a.npy": b"a" * 100, "b.npy": b"b" * 50, "sub/c.npy": b"c" * 10}.items():
        (out / rel).write_bytes(content)
    sidecar = out.parent / "toy.json"
    sidecar.write_text(json.dumps({"name": "toy", "identity": record_identity(out, stage=stage)}))
    return out


def reads_nothing(monkeypatch) -> None:
    """Any read of a file's content from here on fails the test."""
    def refuse(path, algorithm):
        raise AssertionError(f"read {path}")
    monkeypatch.setattr(hashing, "digest", refuse)
    monkeypatch.setattr(provenance, "digest", refuse)


def assert_refused(out: Path, detail: str, full: bool | None = None) -> None:
    """data_checksum(out) refuses the prepared data in the one line that names ``detail``."""
    with pytest.raises(TrackingError) as err:
        data_checksum(out, full=full)
    assert str(err.value) == (f"the prepared data at {out} changed since it was prepared ({detail}); rerun its "
                              "prepare stage (dvc repro prepare_toy)")


def edit_keeping_size_and_mtime(path: Path, content: bytes) -> None:
    st = path.stat()
    assert len(content) == st.st_size
    path.write_bytes(content)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---------------------------------------------------------------- the recorded identity and the cheap check


def test_the_identity_is_the_full_hash_and_the_manifest_lists_every_file(tmp_path):
    out = prepared(tmp_path)
    identity = json.loads((out.parent / "toy.json").read_text())["identity"]
    assert identity == {"path": "toy", "md5": old_checksum(out), "files": 3, "bytes": 160, "stage": "prepare_toy"}
    md5, entries = hashing.read_manifest(out.parent / "toy.manifest.tsv")
    assert md5 == identity["md5"] and [e.path for e in entries] == ["a.npy", "b.npy", "sub/c.npy"]
    assert [(e.size, e.mtime_ns) for e in entries] == [((out / e.path).stat().st_size,
                                                       (out / e.path).stat().st_mtime_ns) for e in entries]


def test_prepared_data_return_the_recorded_hash_without_reading_a_file(tmp_path, monkeypatch):
    out = prepared(tmp_path)
    want = old_checksum(out)
    reads_nothing(monkeypatch)
    assert data_checksum(out) == want


def test_an_edit_keeping_size_and_mtime_needs_the_full_check(tmp_path, monkeypatch):
    out = prepared(tmp_path)
    want = old_checksum(out)
    edit_keeping_size_and_mtime(out / "b.npy", b"x" * 50)
    assert data_checksum(out) == want  # the documented limit of the stat check: nothing was read
    assert_refused(out, "file b.npy: content differs", full=True)
    monkeypatch.setenv("GAL_DATA_CHECK", "full")
    with pytest.raises(TrackingError, match="file b.npy: content differs"):
        data_checksum(out)
    monkeypatch.setenv("GAL_DATA_CHECK", "stat")
    assert data_checksum(out) == want


def test_the_full_check_passes_unchanged_data(tmp_path, monkeypatch):
    out = prepared(tmp_path)
    monkeypatch.setenv("GAL_DATA_CHECK", "full")
    assert data_checksum(out) == old_checksum(out)


def test_a_bad_check_setting_is_one_line(tmp_path, monkeypatch):
    out = prepared(tmp_path)
    monkeypatch.setenv("GAL_DATA_CHECK", "ful")
    with pytest.raises(TrackingError, match=r"GAL_DATA_CHECK='ful': set it to full .* or stat"):
        data_checksum(out)


def test_an_edit_that_changes_the_size_is_one_line_naming_the_file(tmp_path, monkeypatch):
    out = prepared(tmp_path)
    (out / "sub" / "c.npy").write_bytes(b"c" * 11)
    reads_nothing(monkeypatch)  # the sizes say it
    assert_refused(out, "file sub/c.npy: 11 bytes, 10 when prepared")


def test_an_edit_of_the_same_size_is_found_by_its_mtime(tmp_path):
    out = prepared(tmp_path)
    st = (out / "a.npy").stat()
    (out / "a.npy").write_bytes(b"z" * 100)
    os.utime(out / "a.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert_refused(out, "file a.npy: modified, content differs")


def test_a_touched_file_is_rehashed_alone_and_then_remembered(tmp_path, monkeypatch):
    """Same content, new mtime (touch, a copy, dvc checkout): it passes, and the next start reads nothing."""
    out = prepared(tmp_path)
    want = old_checksum(out)
    os.utime(out / "a.npy", ns=(0, 1_000_000_000))
    read = []
    real = provenance.digest
    monkeypatch.setattr(provenance, "digest", lambda p, a: read.append(Path(p).name) or real(p, a))
    assert data_checksum(out) == want and read == ["a.npy"]
    reads_nothing(monkeypatch)
    assert data_checksum(out) == want


@pytest.mark.parametrize("change, what", [
    (lambda out: (out / "sub" / "new.npy").write_bytes(b"n"), "file sub/new.npy: not in the prepared data"),
    (lambda out: (out / "b.npy").unlink(), "file b.npy: missing"),
    (lambda out: [(out / n).unlink() for n in ("a.npy", "b.npy")], "file a.npy: missing; 1 more differ"),
])
def test_an_added_or_removed_file_is_one_line(tmp_path, monkeypatch, change, what):
    out = prepared(tmp_path)
    change(out)
    reads_nothing(monkeypatch)
    assert_refused(out, what)


def test_without_a_manifest_the_data_are_rehashed_against_the_identity(tmp_path, monkeypatch):
    out = prepared(tmp_path)
    want = old_checksum(out)
    manifest = out.parent / "toy.manifest.tsv"
    manifest.unlink()
    assert data_checksum(out) == want and manifest.is_file()  # checked in full, and remembered
    reads_nothing(monkeypatch)
    assert data_checksum(out) == want
    monkeypatch.undo()
    manifest.write_text("# md5:0123\n")  # another identity's manifest: not used
    (out / "b.npy").write_bytes(b"y" * 50)
    assert_refused(out, f"its content is {old_checksum(out)}, {want} when prepared")


def test_data_without_an_identity_are_hashed_in_full_as_before(tmp_path):
    folder = tmp_path / "hand"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"a")
    (folder / "sub" / "b.txt").write_bytes(b"b")
    single = tmp_path / "table.npz"
    single.write_bytes(b"table")
    (tmp_path / "table.json").write_text(json.dumps({"name": "table"}))  # a sidecar without an identity
    for path in (folder, single):
        first = data_checksum(path)
        assert first == old_checksum(path)
    (folder / "a.txt").write_bytes(b"A")
    assert data_checksum(folder) == old_checksum(folder) != first  # no identity, nothing to compare with


def test_a_sidecar_is_not_its_own_identity(tmp_path):
    out = prepared(tmp_path)
    sidecar = out.parent / "toy.json"
    assert data_checksum(sidecar) == old_checksum(sidecar)


# ---------------------------------------------------------------- the prepare stages write it


def test_regression_stage_records_the_identity_and_an_edit_is_refused(tmp_path, monkeypatch):
    from pipelines.prepare import regression as R

    assert R.run(prepare_config(tmp_path, "data=boston", "profile=smoke")) == 0
    npz = tmp_path / "data" / "processed" / "boston.npz"
    record = json.loads((tmp_path / "data" / "processed" / "boston.json").read_text())
    assert record["identity"] == {"path": "boston.npz", "md5": old_checksum(npz), "files": 1,
                                  "bytes": npz.stat().st_size, "stage": "prepare@boston"}
    assert hashing.read_manifest(manifest_path(npz.with_suffix(".json")))[0] == record["identity"]["md5"]
    with monkeypatch.context() as m:
        reads_nothing(m)
        assert data_checksum(npz) == old_checksum(npz)
    with np.load(npz) as z:  # edited but still parseable: the same shapes, another target
        arrays = {k: z[k] for k in z.files}
    arrays["y"] = arrays["y"] + 1.0
    npz.write_bytes(R.npz_bytes(arrays))
    with pytest.raises(TrackingError, match=r"boston.npz changed since it was prepared \(file boston.npz: "
                                            r"modified, content differs\); .*\(dvc repro prepare@boston\)"):
        data_checksum(npz)


def test_a_run_on_edited_prepared_data_stops_before_training(tmp_path):
    """The issue's case end to end: a still parseable edit of a prepared table, then a training run."""
    from pipelines.prepare import regression as R

    assert R.run(prepare_config(tmp_path, "data=boston", "profile=smoke")) == 0
    npz = tmp_path / "data" / "processed" / "boston.npz"
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["y"] = arrays["y"][::-1].copy()
    npz.write_bytes(R.npz_bytes(arrays))
    result = train(tmp_path, "experiment=boston_gal", "task.epochs=1", env=train_env(tmp_path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "changed since it was prepared (file boston.npz: modified, content differs)" in result.stderr
    assert "dvc repro prepare@boston" in result.stderr
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]  # no record


def test_cifar_stage_records_the_identity_of_its_folder(tmp_path, prepared_cifar10, monkeypatch):
    processed = with_data(tmp_path, prepared_cifar10) / "data" / "processed"  # copied with their mtimes
    out = processed / "cifar10"
    identity = json.loads((processed / "cifar10.json").read_text())["identity"]
    assert identity["md5"] == old_checksum(out) and identity["stage"] == "prepare_cifar@cifar10"
    assert (identity["path"], identity["files"]) == ("cifar10", 4)
    assert hashing.read_manifest(processed / "cifar10.manifest.tsv")[0] == identity["md5"]
    with monkeypatch.context() as m:
        reads_nothing(m)
        assert data_checksum(out) == old_checksum(out)
    labels = np.load(out / "train_labels.npy")
    np.save(out / "train_labels.npy", (labels + 1) % 10)  # still valid labels, same size
    with pytest.raises(TrackingError, match=r"\(file train_labels.npy: modified, content differs\); rerun its "
                                            r"prepare stage \(dvc repro prepare_cifar@cifar10\)"):
        data_checksum(out)
