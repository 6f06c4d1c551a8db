"""Fixtures the pipeline tests share: the report tests' site of run records and rendered reports, the smoke
fixtures' prepared data, made once a session by the real prepare stages (copy it into a run's root with
train_helpers.with_data; never write to it), a run root that tracks into its own sqlite store (with a
small Boston table: boston_root), and the end of the session's warm server (started by the first train()).
Plain helpers are in train_helpers.py and prepare_helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipelines import train_helpers
from tests.pipelines.prepare_helpers import prepare_config
from tests.pipelines.train_helpers import write_boston


@pytest.fixture(scope="session", autouse=True)
def stop_warm_server():
    """The session's warm server (train_helpers.warm_server, started by the first train()) ends with it."""
    yield
    train_helpers.stop_warm_server()


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> dict:
    """The report tests' site (report_fixtures.make_site), made once a session; no test changes it."""
    from tests.pipelines.report_fixtures import make_site

    return make_site(tmp_path_factory)


@pytest.fixture(scope="session")
def prepared_cifar10(tmp_path_factory) -> Path:
    """data/processed of the smoke profile's CIFAR-10 (the fixture archive through the real prepare stage)."""
    from pipelines.prepare import cifar

    root = tmp_path_factory.mktemp("prepared_cifar10")
    assert cifar.run(prepare_config(root, "data=cifar10", "profile=smoke")) == 0
    return root / "data" / "processed"


@pytest.fixture(scope="session")
def prepared_coco(tmp_path_factory) -> Path:
    """data/processed of the smoke profile's COCO (16 train and 8 val images, through the real prepare stage)."""
    from pipelines.prepare import coco

    root = tmp_path_factory.mktemp("prepared_coco")
    assert coco.run(prepare_config(root, "data=coco", "profile=smoke")) == 0
    return root / "data" / "processed"


@pytest.fixture
def tracked_root(tmp_path, monkeypatch) -> Path:
    """``tmp_path`` as a run's root: MLflow on an sqlite store there, outside any DVC stage."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_STAGE", raising=False)
    return tmp_path


@pytest.fixture
def boston_root(tracked_root) -> Path:
    """A tracked run root with a small Boston table (80 rows) as its prepared data."""
    write_boston(tracked_root)
    return tracked_root


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One sqlite MLflow store per test module (creating one runs MLflow's migrations: seconds each)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store').as_posix()}/mlflow.db"


@pytest.fixture
def store_env(monkeypatch, tmp_path, sqlite_uri) -> Path:
    """The cwd ``tmp_path``, tracking into the module's store, outside any DVC stage and any proxy (the
    tracking tests of RunTracker itself; use it with autouse=True there)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    for var in ("DVC_ROOT", "DVC_STAGE", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path
