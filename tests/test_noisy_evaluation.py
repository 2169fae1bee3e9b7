"""Noisy evaluation (Kuo et al. 2023): k random clients' validation data and Laplace noise as what a
study is told of each round, on real digits clients; the CLI refusing bad values; a real `fedhpo tune`."""

import math
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import servers
import torch

import flows.comparison  # noqa: F401 - Prefect, imported before capsys, binds its logging to the real stderr
from cli.main import main
from fedhpo_core.client import ClientData
from fedhpo_core.data import load_dataset
from fedhpo_core.evaluation import NoisyEvaluation
from fedhpo_core.federation import FederatedData, Federation, RoundSteps, partition_of
from fedhpo_core.models import load_flat_weights
from fedhpo_core.registry import method as method_named
from fedhpo_core.search.space import Configuration
from fedhpo_core.search.study import TuneSettings, check_study, open_study, study_definition
from fedhpo_core.settings import SettingsError, TrainSettings
from fedhpo_core.tracking import Tracker
from fedhpo_core.trial import TrialTrainer
from fedhpo_core.tuners import PerClientConfig

# Dirichlet shares: clients of unequal validation sizes, so sample weighting matters.
FIXED = TrainSettings(dataset="digits", clients=6, partition="dirichlet", alpha=0.5, experiment="noisy-eval-tests")
CONFIGURATION = Configuration({"lr": 0.05, "weight_decay": 0.0})
REPOSITORY = Path(__file__).resolve().parents[1]


class CountingClient(ClientData):
    """A client that records every read of its validation rows."""

    reads: list["CountingClient"] = []

    @property
    def x_val(self) -> torch.Tensor:
        CountingClient.reads.append(self)
        return super().x_val


@pytest.fixture(scope="module")
def data() -> FederatedData:
    built = FederatedData.build(load_dataset("digits", FIXED.data_root), partition_of(FIXED.data), FIXED.model)
    clients = tuple(CountingClient(c.x, c.y, c.train, c.val) for c in built.clients)
    return replace(built, clients=clients)


@pytest.fixture(scope="module")
def weights(data) -> torch.Tensor:
    """A global model three rounds in: accuracies well above chance and different per client."""
    federation = Federation(data, FIXED.server, FIXED.participation, FIXED.seed, FIXED.privacy)
    tuner = PerClientConfig([FIXED.client_config] * FIXED.clients)
    return federation.run(tuner, 3).state.weights


def by_hand(data: FederatedData, weights: torch.Tensor, clients) -> float:
    """Each client's accuracy on its own validation rows, averaged with weights n_i / sum n."""
    model = load_flat_weights(data.spec.build(), weights).eval()
    accuracies, sizes = [], []
    with torch.no_grad():
        for c in clients:
            x, y = data.clients[c].x[data.clients[c].val], data.clients[c].y[data.clients[c].val]
            accuracies.append(int((model(x).argmax(1) == y).sum()) / len(y))
            sizes.append(len(y))
    return float(np.average(accuracies, weights=sizes))


def test_the_partition_gives_clients_of_unequal_validation_sizes(data):
    sizes = [c.num_val for c in data.clients]
    assert min(sizes) > 0 and len(set(sizes)) > 1, sizes


@pytest.mark.parametrize("k", [1, 2, 4])
def test_exactly_k_clients_are_read_and_the_score_is_theirs(data, weights, k):
    evaluation = NoisyEvaluation(clients=k)
    for round in range(1, 6):
        CountingClient.reads.clear()
        score = evaluation.score(data, weights, math.nan, FIXED.seed, 0, round)
        read = sorted({data.clients.index(c) for c in CountingClient.reads})
        assert len(read) == k
        assert read == evaluation.chosen(len(data.clients), evaluation.rng(FIXED.seed, 0, round))
        assert score == pytest.approx(by_hand(data, weights, read), abs=1e-12)


def test_all_clients_without_noise_is_the_sample_weighted_accuracy_over_every_client(data, weights):
    everyone = NoisyEvaluation(clients=len(data.clients))
    score = everyone.score(data, weights, math.nan, FIXED.seed, 0, 1)
    expected = by_hand(data, weights, range(len(data.clients)))
    assert score == pytest.approx(expected, abs=1e-12)
    uniform = np.mean([by_hand(data, weights, [c]) for c in range(len(data.clients))])
    assert abs(expected - uniform) > 1e-6  # the test tells sample weighting from a plain mean


def test_the_same_seed_draws_the_same_clients_and_noise_and_other_rounds_and_trials_draw_anew(data, weights):
    evaluation = NoisyEvaluation(clients=2, noise=0.05)
    num_clients = len(data.clients)

    def draws(seed, trial, round):
        return evaluation.chosen(num_clients, evaluation.rng(seed, trial, round))

    first = [evaluation.score(data, weights, math.nan, 3, 0, r) for r in range(1, 9)]
    again = [evaluation.score(data, weights, math.nan, 3, 0, r) for r in range(1, 9)]
    assert first == again and len(set(first)) == len(first)
    assert [draws(3, 0, r) for r in range(1, 9)] == [draws(3, 0, r) for r in range(1, 9)]
    assert len({tuple(draws(3, 0, r)) for r in range(1, 9)}) > 1  # rounds draw other clients
    assert [draws(3, 1, r) for r in range(1, 9)] != [draws(3, 0, r) for r in range(1, 9)]  # so do trials
    assert [draws(4, 0, r) for r in range(1, 9)] != [draws(3, 0, r) for r in range(1, 9)]  # and seeds


