"""Degenerate settings and data are one line before compute (issue 27): a key nothing reads, a width of 0, a
NaN or infinite hyper-parameter, a split that leaves a handful of rows, a seed beyond what the RNGs take, labels
outside the class range. From the command line: exit code 2, one line, nothing written (no MLflow store, run,
record or checkpoint)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipelines.errors import ConfigError, RunError
from pipelines.tasks.classification import data as image_data
from pipelines.tasks.detection import data as coco_data, task as detection
from pipelines.training import runner
from tests.pipelines.train_helpers import train, train_config, train_env, with_data, write_boston


@pytest.mark.parametrize("override, message", [
    ("+task.epochz=3", "task.epochz: experiment=boston_gal has no such setting, so nothing would read it; did you "
                       "mean task.epochs?"),
    ("data.model.hidden=[0,50]", "data.model.hidden=[0, 50]: use a list of positive integers (the MLP's hidden "
                                 "widths; [] for a linear model)"),
    ("method.ratio=inf", "method.ratio=inf: use a finite number"),
    ("optim.lr=nan", "optim.lr=nan: use a finite number"),
    ("seed=18446744073709551616", "seed=18446744073709551616: use an integer from 0 to 4294967295"),
    ("task.test_fraction=0.99", "task.test_fraction=0.99 leaves 1 training and 79 test rows of the 80 in "
                                "{root}/data/processed/boston.npz: training needs at least 14 (features + 1), "
                                "testing 2"),
])
def test_the_command_line_refuses_in_one_line_and_writes_nothing(tmp_path, override, message):
    write_boston(tmp_path)
    done = train(tmp_path, "experiment=boston_gal", "profile=smoke", "seed=0", override, env=train_env(tmp_path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"train regression: bad config: {message.format(root=tmp_path)}"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no mlflow.db, runs/ or checkpoints/


def detr_config(root: Path, *overrides: str):
    return train_config("experiment=coco_detr_r50_gal", f"root={root}", *overrides)


@pytest.mark.parametrize("overrides, message", [
    (("model.hidden_dim=30",), "model.hidden_dim=30: use an even number divisible by model.nheads=4"),
    (("model.nheads=0",), "model.nheads=0: use an integer of at least 1"),
    (("model.num_queries=-1",), "model.num_queries=-1: use an integer of at least 1"),
    (("model.dec_layers=0",), "model.dec_layers=0: use an integer of at least 1"),
    (("model.dropout=1.0",), "model.dropout=1.0: use a number in [0, 1)"),
    (("task.lr_backbone=-1e-5",), "task.lr_backbone=-1e-05: use a number in [0, inf)"),
    (("task.lr_backbone=inf",), "task.lr_backbone=inf: use a finite number"),
    (("task.loss.eos_coef=-0.1",), "task.loss.eos_coef=-0.1: use a number in [0, inf)"),
    (("task.log_every=-5",), "task.log_every=-5: use an integer of at least 0"),
])
def test_detection_refuses_degenerate_settings_on_the_config_alone(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        runner.check(detr_config(tmp_path, *overrides), detection.Detection)


def test_detection_refuses_a_category_id_outside_its_classes(tmp_path, prepared_coco):
    root = with_data(tmp_path, prepared_coco)
    path = root / "data" / "processed" / "coco" / "annotations" / "instances_val2017.json"
    instances = json.loads(path.read_text())
    instances["annotations"][0]["category_id"] = 95
    path.write_text(json.dumps(instances))
    with pytest.raises(RunError, match=re.escape(f"{path} holds category_id 95, outside 0..90 (data.num_classes=91)")):
        coco_data.datasets(detr_config(root), root)


def imagenet_folder(root: Path, train: dict[str, int], val: dict[str, int], classes: int) -> None:
    """data/processed/imagenet with ``train``/``val`` {wnid: images} (empty files: listing reads no pixels)."""
    processed = root / "data" / "processed"
    for split, counts in (("train", train), ("val", val)):
        for wnid, n in counts.items():
            (processed / "imagenet" / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (processed / "imagenet" / split / wnid / f"{wnid}_{i}.JPEG").write_bytes(b"")
    (processed / "imagenet.json").write_text(json.dumps({"name": "imagenet", "classes": classes}))


def test_imagenet_val_labels_are_the_training_class_indices(tmp_path):
    """A val folder without images of one class would number the classes after it one lower than training does."""
    imagenet_folder(tmp_path, {"n01": 2, "n02": 2, "n03": 2}, {"n01": 1, "n03": 1}, classes=3)
    cfg = train_config("experiment=imagenet_resnet50_gal", f"root={tmp_path}")
    _, val, classes, _ = image_data.datasets(cfg, tmp_path)
    assert classes == 3 and [target for _, target in val.reader.samples] == [0, 2]


def test_imagenet_with_more_classes_than_its_sidecar_is_refused(tmp_path):
    imagenet_folder(tmp_path, {"n01": 2, "n02": 2, "n03": 1}, {"n01": 1, "n02": 1}, classes=2)
    cfg = train_config("experiment=imagenet_resnet50_gal", f"root={tmp_path}")
    with pytest.raises(RunError, match=re.escape("train holds images of 3 classes, more than the 2 of imagenet.json")):
        image_data.datasets(cfg, tmp_path)


def test_every_preset_passes_the_checks(tmp_path):
    """The checks refuse nothing a preset sets, in every profile (no data read: root is empty)."""
    from pipelines.config import CONF
    from pipelines.training import identity

    presets = sorted(p.stem for p in (CONF / "experiment").glob("*_*.yaml") if p.stem.endswith(("_gal", "_baseline")))
    assert len(presets) >= 26
    for profile in ("smoke", "regression", "paper"):
        for preset in presets:
            cfg = train_config(f"experiment={preset}", f"profile={profile}", f"root={tmp_path}")
            runner.check(cfg, runner.task_class(cfg.task.name), here=False)
            assert identity.variant(cfg) == "", (preset, profile)
    assert not any(tmp_path.iterdir())
