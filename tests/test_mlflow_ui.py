"""What a run shows in the MLflow UI: a real `mlflow server` and a real headless Chromium."""

import os
import re
import time
from pathlib import Path

import browser
import mlflow
import pandas as pd
import pytest
import servers
import torch
from mlflow import MlflowClient

from fedhpo_core.tracking import compare_url, run_url, view_url
from flows.training import federated_training

pytestmark = pytest.mark.usefixtures("prefect_server")

CURVES = {"val_acc", "val_loss", "test_acc", "test_loss", "train_loss", "client_val_acc", "client_val_loss"}
# Many clients, each with a few samples: every round trains 100 of them.
MANY = {"clients": 200, "participation": 0.5, "rounds": 2, "partition": "dirichlet", "alpha": 0.5}


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
    assert keys[0] == keys[1] and len(keys[1]) <= 19  # 10 or 100 clients a round: the same metrics
    assert keys[1] >= CURVES and not [k for k in keys[1] if re.search(r"client_\d|^hp/", k)]
    run = client.get_run(many["run_id"])
    assert run.data.params["clients_per_round"] == "100" and run.data.params["batch_size"] == "32"
    # Nor do Prefect's task runs grow with the clients: per round one for all clients, aggregate, evaluate.
    names = task_run_names(run.data.tags["prefect.flow_run_id"])
    assert len(names) == 2 + 3 * MANY["rounds"] and "round-1-clients" in names, names

    run_page = f"{mlflow_server_url}/#/experiments/{many['experiment_id']}/runs/{many['run_id']}/model-metrics"
    with browser.chromium(tmp_path / "chromium", height=4000) as page:  # charts render once in view: all, here
        page.open(run_page, f"document.querySelectorAll('h4[title]').length >= {len(keys[1])}")
        charts = page.evaluate("[...document.querySelectorAll('h4[title]')].map(e => e.title)")
    assert len(charts) == len(keys[1]) and set(charts) == keys[1]  # a chart per metric, none per client
    assert set(charts[:2]) <= CURVES, charts  # the page opens on learning curves


MODEL = "fedhpo-browse"
ROOT = Path(__file__).resolve().parent.parent
# A folder (relative to the repository): the browsing test saves its pages there (docs/screenshots).
SCREENSHOTS_ENV = "FEDHPO_SCREENSHOTS"
SHOW_DESCRIPTION = "document.querySelector('[data-testid=\"show-comment-toggle\"]').click()"  # its "Show more"


@pytest.fixture(scope="module")
def browsed(tmp_path_factory, prefect_server):
    """A small comparison (digits, random search and successive halving, two seeds) tracked by a real `mlflow server`,
    every study's best model registered; the server's URL and the comparison's summary."""
    from flows.comparison import method_comparison

    folder = tmp_path_factory.mktemp("browse")
    with servers.mlflow_server(folder / "mlflow") as url, pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", url)
        summary = method_comparison(
            methods=["random", "sha"], seeds=[0, 1], budgets=[8], n_configs=4, final_rounds=2,
            storage=f"sqlite:///{folder / 'optuna.db'}", register_model=MODEL,
            train={"clients": 3, "experiment": "browse"},
        )  # fmt: skip
        yield url, summary


def children(client: MlflowClient, experiment_id: str, run_id: str, role: str) -> list:
    return client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`fedhpo.role` = '{role}'"
    )


