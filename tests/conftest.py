"""Shared fixtures: every test runs in a scratch folder with its own MLflow store and Prefect
result storage, and flows run against a real temporary Prefect server (prefect_test_harness)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import servers

SCRATCH = Path(tempfile.mkdtemp(prefix="fedhpo-tests-"))
# Set before Prefect or MLflow is imported, so neither touches the user's home or the repository.
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(SCRATCH / "prefect-results")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{SCRATCH / 'mlflow.db'}"
# `fedhpo` commands the tests start share a local Prefect server and a warm runner of this home,
# stopped when the session ends.
os.environ["PREFECT_HOME"] = str(SCRATCH / "prefect-home")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def scratch_working_directory():
    """MLflow's artifact folder and anything else relative land in the scratch folder, removed after."""
    from cli import local_server, warm

    previous = Path.cwd()
    os.chdir(SCRATCH)
    yield
    os.chdir(previous)
    warm.stop()
    local_server.stop()
    shutil.rmtree(SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_client():
    from mlflow import MlflowClient

    return MlflowClient()


@pytest.fixture
def shared_data() -> str:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST under {SHARED_DATA}")
    return str(SHARED_DATA)


@pytest.fixture
def postgres_url(tmp_path_factory):
    """A fresh PostgreSQL database on 127.0.0.1 (skipped without PostgreSQL); its SQLAlchemy URL."""
    with servers.postgres(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture
def mlflow_server_url(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 with a fresh SQLite store; its tracking URL."""
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture
def prefect_api_url(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 with a fresh SQLite database; its API URL (ends in /api)."""
    with servers.prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        yield url
