"""The COCO 2017 prepare stage: fixture layout and annotations, the CLI end to end, canonical runs from a mirror,
failures (checksum, damaged or unsafe zips, annotations that do not match the images), reruns.

All offline: the zips are the pipeline's own smoke fixtures, whole or damaged on purpose.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.fetch import MIRROR_ENV
from pipelines.prepare import coco as C
from pipelines.prepare import fixtures

from .prepare_helpers import CONF, files_under, prepare_cli, prepare_config

ZIPS = {"annotations": "annotations_trainval2017.zip", "val": "val2017.zip", "train": "train2017.zip"}
FIXTURE = {"train": 16, "val": 8, "seed": 0}  # data.fixture in conf/data/coco.yaml
CATEGORIES = {1: "person", 3: "car", 18: "dog", 44: "bottle", 90: "toothbrush"}

config = prepare_config


def cli(cwd: Path, *args: str, mirror: Path | None = None) -> subprocess.CompletedProcess:
    return prepare_cli("pipelines.prepare.coco", cwd, *args, mirror=mirror)


def unzip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def members(**change) -> dict[str, list[tuple[str, bytes | None]]]:
    """The fixture's members by role, each role's list passed through ``change[role]`` if given."""
    out = fixtures.coco_members(**FIXTURE)
    return {role: change.get(role, lambda ms: ms)(ms) for role, ms in out.items()}


def zips_of(ms: dict[str, list]) -> dict[str, bytes]:
    return {role: fixtures.deterministic_zip(m) for role, m in ms.items()}


def edit_instances(split: str, edit):
    """A change for members(annotations=...): ``edit(doc)`` applied to instances_<split>2017.json."""
    def change(ms):
        out = []
        for name, content in ms:
            if name == f"annotations/instances_{split}2017.json":
                doc = json.loads(content)
                edit(doc)
                content = json.dumps(doc).encode()
            out.append((name, content))
        return out
    return change


def canonical(tmp_path: Path, zips: dict[str, bytes], monkeypatch, *overrides: str, match=tuple(ZIPS)):
    """Config of a canonical (profile=paper) run whose mirror holds ``zips`` under the canonical names, with the
    md5s of the roles in ``match`` set to match them and the counts set to the fixture's."""
    mirror = tmp_path / "mirror"
    mirror.mkdir(exist_ok=True)
    for role, data in zips.items():
        (mirror / ZIPS[role]).write_bytes(data)
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    md5s = [f"data.source.archives.{r}.md5={hashlib.md5(zips[r]).hexdigest()}" for r in match]
    counts = [f"data.source.counts.train={FIXTURE['train']}", f"data.source.counts.val={FIXTURE['val']}",
              f"data.source.counts.categories={len(CATEGORIES)}"]
    return config(tmp_path / "out", "data=coco", "profile=paper", *md5s, *counts, *overrides)


def assert_one_line_failure(capsys, message: str, root: Path, kept: tuple[str, ...] = ()) -> None:
    """One line on stderr naming ``message``; no prepared outputs; data/raw/coco holds just the verified ``kept``."""
    err = capsys.readouterr().err
    assert err.startswith("prepare coco: ") and err.count("\n") == 1, err
    assert message in err, err
    leftovers = files_under(root / "data") - {f"fixtures/coco/{n}" for n in ZIPS.values()}  # inputs
    assert leftovers == {f"raw/coco/{n}" for n in kept}, leftovers
    processed = root / "data" / "processed"
    assert not processed.exists() or list(processed.iterdir()) == []  # no temporary directories either
    raw = root / "data" / "raw" / "coco"
    assert sorted(p.name for p in raw.iterdir()) == sorted(kept) if kept else not raw.exists()


def run_failing(cfg, capsys, message: str, kept: tuple[str, ...] = ()) -> None:
    capsys.readouterr()
    assert C.run(cfg) == 2
    assert_one_line_failure(capsys, message, Path(cfg.root), kept)


