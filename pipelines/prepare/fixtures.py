"""Smoke fixtures: small synthetic files in the REAL raw formats, made by the pipeline itself.

The smoke profile fetches these through the same mirror code path and parses them with the same parsers as
the real files, so a smoke run exercises everything but the data. The targets are a smooth function of the
features plus noise, so a model trained on them has something to learn. Output is byte-deterministic for a
given (rows, seed): no timestamps, user names or dict-order effects, so fetch() can verify the checksum the
generator reports and DVC sees unchanged files as unchanged.
"""
from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
import zipfile

import numpy as np

SYNTHETIC_NOTE = (" SYNTHETIC SMOKE FIXTURE written by pipelines/prepare/fixtures.py in the layout of the\n"
                  " StatLib boston file: the numbers below are random draws with a made-up price relation,\n"
                  " NOT the data of Harrison, D. and Rubinfeld, D.L. 'Hedonic prices and the environment\n"
                  " for clean air', J. Environ. Economics & Management, vol.5, 81-102, 1978.\n"
                  " Use it to test code, never to report results.\n")
BOSTON_VARIABLES = (  # the real file's variable list, which makes the preamble 22 lines like the real one
    ("CRIM", "per capita crime rate by town"),
    ("ZN", "proportion of residential land zoned for lots over 25,000 sq.ft."),
    ("INDUS", "proportion of non-retail business acres per town"),
    ("CHAS", "Charles River dummy variable (= 1 if tract bounds river; 0 otherwise)"),
    ("NOX", "nitric oxides concentration (parts per 10 million)"),
    ("RM", "average number of rooms per dwelling"),
    ("AGE", "proportion of owner-occupied units built prior to 1940"),
    ("DIS", "weighted distances to five Boston employment centres"),
    ("RAD", "index of accessibility to radial highways"),
    ("TAX", "full-value property-tax rate per $10,000"),
    ("PTRATIO", "pupil-teacher ratio by town"),
    ("B", "1000(Bk - 0.63)^2 where Bk is the proportion of blacks by town"),
    ("LSTAT", "% lower status of the population"),
    ("MEDV", "Median value of owner-occupied homes in $1000's"),
)
CAL_HOUSING_COLUMNS = ("longitude", "latitude", "housingMedianAge", "totalRooms", "totalBedrooms", "population",
                       "households", "medianIncome", "medianHouseValue")


def boston_statlib(rows: int = 120, seed: int = 0) -> bytes:
    """A StatLib-format boston file: 22-line preamble, then each record as 11 numbers, newline, 3 numbers."""
    rng = np.random.default_rng(seed)
    n = rows
    # Ranges and rough shapes of the real columns, so scaling and model code meet realistic magnitudes.
    crim = np.exp(rng.normal(-1.0, 1.6, n)).clip(0.006, 89.0)
    zn = rng.choice([0.0, 0.0, 0.0, 0.0, 12.5, 20.0, 25.0, 80.0], n)
    indus = rng.uniform(0.46, 27.74, n)
    chas = (rng.random(n) < 0.07).astype(int)
    nox = rng.uniform(0.385, 0.871, n)
    rm = rng.normal(6.28, 0.7, n).clip(3.56, 8.78)
    age = rng.uniform(2.9, 100.0, n)
    dis = np.exp(rng.normal(1.2, 0.5, n)).clip(1.13, 12.13)
    rad = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 24], n)
    tax = rng.uniform(187.0, 711.0, n)
    ptratio = rng.uniform(12.6, 22.0, n)
    b = (396.9 - np.abs(rng.normal(0.0, 30.0, n))).clip(0.32, 396.9)
    lstat = rng.uniform(1.73, 37.97, n)
    medv = (22.5 + 5.0 * (rm - 6.28) - 0.45 * (lstat - 12.6) - 10.0 * (nox - 0.55) + 2.5 * chas
            - 0.3 * (ptratio - 18.5) + 2.0 * np.sin(dis) - 1.5 * np.log1p(crim) + rng.normal(0.0, 1.5, n))
    medv = medv.clip(5.0, 50.0)  # the real MEDV is censored at 50
    lines = [SYNTHETIC_NOTE, "\n", " Variables in order:\n"]
    lines += [f" {name:<8} {text}\n" for name, text in BOSTON_VARIABLES]
    lines.append("\n")
    for i in range(n):
        lines.append(f" {crim[i]:8.5f} {zn[i]:6.2f} {indus[i]:6.2f} {chas[i]:2d} {nox[i]:6.4f} {rm[i]:6.4f} "
                     f"{age[i]:6.2f} {dis[i]:7.4f} {rad[i]:3d} {tax[i]:6.1f} {ptratio[i]:6.2f}\n")
        lines.append(f" {b[i]:6.2f} {lstat[i]:6.2f} {medv[i]:6.2f}\n")
    return "".join(lines).encode("ascii")


