"""The CIFAR prepare stage: fixture layout, reading and checking archives, the CLI end to end, failures.

All offline: the archives are the pipeline's own smoke fixtures, whole or damaged on purpose.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipelines.fetch import MIRROR_ENV
from pipelines.prepare import cifar as C
from pipelines.prepare import fixtures

from .prepare_helpers import files_under, prepare_cli, prepare_config

ARCHIVE = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
FORMAT = {"cifar10": "cifar10_python", "cifar100": "cifar100_python"}
CLASSES = {"cifar10": 10, "cifar100": 100}


config = prepare_config


def cli(cwd: Path, *args: str, mirror: Path | None = None) -> subprocess.CompletedProcess:
    return prepare_cli("pipelines.prepare.cifar", cwd, *args, mirror=mirror)


def members_of(data: bytes) -> dict[str, object]:
    """Each file of a .tar.gz, unpickled the way CIFAR's own instructions say (non-pickles as bytes)."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            if m.isfile():
                raw = tar.extractfile(m).read()
                out[m.name] = raw if m.name.endswith(("html", "~")) else pickle.loads(raw, encoding="bytes")
    return out


def damaged_archive(kind: str, change) -> bytes:
    """The cifar10/cifar100 fixture with its member list passed through ``change``."""
    return fixtures.deterministic_tar(change(fixtures.cifar_members(kind, train=200, test=100, seed=0)))


def canonical(tmp_path: Path, name: str, archive: bytes, monkeypatch, *overrides: str):
    """Config of a canonical run whose mirror holds ``archive``, with the md5 set to match it."""
    mirror = tmp_path / "mirror"
    mirror.mkdir(exist_ok=True)
    (mirror / ARCHIVE[name]).write_bytes(archive)
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    return config(tmp_path / "out", f"data={name}", "profile=paper",
                  f"data.source.md5={hashlib.md5(archive).hexdigest()}", *overrides)


def assert_one_line_failure(capsys, name: str, message: str, root: Path) -> None:
    err = capsys.readouterr().err
    assert err.startswith(f"prepare {name}: ") and err.count("\n") == 1, err
    assert message in err, err
    leftovers = files_under(root / "data") - {f"fixtures/{ARCHIVE[name]}"}  # the fixture is an input
    assert leftovers == set(), leftovers
    for folder in (root / "data" / "processed", root / "data" / "raw" / name):  # no temporary dirs either
        assert not folder.exists() or list(folder.iterdir()) == []