def test_the_noise_is_laplace_of_the_configured_scale(data):
    b, exact = 0.05, 0.5
    evaluation = NoisyEvaluation(noise=b)
    noise = np.array([evaluation.score(data, None, exact, 0, t, r) - exact for t in range(50) for r in range(100)])
    assert abs(noise.mean()) < 0.05 * b
    assert noise.std() == pytest.approx(math.sqrt(2) * b, rel=0.05)  # Lap(0, b) has variance 2 b^2
    assert np.abs(noise).mean() == pytest.approx(b, rel=0.05)  # and E|X| = b (a Gaussian's would be 1.13 b)
    assert NoisyEvaluation().score(data, None, exact, 0, 0, 1) == exact  # off: the exact score


def test_a_trial_is_told_the_noisy_score_every_round_and_as_its_result(data):
    def tune(evaluation):
        trainer = TrialTrainer(
            data, FIXED, "server", Tracker(FIXED.experiment, "study"), "t", RoundSteps(), evaluation=evaluation
        )
        study = optuna.create_study(direction="maximize")
        result = trainer(study.ask(), CONFIGURATION, 3)
        (trial,) = study.get_trials(deepcopy=False)
        return result, trial.intermediate_values

    exact, exact_scores = tune(NoisyEvaluation())
    noisy, noisy_scores = tune(NoisyEvaluation(clients=2, noise=0.05))
    repeated, repeated_scores = tune(NoisyEvaluation(clients=2, noise=0.05))
    assert noisy_scores == repeated_scores and noisy.score == repeated.score == noisy_scores[3]
    assert all(noisy_scores[r] != exact_scores[r] for r in (1, 2, 3)) and exact.score == exact_scores[3]
    # Training is untouched: the same final model, only what the study is told differs.
    assert torch.equal(noisy.state.weights, exact.state.weights)
    evaluation = NoisyEvaluation(clients=2, noise=0.05)
    assert noisy.score == evaluation.score(data, noisy.state.weights, math.nan, FIXED.seed, 0, 3)


BAD_VALUES = {
    "negative k": (["--eval-clients", "-1"], "eval_clients must be >= 0, got -1"),
    "k above the clients": (
        ["--clients", "4", "--eval-clients", "5"],
        "eval_clients (5) exceeds the number of clients (4)",
    ),
    "negative noise": (["--eval-noise", "-0.1"], "eval_noise must be a finite number >= 0, got -0.1"),
    "nan noise": (["--eval-noise", "nan"], "eval_noise must be a finite number >= 0, got nan"),
}


@pytest.mark.parametrize("command", ["tune", "compare"])
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_exit_2_with_one_line(command, case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    flags, message = BAD_VALUES[case]
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--method" if command == "tune" else "--methods", "random", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"fedhpo {command}: error: ") and message in error, error
    assert list(tmp_path.iterdir()) == []  # nothing was started or written


def test_a_study_continues_only_with_the_noisy_evaluation_it_was_created_with(tmp_path):
    storage, fixed = f"sqlite:///{tmp_path / 'optuna.db'}", TrainSettings()
    noisy = TuneSettings(method="random", budget=12, n_configs=4, eval_clients=2, eval_noise=0.01)
    plain = replace(noisy, eval_clients=0, eval_noise=0.0)
    open_study(method_named("random").build(), storage, "noisy", False, definition=study_definition(noisy, fixed))
    check_study(storage, "noisy", method_named("random").build(), study_definition(noisy, fixed), True, False)
    with pytest.raises(SettingsError, match=r"\(--eval-clients 2 --eval-noise 0.01\)"):
        check_study(storage, "noisy", method_named("random").build(), study_definition(plain, fixed), True, False)
    # A study recorded before the settings existed had them off.
    old = {k: v for k, v in study_definition(plain, fixed).items() if k not in ("eval_clients", "eval_noise")}
    open_study(method_named("random").build(), storage, "old", False, definition=old)
    check_study(storage, "old", method_named("random").build(), study_definition(plain, fixed), True, False)
    with pytest.raises(SettingsError, match=r"\(--eval-clients 0 --eval-noise 0.0\)"):
        check_study(storage, "old", method_named("random").build(), study_definition(noisy, fixed), True, False)


def test_a_tune_with_noisy_evaluation_runs_and_logs_its_settings(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(REPOSITORY)}
    command = [servers.venv_bin("fedhpo"), "tune", "--method", "random", "--budget", "6", "--n-configs", "3"]
    command += ["--eval-clients", "2", "--eval-noise", "0.01", "--final-rounds", "1", "--dataset", "digits"]
    command += ["--clients", "4", "--experiment", "noisy"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("noisy").experiment_id
    (study_run,) = client.search_runs([experiment], "tags.`fedhpo.role` = 'study'")
    assert study_run.data.params["eval_clients"] == "2" and study_run.data.params["eval_noise"] == "0.01"
    assert study_run.data.tags["mlflow.runName"].endswith("-clients2-noise0.01")
    (final,) = client.search_runs([experiment], "tags.`fedhpo.role` = 'final'")
    assert 0 <= final.data.metrics["test_acc"] <= 1  # the retrained model's test accuracy, never noised
