"""Personalized evaluation (`fedhpo_core.personalization`), the scaled-groups task, and the
personalized objectives and metrics of studies and comparisons, end to end."""

import math

import numpy as np
import optuna
import pytest
import torch

from cli.main import main
from fedhpo_core.client import ClientData, evaluate, train_sequentially
from fedhpo_core.cohort import train_cohort
from fedhpo_core.federation import FederatedData, partition_of
from fedhpo_core.models import ModelSpec, workspace_model
from fedhpo_core.personalization import Personalized, finetune_rows, personalize
from fedhpo_core.scaled_groups import DIGITS
from fedhpo_core.settings import ClientConfig, TrainSettings
from fedhpo_core.task import ACCURACY, RMSE, load_task_data, prepared
from flows.comparison import method_comparison
from flows.study import hpo_study

SPEC = ModelSpec("mlp", (6,), 2)


def opposed_clients(n: int = 6, samples: int = 80) -> list[ClientData]:
    """Clients whose labels follow one linear rule, flipped for the odd ones: no global model serves
    both halves, a few local steps serve each client."""
    generator = torch.Generator().manual_seed(0)
    rule = torch.randn(6, generator=generator)
    clients = []
    for c in range(n):
        x = torch.randn(samples, 6, generator=generator)
        y = ((x @ rule > 0) ^ bool(c % 2)).long()
        clients.append(ClientData(x, y, torch.arange(60), torch.arange(60, samples)))
    return clients


def test_without_fine_tuning_each_client_scores_the_global_model_on_its_own_split():
    clients, weights = opposed_clients(), SPEC.initial_weights(0)
    configs = dict.fromkeys(range(6), ClientConfig())
    scores = personalize(SPEC, weights, clients, configs, 0, 1, train_cohort).scores
    model = workspace_model(SPEC, weights)
    assert scores == {c: evaluate(model, d.x_val, d.y_val, SPEC)[1] for c, d in enumerate(clients)}


def test_fine_tuning_serves_clients_no_global_model_can_and_dittos_lambda_holds_it_back():
    clients, weights = opposed_clients(), SPEC.initial_weights(0)

    def mean(**settings) -> float:
        configs = dict.fromkeys(range(6), ClientConfig(lr=0.5, batch_size=20, **settings))
        return personalize(SPEC, weights, clients, configs, 0, 1, train_cohort).mean

    untuned, tuned = mean(), mean(finetune_steps=30)
    assert untuned < 0.7 and tuned > 0.85  # the halves disagree: only local steps serve both
    assert mean(finetune_steps=30, finetune_lr=1e-6) == pytest.approx(untuned, abs=0.02)  # the rate is used
    pulled = mean(finetune_steps=30, ditto_lambda=1.5)  # Ditto's lambda keeps v near the global model
    assert abs(pulled - untuned) < abs(tuned - untuned) / 3


def test_fine_tuning_takes_exactly_k_batches_of_the_clients_own_rows():
    client = opposed_clients()[0]
    rows = finetune_rows(client, 7, 32, torch.Generator().manual_seed(0))
    assert rows.num_train == 7 * 32 and set(rows.train.tolist()) == set(client.train.tolist())
    assert torch.equal(rows.val, client.val)  # scored on its own held-out split, untouched


def test_the_engines_agree_and_a_seed_repeats_the_scores():
    clients, weights = opposed_clients(), SPEC.initial_weights(0)
    configs = {c: ClientConfig(lr=0.3, batch_size=16, finetune_steps=5) for c in range(6)}
    cohort = personalize(SPEC, weights, clients, configs, 3, 2, train_cohort).scores
    assert cohort == personalize(SPEC, weights, clients, configs, 3, 2, train_cohort).scores
    sequential = personalize(SPEC, weights, clients, configs, 3, 2, train_sequentially).scores
    assert sequential == pytest.approx(cohort, abs=1 / 20)  # one validation sample at most


def test_a_client_whose_fine_tuning_diverges_scores_the_worst_and_the_rest_are_kept():
    clients, weights = opposed_clients(), SPEC.initial_weights(0)
    configs = {c: ClientConfig(finetune_steps=20, finetune_lr=1e30 if c == 2 else 0.1) for c in range(6)}
    scores = personalize(SPEC, weights, clients, configs, 0, 1, train_cohort).scores
    assert scores[2] == 0.0 and all(math.isfinite(s) and s > 0 for c, s in scores.items() if c != 2)


