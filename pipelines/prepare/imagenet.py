"""Prepare stage for ImageNet (ILSVRC2012): the user's archives -> the ImageFolder layout.

    python -m pipelines.prepare.imagenet data=imagenet profile=<p> [data.archives_dir=<dir>] [root=.]

ImageNet has no public URL. The stage reads the three official archives from ``data.archives_dir`` (default:
env IMAGENET_ARCHIVES): ILSVRC2012_img_train.tar (one tar per class, ``<wnid>.tar``, each holding JPEGs),
ILSVRC2012_img_val.tar (50000 flat JPEGs) and ILSVRC2012_devkit_t12.tar.gz (data/meta.mat maps
ILSVRC2012_ID -> WNID; data/ILSVRC2012_validation_ground_truth.txt gives the ILSVRC2012_ID of each val image
in sorted filename order). Each archive's md5 is checked first (``data.verify_md5: false`` skips that).
Profile ``smoke`` (data_source: fixtures) writes a tiny synthetic archive set in the same layout into
data/fixtures/imagenet/ and runs the same code path, verified by the md5s of the bytes it wrote.

Outputs under ``root``: data/processed/imagenet/{train,val}/<wnid>/<image>.JPEG (val gets a folder for every
class, so ImageFolder indexes classes identically in both), data/processed/imagenet.json and
data/processed/imagenet.manifest.tsv (the folder's identity, hashed once here: pipelines.hashing). The archives
are streamed member by member (the train tar is 138 GB: never in memory, read once) into a temporary sibling
directory that is renamed into place at the end. Every member path is checked before anything is written
(no absolute or ``..`` paths, no links or devices). A failed run leaves no outputs: one line on stderr, exit
code 1, or 2 when the archives are missing or the config is bad.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np

from pipelines.atomic import replace_dir, temp_dir_beside, write_atomic, write_if_changed
from pipelines.fetch import CORRUPT, FetchError, check_member, tar_kind
from pipelines.hashing import digest, manifest_path, record_identity
from pipelines.prepare import fixtures
from pipelines.errors import ConfigError
from pipelines.prepare.stage import PrepareError, hydra_entry, run_stage

try:
    from tqdm import tqdm
except ImportError:  # progress is cosmetic
    tqdm = None

ROLES = ("train", "val", "devkit")  # the three archives, in data.source.archives
ENV = "IMAGENET_ARCHIVES"
META_MAT = "meta.mat"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
CHUNK = 1 << 20


class MissingArchives(ConfigError):
    """The archives directory or one of its files is missing: what to get and where."""

    prefix = ""  # the message itself says what to do


def missing_message(archives, where: str) -> str:
    names = [archives[r].name for r in ROLES]
    return (f"ImageNet archives not found: {where}. The stage needs the three ILSVRC2012 files "
            f"{names[0]}, {names[1]} and {names[2]} in one directory: download them from https://image-net.org "
            f"(register and log in, then the ILSVRC2012 download page) and point the stage at that directory "
            f"with env {ENV}=<dir> or the override data.archives_dir=<dir>")


# ---------------------------------------------------------------- locating and verifying the archives


def locate(cfg, root: Path) -> tuple[dict[str, Path], dict[str, str], dict, str]:
    """(archive paths by role, expected md5s by role, expected counts, origin) for the configured data source."""
    data = cfg.data
    archives = data.source.archives
    if cfg.data_source == "fixtures":
        fx = data.fixture
        folder = root / "data" / "fixtures" / "imagenet"
        md5s = write_fixtures(folder, archives, classes=int(fx.classes), train_per_class=int(fx.train_per_class),
                              val=int(fx.val), seed=int(fx.seed))
        counts = {"classes": int(fx.classes), "train": int(fx.classes) * int(fx.train_per_class), "val": int(fx.val)}
        return {r: folder / archives[r].name for r in ROLES}, md5s, counts, "fixture:data/fixtures/imagenet"
    if cfg.data_source != "canonical":
        raise ConfigError(f"data_source must be canonical or fixtures, got {cfg.data_source!r}")
    if not data.get("archives_dir"):
        raise MissingArchives(missing_message(archives, f"data.archives_dir is not set and env {ENV} is empty"))
    folder = Path(str(data.archives_dir)).expanduser()
    if not folder.is_dir():
        raise MissingArchives(missing_message(archives, f"{folder} is not a directory"))
    lacking = [archives[r].name for r in ROLES if not (folder / archives[r].name).is_file()]
    if lacking:
        raise MissingArchives(missing_message(archives, f"{folder} lacks {', '.join(lacking)}"))
    md5s = {r: str(archives[r].md5).lower() for r in ROLES}
    counts = {k: int(v) for k, v in data.source.counts.items()}
    return {r: folder / archives[r].name for r in ROLES}, md5s, counts, f"archives:{folder}"


def verify(paths: dict[str, Path], md5s: dict[str, str]) -> None:
    for role in ROLES:
        path = paths[role]
        size = path.stat().st_size
        if size >= 2**30:  # the train tar takes minutes to hash: say what is happening
            print(f"prepare imagenet: checking md5 of {path.name} ({size / 2**30:.1f} GiB)", file=sys.stderr)
        got = digest(path, "md5")
        if got != md5s[role]:
            raise PrepareError(f"md5 mismatch for {path.name}: expected {md5s[role]}, got {got}; the file is "
                               "incomplete, damaged or not the official ILSVRC2012 file: download it again from "
                               "https://image-net.org (or set data.verify_md5=false if you know better)")


# ---------------------------------------------------------------- the devkit


def read_devkit(devkit: Path, work: Path) -> tuple[dict[int, str], list[int]]:
    """({ILSVRC2012_ID: WNID} of the leaf synsets, the val ground-truth IDs in sorted filename order)."""
    from scipy.io import loadmat

    from pipelines.fetch import extract

    kit = extract(devkit, work / "devkit")  # small: fetch's safe extract (member checks, all or nothing)
    found = {name: sorted(kit.rglob(name)) for name in (META_MAT, GROUND_TRUTH)}
    for name, hits in found.items():
        if len(hits) != 1:
            raise PrepareError(f"{devkit.name}: expected one {name} inside (data/{name}), found {len(hits)}")
    try:
        synsets = np.atleast_1d(loadmat(found[META_MAT][0], squeeze_me=True)["synsets"])
        leaves = {}
        for s in synsets:
            if int(s["num_children"]) == 0:
                leaves[int(s["ILSVRC2012_ID"])] = str(s["WNID"])
    except (KeyError, ValueError, TypeError, IndexError, OSError) as e:
        raise PrepareError(f"{devkit.name}: {META_MAT} is not a devkit synsets table: {e!r}") from None
    if not leaves or len(set(leaves.values())) != len(leaves):
        raise PrepareError(f"{devkit.name}: {META_MAT} has no leaf synsets or repeats a WNID")
    for wnid in leaves.values():
        if not re.fullmatch(r"n\d{8}", wnid):
            raise PrepareError(f"{devkit.name}: {META_MAT} holds WNID {wnid!r}, expected n + 8 digits")
    truth = []
    for n, line in enumerate(found[GROUND_TRUTH][0].read_text(encoding="ascii", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if not line.strip().isdigit() or int(line) not in leaves:
            raise PrepareError(f"{devkit.name}: {GROUND_TRUTH} line {n}: {line.strip()[:20]!r} is not the "
                               "ILSVRC2012_ID of a leaf synset")
        truth.append(int(line))
    return leaves, truth


# ---------------------------------------------------------------- streaming extraction


class _Progress(io.RawIOBase):
    """A read-only file that advances a tqdm bar by the bytes read (tarfile's stream mode only reads)."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def readable(self):
        return True

    def read(self, n=-1):
        b = self.f.read(n)
        if self.bar is not None:
            self.bar.update(len(b))
        return b

    def readinto(self, b):
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def _bar(path: Path):
    if tqdm is None:
        return None
    return tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name,
                file=sys.stderr, leave=False, disable=None)


