"""Planted problems for the round-level methods: rounds whose outcome is a known function of the
configuration each client drew, plus client-to-client spread and noise, with no training. Each
method must put its distribution on the best configuration within the rounds a paper's budget
allows, and a method whose update has the wrong sign, or does not move, must fail the same check.

The problem: the FedTune paper's 5 learning rates x 4 weight decays; a configuration's quality
q(lr, wd) = 0.4 - 0.2 |log10(lr / 0.05)| - (0.3 if wd >= 0.01 else 0.1 if wd > 0 else 0), best
(0.05, 0). A client's local validation loss falls in a round from `before` (its own level times a
trend that shrinks with the rounds) to before * exp(-q + noise): clients differ far more than
configurations do, and the noise (sd 0.15) is as large as the gap to the second best.
"""

import math

import numpy as np
import pytest
import torch

from fedhpo_core import seeding
from fedhpo_core.client import ClientUpdate
from fedhpo_core.federation import RoundReport
from fedhpo_core.search.space import SearchSpace
from fedhpo_core.settings import ClientConfig
from fedhpo_core.tuners.fedex import FedEx
from fedhpo_core.tuners.fedtune import FedTune
from fedhpo_core.tuners.stepwise import Stepwise

VALUES = [{"lr": lr, "weight_decay": wd} for lr in (0.1, 0.05, 0.01, 0.005, 0.001) for wd in (0.0, 0.1, 0.01, 0.001)]
CONFIGS = [ClientConfig(**v) for v in VALUES]
BEST = VALUES.index({"lr": 0.05, "weight_decay": 0.0})
CLIENTS = 10
NOISE = 0.15


def quality(config: ClientConfig) -> float:
    decay = 0.3 if config.weight_decay >= 0.01 else 0.1 if config.weight_decay > 0 else 0.0
    return 0.4 - 0.2 * abs(math.log10(config.lr / 0.05)) - decay


def planted_round(
    round: int, configs: dict[int, ClientConfig], rng: np.random.Generator, spread: bool = True
) -> RoundReport:
    # how badly the global model fits each client's data
    levels = np.linspace(0.3, 3.0, CLIENTS) if spread else np.ones(CLIENTS)
    trend = 1 / math.sqrt(round)
    updates = []
    for client, config in configs.items():
        before = levels[client] * trend
        after = before * math.exp(-quality(config) + rng.normal(0, NOISE))
        statistics = {"val_loss_before": before, "val_loss_after": after}
        updates.append(
            ClientUpdate(
                client, torch.zeros(1), 100, after, after, 1 - after / 4, 20 + 10 * client, statistics=statistics
            )
        )
    return RoundReport(round, configs, tuple(updates), 0.0, 0.0, torch.zeros(1), torch.zeros(1))


def run(tuner, rounds: int, seed: int = 0, spread: bool = True):
    rng = seeding.numpy_rng(seed, 99)
    for round in range(1, rounds + 1):
        configs = tuner.configure(round, list(range(CLIENTS)))
        tuner.observe(planted_round(round, configs, rng, spread))
    return tuner


class FlippedFedEx(FedEx):
    """A broken FedEx: its signal has the wrong sign (improvements count as losses)."""

    def signal_of(self, update):
        return -super().signal_of(update)


class FlippedFedTune(FedTune):
    """A broken FedTune: its credits have the wrong sign."""

    def credits_of(self, updates, start):
        return {c: -r for c, r in super().credits_of(updates, start).items()}


class PlantedCreditFedTune(FedTune):
    """The paper's FedTune with the server-side credit stubbed: R_i = q(h_i) + noise (the credit's
    scale on MNIST, about 0.1, times a few)."""

    rng = np.random.default_rng(5)

    def credits_of(self, updates, start):
        config = {u.client: self.candidates[self.factors.candidate(self.draws[u.client])] for u in updates}
        return {c: 0.5 * (quality(h) + 0.4 + self.rng.normal(0, NOISE)) for c, h in config.items()}


def fedtune(cls=FedTune, **options) -> FedTune:
    x, y = torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.int64)
    from fedhpo_core.models import ModelSpec

    return cls(
        CONFIGS, VALUES, CLIENTS, ModelSpec("mlp", (1, 4, 4), 3), (x, y), seed=0, **({"credit": "local"} | options)
    )


