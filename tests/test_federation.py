import math

import pytest
import torch

from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, Federation, RoundReport
from fedhpo_core.partition import partition_dataset
from fedhpo_core.settings import ClientConfig, TrainSettings
from fedhpo_core.tuners import FixedConfig, Tuner


def digits_federation(clients=5, participation=1.0, seed=0, aggregator="fedavg"):
    settings = TrainSettings(clients=clients, participation=participation, seed=seed, aggregator=aggregator)
    dataset = load_dataset("digits", "unused")
    partition = partition_dataset(dataset.y_train.numpy(), clients, "iid", seed, 0.1, 0.1)
    return Federation(FederatedData.build(dataset, partition, "mlp"), settings.server, participation, seed)


class PerClientLearningRates(Tuner):
    """Gives client i the learning rate 0.01 * (i + 1) in round t, and records what it saw."""

    def __init__(self):
        self.seen: list[RoundReport] = []

    def configure(self, round, clients):
        return {c: ClientConfig(lr=0.01 * (c + 1) * round) for c in clients}

    def observe(self, report):
        self.seen.append(report)


def test_same_seed_same_weights_bit_for_bit():
    a = digits_federation(seed=3).run(FixedConfig(ClientConfig()), rounds=3)
    b = digits_federation(seed=3).run(FixedConfig(ClientConfig()), rounds=3)
    c = digits_federation(seed=4).run(FixedConfig(ClientConfig()), rounds=3)
    assert torch.equal(a.state.weights, b.state.weights)
    assert a.evaluations == b.evaluations
    assert not torch.equal(a.state.weights, c.state.weights)


def test_the_tuner_configures_every_sampled_client_every_round_and_sees_no_test_metrics():
    tuner = PerClientLearningRates()
    digits_federation(clients=6, participation=0.5).run(tuner, rounds=4)
    assert [r.round for r in tuner.seen] == [1, 2, 3, 4]
    for report in tuner.seen:
        assert len(report.clients) == 3 and report.clients == sorted(report.configs)
        assert all(report.configs[c].lr == pytest.approx(0.01 * (c + 1) * report.round) for c in report.clients)
        assert not any("test" in name for name in vars(report))
    assert len({tuple(r.clients) for r in tuner.seen}) > 1  # participation resamples each round


def test_client_sampling_is_seeded_and_sized():
    federation = digits_federation(clients=10, participation=0.3, seed=1)
    assert federation.sample_clients(5) == digits_federation(clients=10, participation=0.3, seed=1).sample_clients(5)
    assert len(federation.sample_clients(1)) == 3
    assert len(digits_federation(clients=10, participation=0.01).sample_clients(1)) == 1


def test_a_run_continues_from_its_state_exactly():
    federation = digits_federation(aggregator="fedadam")
    whole = federation.run(FixedConfig(ClientConfig()), rounds=4)
    first = federation.run(FixedConfig(ClientConfig()), rounds=2)
    rest = federation.run(FixedConfig(ClientConfig()), rounds=2, start=first.state)
    assert rest.state.round == 4
    assert torch.equal(whole.state.weights, rest.state.weights)


def test_divergence_ends_the_run_and_is_reported():
    reports = []
    result = digits_federation().run(
        FixedConfig(ClientConfig(lr=1e12)), rounds=5, observe=lambda report, _: reports.append(report)
    )
    assert result.diverged and result.diverged_round == 1 and result.state.round == 1
    assert reports[-1].diverged and not math.isfinite(reports[-1].train_loss)


def test_federated_training_learns_digits():
    result = digits_federation().run(FixedConfig(ClientConfig(lr=0.1)), rounds=10)
    assert result.evaluations[-1].test_score > 0.85
    assert result.evaluations[-1].val_loss < result.evaluations[0].val_loss