def _flat_name(label: str, member: tarfile.TarInfo) -> str | None:
    """The member's file name after the safety checks; None for a directory entry; error for anything else."""
    try:
        check_member(Path(label), member.name, tar_kind(member))
    except FetchError as e:
        raise PrepareError(str(e)) from None
    name = member.name[2:] if member.name.startswith("./") else member.name
    if member.isdir():
        return None
    if "/" in name or "\\" in name or name in ("", ".") or name.startswith("."):
        raise PrepareError(f"{label}: unexpected member {member.name!r}: the ILSVRC2012 archives hold flat files")
    return name


def _write_member(tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, label: str) -> None:
    src = tf.extractfile(member)
    try:
        with open(dest, "xb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    except FileExistsError:
        raise PrepareError(f"{label}: member {member.name!r} appears twice") from None


def extract_val(archive: Path, flat: Path) -> list[str]:
    """Stream the flat val JPEGs into ``flat``; return their names, sorted."""
    flat.mkdir()
    names = []
    bar = _bar(archive)
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=_Progress(raw, bar), mode="r|") as tf:
            for member in tf:
                name = _flat_name(archive.name, member)
                if name is not None:
                    _write_member(tf, member, flat / name, archive.name)
                    names.append(name)
    except CORRUPT as e:
        raise PrepareError(f"corrupt or truncated archive {archive.name}: {e}; get it again") from None
    finally:
        if bar is not None:
            bar.close()
    return sorted(names)


