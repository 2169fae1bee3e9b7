"""FedEx: Khodak et al., "Federated Hyperparameter Tuning: Challenges, Baselines, and Connections to
Weight-Sharing", NeurIPS 2021 (Algorithm 1; reference code mkhodak/FedEx, `hyper.py`).

A categorical distribution theta over k local-training configurations. Each round every sampled
client draws its configuration j_i ~ theta, trains, and reports its validation loss L_i after
local training. theta then takes an exponentiated-gradient step on the importance-weighted loss
    g_j = sum_{i: j_i = j} w_i (L_i - lambda) / theta_j,   w_i = n_i^val / sum_i n_i^val,
    log theta <- log theta - eta_t g,  renormalized,       eta_t = sqrt(2 log k) / sqrt(t),
with the baseline lambda the weighted mean loss of the previous round (0 in the first): the
reference code's defaults ('auto' step size schedule, baseline discount 0). Server settings are
not tuned here; FedEx leaves them to an outer random search or successive halving.
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedhpo_core import seeding
from fedhpo_core.settings import ClientConfig
from fedhpo_core.tuners.base import Tuner

FEDEX = 7  # seeding key of the configuration draws


class FedEx(Tuner):
    def __init__(self, configs: Sequence[ClientConfig], values: Sequence[Mapping[str, object]], seed: int):
        """`configs[j]` is configuration j; `values[j]` its search-space values (for `chosen`)."""
        self.configs, self.values, self.seed = list(configs), list(values), seed
        k = len(self.configs)
        self.log_theta = np.full(k, -math.log(k))
        self.eta0 = math.sqrt(2 * math.log(k)) if k > 1 else 0.0
        self.steps = 0
        self.previous_loss: float | None = None
        self.draws: dict[int, int] = {}

    @property
    def theta(self) -> np.ndarray:
        return np.exp(self.log_theta)

    def configure(self, round, clients):
        rng = seeding.numpy_rng(self.seed, FEDEX, round)
        theta = self.theta / self.theta.sum()
        self.draws = {c: int(rng.choice(len(theta), p=theta)) for c in clients}
        return {c: self.configs[j] for c, j in self.draws.items()}

    def gradient(self, losses: Mapping[int, float], sizes: Mapping[int, int], baseline: float) -> np.ndarray:
        """g_j = sum over clients that drew j of w_i (L_i - baseline) / theta_j."""
        total = sum(sizes.values())
        grad = np.zeros(len(self.configs))
        for client, loss in losses.items():
            j = self.draws[client]
            grad[j] += sizes[client] / total * (loss - baseline) / self.theta[j]
        return grad

    def observe(self, report):
        scored = [u for u in report.updates if u.num_val > 0 and math.isfinite(u.val_loss)]
        if not scored:
            return
        losses = {u.client: u.val_loss for u in scored}
        sizes = {u.client: u.num_val for u in scored}
        baseline = self.previous_loss if self.previous_loss is not None else 0.0
        self.steps += 1
        self.log_theta = self.log_theta - self.eta0 / math.sqrt(self.steps) * self.gradient(losses, sizes, baseline)
        self.log_theta -= np.logaddexp.reduce(self.log_theta)
        self.previous_loss = sum(sizes[c] * losses[c] for c in losses) / sum(sizes.values())

    def state(self):
        theta = self.theta
        entropy = float(-(theta * np.log(np.maximum(theta, 1e-300))).sum())
        return {f"fedex/theta_{j}": float(p) for j, p in enumerate(theta)} | {"fedex/entropy": entropy}

    def chosen(self):
        return dict(self.values[int(np.argmax(self.log_theta))])
