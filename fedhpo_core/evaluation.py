"""Noisy evaluation (Kuo et al., "On Noisy Evaluation in Federated Hyperparameter Tuning", MLSys
2023): the score a search method is told of a trial's round when a federation evaluates on a few
of its clients, privately. Two of the paper's sources of noise, each a setting, each off at 0:

- client subsampling: the round's global model is scored on the local validation data of `clients`
  (k) clients drawn at random for the round, their accuracies weighted by validation size (the
  correct predictions over all their validation rows);
- differential privacy: the Laplace mechanism on the aggregated score, noise Lap(0, b) added to it.

The noise is parametrized by the Laplace scale b (`noise`), not by a privacy budget: a score of
sensitivity Delta released with Lap(0, b) is (Delta / b)-differentially private, Delta = 1/k for a
uniform mean of k accuracies (sample weights make it the largest chosen client's share of the
rows), and over M released scores the budgets add up (basic composition); b is what a search
method faces whatever k and M are, and b = 0 is exactly the noiseless score.

The final retraining and its test accuracy are never noisy: only what the search is told.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedhpo_core import seeding
from fedhpo_core.federation import FederatedData, evaluate_splits
from fedhpo_core.settings import SettingsError


@dataclass(frozen=True)
class NoisyEvaluation:
    """How a trial's rounds are evaluated: on `clients` random clients' validation data instead of
    the objective's split (0: the objective's), plus Laplace noise of scale `noise` (0: none)."""

    clients: int = 0
    noise: float = 0.0

    def __post_init__(self):
        if self.clients < 0:
            raise SettingsError(f"eval_clients must be >= 0, got {self.clients}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise SettingsError(f"eval_noise must be a finite number >= 0, got {self.noise}")

    def check(self, num_clients: int) -> None:
        """k clients can be drawn from a federation of `num_clients`."""
        if self.clients > num_clients:
            raise SettingsError(f"eval_clients ({self.clients}) exceeds the number of clients ({num_clients})")

    def rng(self, seed: int, trial: int, round: int) -> np.random.Generator:
        """The round's draws for a trial. Each trial draws its own, as the paper's evaluations are
        independent: a draw shared by the trials scored at a round would cancel out of every
        comparison between them (random search compares all its trials at the same round)."""
        return seeding.numpy_rng(seed, seeding.EVALUATION, trial, round)

    def chosen(self, num_clients: int, rng: np.random.Generator) -> list[int]:
        """The k distinct clients of a round, drawn uniformly without replacement."""
        return sorted(int(c) for c in rng.choice(num_clients, self.clients, replace=False))

    def score(
        self, data: FederatedData, weights: torch.Tensor, exact: float, seed: int, trial: int, round: int
    ) -> float:
        """The score of `round`'s global `weights`: `exact` (the objective's) or, with k > 0, the
        accuracy on k random clients' validation rows; with b > 0, plus Lap(0, b). Deterministic in
        (seed, trial, round)."""
        rng = self.rng(seed, trial, round)
        score = subsampled_accuracy(data, weights, self.chosen(len(data.clients), rng)) if self.clients else exact
        return score + float(rng.laplace(0.0, self.noise)) if self.noise else score


def subsampled_accuracy(data: FederatedData, weights: torch.Tensor, clients: list[int]) -> float:
    """The global model's accuracy on these clients' local validation rows together: their
    accuracies weighted by validation size (nan if none of them holds validation data)."""
    rows = [data.clients[c] for c in clients]
    split = (torch.cat([c.x_val for c in rows]), torch.cat([c.y_val for c in rows]))
    _, values = evaluate_splits(data.spec, weights, {"clients": split})["clients"]
    return next(iter(values.values()))
