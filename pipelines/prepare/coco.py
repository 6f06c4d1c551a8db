"""Fetch + prepare stage for COCO 2017 detection (train2017 / val2017 with the instances annotations).

    python -m pipelines.prepare.coco data=coco profile=<smoke|paper|regression> [root=.]

Data source ``canonical`` fetches the three official zips (``data.source.archives``: annotations, val, train,
smallest first) into data/raw/coco/, or the files of the same names from the mirror in env GAL_DATA_MIRROR;
downloads resume after an interruption and each zip's md5 is checked before anything is extracted
(pipelines.fetch). Data source ``fixtures`` (the smoke profile; regression keeps image sets at smoke size)
writes three small zips in the exact COCO layout into data/fixtures/coco/ (pipelines.prepare.fixtures.coco_zips)
and fetches them through the same mirror code path, verified by the md5s of the generated files.

Prepared format, data/processed/coco/ (read by the detection task, pipelines/tasks/detection/data.py):
    train2017/<id:012d>.jpg, val2017/<id:012d>.jpg   the JPEGs, byte for byte as in the zips
    annotations/instances_train2017.json             COCO's own files, untouched (the captions and keypoints
    annotations/instances_val2017.json               files of the annotations zip are left out)
plus data/processed/coco.json {name, classes, categories, train: {images, annotations}, val: {images,
annotations}, raw_md5: {zip name: md5}, source, profile, identity} and data/processed/coco.manifest.tsv (the
folder's identity, hashed once here: pipelines.hashing). This is the layout torchvision's CocoDetection,
pycocotools and DETR read, so nothing is converted: labels are COCO's category ids (1..90; ``data.num_classes``
91). Each zip is extracted safely (pipelines.fetch.extract: every member path is checked first, no absolute or
``..`` paths, no links) into a temporary directory beside data/processed/coco/, its one top folder renamed into
place inside it, and that directory renamed to data/processed/coco/ once everything is checked: the 19 GB are
written once, never copied. The checks: each zip holds only its top folder; both instances files parse as COCO
(unique image and annotation ids, plain file names, boxes of four finite numbers with no negative size,
annotations of listed images and categories); every image they list is in its folder and nothing else is;
image and category counts match ``data.source.counts`` (fixtures: ``data.fixture``); both splits have the same
categories, all ids in 1..num_classes-1.

A failed run leaves no prepared outputs and no sidecar (also none of an earlier run): one line on stderr and
exit code 2 (pipelines.errors). data/raw/coco/ is the download cache: it only ever holds complete zips that
passed the md5 check (a download that fails it is discarded), and keeps them after a later failure, so that a
network error on one file never costs the 18 GB of another; a rerun checks their md5 again and does not fetch
them again. A rerun rebuilds data/processed/coco/ with the same bytes.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

from pipelines.atomic import replace_dir, temp_dir_beside, write_atomic, write_if_changed
from pipelines.errors import ConfigError
from pipelines.fetch import MIRROR_ENV, extract, fetch
from pipelines.hashing import manifest_path, record_identity
from pipelines.prepare import fixtures
from pipelines.prepare.stage import PrepareError, hydra_entry, run_stage

ROLES = ("annotations", "val", "train")  # the three zips of data.source.archives, fetched in this order
SPLITS = ("train", "val")
FOLDER = {"train": "train2017", "val": "val2017", "annotations": "annotations"}  # each zip's one top folder
KEPT = {f"instances_{FOLDER[s]}.json" for s in SPLITS}  # what the prepared annotations/ holds
SHOWN = 5  # names listed in a message about missing or unexpected images


def instances_name(split: str) -> str:
    return f"instances_{FOLDER[split]}.json"


def _names(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


# ---------------------------------------------------------------- checking the extracted files


def read_instances(path: Path, label: str) -> dict:
    """One instances_*.json, parsed; ``label`` names it in errors (e.g. the zip and member)."""
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise PrepareError(f"{label}: not a JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise PrepareError(f"{label}: expected a JSON object, got {type(doc).__name__}")
    lacking = [k for k in ("images", "annotations", "categories") if not isinstance(doc.get(k), list)]
    if lacking:
        raise PrepareError(f"{label}: not a COCO instances file: no list under {', '.join(lacking)}")
    return doc


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_categories(doc: dict, label: str, num_classes: int) -> dict[int, str]:
    """{category id: name}, checked: unique integer ids in 1..num_classes-1, each with a name."""
    found: dict[int, str] = {}
    for k, cat in enumerate(doc["categories"]):
        if not isinstance(cat, dict) or not _int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise PrepareError(f"{label}: category {k} has no integer id and name: {str(cat)[:80]}")
        if not 1 <= cat["id"] < num_classes:
            raise PrepareError(f"{label}: category id {cat['id']} ({cat['name']}) is outside 1..{num_classes - 1} "
                               f"(data.num_classes={num_classes}: the ids are the class indices)")
        if cat["id"] in found:
            raise PrepareError(f"{label}: category id {cat['id']} appears twice")
        found[cat["id"]] = cat["name"]
    return found


def check_images(doc: dict, label: str) -> dict[int, str]:
    """{image id: file name}, checked: unique integer ids, unique plain file names, positive sizes."""
    files: dict[int, str] = {}
    seen: set[str] = set()
    for k, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or not _int(im.get("id")) or not isinstance(im.get("file_name"), str):
            raise PrepareError(f"{label}: image {k} has no integer id and file_name: {str(im)[:80]}")
        name = im["file_name"]
        if not re.fullmatch(r"[^/\\:\x00]+", name) or name.startswith("."):
            raise PrepareError(f"{label}: image {im['id']} has file_name {name!r}: expected a plain file name")
        if not all(_int(im.get(d)) and im[d] > 0 for d in ("width", "height")):
            raise PrepareError(f"{label}: image {im['id']} ({name}) has no positive integer width and height")
        if im["id"] in files:
            raise PrepareError(f"{label}: image id {im['id']} appears twice")
        if name in seen:
            raise PrepareError(f"{label}: file_name {name} appears twice")
        files[im["id"]] = name
        seen.add(name)
    return files


def check_annotations(doc: dict, label: str, images: dict[int, str], categories: dict[int, str]) -> int:
    """The number of annotations, each checked: unique id, a listed image and category, a COCO box."""
    seen: set[int] = set()
    for k, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict) or not all(_int(ann.get(key)) for key in ("id", "image_id", "category_id")):
            raise PrepareError(f"{label}: annotation {k} has no integer id, image_id and category_id")
        if ann["id"] in seen:
            raise PrepareError(f"{label}: annotation id {ann['id']} appears twice")
        seen.add(ann["id"])
        if ann["image_id"] not in images:
            raise PrepareError(f"{label}: annotation {ann['id']} is of image {ann['image_id']}, which the file "
                               "does not list")
        if ann["category_id"] not in categories:
            raise PrepareError(f"{label}: annotation {ann['id']} has category {ann['category_id']}, which the "
                               "file does not list")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
                and box[2] >= 0 and box[3] >= 0):
            raise PrepareError(f"{label}: annotation {ann['id']} has bbox {str(box)[:60]}: expected [x, y, width, "
                               "height], four finite numbers, width and height not negative")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise PrepareError(f"{label}: annotation {ann['id']} has iscrowd {ann.get('iscrowd')!r}: expected 0 or 1")
    return len(seen)


def check_split(split: str, work: Path, zips: dict[str, str], num_classes: int,
                expected: int) -> tuple[dict[int, str], dict]:
    """Check one split of the extracted tree; return ({category id: name}, {images, annotations})."""
    ann_label = f"{zips['annotations']}:annotations/{instances_name(split)}"
    doc = read_instances(work / "annotations" / instances_name(split), ann_label)
    categories = check_categories(doc, ann_label, num_classes)
    images = check_images(doc, ann_label)
    annotations = check_annotations(doc, ann_label, images, categories)
    del doc  # the train file is about 450 MB of JSON: let it go before listing 118k files
    folder = work / FOLDER[split]
    present = {p.name for p in folder.iterdir()}
    listed = set(images.values())
    missing = sorted(listed - present)
    if missing:
        raise PrepareError(f"{zips[split]}: {len(missing)} of the {len(listed)} images that {instances_name(split)} "
                           f"lists are missing from {FOLDER[split]}/: {_names(missing)}; the archive is incomplete "
                           "or does not match the annotations")
    unlisted = sorted(present - listed)
    if unlisted:
        raise PrepareError(f"{zips[split]}: {FOLDER[split]}/ holds {len(unlisted)} entries that "
                           f"{instances_name(split)} does not list: {_names(unlisted)}; the archive does not match "
                           "the annotations")
    if not all((folder / name).is_file() for name in listed):
        odd = sorted(n for n in listed if not (folder / n).is_file())
        raise PrepareError(f"{zips[split]}: {FOLDER[split]}/{odd[0]} is not a file")
    if len(listed) != expected:
        raise PrepareError(f"{zips[split]}: {len(listed)} {split} images, expected {expected}; the archives are "
                           "not the ones configured")
    return categories, {"images": len(listed), "annotations": annotations}


# ---------------------------------------------------------------- extraction


def unpack(archive: Path, top: str, work: Path) -> None:
    """Extract ``archive`` safely and move its one top folder ``top`` to ``work/top`` (a rename: no copy)."""
    scratch = extract(archive, work / f".{archive.name}.x")  # checks every member before writing anything
    entries = sorted(p.name for p in scratch.iterdir())
    if entries != [top] or not (scratch / top).is_dir():
        unexpected = [e for e in entries if e != top] or [top]
        raise PrepareError(f"{archive.name}: expected everything under {top}/, found {_names(unexpected)}; not "
                           "the COCO 2017 archive")
    os.rename(scratch / top, work / top)
    scratch.rmdir()


def build(raw: dict[str, Path], counts: dict[str, int], num_classes: int, work: Path) -> dict:
    """Extract the three zips into ``work`` and check them; return the sidecar's counts."""
    zips = {role: raw[role].name for role in ROLES}
    for role in ROLES:
        unpack(raw[role], FOLDER[role], work)
    annotations = work / "annotations"
    for path in sorted(annotations.iterdir()):
        if path.name in KEPT:
            continue
        if path.is_dir() and not path.is_symlink():  # captions, keypoints: not used, still in the raw zip
            shutil.rmtree(path)
        else:
            path.unlink()
    lacking = sorted(KEPT - {p.name for p in annotations.iterdir() if p.is_file()})
    if lacking:
        raise PrepareError(f"{zips['annotations']}: annotations/{lacking[0]} is missing; not the COCO 2017 "
                           "annotations archive")
    record: dict = {}
    categories = {}
    for split in SPLITS:
        categories[split], record[split] = check_split(split, work, zips, num_classes, counts[split])
    if categories["train"] != categories["val"]:
        differ = sorted(set(categories["train"].items()) ^ set(categories["val"].items()))
        raise PrepareError(f"{zips['annotations']}: the train and val instances files list different categories "
                           f"(first difference: id {differ[0][0]} {differ[0][1]!r})")
    if len(categories["train"]) != counts["categories"]:
        raise PrepareError(f"{zips['annotations']}: {len(categories['train'])} categories, expected "
                           f"{counts['categories']}; not the COCO 2017 annotations")
    record["categories"] = len(categories["train"])
    return record


