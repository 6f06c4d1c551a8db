"""The classification trainer on the CIFAR-10 smoke fixture: kill-and-resume ends bitwise equal to an
uninterrupted run (same MLflow run), 2 DDP processes (gloo; on one node or two) match 1 process on the same
global batch, checkpoints load with weights_only=True, and bad inputs fail in one line without a run record."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.errors import ConfigError, RunError, TrackingError, UserError
from pipelines.tasks.classification import task as classification
from pipelines.training import launch, runner
from tests.network import free_port
from tests.pipelines.train_helpers import (checkpoint_path, kill_at_first_checkpoint, outcome, run_name, start,
                                           train, train_config, train_env, wait_for, with_data)

EXPERIMENT = "experiment=cifar10_sgd_gal"
RUN = "cifar10_sgd-gal-s0"  # the smoke preset's own run (its data profile has 3 epochs)
TASK = "classification"


@pytest.fixture
def root(tracked_root, prepared_cifar10) -> Path:
    return with_data(tracked_root, prepared_cifar10)


def config(root: Path, *overrides: str):
    """The smoke preset for one epoch under ``root``, with ``overrides``."""
    return train_config(EXPERIMENT, f"root={root}", "task.epochs=1", *overrides)


@pytest.mark.slow
def test_kill_and_resume_ends_bitwise_equal_in_the_same_mlflow_run(tmp_path, prepared_cifar10):
    straight, killed = (with_data(tmp_path / name, prepared_cifar10) for name in ("straight", "killed"))
    env = train_env(tmp_path)
    epochs = "task.epochs=3"
    done = train(straight, EXPERIMENT, epochs, env=env)
    assert done.returncode == 0, done.stderr

    # SIGKILL right after the first checkpoint: epochs 2-3 left
    kill_at_first_checkpoint(killed, EXPERIMENT, epochs, env=env, checkpoint=checkpoint_path(killed, TASK, RUN))
    killed_at = torch.load(checkpoint_path(killed, TASK, RUN), map_location="cpu", weights_only=True)["epoch"]
    assert killed_at < 3 and not (killed / "runs" / "classification" / RUN).exists()

    resumed = train(killed, EXPERIMENT, epochs, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {RUN} after epoch {killed_at}" in resumed.stdout

    (h1, m1, w1), (h2, m2, w2) = outcome(straight, TASK, RUN), outcome(killed, TASK, RUN)
    assert [row["epoch"] for row in h2] == ["1", "2", "3"]
    assert h1 == h2 and m1 == m2
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    run_id = json.loads((killed / "runs" / "classification" / RUN / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("classification").experiment_id])
    assert len(runs) == 2 and client.get_run(run_id).info.status == "FINISHED"  # one per root: no third run


@pytest.mark.slow
def test_ddp_on_one_or_two_nodes_matches_one_process_on_the_same_global_batch(tmp_path, prepared_cifar10):
    # GroupNorm model, no dropout: nothing depends on how the global batch is split between processes. eps 0.1:
    # at the preset's 0.001 the per-sample "adjusted better" comparisons are float-rounding ties.
    overrides = ("model.name=test_efficientnet_gn", "model.bn_momentum=null", "model.drop_rate=0", "task.epochs=2", "trainer.device=cpu",
                 "method.ratio=0.1")
    nodes = ("trainer.nodes=2", "trainer.gpus=1", f"trainer.rdzv_endpoint=127.0.0.1:{free_port()}")
    layouts = {"1 process": [("trainer.gpus=1",)], "2 processes": [("trainer.gpus=2",)],
               "2 nodes": [(*nodes, "trainer.node_rank=0"), (*nodes, "trainer.node_rank=1")]}
    results, run = {}, run_name(config(tmp_path, *overrides))
    for layout, commands in layouts.items():
        roots = [with_data(tmp_path / layout / f"node{i}", prepared_cifar10)  # one disk per node
                 for i in range(len(commands))]
        env = train_env(roots[0], OMP_NUM_THREADS="1")
        start_all = lambda: [start(root, EXPERIMENT, *overrides, *command, env=env)  # noqa: E731
                             for root, command in zip(roots, commands)]
        if layout == "2 nodes":  # kill both nodes after the first checkpoint, which only node 0 has: resume
            procs = start_all()
            wait_for(checkpoint_path(roots[0], TASK, run), procs)
            for proc in procs:  # the stage processes only: their torchrun agents and workers must follow
                proc.kill()
                proc.communicate()
            assert torch.load(checkpoint_path(roots[0], TASK, run), weights_only=True)["epoch"] == 1
        procs = start_all()
        outs = [proc.communicate(timeout=600)[0] for proc in procs]
        for proc, out in zip(procs, outs):
            assert proc.returncode == 0, out[-4000:]
        assert ("launching 2 processes" in outs[-1]) == (layout != "1 process")
        if layout == "2 nodes":
            assert f"resuming {run} after epoch 1" in outs[0]
        results[layout] = outcome(roots[0], TASK, run)
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        assert len(client.search_runs([client.get_experiment_by_name("classification").experiment_id])) == 1
        for other in roots[1:]:  # global rank 0 is on node 0: node 1 writes no record and no checkpoint
            assert not (other / "runs").exists() and not (other / "checkpoints").exists()

    (h1, m1, w1), (h2, m2, w2), (hn, mn, wn) = results.values()
    for k in w1:
        assert torch.allclose(w1[k].float(), w2[k].float(), rtol=1e-4, atol=1e-5), k
    for row1, row2 in zip(h1, h2):
        for name in row1:
            # adjusted_better compares per-sample trial losses that are near float ties: another summation order
            # of the gradients flips a few of the epoch's 200 comparisons (1-2 here, depending on the CPU);
            # remainder_ulps counts float32 spacings of L, which that order moves by a step or two
            tolerance = (dict(abs=5 / 200) if name == "adjusted_better" else dict(abs=2.0)
                         if name == "remainder_ulps" else dict(rel=1e-4, abs=1e-5))
            assert float(row1[name]) == pytest.approx(float(row2[name]), **tolerance), name
    assert m1["params_model"] == m2["params_model"] and m1["val_top1_err"] == pytest.approx(m2["val_top1_err"])
    # two nodes of one process each are the same 2-rank job as one node of two: the same numbers exactly
    assert hn == h2 and mn == m2 and all(torch.equal(wn[k], w2[k]) for k in w2)


def test_bf16_fp16_and_channels_last_also_run_on_cpu(tmp_path, prepared_cifar10):
    # the GPU recipe's precision and layout (what "auto" picks on CUDA), and the authors' ImageNet fp16 with loss
    # scaling, forced on CPU: GAL steps with bf16 / fp16 logits, close to fp32 but not equal to it
    with_data(tmp_path, prepared_cifar10)
    rows = {}
    for precision, layout in (("fp32", False), ("bf16", True), ("fp16", False)):
        cfg = config(tmp_path, f"trainer.precision={precision}", f"trainer.channels_last={layout}",
                     "task.max_steps=3")
        trainer = classification.Classification(cfg, launch.setup(cfg.trainer))
        stem = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))  # 3x3: layouts differ
        assert stem.weight.is_contiguous(memory_format=torch.channels_last) == layout
        x = trainer.preprocess(next(iter(trainer.val_loader))[0], train=False)
        assert x.is_contiguous(memory_format=torch.channels_last) == layout
        with torch.no_grad(), torch.autocast(**trainer.autocast):
            assert trainer.model(x).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16,
                                              "fp16": torch.float16}[precision]
        rows[precision] = trainer.train_epoch(1)
        scaler = trainer.state_dict()["scaler"]  # in the checkpoint: a resume continues with the same scale
        if precision == "fp16":  # starts at 2**16, halved on each step whose gradients overflow (that step skipped)
            assert 1 < scaler["scale"] <= 2.0 ** 16 and math.isfinite(rows["fp16"]["train_loss"])
        else:
            assert scaler == {}
    fp32, bf16 = rows["fp32"], rows["bf16"]
    assert bf16["train_loss"] != fp32["train_loss"]
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.05)
    assert bf16["remainder"] == pytest.approx(fp32["remainder"], rel=0.1) and bf16["accepted"] == fp32["accepted"]
    # fp16's first steps are skipped while the scale overflows, so its loss moves less than fp32's
    assert rows["fp16"]["train_loss"] != fp32["train_loss"] and 0 <= rows["fp16"]["accepted"] <= 1


# ------------------------------------------------------------------------------------------- failures
def test_gal_and_baseline_record_their_metrics(root, capsys):
    for method in ("gal", "baseline"):
        classification.run(config(root, f"experiment=cifar10_sgd_{method}", "task.max_steps=2"))
    classification.run(config(root, "task.max_steps=2"))
    run = "cifar10_sgd-gal-epochs1-max_steps2-s0"
    assert run_name(config(root, "task.max_steps=2")) == run
    assert f"starting {run} over: {checkpoint_path(root, TASK, run)} holds a finished run" in capsys.readouterr().out
    gal = root / "runs" / "classification" / run
    base = root / "runs" / "classification" / "cifar10_sgd-baseline-epochs1-max_steps2-s0"
    header = (gal / "history.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "val_loss", "val_top1_err", "val_top5_err", "lr", "time_per_image", "remainder", "cosine",
            "accepted", "adjusted_better", "tie", "remainder_ulps", "adjuster_grad_norm", "adjuster_move",
            "adjuster_move_rel"} <= set(header)
    assert "remainder" not in (base / "history.csv").read_text().splitlines()[0]
    gal_metrics, base_metrics = (json.loads((p / "metrics.json").read_text()) for p in (gal, base))
    assert base_metrics["params_adjuster"] == 0
    assert gal_metrics["params_adjuster"] == 10 * 100 + 100 * 32 + 32 * 16 + 16 * 10  # 10 -> 100-32-16 -> 10
    assert gal_metrics["val_top1_acc"] == pytest.approx(100 - gal_metrics["val_top1_err"])


@pytest.mark.parametrize("overrides, message", [  # refused by the data or the model as the run builds them
    (("task.batch_size=1000",), "task.batch_size=1000 is larger than the 200 training images"),
    (("model.name=no_such_net",), "model.name='no_such_net' is not a timm model"),
    (("model.name=test_efficientnet_gn",), "model.name='test_efficientnet_gn' takes no bn_momentum"),
    (("data=cifar100",), "cifar100.json is missing: run the prepare stage of cifar100 first"),
])
def test_bad_settings_fail_in_one_line_without_a_record(root, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        classification.run(config(root, *overrides))
    assert not (root / "runs").exists()


@pytest.mark.parametrize("overrides, message", [  # refused by the checks, before any data or model
    (("trainer.precision=fp8",), "trainer.precision='fp8': use auto, fp32, bf16, fp16"),
    (("task.epochs=0",), "task.epochs=0: use an integer of at least 1"),
    (("task.batch_size=30", "trainer.gpus=4", "trainer.device=cpu"),
     "task.batch_size=30 (global) must be divisible by the 4 processes"),
    (("trainer.gpus=2", "trainer.device=auto"), "trainer.gpus=2 but torch sees no CUDA device; set trainer.device=cpu"),
    (("method.arch=null",), "method.arch (the adjuster's hidden widths) is not set"),
    (("+optim.betas=[0.9,0.99]",), "unexpected keyword argument 'betas'"),
    (("trainer.nodes=2",), "trainer.nodes=2 needs trainer.rdzv_endpoint=<host:port of node 0>"),
    (("trainer.nodes=2", "trainer.rdzv_endpoint=node0:29500", "trainer.node_rank=2"),
     "trainer.node_rank=2: use 0 to 1"),
    # degenerate values, each refused only mid-run or never before
    (("task.label_smoothing=1.5",), "task.label_smoothing=1.5: use a number in [0, 1)"),
    (("task.augment.hflip=-0.5",), "task.augment.hflip=-0.5: use a number in [0, 1]"),
    (("task.ema_decay=1.5",), "task.ema_decay=1.5: use a number in [0, 1) or null"),
    (("task.eval_crop_pct=0",), "task.eval_crop_pct=0: use a number in (0, 1] or null"),
    (("task.schedule.decay_rate=0",), "task.schedule.decay_rate=0: use a number in (0, inf)"),
    (("task.schedule.decay_rate=inf",), "task.schedule.decay_rate=inf: use a finite number"),
    (("task.schedule.decay_milestones=[100,-1]",), "task.schedule.decay_milestones.1=-1: use an integer of at least 1"),
    (("task.schedule.warmup_epochs=-1",), "task.schedule.warmup_epochs=-1: use an integer of at least 0"),
    (("task.log_every=-5",), "task.log_every=-5: use an integer of at least 0"),
    (("task.image_size=-32",), "task.image_size=-32: use an integer of at least 1"),
    (("model.drop_rate=1.5",), "model.drop_rate=1.5: use a number in [0, 1)"),
    (("model.bn_momentum=-0.1",), "model.bn_momentum=-0.1: use a number in [0, 1] or null"),
    (("optim.momentum=inf",), "optim.momentum=inf: use a finite number"),
    (("optim.weight_decay=nan",), "optim.weight_decay=nan: use a finite number"),
    (("method.scale=inf",), "method.scale=inf: use a finite number"),
    (("method.arch=[100,0]",), "method: dim and hidden widths must be positive integers"),
    (("seed=4294967296",), "seed=4294967296: use an integer from 0 to 4294967295"),
])
def test_bad_config_is_refused_by_the_checks_on_the_config_alone(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        runner.check(config(tmp_path, *overrides), classification.Classification)


def test_a_bad_config_from_the_stage_command_is_one_line_exit_code_2_and_writes_nothing(tmp_path):
    done = train(tmp_path, EXPERIMENT, "trainer.precision=fp8", env=train_env(tmp_path))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "train classification: bad config: trainer.precision='fp8': use auto, fp32, bf16, fp16"], done.stderr
    assert not any(tmp_path.iterdir())  # no record, checkpoint or MLflow store


def test_pretrained_weights_without_hub_access_say_what_to_do(root, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it directly
    with pytest.raises(UserError, match="set model.pretrained=false"):
        classification.run(config(root, "model.pretrained=true"))


def test_corrupt_inputs_fail_clearly(root):
    path = checkpoint_path(root, TASK, run_name(config(root)))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is unreadable .*; delete it to start the run over"):
        classification.run(config(root))
    path.unlink()
    images = root / "data" / "processed" / "cifar10" / "train_images.npy"
    images.write_bytes(images.read_bytes()[:1000])  # truncated
    with pytest.raises(UserError, match="cannot read the prepared CIFAR files"):
        classification.run(config(root))
    assert not (root / "runs").exists()


def set_label(index: int, value: int):
    return lambda labels: np.where(np.arange(len(labels)) == index, value, labels)


@pytest.mark.parametrize("split, change, message", [
    ("train", set_label(7, 10), "train_labels.npy holds label 10, outside 0..9 (10 classes in cifar10.json); rerun "
                                "its prepare stage"),
    ("test", set_label(0, -1), "test_labels.npy holds label -1, outside 0..9"),
    ("train", lambda labels: labels.astype(np.float64), "train_labels.npy holds float64 labels, not class indices"),
])
def test_labels_outside_the_classes_fail_in_one_line_before_training(root, split, change, message):
    path = root / "data" / "processed" / "cifar10" / f"{split}_labels.npy"
    np.save(path, change(np.load(path)))
    with pytest.raises(RunError, match=re.escape(message)):
        classification.run(config(root))
    assert not list(root.glob("runs/**/metrics.json")) and not list(root.glob("checkpoints/**/*.pt"))
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(TASK)
    assert experiment is None or not client.search_runs([experiment.experiment_id])  # no MLflow run


def test_diverging_run_fails_and_keeps_no_record(root):
    with pytest.raises(TrackingError, match="the run diverged"):
        classification.run(config(root, "optim.lr=1e12", "method.ratio=0", "task.max_steps=3"))
    assert not (root / "runs").exists()


def test_resume_on_other_trainer_settings_is_refused_in_one_line(root):
    classification.run(config(root, "task.epochs=2", "task.max_steps=2"))
    path = checkpoint_path(root, TASK, run_name(config(root, "task.epochs=2", "task.max_steps=2")))
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "epoch": 1}, path)  # as if killed after epoch 1
    # same model state in another memory layout: resumable weights, but the MLflow params would misstate the run
    # (another precision is another run: its own name, trainer.precision being part of run identity)
    with pytest.raises(TrackingError, match=r"config differs from the checkpoint's \(trainer.channels_last\)"):
        classification.run(config(root, "task.epochs=2", "task.max_steps=2", "trainer.channels_last=true"))