def cal_housing_data(rows: int = 600, seed: int = 0) -> bytes:
    """cal_housing.data: 9 comma-separated numbers a row, printed '%f' like the real file."""
    rng = np.random.default_rng(seed)
    n = rows
    lon = rng.uniform(-124.3, -114.3, n)
    lat = rng.uniform(32.5, 42.0, n)
    age = rng.integers(1, 53, n).astype(float)
    households = np.round(np.exp(rng.normal(6.0, 0.6, n))).clip(2, 6000)
    ave_rooms = rng.normal(5.4, 1.0, n).clip(1.5, 12.0)
    rooms = np.round(households * ave_rooms)
    bedrooms = np.round(households * rng.normal(1.07, 0.1, n).clip(0.6, 2.0))
    occupancy = rng.normal(2.9, 0.6, n).clip(1.0, 8.0)
    population = np.round(households * occupancy)
    income = np.round(np.exp(rng.normal(1.25, 0.45, n)).clip(0.5, 15.0), 4)
    # Price in 100k: income, a coastal bump (Bay Area and Los Angeles), age and crowding, plus noise.
    coast = (np.exp(-((lon + 122.3) ** 2 + (lat - 37.7) ** 2) / 2)
             + np.exp(-((lon + 118.3) ** 2 + (lat - 34.0) ** 2) / 2))
    value = (0.4 * income + 0.3 + 1.2 * coast + 0.008 * age - 0.15 * (occupancy - 2.9)
             + rng.normal(0.0, 0.25, n))
    value = np.round(100000 * value).clip(14999, 500001)  # the real target is censored at 500001
    table = np.column_stack([lon, lat, age, rooms, bedrooms, population, households, income, value])
    return "".join(",".join(f"{v:f}" for v in row) + "\n" for row in table).encode("ascii")


def cal_housing_tgz(rows: int = 600, seed: int = 0) -> bytes:
    """cal_housing.tgz laid out like the real archive: CaliforniaHousing/cal_housing.{data,domain}."""
    domain = "".join(f"{c}: continuous.\n" for c in CAL_HOUSING_COLUMNS).encode("ascii")
    members = [("CaliforniaHousing", None), ("CaliforniaHousing/cal_housing.data", cal_housing_data(rows, seed)),
               ("CaliforniaHousing/cal_housing.domain", domain)]
    return deterministic_tar(members)


CIFAR10_LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_README = (b"<html><body><p>SYNTHETIC SMOKE FIXTURE written by pipelines/prepare/fixtures.py in the layout of "
                b"the CIFAR python archives (Krizhevsky, 2009): the images are class templates plus noise, NOT "
                b"CIFAR data. Use it to test code, never to report results.</p></body></html>\n")