def test_the_worst_tenth_is_the_mean_of_the_worst_clients_in_the_metrics_direction():
    scores = dict(enumerate([0.9, 0.2, 0.8, 0.4, 0.7, 0.6, 0.5, 0.95, 0.85, 0.3] * 2))
    personalized = Personalized(scores, ACCURACY)
    assert personalized.mean == pytest.approx(np.mean(list(scores.values())))
    assert personalized.worst == pytest.approx(0.2)  # 20 clients: the two worst, both 0.2
    assert Personalized({0: 1.0, 1: 3.0, 2: 2.0}, RMSE).worst == 3.0  # at least one; the largest error
    assert personalized.metrics() == {"personal_acc": personalized.mean, "personal_acc_worst10": 0.2}


def test_the_scaled_groups_task_scales_the_odd_clients_inputs_tenfold():
    settings = prepared(TrainSettings(task="digits-scaled"))
    assert settings.clients == 20 and settings.partition == "natural"
    dataset = load_task_data(settings.task_ref, settings.data_root)
    base = DIGITS.load(settings.data_root)  # the same again
    plain = load_task_data(prepared(TrainSettings(dataset="digits")).task_ref, settings.data_root)
    odd = dataset.groups % 2 == 1
    assert torch.allclose(dataset.x_train[odd], plain.x_train[odd] * 10)
    assert torch.equal(dataset.x_train[~odd], plain.x_train[~odd]) and torch.equal(base.x_train, dataset.x_train)
    assert torch.equal(dataset.x_test[1::2], plain.x_test[1::2] * 10)
    data = FederatedData.build(dataset, partition_of(settings.data), "mlp", task=settings.task_ref)
    sizes = [c.num_train for c in data.clients]
    assert len(sizes) == 20 and max(sizes) - min(sizes) <= 3  # IID: equal shares


def test_a_study_can_optimize_the_personalized_score_and_logs_it(mlflow_client, tmp_path, prefect_server):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    train = {"task": "digits-scaled", "finetune_steps": 2, "experiment": "personal"}
    summary = hpo_study(
        method="random",
        budget=6,
        n_configs=3,
        final_rounds=2,
        objective="personalized-worst",
        storage=storage,
        train=train,
    )
    study = optuna.load_study(study_name=summary["study_name"], storage=storage)
    runs = {
        r.data.tags["fedhpo.trial"]: r
        for r in mlflow_client.search_runs([summary["experiment_id"]])
        if r.data.tags.get("fedhpo.role") == "trial"
    }
    for trial in study.trials:  # the trial's value is its last round's worst-tenth personalized accuracy
        run = runs[str(trial.number)]
        assert trial.value == run.data.metrics["personal_acc_worst10"]
        assert run.data.metrics["personal_acc"] >= trial.value
    parent = mlflow_client.get_run(summary["run_id"])
    assert parent.data.metrics["final_personal_acc"] == summary["final_personal_acc"]
    assert 0 <= summary["final_personal_acc_worst10"] <= summary["final_personal_acc"] <= 1
    final = mlflow_client.get_run(summary["final_run_id"])
    assert final.data.metrics["personal_acc"] == summary["final_personal_acc"]


def test_a_comparison_tabulates_the_personalized_scores(mlflow_client, prefect_server):
    summary = method_comparison(
        methods=["random", "fedex"],
        seeds=[0],
        budgets=[6],
        n_configs=3,
        final_rounds=2,
        objective="personalized",
        train={"task": "digits-scaled", "experiment": "personal-comparison"},
    )
    assert list(summary["personalized_tables"]) == ["final_personal_acc", "final_personal_acc_worst10"]
    assert "| fedex |" in summary["personalized_tables"]["final_personal_acc"]
    assert all("final_personal_acc" in row for row in summary["results"])
    artifacts = {a.path for a in mlflow_client.list_artifacts(summary["run_id"], "comparison")}
    assert "comparison/personal_acc_table.csv" in artifacts
    description = mlflow_client.get_run(summary["run_id"]).data.tags["mlflow.note.content"]
    assert "Personalized acc on the clients' validation splits (mean over clients)" in description


def test_a_personalized_objective_with_noisy_client_subsets_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["tune", "--objective", "personalized", "--eval-clients", "2"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "eval_clients does not apply" in err and len(err.splitlines()) == 1