def clients_on_best(tuner: FedTune) -> int:
    return sum(
        tuner.chosen()[f"lr/client_{c}"] == 0.05 and tuner.chosen()[f"weight_decay/client_{c}"] == 0.0
        for c in range(CLIENTS)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedex_finds_the_planted_best_configuration_within_30_rounds(seed):
    tuner = run(FedEx(CONFIGS, VALUES, seed), 30, seed)
    assert tuner.chosen() == VALUES[BEST]
    assert tuner.theta[BEST] > 0.3 and tuner.theta[BEST] == tuner.theta.max()


def test_fedex_with_a_flipped_sign_or_no_step_fails_the_planted_problem():
    flipped = run(FlippedFedEx(CONFIGS, VALUES, 0), 30)
    assert flipped.chosen() != VALUES[BEST] and flipped.theta[BEST] < 1 / len(VALUES)
    frozen = FedEx(CONFIGS, VALUES, 0)
    frozen.step_size = lambda factor, gradient: 0.0
    assert run(frozen, 30).theta[BEST] == pytest.approx(1 / len(VALUES))


def test_the_papers_fedex_misses_the_planted_best_in_most_seeds():
    """Why the defaults differ from the paper: judged against the previous round's loss, one
    distribution over all 20 candidates, it settles on the best in at most one of four seeds,
    even after 300 rounds (the defaults: every seed within 30, above)."""
    found = [run(FedEx(CONFIGS, VALUES, s, **FedEx.PAPER), 300, s).chosen() == VALUES[BEST] for s in range(4)]
    assert sum(found) <= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedtune_puts_most_clients_on_the_planted_best_within_30_rounds(seed):
    tuner = fedtune()
    tuner.seed = seed
    tuner = run(tuner, 30, seed)
    assert clients_on_best(tuner) >= 8
    assert tuner.pi[:, BEST].mean() > 0.3 and (tuner.pi.argmax(axis=1) == BEST).all()


def test_fedtune_with_a_flipped_sign_or_no_step_fails_the_planted_problem():
    assert clients_on_best(run(fedtune(FlippedFedTune), 30)) == 0
    frozen = run(fedtune(eta=0.0), 30)
    assert frozen.pi == pytest.approx(np.full((CLIENTS, len(VALUES)), 1 / len(VALUES)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_papers_fedtune_update_learns_a_planted_credit_slowly(seed):
    """Eq. 11 moves each client's own pi_i towards the best configuration, but with 20 candidates a
    client draws each about once in 30 rounds: by then pi_i has barely moved; by 300 it has."""
    uniform = 1 / len(VALUES)
    early, late = fedtune(PlantedCreditFedTune, **FedTune.PAPER), fedtune(PlantedCreditFedTune, **FedTune.PAPER)
    early.seed = late.seed = seed
    assert run(early, 30, seed).pi[:, BEST].mean() < 4 * uniform
    assert run(late, 300, seed).pi[:, BEST].mean() > 4 * uniform


def planted_accuracy_rounds(tuner: Stepwise, rounds: int, sign: float = 1.0, seed: int = 0):
    """A federation whose error shrinks each round by exp(-(0.25 + q(h)) / sqrt(t) + noise): the
    gains shrink with the rounds as real ones do."""
    rng = seeding.numpy_rng(seed, 98)
    error = 0.9
    for round in range(1, rounds + 1):
        config = tuner.configure(round, [0])[0]
        rate = (0.25 + sign * quality(config)) / math.sqrt(round) + rng.normal(0, NOISE / 3)
        error *= math.exp(-max(rate, -0.5))
        report = type("Report", (), {"val_score": 1 - error, "client_val_score": 1 - error, "diverged": False})
        tuner.observe(report)
    return tuner


def stepwise(seed: int, **options) -> Stepwise:
    space = SearchSpace.load(None).parameters("global", 1)
    return Stepwise(space, ClientConfig(), [100], 10, seed, **options)


def test_stepwise_settles_on_a_planted_good_configuration_within_30_rounds():
    chosen = [planted_accuracy_rounds(stepwise(seed), 30, seed=seed).chosen() for seed in range(3)]
    assert all(quality(ClientConfig(**c)) >= quality(CONFIGS[BEST]) - 0.11 for c in chosen), chosen
    flipped = [planted_accuracy_rounds(stepwise(seed), 30, sign=-1.0, seed=seed).chosen() for seed in range(3)]
    assert all(quality(ClientConfig(**c)) < 0 for c in flipped), flipped


def test_a_setting_the_rounds_cannot_tell_apart_stays_at_the_studys_fixed_value(monkeypatch):
    """Weight decay planted to do nothing: the learning rate is still found, the weight decay stays
    at the fixed 0.01 (not wherever the noise ends); with the real planted effect it moves to 0."""
    import test_planted

    fixed = {"lr": 0.01, "weight_decay": 0.01}
    found = run(FedEx(CONFIGS, VALUES, 0, fixed=fixed), 30).chosen()
    assert found == VALUES[BEST]
    monkeypatch.setattr(test_planted, "quality", lambda config: 0.4 - 0.2 * abs(math.log10(config.lr / 0.05)))
    for seed in range(3):
        assert run(FedEx(CONFIGS, VALUES, seed, fixed=fixed), 30, seed).chosen() == {"lr": 0.05, "weight_decay": 0.01}
        tuner = fedtune(fixed=fixed)
        tuner.seed = seed
        chosen = run(tuner, 30, seed).chosen()
        assert all(chosen[f"weight_decay/client_{c}"] == 0.01 for c in range(CLIENTS))
