"""pipelines.tracking.resume: the one rule for continuing a checkpoint, shared by the runner and RunTracker."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pipelines.tracking.resume import Resume, config_digest, decide
from pipelines.tracking.run import RunTracker
from pipelines.errors import TrackingError

JOURNAL = Path("history.jsonl")  # a resumable run's journal (relative: each test has its own cwd)
CONFIG = {"experiment": "boston", "seed": 0, "model": {"hidden": [64, 64], "lr": 0.01},
          "task": {"epochs": 3}, "trainer": {"gpus": 1, "resolved_device": "cpu", "world_size": 1}}


def changed(config: dict, key: str, value) -> dict:
    """A copy of ``config`` with the dotted ``key`` set to ``value``."""
    out = copy.deepcopy(config)
    *path, last = key.split(".")
    node = out
    for part in path:
        node = node[part]
    node[last] = value
    return out


def checkpoint(epoch: int, config: dict = CONFIG, keep_config: bool = True) -> dict:
    """What the runner saves after ``epoch`` (torch.load gives back the same plain types)."""
    saved = {"epoch": epoch, "config_sha": config_digest(config), "task": {}, "tracker": {}}
    if keep_config:
        saved["config"] = json.loads(json.dumps(config))
    return saved


# ------------------------------------------------------------------------------------------ the decision
def test_config_digest_covers_the_whole_config_in_any_key_order():
    assert config_digest(CONFIG) == config_digest(dict(reversed(list(CONFIG.items()))))
    assert config_digest(CONFIG) != config_digest(changed(CONFIG, "trainer.world_size", 2))
    assert config_digest(CONFIG) != config_digest(changed(CONFIG, "seed", "0"))  # another type, same text


def test_no_checkpoint_starts_at_epoch_one():
    assert decide(None, CONFIG, 3) == Resume(resume=False, start_epoch=1, reason="no checkpoint")


def test_same_config_unfinished_resumes_after_its_epoch():
    assert decide(checkpoint(2), CONFIG, 3) == Resume(True, 3, "resuming after epoch 2")
    assert decide(checkpoint(1, keep_config=False), CONFIG, 3) == Resume(True, 2, "resuming after epoch 1")


def test_a_finished_checkpoint_starts_over_whatever_its_config():
    assert decide(checkpoint(3), CONFIG, 3) == Resume(False, 1, "holds a finished run")
    assert decide(checkpoint(3), changed(CONFIG, "model.lr", 0.02), 3) == Resume(False, 1, "holds a finished run")


def test_an_unfinished_checkpoint_of_a_trainer_only_difference_is_refused_naming_the_key():
    with pytest.raises(TrackingError, match=r"config differs from the checkpoint's \(trainer.world_size\); .*"
                                            r"delete ckpt/last.pt to start the run over"):
        decide(checkpoint(1), changed(CONFIG, "trainer.world_size", 2), 3, where="ckpt/last.pt")


def test_an_unfinished_checkpoint_of_another_config_is_refused():
    other = changed(changed(CONFIG, "model.lr", 0.02), "trainer.resolved_device", "cuda")
    with pytest.raises(TrackingError, match=r"\(model.lr, trainer.resolved_device\)"):
        decide(checkpoint(1), other, 3)
    with pytest.raises(TrackingError, match="keeps no config to compare"):
        decide(checkpoint(1, keep_config=False), other, 3)
    with pytest.raises(TrackingError, match="in a value's type"):
        decide(checkpoint(1), changed(CONFIG, "seed", "0"), 3)
    with pytest.raises(TrackingError, match=r"\(task.epochs\)"):  # more epochs is another config, not a resume
        decide(checkpoint(3), changed(CONFIG, "task.epochs", 5), 5)


def test_the_decision_is_frozen():
    with pytest.raises(AttributeError):
        decide(None, CONFIG, 3).resume = True


# --------------------------------------------------------------------------- RunTracker applies the same rule
@pytest.fixture(autouse=True)
def env(store_env) -> Path:
    return store_env


def killed_after_one_epoch() -> tuple[RunTracker, dict]:
    """A run that logged epoch 1, checkpointed and failed; its tracker state as a checkpoint holds it."""
    with pytest.raises(RuntimeError):
        with RunTracker("regression", "boston-gal-s0", CONFIG, profile="smoke", journal=JOURNAL) as tracker:
            tracker.log_epoch(1, {"train_loss": 1.0})
            state = json.loads(json.dumps(tracker.state()))
            raise RuntimeError("killed")
    return tracker, state


def test_run_tracker_resumes_a_state_whose_config_digest_matches(env, sqlite_uri):
    from mlflow.tracking import MlflowClient

    first, state = killed_after_one_epoch()
    assert state["config_sha256"] == config_digest(CONFIG) == checkpoint(1)["config_sha"]  # one digest
    with RunTracker("regression", "boston-gal-s0", copy.deepcopy(CONFIG), profile="smoke", journal=JOURNAL, resume=state) as tracker:
        for epoch in (2, 3):
            tracker.log_epoch(epoch, {"train_loss": 1.0 / epoch})
        tracker.log_final({"test_mae": 0.4})
    assert tracker.run_id == first.run_id
    assert MlflowClient(sqlite_uri).get_run(first.run_id).info.status == "FINISHED"
    assert (env / "runs/regression/boston-gal-s0/history.csv").read_text().splitlines()[0] == "epoch,train_loss"


def test_run_tracker_refuses_a_state_that_differs_only_in_trainer(env, sqlite_uri):
    from mlflow.tracking import MlflowClient

    first, state = killed_after_one_epoch()
    delete = "delete the checkpoint to start the run over$"
    for config, what in ((changed(CONFIG, "trainer.world_size", 2), r"\(trainer.world_size\)"),
                         (changed(CONFIG, "seed", "0"), r"\(past the 500 characters MLflow keeps, or in a value's "
                                                        r"type\)")):
        with pytest.raises(TrackingError, match=f"cannot resume run regression/boston-gal-s0: the config differs "
                                                f"from the checkpoint's {what}; .*{delete}"):
            with RunTracker("regression", "boston-gal-s0", config, profile="smoke", journal=JOURNAL, resume=state):
                pytest.fail("the block must not run")
    assert MlflowClient(sqlite_uri).get_run(first.run_id).info.status == "FAILED"  # untouched