def extract_train(archive: Path, dest: Path, wnids: set[str]) -> dict[str, int]:
    """Stream each class tar of the train archive into ``dest/<wnid>/``; return the image count per WNID."""
    counts: dict[str, int] = {}
    bar = _bar(archive)
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=_Progress(raw, bar), mode="r|") as outer:
            for member in outer:
                name = _flat_name(archive.name, member)
                if name is None:
                    continue
                wnid = name[:-len(".tar")] if name.endswith(".tar") else None
                if wnid not in wnids:
                    raise PrepareError(f"{archive.name}: unexpected member {member.name!r}: expected one "
                                       "<wnid>.tar per leaf synset of the devkit")
                if wnid in counts:
                    raise PrepareError(f"{archive.name}: member {member.name!r} appears twice")
                folder = dest / wnid
                folder.mkdir()
                label = f"{archive.name}:{name}"
                n = 0
                with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as inner:
                    for im in inner:
                        # check_member names the archive by its last path part: the class tar.
                        iname = _flat_name(label, im)
                        if iname is not None:
                            _write_member(inner, im, folder / iname, label)
                            n += 1
                if n == 0:
                    raise PrepareError(f"{label}: the class tar holds no images")
                counts[wnid] = n
    except CORRUPT as e:
        raise PrepareError(f"corrupt or truncated archive {archive.name}: {e}; get it again") from None
    finally:
        if bar is not None:
            bar.close()
    return counts


# ---------------------------------------------------------------- the stage


def build(paths: dict[str, Path], counts: dict, tmp: Path) -> dict:
    """Extract everything into ``tmp`` (train/, val/); return the counts found."""
    leaves, truth = read_devkit(paths["devkit"], tmp)
    wnids = set(leaves.values())
    if len(wnids) != counts["classes"]:
        raise PrepareError(f"{paths['devkit'].name}: {len(wnids)} leaf synsets, expected {counts['classes']}")
    if len(truth) != counts["val"]:
        raise PrepareError(f"{paths['devkit'].name}: {GROUND_TRUTH} has {len(truth)} labels, "
                           f"expected {counts['val']}")

    val, flat = tmp / "val", tmp / ".val-flat"
    val.mkdir()
    for wnid in wnids:  # every class, so ImageFolder gives train and val the same class indices
        (val / wnid).mkdir()
    names = extract_val(paths["val"], flat)
    if len(names) != len(truth):
        raise PrepareError(f"corrupt or truncated archive {paths['val'].name}: {len(names)} images, the devkit "
                           f"labels {len(truth)}; get it again")
    for name, ident in zip(names, truth):  # the ground truth is in sorted filename order
        os.replace(flat / name, val / leaves[ident] / name)
    flat.rmdir()

    train = tmp / "train"
    train.mkdir()
    per_class = extract_train(paths["train"], train, wnids)
    if set(per_class) != wnids:
        raise PrepareError(f"corrupt or truncated archive {paths['train'].name}: {len(per_class)} of "
                           f"{len(wnids)} class tars; get it again")
    total = sum(per_class.values())
    if total != counts["train"]:
        raise PrepareError(f"corrupt or truncated archive {paths['train'].name}: {total} images, expected "
                           f"{counts['train']}; get it again")
    shutil.rmtree(tmp / "devkit")
    return {"classes": len(wnids), "train_images": total, "val_images": len(names)}


