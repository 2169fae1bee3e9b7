"""FedHyper: Wu et al., "FedHyper: A Universal and Robust Learning Rate Scheduler for Federated
Learning with Hypergradient Descent" (arXiv 2310.03156; summary in `../shared/papers/`; reference
code ATP-1010/FedHyper, `federated_main.py`). Its two server-side schedulers:

- global: the pseudo-gradient of round t is Delta_t = (sum_i n_i w_i / sum_i n_i) - x_t; its
  hypergradient with respect to the global learning rate is the inner product
  h_t = <Delta_{t-1}, Delta_t> of consecutive pseudo-gradients, and the rate follows it by
  hypergradient ascent with bound clipping:
      alpha_t = clip(alpha_{t-1} + h_t, 1 / gamma_alpha, gamma_alpha),  alpha_0 = 1,
      x_{t+1} = x_t + alpha_t Delta_t;
- server-side local: the clients' learning rate follows the same hypergradient, relative to its
  initial value beta_0, with its own bounds:
      beta_t = clip(beta_{t-1} + beta_0 h_t, beta_0 / gamma_beta, beta_0 gamma_beta).

- client-side local: each client adapts its own rate step by step during local training
  (`fedhpo_core.client.HypergradientLR`), from the server-side local rate and the last global update.

gamma_alpha = 3 and gamma_beta = 10 (the paper's defaults).
"""

from dataclasses import replace

import torch

from fedhpo_core.aggregators import weighted_mean
from fedhpo_core.settings import ClientConfig
from fedhpo_core.tuners.base import Tuner

SCHEDULERS = ("global", "server_local", "client_local")


class FedHyper(Tuner):
    def __init__(self, base: ClientConfig, schedulers=SCHEDULERS, gamma_alpha: float = 3.0, gamma_beta: float = 10.0):
        unknown = set(schedulers) - set(SCHEDULERS)
        if unknown or not schedulers:
            raise ValueError(f"FedHyper schedulers are {', '.join(SCHEDULERS)}; got {sorted(schedulers)}")
        self.base, self.schedulers = base, tuple(schedulers)
        self.gamma_alpha, self.gamma_beta = gamma_alpha, gamma_beta
        self.alpha, self.beta = 1.0, base.lr
        self.previous: torch.Tensor | None = None
        self.hypergradient = 0.0

    def configure(self, round, clients):
        config = replace(self.base, lr=self.beta, lr_hypergradient="client_local" in self.schedulers)
        return dict.fromkeys(clients, config)

    def step(self, delta: torch.Tensor) -> None:
        """Update both rates from this round's pseudo-gradient (the first round has no hypergradient)."""
        if self.previous is not None:
            self.hypergradient = float(torch.dot(self.previous.double(), delta.double()))
            if "global" in self.schedulers:
                self.alpha = min(self.gamma_alpha, max(1 / self.gamma_alpha, self.alpha + self.hypergradient))
            if "server_local" in self.schedulers:
                beta0 = self.base.lr
                stepped = self.beta + beta0 * self.hypergradient
                self.beta = min(beta0 * self.gamma_beta, max(beta0 / self.gamma_beta, stepped))
        self.previous = delta

    def server_settings(self, server, weights, updates):
        delta = weighted_mean([u.weights for u in updates], [u.num_samples for u in updates]) - weights
        if torch.isfinite(delta).all():
            self.step(delta)
        return replace(server, lr=server.lr * self.alpha) if "global" in self.schedulers else server

    def state(self):
        return {"fedhyper/alpha": self.alpha, "fedhyper/beta": self.beta, "fedhyper/hypergradient": self.hypergradient}

    def chosen(self):
        """The client learning rate the schedule ended at (the global rate is a schedule, not a setting)."""
        return {"lr": self.beta}