# ---------------------------------------------------------------- the fixture


def test_fixture_has_the_real_layout_and_coco_annotations():
    zips = fixtures.coco_zips(**FIXTURE)
    assert set(zips) == set(ZIPS)
    with zipfile.ZipFile(io.BytesIO(zips["annotations"])) as zf:
        assert sorted(zf.namelist()) == ["annotations/", *sorted(f"annotations/{k}_{s}2017.json"
                                                                 for k in ("captions", "instances")
                                                                 for s in ("train", "val"))]
    ids = {}
    for split, n in (("train", FIXTURE["train"]), ("val", FIXTURE["val"])):
        with zipfile.ZipFile(io.BytesIO(zips[split])) as zf:
            names = zf.namelist()
        assert names[0] == f"{split}2017/" and len(names) == n + 1
        doc = json.loads(unzip(zips["annotations"])[f"annotations/instances_{split}2017.json"])
        assert list(doc) == ["info", "licenses", "images", "annotations", "categories"]
        assert "SYNTHETIC" in doc["info"]["description"]
        assert {c["id"]: c["name"] for c in doc["categories"]} == CATEGORIES
        assert sorted(f"{split}2017/{im['file_name']}" for im in doc["images"]) == sorted(names[1:])
        ids[split] = {im["id"] for im in doc["images"]}
        assert all(im["file_name"] == f"{im['id']:012d}.jpg" for im in doc["images"])
        per_image = {im["id"]: [a for a in doc["annotations"] if a["image_id"] == im["id"]] for im in doc["images"]}
        images = {im["id"]: Image.open(io.BytesIO(unzip(zips[split])[f"{split}2017/{im['file_name']}"]))
                  for im in doc["images"]}
        for im in doc["images"]:
            assert images[im["id"]].format == "JPEG" and images[im["id"]].size == (im["width"], im["height"])
            assert 64 <= im["width"] <= 160 and 64 <= im["height"] <= 160
        assert sum(i.mode == "L" for i in images.values()) == 1  # one grayscale image, the rest RGB
        assert {i.mode for i in images.values()} == {"L", "RGB"}
        assert sum(not found for found in per_image.values()) == 1  # one image without objects
        crowd = [a for a in doc["annotations"] if a["iscrowd"]]
        assert len(crowd) == 1 and crowd[0]["category_id"] == 1
        assert crowd[0]["segmentation"]["size"] == [images[crowd[0]["image_id"]].height,
                                                    images[crowd[0]["image_id"]].width]
        assert sum(crowd[0]["segmentation"]["counts"][1::2]) == crowd[0]["area"]  # RLE: runs of 0s, 1s, ...
        for a in doc["annotations"]:
            x, y, w, h = a["bbox"]
            im = images[a["image_id"]]
            assert 0 <= x and 0 <= y and x + w <= im.width and y + h <= im.height and w >= 6 and h >= 6
            assert 0 < a["area"] <= w * h
            if not a["iscrowd"]:
                assert len(a["segmentation"]) == 1 and len(a["segmentation"][0]) in (8, 32)
        assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"])
        if split == "train":
            assert {a["category_id"] for a in doc["annotations"]} == set(CATEGORIES)  # every class to learn
    assert not ids["train"] & ids["val"]  # COCO's image ids are unique across the splits


