"""The ImageNet prepare stage on its own tiny fixture archive set: layout, labels, missing/damaged/hostile input.

All offline: the archives are the pipeline's smoke fixtures (the real ILSVRC2012 layout) or edits of them.
"""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipelines.prepare import imagenet as I

from .prepare_helpers import prepare_cli, prepare_config

NAMES = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar",
         "devkit": "ILSVRC2012_devkit_t12.tar.gz"}
FIXTURE_COUNTS = ("data.source.counts.classes=4", "data.source.counts.train=24", "data.source.counts.val=8")


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(I.ENV, raising=False)


def config(root: Path, *overrides: str):
    return prepare_config(root, "data=imagenet", *overrides)


def canonical(root: Path, archives: Path, *overrides: str):
    """The user-archives code path pointed at ``archives`` (fixture-sized, so counts and md5 overridden)."""
    return config(root, "data_source=canonical", f"data.archives_dir={archives}", *overrides)


def archives_dir(tmp_path: Path, **replace: bytes) -> Path:
    """A directory holding the fixture archives under their real names, some replaced by ``replace``."""
    folder = tmp_path / "archives"
    folder.mkdir()
    for role, content in {**I.fixture_archives(), **replace}.items():
        (folder / NAMES[role]).write_bytes(content)
    return folder


def outputs(root: Path) -> list[Path]:
    processed = root / "data" / "processed"
    return sorted(processed.iterdir()) if processed.exists() else []


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def devkit_truth() -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(I.fixture_archives()["devkit"])) as tf:
        text = tf.extractfile(f"ILSVRC2012_devkit_t12/data/{I.GROUND_TRUTH}").read().decode()
    return [int(line) for line in text.split()]


def cli(cwd: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return prepare_cli("pipelines.prepare.imagenet", cwd, "data=imagenet", *args, env_extra=env_extra)


# ---------------------------------------------------------------- fixtures and the good path


def test_fixture_archives_are_deterministic_and_real_format():
    a, b = I.fixture_archives(), I.fixture_archives()
    assert a == b
    assert I.fixture_archives(seed=1)["train"] != a["train"]
    with tarfile.open(fileobj=io.BytesIO(a["train"])) as tf:
        assert tf.getnames() == ["n01440764.tar", "n01443537.tar", "n01484850.tar", "n01491361.tar"]
    with tarfile.open(fileobj=io.BytesIO(a["val"])) as tf:
        assert tf.getnames() == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 9)]
    with tarfile.open(fileobj=io.BytesIO(a["devkit"]), mode="r:gz") as tf:  # meta.mat as the real one reads
        from scipy.io import loadmat

        synsets = loadmat(io.BytesIO(tf.extractfile(f"ILSVRC2012_devkit_t12/data/{I.META_MAT}").read()))["synsets"]
    assert synsets.shape == (6, 1)  # 4 leaves + 2 inner synsets, N x 1 like the devkit's 1860 x 1
    leaves = [(int(s["ILSVRC2012_ID"][0, 0]), str(s["WNID"][0])) for s in synsets[:, 0] if s["num_children"][0, 0] == 0]
    assert leaves == [(k + 1, w) for k, (w, _) in enumerate(I.FIXTURE_LEAVES[:4])]


def test_smoke_builds_the_imagefolder_layout(tmp_path, capsys):
    assert I.run(config(tmp_path, "profile=smoke")) == 0
    out = tmp_path / "data" / "processed" / "imagenet"
    wnids = [w for w, _ in I.FIXTURE_LEAVES[:4]]
    assert sorted(p.name for p in (out / "train").iterdir()) == wnids
    assert sorted(p.name for p in (out / "val").iterdir()) == wnids  # same classes -> same ImageFolder indices
    for wnid in wnids:
        images = sorted((out / "train" / wnid).iterdir())
        assert len(images) == 6 and all(p.name.startswith(wnid + "_") and p.suffix == ".JPEG" for p in images)
        with Image.open(images[0]) as im:
            assert im.format == "JPEG" and im.size == (8, 8)
    # val labels: the devkit's ground truth (sorted filename order) through meta.mat's ID -> WNID
    truth = devkit_truth()
    val = {p.name: p.parent.name for p in (out / "val").rglob("*.JPEG")}
    assert len(val) == 8
    for i, ident in enumerate(truth, 1):
        assert val[f"ILSVRC2012_val_{i:08d}.JPEG"] == I.FIXTURE_LEAVES[ident - 1][0]
    record = json.loads((tmp_path / "data" / "processed" / "imagenet.json").read_text())
    assert record["classes"] == 4 and record["train_images"] == 24 and record["val_images"] == 8
    assert record["profile"] == "smoke" and record["md5_verified"] is True
    fx = tmp_path / "data" / "fixtures" / "imagenet"
    assert record["archive_md5"] == {n: I.digest(fx / n, "md5") for n in NAMES.values()}
    assert record["identity"]["files"] == 32 and record["identity"]["stage"] == "prepare_imagenet"
    names = ["imagenet", "imagenet.json", "imagenet.manifest.tsv"]
    assert [p.name for p in outputs(tmp_path)] == names  # no temp dirs left
    assert "4 classes, 24 train / 8 val" in capsys.readouterr().out