def test_the_mlflow_ui_shows_what_a_comparison_found(browsed, tmp_path):
    from flows.study import STUDIES_VIEW

    url, summary = browsed
    experiment, client = summary["experiment_id"], MlflowClient(url)
    shots = ROOT / os.environ[SCREENSHOTS_ENV] if SCREENSHOTS_ENV in os.environ else tmp_path / "screenshots"
    study = next(row for row in summary["results"] if (row["method"], row["seed"]) == ("random", 1))  # 4 configurations
    [final] = children(client, experiment, study["run_id"], "final")
    trials = [run.info.run_id for run in children(client, experiment, study["run_id"], "trial")]
    with browser.chromium(tmp_path / "chromium") as page:
        page.set_local_storage(url, browser.MLFLOW_ASSISTANT_CLOSED)

        # The experiment opens on its runs table (the model-training view), not the GenAI overview.
        text = page.open(run_url(url, experiment), "document.body.innerText.includes('comparison-')")
        assert "25 matching runs" in text and "Run Name" in text  # 1 comparison, 4 studies of 4 trials and a final

        # The comparison run's Overview: its description, the comparison table with the winner.
        text = page.open(run_url(url, experiment, summary["run_id"]), "document.body.innerText.includes('Winner')")
        assert "Method comparison" in text and f"Winner: {summary['champion']}" in text
        table = page.evaluate("document.querySelector('.note-editor-preview-content table').innerText")
        assert all(method in table for method in ("random", "sha")) and "budget 8" in table
        page.evaluate(SHOW_DESCRIPTION)
        page.screenshot(shots / "comparison.png")

        # The studies, grouped by method, the most accurate first (a shared view of the runs table).
        text = page.open(view_url(url, experiment, STUDIES_VIEW), "document.body.innerText.includes('Group: sha')")
        assert "Group: random" in text and "Group by: method" in text and "4 matching runs" in text
        assert "final_test_acc" in text and f"{study['final_test_acc']}"[:8] in text
        page.screenshot(shots / "studies.png")

        # A study run's Overview: its best configuration and test accuracy, its metrics what it found.
        text = page.open(run_url(url, experiment, study["run_id"]), "document.body.innerText.includes('Metrics')")
        assert "best configuration" in text and f"{study['final_test_acc']:.4f}" in text
        metrics = text[text.index("Metrics (") :]
        assert metrics.index("best_val_score") < metrics.index("final_test_acc") < metrics.index("rounds_used")
        assert "config/" not in text and "trial_score" not in text
        page.evaluate(SHOW_DESCRIPTION)
        page.screenshot(shots / "study.png")

        # Its final run: what was retrained, how good it is, its registered model.
        text = page.open(run_url(url, experiment, final.info.run_id), "document.body.innerText.includes('Final run')")
        assert "| test accuracy |" not in text and f"{study['final_test_acc']:.4f}" in text
        assert f"models:/{MODEL}/{study['model_version']}" in text

        # Its trials in MLflow's compare view: hyperparameters against score, as parallel coordinates.
        text = page.open(compare_url(url, experiment, trials), "document.querySelector('g.parcoords')")
        assert f"Comparing {len(trials)} Runs" in text and "Model training" in text
        metrics = "[...document.querySelectorAll('.du-bois-light-select-selector')][1]"  # the plot's metric
        page.click(f"{metrics}.querySelector('.du-bois-light-select-selection-item-remove')")
        page.click(metrics)
        page.type("score")
        page.press("Enter", 13)
        page.press("Escape", 27)
        time.sleep(1)  # the plot redraws
        axes = page.evaluate("[...document.querySelectorAll('g.parcoords .axis-title')].map(e => e.textContent)")
        assert axes == ["lr", "weight_decay", "score"], axes  # a trial run's params: its configuration only
        page.screenshot(shots / "trials.png")

        # The registered model: a version per study, the winner's with the alias.
        text = page.open(f"{url}/#/models/{MODEL}", "document.querySelector('[title=\"champion\"]')")
        assert "Version 4" in text


def test_the_comparison_winner_is_registered_and_its_model_reproduces_the_test_accuracy(browsed, monkeypatch):
    from fedhpo_core.data import load_dataset
    from fedhpo_core.federation import FederatedData, partition_of
    from fedhpo_core.settings import TrainSettings

    url, summary = browsed
    client = MlflowClient(url)
    results = pd.DataFrame(summary["results"])
    assert sorted(results.model_version.astype(int)) == [1, 2, 3, 4]  # every study's best model, a version each
    # The winner: the method with the best mean test accuracy; of its studies, the best on validation.
    method = results.groupby("method").final_test_acc.mean().idxmax()
    winner = results.loc[results[results.method == method].final_val_acc.idxmax()]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == winner.model_version
    assert summary["champion"] == f"{method}, budget 8, seed {winner.seed}"
    study = client.get_run(winner.run_id).data.tags["fedhpo.study"]
    assert champion.tags == {
        "method": method,
        "study": study,
        "seed": str(winner.seed),
        "final_test_acc": str(winner.final_test_acc),
        "final_val_acc": str(winner.final_val_acc),
    }
    source = client.get_run(champion.run_id)  # the version comes from the study's final run
    assert source.data.tags["fedhpo.role"] == "final" and source.data.tags["mlflow.parentRunId"] == winner.run_id

    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    model = mlflow.pytorch.load_model(f"models:/{MODEL}@champion")
    settings = TrainSettings(clients=3, seed=int(winner.seed))
    data = FederatedData.build(load_dataset(settings.dataset, settings.data_root), partition_of(settings.data), "mlp")
    features, labels = data.test
    with torch.no_grad():
        correct = (model(features).argmax(dim=1) == labels).sum().item()
    assert correct / len(labels) == pytest.approx(winner.final_test_acc, abs=1e-9)


def test_a_comparison_and_its_studies_show_in_prefect_named_for_their_parameters_with_links(browsed):
    from prefect.client.orchestration import get_client

    url, summary = browsed
    client = MlflowClient(url)
    flow_run_id = client.get_run(summary["run_id"]).data.tags["prefect.flow_run_id"]
    studies = [client.get_run(row["run_id"]).data.tags["prefect.flow_run_id"] for row in summary["results"]]
    with get_client(sync_client=True) as prefect:
        comparison = prefect.read_flow_run(flow_run_id)
        names = [prefect.read_flow_run(study).name for study in studies]
        artifacts = prefect.request(
            "POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 10}
        ).json()
    assert comparison.name.startswith("random-sha-digits-")  # then a random slug: two comparisons never share studies
    assert names == [f"{row['method']}-digits-b8-s{row['seed']}" for row in summary["results"]]
    [artifact] = [a for a in artifacts if a["type"] == "markdown"]
    assert "Method comparison" in artifact["data"] and f"Winner: {summary['champion']}" in artifact["data"]
    for row in summary["results"]:
        assert f"({run_url(url, summary['experiment_id'], row['run_id'])})" in artifact["data"]