def test_fixture_boxes_are_the_drawn_shapes():
    """Each box is exactly where its category's colour is (a detector has something to learn), within the
    1 px a JPEG edge may blur; a crowd box holds several people."""
    zips = fixtures.coco_zips(**FIXTURE)
    colours = {cid: colour for cid, (_, colour, _) in fixtures.COCO_SHAPES.items()}
    checked = 0
    for split in ("train", "val"):
        doc = json.loads(unzip(zips["annotations"])[f"annotations/instances_{split}2017.json"])
        files = unzip(zips[split])
        names = {im["id"]: im["file_name"] for im in doc["images"]}
        for a in doc["annotations"]:
            image = Image.open(io.BytesIO(files[f"{split}2017/{names[a['image_id']]}"]))
            colour = Image.new("RGB", (1, 1), colours[a["category_id"]]).convert(image.mode).convert("RGB")
            pixels = np.asarray(image.convert("RGB"), dtype=float)
            near = np.linalg.norm(pixels - np.asarray(colour.getpixel((0, 0)), dtype=float), axis=-1) < 60
            x, y, w, h = (int(v) for v in a["bbox"])
            pad = fixtures.COCO_GAP - 1  # no other object comes this close
            y0, x0 = max(0, y - pad), max(0, x - pad)
            window = near[y0:y + h + pad, x0:x + w + pad]
            ys, xs = np.nonzero(window)
            found = [x0 + xs.min(), y0 + ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert np.abs(np.subtract(found, [x, y, w, h])).max() <= 1, (split, a["id"], found, a["bbox"])
            if a["iscrowd"]:  # several separate people: columns without any person between them
                assert (~window[pad:pad + h, pad:pad + w].any(axis=0)).sum() >= 3
            checked += 1
    assert checked == 41


def test_fixture_is_byte_deterministic(tmp_path):
    first = fixtures.coco_zips(**FIXTURE)
    assert fixtures.coco_zips(**FIXTURE) == first
    assert fixtures.coco_zips(train=16, val=8, seed=1)["train"] != first["train"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert C.write_fixtures(a, ZIPS, **FIXTURE) == C.write_fixtures(b, ZIPS, **FIXTURE) == {
        role: hashlib.md5(data).hexdigest() for role, data in first.items()}
    for role, name in ZIPS.items():
        assert (a / name).read_bytes() == (b / name).read_bytes() == first[role]
    with zipfile.ZipFile(io.BytesIO(first["train"])) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    with pytest.raises(ValueError, match="at least one image per split"):
        fixtures.coco_members(train=0)


# ---------------------------------------------------------------- the stage


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools mask decoding
def test_smoke_stage_end_to_end(tmp_path):
    from pycocotools.coco import COCO

    proc = cli(tmp_path, "data=coco", "profile=smoke", f"root={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("prepare coco: 5 categories, 16 train / 8 val images"), proc.stdout
    root = tmp_path / "r"
    assert files_under(tmp_path) == {f"r/{p}" for p in files_under(root)}  # Hydra wrote nothing in cwd
    zips = fixtures.coco_zips(**FIXTURE)
    images = {split: {n.split("/", 1)[1]: c for n, c in unzip(zips[split]).items()} for split in ("train", "val")}
    assert files_under(root) == {f"data/{d}/coco/{n}" for d in ("fixtures", "raw") for n in ZIPS.values()} | {
        "data/processed/coco.json", "data/processed/coco.manifest.tsv",
        "data/processed/coco/annotations/instances_train2017.json",
        "data/processed/coco/annotations/instances_val2017.json"} | {
        f"data/processed/coco/{split}2017/{name}" for split in images for name in images[split]}
    out = root / "data" / "processed" / "coco"
    annotations = unzip(zips["annotations"])
    counts = {}
    for split in ("train", "val"):
        ann_file = out / "annotations" / f"instances_{split}2017.json"
        assert ann_file.read_bytes() == annotations[f"annotations/instances_{split}2017.json"]  # untouched
        for name, content in images[split].items():
            assert (out / f"{split}2017" / name).read_bytes() == content
        with contextlib.redirect_stdout(io.StringIO()):
            api = COCO(str(ann_file))
        assert api.getCatIds() == sorted(CATEGORIES)  # COCO's own ids, not remapped
        assert {c["id"]: c["name"] for c in api.loadCats(api.getCatIds())} == CATEGORIES
        assert len(api.getAnnIds(iscrowd=True)) == 1  # the crowd region
        assert sum(not api.getAnnIds(imgIds=[i]) for i in api.getImgIds()) == 1  # an image without objects
        modes = [Image.open(out / f"{split}2017" / im["file_name"]).mode for im in api.loadImgs(api.getImgIds())]
        assert sorted(modes) == ["L"] + ["RGB"] * (len(modes) - 1)  # a grayscale JPEG
        mask = api.annToMask(api.loadAnns(api.getAnnIds(iscrowd=True))[0])
        assert mask.sum() == api.loadAnns(api.getAnnIds(iscrowd=True))[0]["area"]
        counts[split] = {"images": len(api.getImgIds()), "annotations": len(api.getAnnIds())}
    record = json.loads((root / "data" / "processed" / "coco.json").read_text())
    assert record == {"name": "coco", "classes": 91, "categories": 5, **counts,
                      "raw_md5": {n: hashlib.md5(zips[r]).hexdigest() for r, n in ZIPS.items()},
                      "source": "fixture:data/fixtures/coco", "profile": "smoke",
                      "identity": {**record["identity"], "path": "coco", "files": 26, "stage": "prepare_coco"}}
    assert counts == {"train": {"images": 16, "annotations": 28}, "val": {"images": 8, "annotations": 13}}


def test_rerun_is_idempotent(tmp_path, capsys):
    """A rerun neither rewrites the fixtures nor fetches again, and rebuilds the same bytes; so does a second
    root (the fixture and the outputs are deterministic)."""
    root = tmp_path / "a"
    assert C.run(config(root, "data=coco")) == 0
    before = {rel: ((root / rel).read_bytes(), (root / rel).stat().st_mtime_ns) for rel in files_under(root)}
    assert C.run(config(root, "data=coco")) == 0
    assert C.run(config(tmp_path / "b", "data=coco")) == 0
    assert files_under(root) == files_under(tmp_path / "b") == set(before)
    for rel, (content, mtime) in before.items():
        if rel == "data/processed/coco.manifest.tsv":
            continue  # the mtimes of this workspace's files
        assert (root / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes() == content, rel
        if rel.startswith(("data/fixtures/", "data/raw/")):
            assert (root / rel).stat().st_mtime_ns == mtime, rel  # not written again
    assert capsys.readouterr().out.count("prepare coco: 5 categories") == 3
    assert sorted(p.name for p in (root / "data" / "processed").iterdir()) == ["coco", "coco.json",
                                                                              "coco.manifest.tsv"]  # no leftovers


def test_canonical_run_from_a_mirror(tmp_path, monkeypatch, capsys):
    zips = fixtures.coco_zips(**FIXTURE)
    cfg = canonical(tmp_path, zips, monkeypatch)
    assert (cfg.data_source, cfg.profile) == ("canonical", "paper")
    assert C.run(cfg) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "data" / "processed" / "coco.json").read_text())
    assert record["source"] == "mirror:annotations_trainval2017.zip, val2017.zip, train2017.zip"
    assert record["raw_md5"] == {n: hashlib.md5(zips[r]).hexdigest() for r, n in ZIPS.items()}
    assert (record["profile"], record["train"]["images"], record["val"]["images"]) == ("paper", 16, 8)
    for role, name in ZIPS.items():
        assert (tmp_path / "out" / "data" / "raw" / "coco" / name).read_bytes() == zips[role]
    assert not (tmp_path / "out" / "data" / "fixtures").exists()


def test_md5_mismatch_cli_one_line_error_and_nothing_written(tmp_path):
    # The fixtures where the real zips should be: the published md5s reject the first one fetched.
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for role, data in fixtures.coco_zips(**FIXTURE).items():
        (mirror / ZIPS[role]).write_bytes(data)
    proc = cli(tmp_path, "data=coco", "profile=paper", mirror=mirror)
    assert proc.returncode == 2
    assert proc.stderr.startswith("prepare coco: checksum mismatch") and proc.stderr.count("\n") == 1, proc.stderr
    assert "annotations_trainval2017.zip" in proc.stderr and "f4bbac642086de4f52a3fdda2de5fa2c" in proc.stderr
    assert not (tmp_path / "data").exists() or files_under(tmp_path / "data") == set()


def test_md5_mismatch_of_a_later_zip_keeps_only_the_verified_downloads(tmp_path, monkeypatch, capsys):
    """train2017.zip fails its (published) md5: the annotations and val zips, verified, stay as the download
    cache (a rerun does not fetch them again); nothing else is left."""
    cfg = canonical(tmp_path, fixtures.coco_zips(**FIXTURE), monkeypatch, match=("annotations", "val"))
    run_failing(cfg, capsys, "checksum mismatch", kept=(ZIPS["annotations"], ZIPS["val"]))


def test_failure_removes_the_outputs_of_an_earlier_run(tmp_path, monkeypatch, capsys):
    zips = fixtures.coco_zips(**FIXTURE)
    assert C.run(canonical(tmp_path, zips, monkeypatch)) == 0
    broken = zips_of(members(train=lambda ms: ms[:-1]))
    run_failing(canonical(tmp_path, broken, monkeypatch), capsys, "missing from train2017/",
                kept=tuple(ZIPS.values()))


@pytest.mark.parametrize("damage", ["truncated", "bad member data"])
def test_corrupt_zip_one_line_error(damage, tmp_path, monkeypatch, capsys):
    zips = fixtures.coco_zips(**FIXTURE)
    whole = zips["train"]
    if damage == "truncated":
        zips["train"] = whole[: len(whole) // 2]
    else:  # flip bytes inside a stored JPEG: the zip's CRC check catches it while extracting
        k = whole.index(b"\xff\xd8", len(whole) // 2) + 200
        zips["train"] = whole[:k] + bytes(b ^ 0xFF for b in whole[k:k + 16]) + whole[k + 16:]
    cfg = canonical(tmp_path, zips, monkeypatch)  # md5s set to match: the damage is found while extracting
    run_failing(cfg, capsys, "corrupt or truncated archive train2017.zip", kept=tuple(ZIPS.values()))


@pytest.mark.parametrize("member", ["train2017/../../escaped.jpg", "/tmp/escaped.jpg"])
def test_zip_with_an_unsafe_path_is_refused(member, tmp_path, monkeypatch, capsys):
    zips = zips_of(members(train=lambda ms: [*ms, (member, b"\xff\xd8 not really")]))
    cfg = canonical(tmp_path, zips, monkeypatch)
    run_failing(cfg, capsys, f"refusing to extract train2017.zip: member {member!r} has an unsafe path",
                kept=tuple(ZIPS.values()))
    assert not list(tmp_path.rglob("escaped.jpg"))


def test_image_listed_in_the_annotations_but_missing_is_named(tmp_path, monkeypatch, capsys):
    ms = members()
    dropped = [n for n, c in ms["val"] if c is not None][2:4]
    zips = zips_of({**ms, "val": [(n, c) for n, c in ms["val"] if n not in dropped]})
    cfg = canonical(tmp_path, zips, monkeypatch)
    names = ", ".join(n.split("/")[1] for n in dropped)
    run_failing(cfg, capsys, f"val2017.zip: 2 of the 8 images that instances_val2017.json lists are missing from "
                             f"val2017/: {names};", kept=tuple(ZIPS.values()))


def test_image_not_in_the_annotations_is_rejected(tmp_path, monkeypatch, capsys):
    zips = zips_of(members(train=lambda ms: [*ms, ("train2017/000000000001.jpg", ms[1][1])]))
    cfg = canonical(tmp_path, zips, monkeypatch)
    run_failing(cfg, capsys, "train2017/ holds 1 entries that instances_train2017.json does not list: "
                             "000000000001.jpg", kept=tuple(ZIPS.values()))


def test_zip_with_another_top_folder_is_rejected(tmp_path, monkeypatch, capsys):
    moved = members(val=lambda ms: [(n.replace("val2017/", "images/", 1), c) for n, c in ms])
    cfg = canonical(tmp_path, zips_of(moved), monkeypatch)
    run_failing(cfg, capsys, "val2017.zip: expected everything under val2017/, found images", kept=tuple(ZIPS.values()))


def _set(path: tuple, value):
    def edit(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


@pytest.mark.parametrize("split, edit, message", [
    ("train", _set(("categories", 4, "id"), 91), "category id 91 (toothbrush) is outside 1..90"),
    ("val", _set(("images", 1, "id"), None), "image 1 has no integer id and file_name"),
    ("train", _set(("images", 0, "file_name"), "../escaped.jpg"), "expected a plain file name"),
    ("train", _set(("annotations", 0, "bbox"), [1, 2, -3, 4]), "expected [x, y, width, height]"),
    ("val", _set(("annotations", 0, "image_id"), 7), "which the file does not list"),
    ("val", _set(("annotations", 1, "id"), 1 + 28), "annotation id 29 appears twice"),
    ("val", _set(("categories", 2, "name"), "cat"), "list different categories (first difference: id 18"),
    ("train", lambda doc: doc.pop("annotations"), "not a COCO instances file: no list under annotations"),
])
def test_bad_annotations_one_line_error(split, edit, message, tmp_path, monkeypatch, capsys):
    zips = zips_of(members(annotations=edit_instances(split, edit)))
    run_failing(canonical(tmp_path, zips, monkeypatch), capsys, message, kept=tuple(ZIPS.values()))


def test_wrong_image_count_is_rejected(tmp_path, monkeypatch, capsys):
    # The fixtures under the canonical config: md5s match (overridden), but 16 images are not 118287.
    zips = fixtures.coco_zips(**FIXTURE)
    cfg = canonical(tmp_path, zips, monkeypatch, "data.source.counts.train=118287")
    run_failing(cfg, capsys, "train2017.zip: 16 train images, expected 118287", kept=tuple(ZIPS.values()))
    cfg = canonical(tmp_path, zips, monkeypatch, "data.source.counts.categories=80")
    run_failing(cfg, capsys, "5 categories, expected 80", kept=tuple(ZIPS.values()))


def test_bad_config_exits_2(tmp_path, capsys):
    assert C.run(config(tmp_path, "data=coco", "data_source=elsewhere")) == 2
    assert capsys.readouterr().err.startswith("prepare coco: bad config: data_source must be")
    assert C.run(config(tmp_path, "data=coco", "data.fixture.val=2")) == 2
    assert "fixture sizes must be at least 4" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_config_values():
    cfg = config(Path("."), "data=coco", "profile=paper")
    assert cfg.data_source == "canonical" and cfg.data.num_classes == 91
    assert {r: (a.url.rsplit("/", 1)[-1], a.md5) for r, a in cfg.data.source.archives.items()} == {
        "train": ("train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2"),
        "val": ("val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80"),
        "annotations": ("annotations_trainval2017.zip", "f4bbac642086de4f52a3fdda2de5fa2c")}
    assert dict(cfg.data.source.counts) == {"train": 118287, "val": 5000, "categories": 80}
    assert config(Path("."), "data=coco", "profile=smoke").data_source == "fixtures"


@pytest.mark.skipif(not (CONF / "data_profile" / "coco_regression.yaml").is_file(),
                    reason="conf/data_profile/coco_regression.yaml not added yet")
def test_regression_profile_keeps_coco_at_fixture_size(tmp_path):
    """profile=regression is about Table V: COCO stays on fixtures and its runs are labelled smoke."""
    cfg = config(tmp_path, "data=coco", "profile=regression")
    assert (cfg.data_source, cfg.profile) == ("fixtures", "smoke")