# ---------------------------------------------------------------- the fixture


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_fixture_has_the_real_layout_and_reads_back(kind, tmp_path):
    data = fixtures.cifar_tgz(kind, train=200, test=100, seed=0)
    members = members_of(data)
    if kind == "cifar10":
        top = "cifar-10-batches-py/"
        batches = [members[f"{top}data_batch_{i}"] for i in range(1, 6)]
        test = members[f"{top}test_batch"]
        assert set(batches[0]) == {b"batch_label", b"labels", b"data", b"filenames"}
        assert len(members[f"{top}batches.meta"][b"label_names"]) == 10
        labels_key = b"labels"
    else:
        top = "cifar-100-python/"
        batches, test = [members[f"{top}train"]], members[f"{top}test"]
        assert set(test) == {b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"}
        assert len(members[f"{top}meta"][b"fine_label_names"]) == 100
        assert test[b"coarse_labels"] == [v // 5 for v in test[b"fine_labels"]]
        labels_key = b"fine_labels"
    assert sum(len(b[labels_key]) for b in batches) == 200
    assert test[b"data"].dtype == np.uint8 and test[b"data"].shape == (100, 3072)
    assert len(test[b"filenames"]) == 100 and isinstance(test[b"filenames"][0], bytes)

    path = tmp_path / ARCHIVE[kind]
    path.write_bytes(data)
    ds = C.read_archive(path, FORMAT[kind], CLASSES[kind])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the extraction is cleaned up
    assert ds.train.images.shape == (200, 32, 32, 3) and ds.test.images.shape == (100, 32, 32, 3)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int64
    assert ds.test.labels.tolist() == test[labels_key]
    assert ds.train.labels.tolist() == [v for b in batches for v in b[labels_key]]
    row = test[b"data"][7]  # row-major C x H x W in the archive -> H x W x C prepared
    for h, w, c in [(0, 0, 0), (5, 17, 1), (31, 30, 2)]:
        assert ds.test.images[7, h, w, c] == row[c * 1024 + h * 32 + w]
    assert set(ds.test.labels.tolist()) == set(range(CLASSES[kind]))  # every class occurs
    if kind == "cifar10":
        assert ds.class_names[:2] == ("airplane", "automobile")


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_fixture_is_learnable(kind, tmp_path):
    path = tmp_path / ARCHIVE[kind]
    path.write_bytes(fixtures.cifar_tgz(kind, train=200, test=100, seed=0))
    ds = C.read_archive(path, FORMAT[kind], CLASSES[kind])
    x_train, x_test = (s.images.reshape(len(s.images), -1).astype(float) for s in (ds.train, ds.test))
    centroids = np.stack([x_train[ds.train.labels == k].mean(0) for k in range(CLASSES[kind])])
    predicted = np.argmin(((x_test[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == ds.test.labels).mean() > 0.9  # nearest class mean: chance is 0.1 / 0.01


def test_fixture_is_byte_deterministic(tmp_path):
    first = fixtures.cifar_tgz("cifar10", train=50, test=20, seed=0)
    assert fixtures.cifar_tgz("cifar10", train=50, test=20, seed=0) == first
    assert fixtures.cifar_tgz("cifar10", train=50, test=20, seed=1) != first
    a, b = tmp_path / "a" / "f.tar.gz", tmp_path / "b" / "f.tar.gz"
    assert C.write_fixture("cifar100", a, 50, 20, 0) == C.write_fixture("cifar100", b, 50, 20, 0)
    assert a.read_bytes() == b.read_bytes() == fixtures.cifar_tgz("cifar100", train=50, test=20, seed=0)
    with pytest.raises(ValueError, match="no CIFAR fixture"):
        fixtures.cifar_tgz("cifar1000")


# ---------------------------------------------------------------- the stage


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_smoke_stage_end_to_end(name, tmp_path):
    proc = cli(tmp_path, f"data={name}", "profile=smoke", f"root={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "r"
    assert files_under(tmp_path) == {f"r/{p}" for p in files_under(root)}  # Hydra wrote nothing in cwd
    assert files_under(root) == {f"data/fixtures/{ARCHIVE[name]}", f"data/raw/{name}/{ARCHIVE[name]}",
                                 f"data/processed/{name}.json", f"data/processed/{name}.manifest.tsv"} | {
        f"data/processed/{name}/{s}_{k}.npy" for s in ("train", "test") for k in ("images", "labels")}
    out = root / "data" / "processed" / name
    for split, n in (("train", 200), ("test", 100)):
        images = np.load(out / f"{split}_images.npy", mmap_mode="r")
        labels = np.load(out / f"{split}_labels.npy", mmap_mode="r")
        assert isinstance(images, np.memmap) and isinstance(labels, np.memmap)
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8 and images.flags.c_contiguous
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert 0 <= labels.min() and labels.max() < CLASSES[name]
    record = json.loads((root / "data" / "processed" / f"{name}.json").read_text())
    raw = root / "data" / "raw" / name / ARCHIVE[name]
    assert record == {"name": name, "classes": CLASSES[name], "class_names": record["class_names"], "train": 200,
                      "test": 100, "raw_md5": hashlib.md5(raw.read_bytes()).hexdigest(),
                      "source": f"fixture:data/fixtures/{ARCHIVE[name]}", "profile": "smoke",
                      "identity": {**record["identity"], "path": name, "files": 4, "stage": f"prepare_cifar@{name}"}}
    assert len(record["class_names"]) == CLASSES[name]
    assert raw.read_bytes() == (root / "data" / "fixtures" / ARCHIVE[name]).read_bytes()


def test_smoke_stage_is_deterministic(tmp_path):
    for sub in ("a", "b"):
        assert C.run(config(tmp_path / sub, "data=cifar10")) == 0
    for rel in files_under(tmp_path / "a") - {"data/processed/cifar10.manifest.tsv"}:  # its mtimes are this run's
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_md5_mismatch_cli_one_line_error_and_no_outputs(tmp_path):
    # The fixture where the real archive should be: the published md5 in the config rejects it.
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / ARCHIVE["cifar10"]).write_bytes(fixtures.cifar_tgz("cifar10", train=20, test=10))
    proc = cli(tmp_path, "data=cifar10", "profile=paper", mirror=tmp_path / "mirror")
    assert proc.returncode == 2
    assert proc.stderr.startswith("prepare cifar10: checksum mismatch") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists() or files_under(tmp_path / "data") == set()


def test_failure_removes_the_outputs_of_an_earlier_run(tmp_path, monkeypatch, capsys):
    assert C.run(config(tmp_path, "data=cifar100")) == 0
    (tmp_path / "data" / "raw" / "cifar100" / ARCHIVE["cifar100"]).unlink()  # else fetch() keeps this copy
    real_write = C.write_fixture

    def write_then_corrupt(kind, path, train, test, seed):
        checksum = real_write(kind, path, train, test, seed)
        path.write_bytes(path.read_bytes()[:-100])  # the mirror copy is now damaged
        return checksum

    monkeypatch.setattr(C, "write_fixture", write_then_corrupt)
    capsys.readouterr()
    assert C.run(config(tmp_path, "data=cifar100")) == 2
    assert_one_line_failure(capsys, "cifar100", "checksum mismatch", tmp_path)


def test_truncated_archive_one_line_error(tmp_path, monkeypatch, capsys):
    whole = fixtures.cifar_tgz("cifar10", train=200, test=100)
    cfg = canonical(tmp_path, "cifar10", whole[: len(whole) // 2], monkeypatch)
    assert C.run(cfg) == 2
    assert_one_line_failure(capsys, "cifar10", "corrupt or truncated archive cifar-10-python.tar.gz", tmp_path / "out")


@pytest.mark.parametrize("name, missing", [("cifar10", "data_batch_3"), ("cifar100", "meta")])
def test_archive_missing_a_file_one_line_error(name, missing, tmp_path, monkeypatch, capsys):
    archive = damaged_archive(name, lambda ms: [(n, c) for n, c in ms if not n.endswith("/" + missing)])
    cfg = canonical(tmp_path, name, archive, monkeypatch, "data.source.train=200", "data.source.test=100")
    assert C.run(cfg) == 2
    assert_one_line_failure(capsys, name, f"incomplete archive, {fixtures.cifar_members(name, 2, 1)[0][0]}/{missing} "
                                          "is missing", tmp_path / "out")


@pytest.mark.parametrize("name, key", [("cifar10", b"labels"), ("cifar100", b"fine_labels")])
def test_label_out_of_range_one_line_error(name, key, tmp_path, monkeypatch, capsys):
    def bad_label(members):
        out = []
        for n, c in members:
            if n.endswith("/test" if name == "cifar100" else "/test_batch"):
                batch = pickle.loads(c, encoding="bytes")
                batch[key][3] = CLASSES[name]
                c = pickle.dumps(batch, protocol=2)
            out.append((n, c))
        return out

    cfg = canonical(tmp_path, name, damaged_archive(name, bad_label), monkeypatch,
                    "data.source.train=200", "data.source.test=100")
    assert C.run(cfg) == 2
    assert_one_line_failure(capsys, name, f"label {CLASSES[name]} of image 3 is out of range 0..{CLASSES[name] - 1}",
                            tmp_path / "out")


def test_read_batch_rejects_malformed_batches(tmp_path):
    path = tmp_path / "batch"

    def check(batch, message):
        path.write_bytes(pickle.dumps(batch, protocol=2))
        with pytest.raises(C.PrepareError, match=message):
            C.read_batch(path, b"labels", 10)

    data = np.zeros((2, 3072), np.uint8)
    check({b"data": data}, "no labels entry")
    check({b"data": data.astype(np.float32), b"labels": [0, 1]}, "uint8 N x 3072")
    check({b"data": data[:, :100], b"labels": [0, 1]}, "uint8 N x 3072")
    check({b"data": data, b"labels": [0]}, "must be 2 integers")
    check({b"data": data, b"labels": [0, -1]}, "label -1 of image 1 is out of range")
    check([data], "expected a pickled dict")
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1], b"x": print}, protocol=2))
    with pytest.raises(C.PrepareError, match=r"unexpected global \w+\.print"):
        C.read_batch(path, b"labels", 10)


def test_wrong_image_count_is_rejected(tmp_path, monkeypatch, capsys):
    # The fixture under the canonical config: md5 matches (overridden) but 200 images are not 50000.
    cfg = canonical(tmp_path, "cifar100", fixtures.cifar_tgz("cifar100"), monkeypatch)
    assert C.run(cfg) == 2
    assert_one_line_failure(capsys, "cifar100", "200 train images, expected 50000", tmp_path / "out")


def test_bad_config_exits_2(tmp_path, capsys):
    assert C.run(config(tmp_path, "data=cifar10", "data_source=elsewhere")) == 2
    assert capsys.readouterr().err.startswith("prepare cifar10: bad config: data_source must be")
    assert C.run(config(tmp_path, "data=cifar10", "data.source.format=cifar10_binary")) == 2
    assert "unknown data.source.format" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet"])
def test_regression_profile_keeps_image_data_at_fixture_size(tmp_path, name):
    """profile=regression is about Table V: image sets stay on fixtures and their runs are labelled smoke."""
    cfg = config(tmp_path, f"data={name}", "profile=regression")
    assert (cfg.data_source, cfg.profile) == ("fixtures", "smoke")
    assert config(tmp_path, f"data={name}", "profile=paper").data_source == "canonical"
