"""Shared fixtures: every test runs in a scratch folder with its own MLflow store and Prefect
result storage, and flows run against a real temporary Prefect server (prefect_test_harness)."""

import os
import tempfile
from pathlib import Path

import pytest

SCRATCH = Path(tempfile.mkdtemp(prefix="fedhpo-tests-"))
# Set before Prefect or MLflow is imported, so neither touches the user's home or the repository.
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(SCRATCH / "prefect-results")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{SCRATCH / 'mlflow.db'}"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def scratch_working_directory():
    """MLflow's artifact folder and anything else relative land in the scratch folder."""
    previous = Path.cwd()
    os.chdir(SCRATCH)
    yield
    os.chdir(previous)


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