def test_user_archives_path_with_md5_skipped(tmp_path):
    folder = archives_dir(tmp_path)
    cfg = canonical(tmp_path / "r", folder, "data.verify_md5=false", *FIXTURE_COUNTS)
    assert I.run(cfg) == 0
    record = json.loads((tmp_path / "r" / "data" / "processed" / "imagenet.json").read_text())
    assert record["md5_verified"] is False and record["train_images"] == 24
    assert record["archive_md5"][NAMES["train"]] == "1d675b47d978889d74fa0da5fadfb00e"  # the config's value


# ---------------------------------------------------------------- failures: one line, no outputs


def test_missing_archives_cli_says_what_to_get(tmp_path):
    r = cli(tmp_path, "profile=smoke", "data_source=canonical", "root=.")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and not r.stdout
    for needle in (*NAMES.values(), "image-net.org", "regist", "IMAGENET_ARCHIVES=", "data.archives_dir="):
        assert needle in lines[0]
    assert not (tmp_path / "data").exists()

    folder = tmp_path / "arch"
    folder.mkdir()
    (folder / NAMES["val"]).write_bytes(b"x")
    r = cli(tmp_path, "profile=smoke", "data_source=canonical", "root=.", env_extra={I.ENV: str(folder)})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"lacks {NAMES['train']}, {NAMES['devkit']}" in r.stderr and "image-net.org" in r.stderr
    assert not (tmp_path / "data").exists()


def test_md5_mismatch_names_file_expected_and_actual(tmp_path, capsys):
    folder = archives_dir(tmp_path)
    assert I.run(canonical(tmp_path / "r", folder)) == 2
    err = capsys.readouterr().err.strip()
    got = I.digest(folder / NAMES["train"], "md5")
    assert len(err.splitlines()) == 1
    assert f"md5 mismatch for {NAMES['train']}: expected 1d675b47d978889d74fa0da5fadfb00e, got {got}" in err
    assert outputs(tmp_path / "r") == []


def _hostile_class_tar(kind: str) -> bytes:
    if kind == "symlink":
        link = tarfile.TarInfo("n01440764_1.JPEG")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        inner = [("n01440764_0.JPEG", b"ok"), link]
    else:
        inner = [("n01440764_0.JPEG", b"ok"), ({"dotdot": "../../evil.JPEG", "absolute": "/tmp/evil.JPEG"}[kind],
                                                b"evil")]
    real = tarfile.open(fileobj=io.BytesIO(I.fixture_archives()["train"]))
    members = [("n01440764.tar", tar_bytes(inner))]
    members += [(m.name, real.extractfile(m).read()) for m in real.getmembers()[1:]]
    return tar_bytes(members)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_hostile_member_in_class_tar_is_refused(tmp_path, capsys, kind):
    folder = archives_dir(tmp_path, train=_hostile_class_tar(kind))
    root = tmp_path / "r"
    assert I.run(canonical(root, folder, "data.verify_md5=false", *FIXTURE_COUNTS)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to extract" in err and "n01440764.tar" in err
    assert outputs(root) == []
    assert not list(tmp_path.rglob("evil.JPEG"))


def test_failed_run_removes_older_outputs(tmp_path, capsys):
    root = tmp_path / "r"
    assert I.run(config(root, "profile=smoke")) == 0
    folder = archives_dir(tmp_path, train=_hostile_class_tar("dotdot"))
    assert I.run(canonical(root, folder, "data.verify_md5=false", *FIXTURE_COUNTS)) == 2
    assert outputs(root) == []  # no stale result that looks like this run's


@pytest.mark.parametrize("cut", ["mid_member", "at_header"])
def test_truncated_val_tar_is_an_error(tmp_path, capsys, cut):
    val = I.fixture_archives()["val"]
    with tarfile.open(fileobj=io.BytesIO(val)) as tf:
        offsets = [m.offset for m in tf.getmembers()]
    # mid_member: inside the 4th image's data; at_header: a clean cut before the 5th header (tar's EOF case)
    size = offsets[3] + 512 + 100 if cut == "mid_member" else offsets[4]
    folder = archives_dir(tmp_path, val=val[:size])
    root = tmp_path / "r"
    assert I.run(canonical(root, folder, "data.verify_md5=false", *FIXTURE_COUNTS)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"truncated archive {NAMES['val']}" in err
    assert outputs(root) == []
