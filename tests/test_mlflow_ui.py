"""What a run shows in the MLflow UI: a real `mlflow server` and a real headless Chromium."""

import re
import shutil
import subprocess

import pytest
import servers
from mlflow import MlflowClient

from fedhpo_core.tracking import run_url
from flows.training import federated_training

pytestmark = pytest.mark.usefixtures("prefect_server")

CURVES = {"val_acc", "val_loss", "test_acc", "test_loss", "train_loss", "client_val_acc", "client_val_loss"}
# Many clients, each with a few samples: every round trains 100 of them.
MANY = {"clients": 200, "participation": 0.5, "rounds": 2, "partition": "dirichlet", "alpha": 0.5}


def rendered_page(url: str, profile) -> str:
    """The page's DOM after Chromium ran its scripts and drew it (charts render once in view: a tall
    window shows them all)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        servers.skip_or_fail("no chromium on PATH")
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    command += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    command += [f"--user-data-dir={profile}", "--window-size=1400,4000", "--run-all-compositor-stages-before-draw"]
    command += ["--virtual-time-budget=30000", "--dump-dom", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout


def task_run_names(flow_run_id: str) -> list[str]:
    """The flow run's task runs, through the REST API (3.8.8's client sends None filters, refused)."""
    from prefect.client.orchestration import get_client

    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200, "offset": 0, "sort": "EXPECTED_START_TIME_ASC"}
    with get_client(sync_client=True) as client:
        return [run["name"] for run in client.request("POST", "/task_runs/filter", json=body).json()]


def test_a_100_client_run_opens_on_its_learning_curves_with_a_bounded_set_of_metrics(
    mlflow_server_url, monkeypatch, tmp_path
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server_url)
    small = federated_training(**MANY | {"clients": 20}, experiment="ui")
    many = federated_training(**MANY, experiment="ui")
    client = MlflowClient(mlflow_server_url)
    keys = [set(client.get_run(s["run_id"]).data.metrics) for s in (small, many)]
    assert keys[0] == keys[1] and len(keys[1]) <= 16  # 10 or 100 clients a round: the same metrics
    assert keys[1] >= CURVES and not [k for k in keys[1] if re.search(r"client_\d|^hp/", k)]
    run = client.get_run(many["run_id"])
    assert run.data.params["clients_per_round"] == "100" and run.data.params["batch_size"] == "32"
    # Nor do Prefect's task runs grow with the clients: per round one for all clients, aggregate, evaluate.
    names = task_run_names(run.data.tags["prefect.flow_run_id"])
    assert len(names) == 2 + 3 * MANY["rounds"] and "round-1-clients" in names, names

    run_page = f"{mlflow_server_url}/#/experiments/{many['experiment_id']}/runs/{many['run_id']}/model-metrics"
    charts = re.findall(r'<h4[^>]*title="([^"]+)"', rendered_page(run_page, tmp_path / "chromium"))
    assert charts, "the run page drew no charts"
    assert len(charts) == len(keys[1]) and set(charts) == keys[1]  # a chart per metric, none per client
    assert set(charts[:2]) <= CURVES, charts  # the page opens on learning curves


@pytest.mark.usefixtures("prefect_server")
def test_a_comparison_opens_in_the_model_training_view_and_says_what_it_found(mlflow_server_url, monkeypatch, tmp_path):
    from flows.comparison import method_comparison

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server_url)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    summary = method_comparison(
        methods=["random", "tpe"], seeds=[0, 1], budgets=[4], n_configs=2, final_rounds=2,
        storage=storage, train={"clients": 3, "experiment": "browse"},
    )  # fmt: skip
    experiment = rendered_page(run_url(mlflow_server_url, summary["experiment_id"]), tmp_path / "experiment")
    assert "comparison-" in experiment  # the runs table, not the GenAI overview
    comparison = rendered_page(
        run_url(mlflow_server_url, summary["experiment_id"], summary["run_id"]), tmp_path / "comparison"
    )
    assert "Method comparison" in comparison and all(m in comparison for m in ("random", "tpe"))
    study = summary["results"][0]
    page = rendered_page(run_url(mlflow_server_url, summary["experiment_id"], study["run_id"]), tmp_path / "study")
    assert "best configuration" in page and f"{study['final_test_acc']:.4f}" in page