def prepare(cfg, created: list[Path]) -> dict:
    """Run the stage; return the sidecar record. Appends each output path to ``created`` once it may exist."""
    data, root = cfg.data, Path(cfg.root)
    paths, md5s, counts, origin = locate(cfg, root)
    verified = bool(data.verify_md5)
    if verified:
        verify(paths, md5s)
    processed = root / "data" / "processed"
    dest, sidecar = processed / "imagenet", processed / "imagenet.json"
    created += [sidecar, manifest_path(sidecar), dest]  # from here a failure removes the old outputs too
    sidecar.unlink(missing_ok=True)
    manifest_path(sidecar).unlink(missing_ok=True)
    tmp = temp_dir_beside(dest)
    try:
        try:
            found = build(paths, counts, tmp)
        except CORRUPT as e:
            raise PrepareError(f"corrupt or truncated archive: {e}; get it again") from None
        except FetchError as e:  # the devkit's extract
            raise PrepareError(str(e)) from None
        except OSError as e:
            raise PrepareError(f"could not write into {dest.parent}: {e}") from None
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record = {"name": "imagenet", **found, "archive_md5": {paths[r].name: md5s[r] for r in ROLES},
              "md5_verified": verified, "source": origin, "profile": cfg.profile,
              "identity": record_identity(dest, stage="prepare_imagenet")}
    write_atomic(sidecar, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return record


def run(cfg) -> int:
    return run_stage("imagenet", lambda created: prepare(cfg, created), lambda r: (
        f"{r['classes']} classes, {r['train_images']} train / {r['val_images']} val images from {r['source']} "
        "-> data/processed/imagenet/"))


# ---------------------------------------------------------------- smoke fixtures

# Real WNIDs and words (ILSVRC2012 leaves), so fixture paths look like the real ones; the IDs are made up.
FIXTURE_LEAVES = (("n01440764", "tench, Tinca tinca"), ("n01443537", "goldfish, Carassius auratus"),
                  ("n01484850", "great white shark, white shark, man-eater, Carcharodon carcharias"),
                  ("n01491361", "tiger shark, Galeocerdo cuvieri"), ("n01494475", "hammerhead, hammerhead shark"),
                  ("n01496331", "electric ray, crampfish, numbfish, torpedo"), ("n01498041", "stingray"),
                  ("n01514668", "cock"))
FIXTURE_INNER = (("n01439121", "cyprinid"), ("n01482330", "shark"))  # non-leaf synsets: must be ignored
MAT_HEADER = b"MATLAB 5.0 MAT-file, SYNTHETIC SMOKE FIXTURE written by pipelines/prepare/imagenet.py"


def _jpeg(rng: np.random.Generator, tint: int) -> bytes:
    from PIL import Image

    pixels = rng.integers(0, 64, (8, 8, 3), dtype=np.uint8)
    pixels[..., tint % 3] += 160  # a class tint, so the pictures differ by class
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def meta_mat(leaves: list[tuple[int, str, str]], inner: list[tuple[int, str, str, list[int]]]) -> bytes:
    """A devkit-format meta.mat: struct array ``synsets`` (N x 1) with the real file's fields."""
    from scipy.io import savemat

    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images")
    rows = [(float(i), w, words, f"synthetic fixture synset {w}", 0.0, np.zeros((1, 0)), 0.0, 0.0)
            for i, w, words in leaves]
    rows += [(float(i), w, words, f"synthetic fixture synset {w}", float(len(kids)),
              np.array([kids], dtype=float), 1.0, 0.0) for i, w, words, kids in inner]
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        for f, v in zip(fields, row):
            synsets[k, 0][f] = v
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets}, format="5", do_compression=False)
    out = bytearray(buf.getvalue())
    out[:116] = MAT_HEADER.ljust(116)  # savemat puts the platform and date here: fixed text, fixed bytes
    return bytes(out)


def fixture_archives(classes: int = 4, train_per_class: int = 6, val: int = 8, seed: int = 0) -> dict[str, bytes]:
    """The three archives' bytes (by role) of a tiny ILSVRC2012 look-alike, byte-deterministic."""
    if not 1 <= classes <= len(FIXTURE_LEAVES) or train_per_class < 1 or val < 1:
        raise ConfigError(f"fixture needs 1..{len(FIXTURE_LEAVES)} classes and at least one image per split")
    rng = np.random.default_rng(seed)
    leaves = [(k + 1, w, words) for k, (w, words) in enumerate(FIXTURE_LEAVES[:classes])]
    inner = [(classes + 1 + k, w, words, [i for i, _, _ in leaves[k::2]])
             for k, (w, words) in enumerate(FIXTURE_INNER) if leaves[k::2]]
    class_tars = []
    for c, (_, wnid, _) in enumerate(leaves):
        images = [(f"{wnid}_{100 + 17 * j}.JPEG", _jpeg(rng, c)) for j in range(train_per_class)]
        class_tars.append((f"{wnid}.tar", fixtures.deterministic_tar(images, gz=False)))
    labels = [int(x) for x in rng.integers(0, classes, val)]
    labels[:classes] = range(min(classes, val))  # every class appears in val when there are enough images
    val_members = [(f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng, labels[i])) for i in range(val)]
    truth = "".join(f"{leaves[c][0]}\n" for c in labels).encode("ascii")
    kit = "ILSVRC2012_devkit_t12"
    readme = b"SYNTHETIC SMOKE FIXTURE in the layout of the ILSVRC2012 devkit; not ImageNet data.\n"
    devkit = [(kit, None), (f"{kit}/COPYING", readme), (f"{kit}/data", None),
              (f"{kit}/data/{GROUND_TRUTH}", truth), (f"{kit}/data/{META_MAT}", meta_mat(leaves, inner))]
    return {"train": fixtures.deterministic_tar(class_tars, gz=False),
            "val": fixtures.deterministic_tar(val_members, gz=False), "devkit": fixtures.deterministic_tar(devkit)}


def write_fixtures(folder: Path, archives, **kw) -> dict[str, str]:
    """Write the fixture archives into ``folder`` under their real names; return their md5s by role."""
    md5s = {}
    for role, content in fixture_archives(**kw).items():
        path = folder / archives[role].name
        write_if_changed(path, content)
        md5s[role] = hashlib.md5(content, usedforsecurity=False).hexdigest()
    return md5s


if __name__ == "__main__":
    hydra_entry(run)