def cifar_members(kind: str, train: int = 200, test: int = 100, seed: int = 0) -> list[tuple[str, bytes | None]]:
    """The members (name, content; None for a directory) of a CIFAR python archive, in the real layout.

    kind ``cifar10``: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta, readme.html}, each
    batch a dict {b"batch_label", b"labels", b"data", b"filenames"}; kind ``cifar100``:
    cifar-100-python/{train, test, meta}, batches {b"filenames", b"batch_label", b"fine_labels",
    b"coarse_labels", b"data"}. b"data" is uint8 N x 3072 (row-major 3 x 32 x 32: all red, all green, all
    blue), labels are lists of Python ints, and the files are protocol-2 pickles with bytes keys, as
    ``pickle.load(f, encoding="bytes")`` returns the real ones. Each class has a fixed low-resolution colour
    template (4 x 4 blocks of 8 x 8 pixels); an image is its class's template plus pixel noise, so a
    classifier has something to learn. Every class occurs in each split once the split has that many images.
    """
    if kind not in ("cifar10", "cifar100"):
        raise ValueError(f"no CIFAR fixture of kind {kind!r}; known: cifar10, cifar100")
    classes = 10 if kind == "cifar10" else 100
    rng = np.random.default_rng(seed)
    templates = rng.uniform(30.0, 225.0, (classes, 3, 4, 4))

    def split(n: int, tag: str) -> tuple[np.ndarray, list[int], list[bytes]]:
        labels = rng.permutation(np.arange(n) % classes)
        base = templates[labels].repeat(8, axis=2).repeat(8, axis=3)  # n x 3 x 32 x 32
        images = np.clip(np.rint(base + rng.normal(0.0, 30.0, base.shape)), 0, 255).astype(np.uint8)
        names = [f"fixture_{tag}_{i:05d}.png".encode() for i in range(n)]
        return images.reshape(n, 3 * 32 * 32), [int(v) for v in labels], names

    def dump(obj) -> bytes:
        return pickle.dumps(obj, protocol=2)

    (x_train, y_train, f_train), (x_test, y_test, f_test) = split(train, "train"), split(test, "test")
    if kind == "cifar10":
        folder = "cifar-10-batches-py"
        members: list[tuple[str, bytes | None]] = [(folder, None)]
        for i, part in enumerate(np.array_split(np.arange(train), 5), 1):
            members.append((f"{folder}/data_batch_{i}", dump({
                b"batch_label": f"training batch {i} of 5".encode(), b"labels": [y_train[j] for j in part],
                b"data": x_train[part], b"filenames": [f_train[j] for j in part]})))
        members.append((f"{folder}/test_batch", dump({b"batch_label": b"testing batch 1 of 1", b"labels": y_test,
                                                      b"data": x_test, b"filenames": f_test})))
        members.append((f"{folder}/batches.meta", dump({
            b"num_cases_per_batch": len(np.array_split(np.arange(train), 5)[0]),
            b"label_names": [n.encode() for n in CIFAR10_LABEL_NAMES], b"num_vis": 3072})))
        members.append((f"{folder}/readme.html", CIFAR_README))
        return members
    folder = "cifar-100-python"
    members = [(folder, None)]
    for tag, x, y, f in (("train", x_train, y_train, f_train), ("test", x_test, y_test, f_test)):
        members.append((f"{folder}/{tag}", dump({
            b"filenames": f, b"batch_label": f"{'training' if tag == 'train' else 'testing'} batch 1 of 1".encode(),
            b"fine_labels": y, b"coarse_labels": [v // 5 for v in y], b"data": x})))
    members.append((f"{folder}/meta", dump({
        b"fine_label_names": [f"fixture_class_{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"fixture_superclass_{i:02d}".encode() for i in range(20)]})))
    members.append((f"{folder}/file.txt~", CIFAR_README))
    return members


def deterministic_tar(members: list[tuple[str, bytes | None]], gz: bool = True) -> bytes:
    """A USTAR tar (gzipped unless ``gz`` is False) of (name, content) members, content None making a
    directory. mtime 0 and no name in the gzip header, fixed owners and times in the tar headers: the same
    members always give the same bytes, so a fixture's checksum is stable."""
    buf = io.BytesIO()
    target = gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") if gz else buf
    with tarfile.open(fileobj=target, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o644
                tar.addfile(info, io.BytesIO(content))
    if gz:
        target.close()
    return buf.getvalue()


def cifar_tgz(kind: str, train: int = 200, test: int = 100, seed: int = 0) -> bytes:
    """cifar-10-python.tar.gz / cifar-100-python.tar.gz laid out like the real archive (cifar_members)."""
    return deterministic_tar(cifar_members(kind, train, test, seed))


MAKERS = {"statlib_boston": boston_statlib, "cal_housing_tgz": cal_housing_tgz}  # keyed by the stage's formats


def make(fmt: str, rows: int, seed: int) -> bytes:
    """The fixture bytes for a raw file format of the prepare stage."""
    if fmt not in MAKERS:
        raise ValueError(f"no smoke fixture for format {fmt!r}; known: {', '.join(MAKERS)}")
    return MAKERS[fmt](rows=rows, seed=seed)


# ---------------------------------------------------------------- COCO 2017

# (id, name, supercategory) of real COCO 2017 categories: the ids are COCO's own, non-contiguous, up to the
# largest (90), so id handling (92 logits, no remapping) is exercised. Each is drawn as one shape in one colour.
COCO_CATEGORIES = ((1, "person", "person"), (3, "car", "vehicle"), (18, "dog", "animal"), (44, "bottle", "kitchen"),
                   (90, "toothbrush", "indoor"))
COCO_SHAPES = {  # category id -> (shape, RGB fill, range of height / width)
    1: ("ellipse", (220, 40, 40), (1.5, 2.5)), 3: ("rectangle", (40, 80, 220), (0.4, 0.7)),
    18: ("ellipse", (240, 200, 20), (0.7, 1.0)), 44: ("rectangle", (30, 200, 60), (2.0, 3.0)),
    90: ("rectangle", (200, 40, 220), (0.15, 0.3))}
COCO_IMAGE_SIZES = (64, 160)  # width and height are drawn from this range (pixels)
COCO_GAP = 4                  # pixels between any two objects, so each drawn shape is exactly its box
COCO_NOTE = ("SYNTHETIC SMOKE FIXTURE written by pipelines/prepare/fixtures.py in the layout of COCO 2017: "
             "shapes drawn on noise, NOT COCO data. Use it to test code, never to report results.")


def _coco_mask(size: tuple[int, int], shape: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """The boolean H x W mask of one drawn shape; ``box`` is (x, y, w, h) in whole pixels."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", size, 0)
    x, y, w, h = box
    getattr(ImageDraw.Draw(canvas), shape)([x, y, x + w - 1, y + h - 1], fill=255)
    return np.asarray(canvas) > 0


def _tight_box(mask: np.ndarray) -> list[float]:
    """COCO's [x, y, width, height] of a mask: the pixels it covers, edges on pixel boundaries."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts of a mask: run lengths in column-major order, starting with zeros."""
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def _coco_place(rng: np.random.Generator, width: int, height: int, w: int, h: int,
                taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    """A free spot (x, y, w, h) for a w x h box at least COCO_GAP pixels from every box in ``taken``."""
    for _ in range(50):
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if all(x + w + COCO_GAP <= tx or tx + tw + COCO_GAP <= x or y + h + COCO_GAP <= ty or ty + th + COCO_GAP <= y
               for tx, ty, tw, th in taken):
            return x, y, w, h
    return None


def _coco_image(rng: np.random.Generator, index: int, gray: bool, empty: bool,
                crowd: bool) -> tuple[bytes, int, int, list[dict]]:
    """One fixture picture: (JPEG bytes, width, height, its annotations without ids)."""
    from PIL import Image, ImageDraw

    width, height = (int(v) for v in rng.integers(COCO_IMAGE_SIZES[0], COCO_IMAGE_SIZES[1] + 1, 2))
    background = rng.integers(20, 61, 3)  # dark, so every category colour (and its grey level) stands out
    pixels = np.clip(background + rng.integers(-6, 7, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    taken: list[tuple[int, int, int, int]] = []
    found: list[dict] = []
    if crowd:  # a group of small people, annotated as one crowd region (RLE mask, iscrowd=1) as COCO does
        region = _coco_place(rng, width, height, 34, 24, taken)
        if region is not None:
            taken.append(region)
            mask = np.zeros((height, width), bool)
            for k in range(4):
                x, y = region[0] + 8 * k + int(rng.integers(0, 2)), region[1] + int(rng.integers(0, 10))
                part = (x, y, 6, int(rng.integers(11, 15)))
                getattr(draw, COCO_SHAPES[1][0])([x, y, x + 5, y + part[3] - 1], fill=COCO_SHAPES[1][1])
                mask |= _coco_mask((width, height), COCO_SHAPES[1][0], part)
            found.append({"segmentation": {"counts": _uncompressed_rle(mask), "size": [height, width]},
                          "area": float(mask.sum()), "iscrowd": 1, "bbox": _tight_box(mask), "category_id": 1})
    for k in range(0 if empty else int(rng.integers(1, 4))):
        pick = index % len(COCO_CATEGORIES) if k == 0 else int(rng.integers(0, len(COCO_CATEGORIES)))
        category = COCO_CATEGORIES[pick][0]
        shape, colour, (low, high) = COCO_SHAPES[category]
        side, aspect = rng.uniform(14, 0.55 * min(width, height)), rng.uniform(low, high)
        w = int(np.clip(round(side / np.sqrt(aspect)), 6, width - 2))
        h = int(np.clip(round(side * np.sqrt(aspect)), 6, height - 2))
        box = _coco_place(rng, width, height, w, h, taken)
        if box is None:
            continue
        taken.append(box)
        x, y, w, h = box
        getattr(draw, shape)([x, y, x + w - 1, y + h - 1], fill=colour)
        mask = _coco_mask((width, height), shape, box)
        if shape == "rectangle":
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
        else:
            t = np.linspace(0.0, 2.0 * np.pi, 16, endpoint=False)
            polygon = np.column_stack([x + w / 2 + w / 2 * np.cos(t), y + h / 2 + h / 2 * np.sin(t)]).ravel()
        found.append({"segmentation": [[round(float(v), 2) for v in polygon]], "area": float(mask.sum()),
                      "iscrowd": 0, "bbox": _tight_box(mask), "category_id": category})
    if gray:
        image = image.convert("L")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92, subsampling=0)  # 4:4:4: no colour bleeding past the edges
    return buf.getvalue(), width, height, found


def coco_members(train: int = 16, val: int = 8, seed: int = 0) -> dict[str, list[tuple[str, bytes | None]]]:
    """The members (name, content; None for a directory) of the three COCO 2017 zips, by role ``train``,
    ``val`` and ``annotations``, in the real layout: train2017/<id:012d>.jpg, val2017/<id:012d>.jpg and
    annotations/{instances,captions}_{train,val}2017.json.

    The instances files are COCO's format (info, licenses, images, annotations, categories): boxes are
    [x, y, w, h] in pixels, each exactly the drawn shape (objects are COCO_GAP pixels apart), ``area`` its pixel
    count, polygons for single objects and an uncompressed RLE for the crowd region (iscrowd=1); category ids
    are COCO's own (COCO_CATEGORIES, each one shape and colour, so a tiny detector has something to learn).
    Image ids are distinct across the splits, as in COCO. In each split, image 1 is grayscale (mode L), image 2
    has no objects and image 3 holds a crowd region (when the split has that many images). The first object of
    image k is of category k mod 5, so every category occurs in a split of eight images or more.
    """
    if train < 1 or val < 1:
        raise ValueError(f"a COCO fixture needs at least one image per split, got train={train} val={val}")
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1, 581930), size=train + val, replace=False)
    split_ids = {"train": sorted(int(i) for i in ids[:train]), "val": sorted(int(i) for i in ids[train:])}
    info = {"description": COCO_NOTE, "url": "", "version": "1.0", "year": 2017, "contributor": "fixture",
            "date_created": "2017/09/01"}
    licenses = [{"url": "", "id": 1, "name": "synthetic fixture"}]
    categories = [{"supercategory": s, "id": i, "name": n} for i, n, s in COCO_CATEGORIES]
    annotation_id = 1
    out: dict[str, list[tuple[str, bytes | None]]] = {"annotations": [("annotations/", None)]}
    for split in ("train", "val"):
        folder = f"{split}2017"
        members: list[tuple[str, bytes | None]] = [(f"{folder}/", None)]
        images, annotations, captions = [], [], []
        for k, image_id in enumerate(split_ids[split]):
            jpeg, width, height, found = _coco_image(rng, k, gray=k == 1, empty=k == 2, crowd=k == 3)
            name = f"{image_id:012d}.jpg"
            members.append((f"{folder}/{name}", jpeg))
            images.append({"license": 1, "file_name": name, "coco_url": "", "height": height, "width": width,
                           "date_captured": "2017-01-01 00:00:00", "flickr_url": "", "id": image_id})
            for ann in found:
                annotations.append({**ann, "image_id": image_id, "id": annotation_id})
                annotation_id += 1
            captions.append({"image_id": image_id, "id": image_id, "caption": f"A synthetic picture with "
                             f"{len(found)} drawn object{'s' if len(found) != 1 else ''}."})
        out[split] = members
        for kind, content in (("captions", {"info": info, "licenses": licenses, "images": images,
                                            "annotations": captions}),
                              ("instances", {"info": info, "licenses": licenses, "images": images,
                                             "annotations": annotations, "categories": categories})):
            out["annotations"].append((f"annotations/{kind}_{folder}.json", json.dumps(content).encode()))
    return out


def deterministic_zip(members: list[tuple[str, bytes | None]]) -> bytes:
    """A zip of (name, content) members, content None making a directory (name ending in /): fixed times,
    Unix modes and system; JPEGs stored, everything else deflated (as the COCO zips). Same members, same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in members:
            info = zipfile.ZipInfo(name if content is not None or name.endswith("/") else name + "/",
                                   date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3  # Unix, whatever the platform: the modes below are Unix modes
            if content is None:
                info.external_attr = (0o40755 << 16) | 0x10  # directory, and the MS-DOS directory flag
                zf.writestr(info, b"")
            else:
                info.external_attr = 0o100644 << 16
                info.compress_type = zipfile.ZIP_STORED if name.endswith(".jpg") else zipfile.ZIP_DEFLATED
                zf.writestr(info, content)
    return buf.getvalue()


def coco_zips(train: int = 16, val: int = 8, seed: int = 0) -> dict[str, bytes]:
    """train2017.zip, val2017.zip and annotations_trainval2017.zip (by role: train, val, annotations) laid out
    like the real archives (coco_members)."""
    return {role: deterministic_zip(members) for role, members in coco_members(train, val, seed).items()}
