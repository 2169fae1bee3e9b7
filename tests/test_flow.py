"""The federated-training flow end to end: a real temporary Prefect server, a real MLflow store."""

import math

import mlflow
import pandas as pd
import pytest
import torch
from prefect import flow

from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, Federation
from fedhpo_core.partition import partition_dataset
from fedhpo_core.settings import TrainSettings
from fedhpo_core.task import prepared
from fedhpo_core.tuners import FixedConfig
from flows.training import federated_training
from tasks.training import partition_data

pytestmark = pytest.mark.usefixtures("prefect_server")

SMALL = {"clients": 4, "rounds": 3, "participation": 0.5, "partition": "dirichlet", "alpha": 0.3}


def run_of(client, summary):
    return client.get_run(summary["run_id"])


def logged_models(summary):
    return mlflow.search_logged_models(
        experiment_ids=[summary["experiment_id"]],
        filter_string=f"source_run_id = '{summary['run_id']}'",
        output_format="list",
    )


def test_flow_leaves_the_expected_mlflow_run(mlflow_client):
    state = federated_training(**SMALL, experiment="flow-e2e", return_state=True)
    assert state.is_completed()
    summary = state.result()
    run = run_of(mlflow_client, summary)
    assert run.info.status == "FINISHED"
    assert run.data.tags["fedhpo.role"] == "train" and run.data.tags["fedhpo.diverged"] == "false"
    assert run.data.tags["prefect.flow_run_id"]

    settings = prepared(TrainSettings(**SMALL, experiment="flow-e2e"))  # as the flow runs it: partition auto is iid
    shown = {"server_lr": settings.server.lr, "task": "digits"}  # the task's label, for a bundled one its dataset
    for name, value in vars(settings).items():
        assert run.data.params[name] == str(shown.get(name, value)), name
    assert run.data.params["score"] == "acc" and run.data.params["score_direction"] == "maximize"

    for metric in ("val_acc", "val_loss", "test_acc", "test_loss", "train_loss"):
        history = mlflow_client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in history) == [1, 2, 3], metric
    test_acc = {m.step: m.value for m in mlflow_client.get_metric_history(run.info.run_id, "test_acc")}
    assert run.data.metrics["final_test_acc"] == test_acc[3]

    # The clients' configuration never changed: params, not a metric series per client and setting.
    assert not [key for key in run.data.metrics if key.startswith("hp/")]
    assert "trajectory/client_hyperparameters.csv" not in {
        a.path for a in mlflow_client.list_artifacts(run.info.run_id)
    }
    assert run.data.params["batch_size"] == "32" and "lr_hypergradient" not in run.data.params

    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "partition")}
    assert artifacts == {"partition/partition.csv", "partition/partition.png"}
    table = pd.read_csv(mlflow_client.download_artifacts(run.info.run_id, "partition/partition.csv"))
    assert len(table) == 4
    class_columns = [c for c in table.columns if c.startswith("class_")]
    assert (table[class_columns].sum(axis=1) == table.train_samples + table.val_samples).all()

    (model,) = logged_models(summary)
    assert model.status.name == "READY"
    loaded = mlflow.pytorch.load_model(f"models:/{model.model_id}")
    assert loaded(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


def test_flow_is_deterministic_and_matches_the_plain_round_loop(mlflow_client):
    # On the CPU, as the in-process run below, also where a GPU would be the default.
    first = federated_training(**SMALL, seed=5, experiment="flow-determinism", device="cpu")
    second = federated_training(**SMALL, seed=5, experiment="flow-determinism", device="cpu")
    for metric in ("test_acc", "val_loss", "train_loss"):
        a = [(m.step, m.value) for m in mlflow_client.get_metric_history(first["run_id"], metric)]
        b = [(m.step, m.value) for m in mlflow_client.get_metric_history(second["run_id"], metric)]
        assert sorted(a) == sorted(b), metric

    # Same weights as the round loop run in-process: Prefect's concurrent task runs change nothing.
    settings = TrainSettings(**SMALL, seed=5)
    dataset = load_dataset("digits", settings.data_root)
    d = settings.data
    partition = partition_dataset(
        dataset.y_train.numpy(), d.clients, d.partition, d.seed, d.val_fraction, d.client_val_fraction, d.alpha
    )
    federation = Federation(FederatedData.build(dataset, partition, "mlp"), settings.server, 0.5, 5)
    expected = federation.run(FixedConfig(settings.client_config), settings.rounds).state.weights
    for summary in (first, second):
        (model,) = logged_models(summary)
        loaded = mlflow.pytorch.load_model(f"models:/{model.model_id}")
        weights = torch.cat([t.reshape(-1) for t in loaded.state_dict().values()])
        assert torch.equal(weights, expected)


def test_partition_task_is_cached_on_its_settings():
    settings = TrainSettings(clients=3, seed=11)

    @flow
    def partition_twice(data):
        return partition_data(data, return_state=True), partition_data(data, return_state=True)

    first, again = partition_twice(settings.data)
    assert again.is_completed() and again.name == "Cached"
    assert all((a == b).all() for a, b in zip(first.result().client_train, again.result().client_train, strict=True))
    (other,) = partition_twice(TrainSettings(clients=3, seed=12).data)[:1]
    assert other.name != "Cached"


def test_a_diverging_run_completes_and_records_the_divergence(mlflow_client):
    state = federated_training(clients=3, rounds=5, lr=1e12, experiment="flow-divergence", return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["diverged_round"] == 1 and summary["rounds_completed"] == 1
    run = run_of(mlflow_client, summary)
    assert run.data.tags["fedhpo.diverged"] == "true" and run.data.tags["fedhpo.diverged_round"] == "1"
    assert run.data.metrics["diverged"] == 1.0
    assert math.isnan(run.data.metrics["train_loss"])
    assert logged_models(summary) == []


def test_a_private_run_on_simulated_phones_logs_epsilon_time_and_who_was_left_out(mlflow_client):
    private = {"dp_clip": 1.0, "dp_noise": 0.8, "devices": "cross-device", "dropout": 0.3, "deadline_s": 1.0}
    settings = {**SMALL, "clients": 6, "rounds": 4, "participation": 0.8, "target_acc": 0.05, **private}
    summary = federated_training(**settings, experiment="flow-private")
    run = run_of(mlflow_client, summary)
    assert {k: run.data.params[k] for k in private} == {k: str(v) for k, v in private.items()}
    history = {
        key: {m.step: m.value for m in mlflow_client.get_metric_history(run.info.run_id, key)}
        for key in ("epsilon", "sim_time_s", "clients_dropped", "clients_late", "val_acc")
    }
    assert list(history["epsilon"]) == [1, 2, 3, 4] and history["epsilon"] == dict(sorted(history["epsilon"].items()))
    assert sorted(history["epsilon"].values()) == list(history["epsilon"].values())  # grows with rounds
    elapsed = [history["sim_time_s"][t] for t in range(1, 5)]
    assert all(0 <= b - a <= 1.0 for a, b in zip([0.0, *elapsed], elapsed, strict=False))  # rounds within D
    assert run.data.metrics["total_bytes_sent"] > 0
    assert history["clients_dropped"] or history["clients_late"]  # logged in the rounds that had any
    first = min(step for step, acc in history["val_acc"].items() if acc >= 0.05)
    assert run.data.metrics["time_to_target_s"] == history["sim_time_s"][first]
