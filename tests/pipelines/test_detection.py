"""The detection task on the COCO smoke fixture: ground truth through post-processing and COCOeval scores AP
100 with COCO's own category ids, kill-and-resume ends bitwise equal in the same MLflow run, 2 processes equal
1 on the same global batch, bad inputs fail in one line."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from mlflow.tracking import MlflowClient

from pipelines.errors import ConfigError, UserError
from pipelines.tasks.detection import data as coco_data, task as detection
from pipelines.tasks.detection.detr.detr import PostProcess
from pipelines.training import runner
from tests.pipelines.train_helpers import (checkpoint_path, kill_at_first_checkpoint, outcome, reprepared, train,
                                           train_config, train_env, with_data)

EXPERIMENT = "experiment=coco_detr_r50_gal"
RUN = "coco_detr_r50-gal-s0"
TASK = "detection"


def config(root: Path, *overrides: str):
    return train_config(EXPERIMENT, f"root={root}", *overrides)


def test_ground_truth_as_predictions_scores_ap_100_with_cocos_category_ids(tmp_path, prepared_coco):
    cfg = config(with_data(tmp_path, prepared_coco))
    _, val, annotations, _ = coco_data.datasets(cfg, tmp_path)
    per_image, ids = {}, set()
    for index in range(len(val)):
        _, target = val[index]
        n = len(target["labels"])
        logits = torch.full((1, max(n, 1), 92), -10.0)
        logits[0, torch.arange(n), target["labels"]] = 10.0  # certain of the true class
        boxes = target["boxes"][None] if n else torch.zeros(1, 1, 4)
        result = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, target["orig_size"][None])[0]
        keep = result["scores"] > 0.5
        xywh = result["boxes"][keep].clone()
        xywh[:, 2:] -= xywh[:, :2]
        per_image[target["image_id"]] = [{"image_id": target["image_id"], "category_id": int(label),
                                          "bbox": box, "score": float(score)}
                                         for label, box, score in zip(result["labels"][keep].tolist(),
                                                                      xywh.tolist(), result["scores"][keep])]
        ids.update(result["labels"][keep].tolist())
    ap = coco_data.coco_ap(annotations, [d for found in per_image.values() for d in found])
    assert ap["val_AP"] == pytest.approx(100, abs=0.5) and ap["val_AP50"] == pytest.approx(100)
    categories = {c["id"] for c in json.loads(annotations.read_text())["categories"]}
    assert ids and ids <= categories and max(ids) > len(categories)  # non-contiguous ids, not remapped


@pytest.mark.slow
def test_kill_and_resume_ends_bitwise_equal_in_the_same_mlflow_run(tmp_path, prepared_coco):
    env = train_env(tmp_path)
    straight, killed = (with_data(tmp_path / name, prepared_coco) for name in ("straight", "killed"))
    done = train(straight, EXPERIMENT, env=env)
    assert done.returncode == 0, done.stderr
    kill_at_first_checkpoint(killed, EXPERIMENT, env=env, checkpoint=checkpoint_path(killed, TASK, RUN))
    resumed = train(killed, EXPERIMENT, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {RUN} after epoch" in resumed.stdout
    (h1, m1, w1), (h2, m2, w2) = outcome(straight, TASK, RUN), outcome(killed, TASK, RUN)
    assert h1 == h2 and m1 == m2 and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert {"val_AP", "val_AP50", "val_AP75", "val_APs", "val_APm", "val_APl", "params_adjuster"} <= set(m1)
    assert m1["params_adjuster"] == 4 * 64 + 64 * 16 + 16 * 4  # PAPER: "+1344"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("detection").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


def resized_to_squares(root: Path, side: int = 128) -> None:
    """Every image of the prepared fixture resized to side x side (boxes and areas scaled alike), and the last
    val image left out. DETR pads each batch to its largest image and the backbone sees that padding near an
    image's border, so only equal sizes make a batch's numbers independent of how it is split between
    processes; 7 val images make the distributed sampler repeat one, which the evaluation must drop."""
    coco = root / "data" / "processed" / "coco"
    for split in ("train", "val"):
        path = coco / "annotations" / f"instances_{split}2017.json"
        data = json.loads(path.read_text())
        if split == "val":
            dropped = data["images"].pop()["id"]
            (coco / "val2017" / f"{dropped:012d}.jpg").unlink()
            data["annotations"] = [a for a in data["annotations"] if a["image_id"] != dropped]
        scale = {}
        for image in data["images"]:
            file = coco / f"{split}2017" / image["file_name"]
            Image.open(file).resize((side, side)).save(file, quality=95)
            scale[image["id"]] = (side / image["width"], side / image["height"])
            image.update(width=side, height=side)
        for a in data["annotations"]:
            sx, sy = scale[a["image_id"]]
            x, y, w, h = a["bbox"]
            a.update(bbox=[x * sx, y * sy, w * sx, h * sy], area=a["area"] * sx * sy)
        path.write_text(json.dumps(data))
    reprepared(coco)


@pytest.mark.slow
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path, prepared_coco):
    # no dropout (its masks are drawn per rank); one image size throughout (see resized_to_squares)
    overrides = ("task.epochs=2", "model.dropout=0", "task.augment.scales=[128]", "task.augment.crop_size=null",
                 "task.augment.eval_size=128", "trainer.device=cpu")
    results = {}
    for gpus in (1, 2):
        root = with_data(tmp_path / f"{gpus}", prepared_coco)
        resized_to_squares(root)
        done = train(root, EXPERIMENT, *overrides, f"trainer.gpus={gpus}", env=train_env(root, OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert ("launching 2 processes" in done.stdout) == (gpus == 2)
        (record,) = (root / "runs" / "detection").iterdir()  # the variant's own name
        with (record / "history.csv").open() as f:
            history = list(csv.DictReader(f))
        weights = torch.load(checkpoint_path(root, TASK, record.name), weights_only=True)["task"]
        results[gpus] = history, weights["model"], weights["adjuster"]
    (h1, m1, a1), (h2, m2, a2) = results.values()
    for row1, row2 in zip(h1, h2, strict=True):
        for name in set(row1) - {"time_per_image", "time_per_step", "images_per_s"}:
            # "accepted" and "tie" are fractions of the epoch's per-step float comparisons; remainder_ulps counts
            # float32 spacings, which another summation order moves by a step or two. The rest: 1e-3, as the CPU's
            # kernels sum a batch of 2 in another order than one of 4 and Adam moves a weight whose gradient is
            # that noise by up to its lr a step, in the direction the noise's sign picks (an Intel Xeon: 1.2e-4
            # and 1.8e-4 apart after 2 epochs; a DDP error, such as a per-rank box count or gradients summed
            # instead of averaged, moves them by tens of percent)
            tolerance = (dict(abs=0.5 / 4) if name in ("accepted", "tie") else dict(abs=2.0)
                         if name == "remainder_ulps" else dict(rel=1e-3, abs=1e-5))
            assert float(row1[name]) == pytest.approx(float(row2[name]), **tolerance), name
    for k in m1:  # AdamW (lr 1e-4) moves a weight by up to 1e-4 a step, so noise can set two runs 2e-4 a step apart
        assert torch.allclose(m1[k].float(), m2[k].float(), rtol=1e-3, atol=5e-4), k  # measured: 2.1e-4 at most
    assert all(torch.allclose(a1[k], a2[k], rtol=1e-3, atol=5e-4) for k in a1)


@pytest.mark.slow
def test_a_tiny_detr_with_gal_learns_to_detect_its_training_images(tmp_path, prepared_coco):
    # Four images (five objects of three categories, one image empty), trained on as four copies each (an epoch
    # of 4 steps: a checkpoint and an evaluation per 4 steps, not per step) and evaluated on themselves: the
    # run's val_* columns are training-set AP. Random init: the backbone trains at the model's lr (DETR's 1e-5
    # is for ImageNet weights); no crops. At lr 1e-3 the loss stalls near 13.5 for a number of steps that
    # float rounding decides (1 or 2 threads); at 3e-4 it falls steadily. Calibrated with 1 and 2 threads:
    # loss 17.6 and AP50 0 at epoch 1; at epoch 30 loss 6.2-6.5, AP 16-20, AP50 33-42. The bounds: half the
    # AP, and a loss about halfway down.
    root = with_data(tmp_path, prepared_coco)
    coco = root / "data" / "processed" / "coco"
    data = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    data["images"] = data["images"][:4]
    kept = {image["id"] for image in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    (coco / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    images, annotations = [], []
    for k in range(4):  # copy k of each image: its own id, the same file
        for image in data["images"]:
            images.append(dict(image, id=image["id"] * 10 + k))
            annotations += [dict(a, image_id=images[-1]["id"]) for a in data["annotations"]
                            if a["image_id"] == image["id"]]
    data["images"] = images
    data["annotations"] = [dict(a, id=i) for i, a in enumerate(annotations, start=1)]
    (coco / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    shutil.rmtree(coco / "val2017")
    shutil.copytree(coco / "train2017", coco / "val2017")
    reprepared(coco)
    done = train(root, EXPERIMENT, "task.epochs=30", "optim.lr=3e-4", "task.lr_backbone=3e-4", "model.dropout=0",
                 "task.augment.crop_size=null", "task.augment.scales=[128]", env=train_env(root), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 steps per epoch" in done.stdout
    (record,) = (root / "runs" / "detection").iterdir()
    with (record / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    first, last = history[0], history[-1]
    assert float(first["val_AP50"]) < 5 and float(first["train_loss"]) > 15
    assert float(last["val_AP50"]) > 16 and float(last["val_AP"]) > 8 and float(last["train_loss"]) < 9


@pytest.mark.parametrize("overrides, message", [  # refused by the data as the run reads it
    (("task.batch_size=100",), "task.batch_size=100 is larger than the 16 training images"),
])
def test_bad_settings_fail_in_one_line_without_a_record(tmp_path, prepared_coco, overrides, message):
    root = with_data(tmp_path, prepared_coco)
    with pytest.raises(UserError, match=re.escape(message)):
        detection.run(config(root, *overrides))
    assert not (root / "runs").exists()


@pytest.mark.parametrize("overrides, message", [  # refused by the checks, before any data or model
    (("trainer.precision=bf16",), "task=detection trains in fp32"),
    (("task.batch_size=3", "trainer.gpus=2", "trainer.device=cpu"), "must be divisible by the 2 processes"),
    (("method.arch=[0]",), "method: dim and hidden widths must be positive"),
    (("task.augment.max_size=128",), "task.augment.max_size=128 must exceed every shorter-side size (largest: 128)"),
    (("task.augment.crop_size=[96,64]",), "task.augment.crop_size=[96, 64] must be [min, max] with 0 < min <= max"),
])
def test_bad_config_is_refused_by_the_checks_on_the_config_alone(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        runner.check(config(tmp_path, *overrides), detection.Detection)


def test_a_bad_config_from_the_stage_command_is_one_line_exit_code_2_and_writes_nothing(tmp_path):
    done = train(tmp_path, EXPERIMENT, "trainer.precision=bf16", env=train_env(tmp_path))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "train detection: bad config: task=detection trains in fp32 with the default memory layout (as DETR's own "
        "code): use trainer.precision=fp32 trainer.channels_last=false"], done.stderr
    assert not any(tmp_path.iterdir())  # no record, checkpoint or MLflow store


def test_missing_or_corrupt_coco_names_the_stage_to_rerun(tmp_path, prepared_coco):
    with pytest.raises(UserError, match=r"coco.json is missing: run the prepare stage of coco"):
        detection.run(config(tmp_path))
    root = with_data(tmp_path / "corrupt", prepared_coco)
    (root / "data" / "processed" / "coco" / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(UserError, match=r"cannot read the prepared COCO files .*dvc repro prepare_coco"):
        detection.run(config(root))
    assert not (root / "runs").exists()
