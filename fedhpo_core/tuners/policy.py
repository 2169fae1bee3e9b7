"""Categorical distributions over candidate configurations, shared by the round-level tuners.

The H candidates are drawn either as one categorical over all of them (joint), or, when they are
the full grid of some settings' choices, as one independent categorical per setting (factorized):
the FedTune paper's p(Z_i) "can be fully factorized" (section 3.2), and the FedEx reference code
keeps one distribution per grid dimension. A factorized draw learns from every round what each
setting's value is worth, whatever the others were: 5 + 6 probabilities for the paper's
5 x 6 grid instead of 30.
"""

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Factors:
    """How a candidate is drawn: one index per factor, `sizes[f]` choices in factor f."""

    def __init__(self, values: Sequence[Mapping[str, object]], factorized: bool):
        names = list(values[0]) if values else []
        choices = [list(dict.fromkeys(v[name] for v in values)) for name in names]
        grid = {tuple(c.index(v[n]) for n, c in zip(names, choices, strict=True)): k for k, v in enumerate(values)}
        self.factorized = factorized and len(names) > 1 and len(grid) == len(values) == math.prod(map(len, choices))
        self.names, self.choices, self.values = names, choices, list(values)
        if self.factorized:
            self.sizes = [len(c) for c in choices]
            self.candidate_of = grid
        else:  # one factor: the candidate's own index
            self.sizes = [len(values)]
            self.candidate_of = {(k,): k for k in range(len(values))}

    def draw_of_values(self, fixed: Mapping[str, object]) -> list[int | None]:
        """Per factor, the index of these setting values (a study's fixed settings), None where absent."""
        if self.factorized:
            return [
                c.index(fixed[n]) if fixed.get(n) in c else None for n, c in zip(self.names, self.choices, strict=True)
            ]
        matches = [k for k, v in enumerate(self.values) if all(fixed.get(n) == x for n, x in v.items())]
        return [matches[0] if matches else None]

    def candidate(self, draw: Sequence[int]) -> int:
        return self.candidate_of[tuple(draw)]

    def probabilities(self, per_factor: Sequence[np.ndarray]) -> np.ndarray:
        """The probability of every candidate under independent factors."""
        result = np.zeros(len(self.candidate_of))
        for draw in itertools.product(*(range(s) for s in self.sizes)):
            result[self.candidate(draw)] = math.prod(p[i] for p, i in zip(per_factor, draw, strict=True))
        return result


def entropy(p: np.ndarray) -> float:
    return float(-(p * np.log(np.clip(p, 1e-300, None))).sum())


SETTLED = 0.5  # probability of a setting's most likely value from which the distribution decides


class FittedBaseline:
    """Variance reduction for a round's signals s_i (one per client): the baseline of client i's
    step on setting f is the round's mean signal, plus client i's own running effect, plus the
    running effects of the values it drew for the other settings,
        lambda_if = mean_t + c_i + sum_{g != f} e_g[v_ig],
    each effect the running mean of what the others leave unexplained (a two-way model of clients
    and rounds, with additive settings). The round's mean takes out what changes for everyone as
    training goes on (the loss falls whatever is drawn); c_i what a client's data does whatever it
    is given (on a Dirichlet-0.1 MNIST federation clients' local losses differ more than
    configurations move them); the other settings' effects what they, not setting f, did. None of
    them depends on the value drawn for f, so the step stays unbiased."""

    def __init__(self, sizes: Sequence[int]):
        self.client: dict[int, float] = {}
        self.client_rounds: dict[int, int] = {}
        self.effects = [np.zeros(size) for size in sizes]
        self.counts = [np.zeros(size) for size in sizes]
        self.squares = [np.zeros(size) for size in sizes]  # running mean of the squared unexplained signal
        self.own_sums = [{} for _ in sizes]  # client -> per-value sums of what the shared effects leave
        self.own_counts = [{} for _ in sizes]

    def residuals(self, signals: Mapping[int, float], draws: Mapping[int, Sequence[int]]) -> dict[int, list[float]]:
        """s_i - lambda_if for every client and setting; then the running effects learn from this round."""
        mean = float(np.mean(list(signals.values()))) if len(signals) > 1 else 0.0
        residuals = {}
        for client, signal in signals.items():
            drawn = [self.effects[f][j] for f, j in enumerate(draws[client])]
            own = self.client.get(client, 0.0)
            residuals[client] = [signal - mean - own - (sum(drawn) - e) for e in drawn]
        for client, signal in signals.items():
            drawn = [self.effects[f][j] for f, j in enumerate(draws[client])]
            rounds = self.client_rounds[client] = self.client_rounds.get(client, 0) + 1
            own = self.client.get(client, 0.0)
            own = self.client[client] = own + (signal - mean - sum(drawn) - own) / rounds
            for f, j in enumerate(draws[client]):
                self.counts[f][j] += 1
                unexplained = signal - mean - own - (sum(drawn) - drawn[f])
                self.effects[f][j] += (unexplained - self.effects[f][j]) / self.counts[f][j]
                self.squares[f][j] += (unexplained**2 - self.squares[f][j]) / self.counts[f][j]
                sums = self.own_sums[f].setdefault(client, np.zeros(len(self.effects[f])))
                counts = self.own_counts[f].setdefault(client, np.zeros(len(self.effects[f])))
                sums[j] += unexplained - self.effects[f][j]
                counts[j] += 1
        return residuals

    def best(
        self,
        client: int | None = None,
        larger: bool = True,
        fixed: Sequence[int | None] = (),
        distributions: Sequence[np.ndarray] = (),
        prior: float = 20.0,
    ) -> tuple[int, ...]:
        """Per setting: where the method's distribution over its values has settled (`distributions`,
        the most likely value at `SETTLED` or more), that value; else the value with the best
        estimated effect: the shared effect shrunk by one
        pseudo-draw (a value hardly drawn stays near average), plus, for a client, its own mean
        deviation from it shrunk by `prior` pseudo-draws (empirical Bayes: a client departs from the
        shared choice only on consistent evidence of its own). Where `fixed` names the index of the
        study's fixed value of a setting, the choice leaves it only for values whose shared effect
        is better by two standard errors: a one-round signal barely sees some settings (on MNIST a
        weight decay of 0.01 looks as good as 0 round by round, and costs 7 points after 100)."""
        sign = 1.0 if larger else -1.0
        choice = []
        for f, (effects, counts) in enumerate(zip(self.effects, self.counts, strict=True)):
            if f < len(distributions) and distributions[f].max() >= SETTLED:
                choice.append(int(np.argmax(distributions[f])))
                continue
            shared = sign * effects * counts / (counts + 1)
            home = fixed[f] if f < len(fixed) else None
            allowed = np.ones(len(effects), dtype=bool)
            if home is not None:  # values the shared evidence says beat the fixed one, and the fixed one
                standard_error = np.sqrt(np.maximum(self.squares[f] - effects**2, 0.0) / np.maximum(counts, 1))
                margin = 2 * np.sqrt(standard_error**2 + standard_error[home] ** 2)
                allowed = (counts > 0) & (shared - shared[home] >= margin)
                allowed[home] = True
            score = shared
            if client is not None and client in self.own_sums[f]:
                score = shared + sign * self.own_sums[f][client] / (self.own_counts[f][client] + prior)
            choice.append(int(np.argmax(np.where(allowed, score, -np.inf))))
        return tuple(choice)