# ---------------------------------------------------------------- the stage


def write_fixtures(folder: Path, names: dict[str, str], train: int, val: int, seed: int) -> dict[str, str]:
    """Write the smoke zips into ``folder`` under their real names (kept as they are when unchanged); return
    their md5s by role, for fetch() to verify."""
    import hashlib

    if min(train, val) < 4:
        raise ConfigError(f"fixture sizes must be at least 4 images per split (grayscale, empty and crowd "
                          f"images), got train={train} val={val}")
    md5s = {}
    for role, content in fixtures.coco_zips(train=train, val=val, seed=seed).items():
        write_if_changed(folder / names[role], content)
        md5s[role] = hashlib.md5(content, usedforsecurity=False).hexdigest()
    return md5s


def prepare(cfg, created: list[Path]) -> dict:
    """Run the stage for cfg.data; return the sidecar record. Appends every output path to ``created``."""
    data, name, root = cfg.data, cfg.data.name, Path(cfg.root)
    if cfg.data_source not in ("canonical", "fixtures"):
        raise ConfigError(f"data_source must be canonical or fixtures, got {cfg.data_source!r}")
    archives = data.source.archives
    lacking = [r for r in ROLES if r not in archives]
    if lacking:
        raise ConfigError(f"data.source.archives lacks {', '.join(lacking)}; it needs {', '.join(ROLES)}")
    urls = {r: str(archives[r].url) for r in ROLES}
    names = {r: urls[r].rstrip("/").rsplit("/", 1)[-1] for r in ROLES}
    num_classes = int(data.num_classes)
    processed = root / "data" / "processed"
    dest, sidecar = processed / name, processed / f"{name}.json"
    raw_dir = root / "data" / "raw" / name
    created += [dest, sidecar, manifest_path(sidecar)]
    shutil.rmtree(dest, ignore_errors=True)  # a run that fails must not leave an older result looking current
    sidecar.unlink(missing_ok=True)          # (and removing it first halves the disk a rerun needs)
    manifest_path(sidecar).unlink(missing_ok=True)

    if cfg.data_source == "fixtures":
        fx = data.fixture
        mirror = str(root / "data" / "fixtures" / name)
        md5s = write_fixtures(Path(mirror), names, int(fx.train), int(fx.val), int(fx.seed))
        counts = {"train": int(fx.train), "val": int(fx.val), "categories": len(fixtures.COCO_CATEGORIES)}
        origin = f"fixture:data/fixtures/{name}"
    else:
        md5s = {r: str(archives[r].md5).lower() for r in ROLES}
        counts = {k: int(data.source.counts[k]) for k in (*SPLITS, "categories")}
        mirror = os.environ.get(MIRROR_ENV) or None
        origin = ("mirror:" if mirror else "") + ", ".join(names[r] if mirror else urls[r] for r in ROLES)
    raw = {r: raw_dir / names[r] for r in ROLES}
    try:
        for role in ROLES:
            if raw[role].is_file() and raw[role].stat().st_size >= 2**30:  # minutes of hashing: say so
                print(f"prepare {name}: checking md5 of {names[role]} ({raw[role].stat().st_size / 2**30:.1f} GiB)",
                      file=sys.stderr)
            fetch(urls[role], raw[role], checksum=f"md5:{md5s[role]}", mirror=mirror)
    finally:
        for folder in (raw_dir / ".partial", raw_dir):  # fetch()'s resume area, kept only while it holds a part
            try:
                folder.rmdir()
            except OSError:
                pass

    work = temp_dir_beside(dest)
    try:
        try:
            found = build(raw, counts, num_classes, work)
        except OSError as e:
            raise PrepareError(f"could not write into {dest.parent}: {e}") from None
        replace_dir(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    record = {"name": name, "classes": num_classes, **found, "raw_md5": {names[r]: md5s[r] for r in ROLES},
              "source": origin, "profile": cfg.profile, "identity": record_identity(dest, stage="prepare_coco")}
    write_atomic(sidecar, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return record


def run(cfg) -> int:
    return run_stage(cfg.data.get("name", "?"), lambda created: prepare(cfg, created), lambda r: (
        f"{r['categories']} categories, {r['train']['images']} train / {r['val']['images']} val images "
        f"({r['train']['annotations']} / {r['val']['annotations']} annotations) from {r['source']} "
        f"-> data/processed/{r['name']}/"))


if __name__ == "__main__":
    hydra_entry(run)
