"""The trial trainer without Prefect: real digits clients, a real MLflow store, Optuna studies."""

import optuna
import pytest
import torch

from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, RoundSteps, partition_of
from fedhpo_core.registry import method as method_named
from fedhpo_core.search.base import ROUNDS_ATTR, RUN_ATTR, rounds_spent
from fedhpo_core.search.space import Configuration, SearchSpace
from fedhpo_core.search.study import open_study, run_search
from fedhpo_core.settings import TrainSettings
from fedhpo_core.tracking import Tracker
from fedhpo_core.trial import TrialTrainer, system_objectives, train_configuration

FIXED = TrainSettings(dataset="digits", clients=4, participation=0.5, aggregator="fedadam", experiment="trial-tests")
CONFIGURATION = Configuration({"lr": 0.05, "weight_decay": 0.0})


@pytest.fixture(scope="module")
def data():
    return FederatedData.build(load_dataset("digits", FIXED.data_root), partition_of(FIXED.data), FIXED.model)


def trainer_for(data, objective="server", lines=None):
    study_run = Tracker(FIXED.experiment, "study")
    return TrialTrainer(
        data, FIXED, objective, study_run, "t", RoundSteps(), log=None if lines is None else lines.append
    )


def test_a_trial_continued_from_its_checkpoint_ends_where_training_straight_through_does(data, mlflow_client):
    trainer, study = trainer_for(data), optuna.create_study(direction="maximize")
    trial = study.ask()
    first = trainer(trial, CONFIGURATION, 2, None, None, None)
    start = trainer.load(first.checkpoint)  # read back from the run's artifacts, FedAdam's moments too
    state = start.state
    assert state.round == 2 and torch.equal(state.weights, first.state.weights) and start.record is None
    assert state.server_state.keys() == first.state.server_state.keys() and state.server_state
    assert all(torch.equal(state.server_state[k], v) for k, v in first.state.server_state.items())
    continued = trainer(trial, CONFIGURATION, 3, start, None, None)

    straight = trainer(study.ask(), CONFIGURATION, 5, None, None, None)
    assert torch.equal(continued.state.weights, straight.state.weights) and continued.score == straight.score
    # One MLflow run per trial, reopened to continue; the score every round, for pruners and the dashboard.
    (frozen, _) = study.get_trials(deepcopy=False)
    assert sorted(frozen.intermediate_values) == [1, 2, 3, 4, 5]
    assert frozen.intermediate_values[5] == continued.score
    run_id = frozen.user_attrs[RUN_ATTR]
    assert [m.step for m in mlflow_client.get_metric_history(run_id, "val_acc")] == [1, 2, 3, 4, 5]
    assert mlflow_client.get_run(run_id).data.tags["fedhpo.trial"] == "0"


def test_a_trial_reopens_the_run_its_killed_attempt_made_before_naming_it(data, mlflow_client):
    """A kept trial (`keeps_asked_trials`) whose attempt was killed between creating its MLflow run
    and naming it on the trial trains in that run; another study's trial of the same name and number
    (an Optuna store deleted and made again) gets its own."""
    trainer, study = trainer_for(data), optuna.create_study(direction="maximize")
    trial = study.ask()
    attempt = trainer.run_of(trial, CONFIGURATION).run_id
    trial.set_user_attr(RUN_ATTR, None)  # as if killed before the write
    trainer(trial, CONFIGURATION, 1, None, None, None)
    assert study.trials[0].user_attrs[RUN_ATTR] == attempt
    again = optuna.create_study(direction="maximize").ask()
    trainer(again, CONFIGURATION, 1, None, None, None)
    assert again.user_attrs[RUN_ATTR] != attempt
    assert mlflow_client.get_run(attempt).data.metrics["rounds_trained"] == 1


def test_scores_follow_the_objective_and_keep_going_stops_after_a_round(data):
    study = optuna.create_study(direction="maximize")
    lines: list[str] = []
    asked: list[int] = []

    def keep_going(round: int) -> bool:
        asked.append(round)
        return round < 2

    clients = trainer_for(data, "clients", lines)(study.ask(), CONFIGURATION, 5, None, None, keep_going)
    assert clients.rounds == 2 and asked == [1, 2] and clients.state.round == 2
    assert lines == [f"trial 0: 2 rounds -> val score {clients.score:.4f} {CONFIGURATION.values}"]
    with Tracker(FIXED.experiment, "by hand") as tracker:
        _, reports, _ = train_configuration(data, FIXED, CONFIGURATION, 2, tracker, RoundSteps())
    assert clients.score == reports[-1].client_val_score != reports[-1].val_score
    # Two clients a round (participation 0.5), the model down and up, 4 bytes a weight.
    assert clients.objectives["bytes_sent"] == 2 * 2 * 2 * data.spec.size * 4
    assert system_objectives(reports) == clients.objectives


@pytest.mark.parametrize("method", ["sha", "pbt"])
def test_studies_train_through_the_real_trainer_within_budget(data, method):
    study = open_study(method_named(method).build(), optuna.storages.InMemoryStorage(), method, resume=False)
    space = SearchSpace.from_dict({"lr": {"type": "categorical", "choices": [0.01, 0.05, 0.1]}})
    spent = run_search(method_named(method).build(), study, space, "global", 4, trainer_for(data), 12, 3, seed=0)
    assert spent.spent == rounds_spent(study) <= 12
    finished = [t for t in study.trials if t.state.is_finished()]
    assert finished and all(t.user_attrs[ROUNDS_ATTR] >= 1 and t.user_attrs[RUN_ATTR] for t in finished)
    assert all(max(t.intermediate_values) >= t.user_attrs[ROUNDS_ATTR] for t in finished)
