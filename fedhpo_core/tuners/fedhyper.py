"""FedHyper: Wu et al., "FedHyper: A Universal and Robust Learning Rate Scheduler for Federated
Learning with Hypergradient Descent" (arXiv 2310.03156; summary in `../shared/papers/`; reference
code ATP-1010/FedHyper, `federated_main.py` and `update.py`). Its three schedulers, any of them on:

- global: the pseudo-gradient of round t is Delta_t = (sum_i n_i w_i / sum_i n_i) - x_t; its
  hypergradient with respect to the global learning rate is the inner product
  h_t = <Delta_{t-1}, Delta_t> of consecutive pseudo-gradients, and the rate follows it by
  hypergradient ascent with bound clipping:
      alpha_t = clip(alpha_{t-1} + h_t, 1 / gamma_alpha, gamma_alpha),  alpha_0 = 1,
      x_{t+1} = x_t + alpha_t Delta_t;
- server-side local: the clients' learning rate follows the same hypergradient, relative to its
  initial value beta_0, with its own bounds:
      beta_t = clip(beta_{t-1} + beta_0 h_t, beta_0 / gamma_beta, beta_0 gamma_beta);
- client-side local: each client rescales its rate step by step during local training, from the
  server-side local rate and the last global update (`HypergradientLR`, a `LocalSchedule`).

gamma_alpha = 3 and gamma_beta = 10 (the paper's defaults).
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from fedhpo_core.aggregators import weighted_mean
from fedhpo_core.client import LocalSchedule, RunningSchedules
from fedhpo_core.settings import ClientConfig
from fedhpo_core.tuners.base import Tuner

SCHEDULERS = ("global", "server_local", "client_local")


@dataclass(frozen=True, eq=False)
class HypergradientLR(LocalSchedule):
    """FedHyper's client-side local scheduler (reference code `update.py`). After each local step
    s >= 1 (counting from 0) with weight change u_s the rate is multiplied by
        gamma_s = min(1.1, 1 + 0.1 <u_s, Delta> / m + <u_s, u_{s-1}>),
    the cumulative multiplier clipped to [1 / gamma_beta, gamma_beta]: Delta is the last global
    update, m the round's clients, and the first step's change is not used, step 1's predecessor
    being Delta itself (the reference's choices)."""

    global_update: torch.Tensor  # Delta, flat
    clients: int  # m
    gamma_beta: float = 10.0

    @classmethod
    def start(cls, schedules: Sequence["HypergradientLR"], lr: torch.Tensor) -> "HypergradientSteps":
        return HypergradientSteps(schedules, lr)


class HypergradientSteps(RunningSchedules):
    """`HypergradientLR` for k clients at once: their multipliers, (k,), and last changes, (k, P)."""

    def __init__(self, schedules: Sequence[HypergradientLR], lr: torch.Tensor):
        updates = [s.global_update for s in schedules]
        # A round's clients share one global update: kept once, not once per client.
        self.delta = updates[0].unsqueeze(0) if all(u is updates[0] for u in updates) else torch.stack(updates)
        self.previous = self.delta.expand(len(schedules), -1).clone()
        self.clients = torch.tensor([s.clients for s in schedules], dtype=torch.float64, device=lr.device)
        self.bound = torch.tensor([s.gamma_beta for s in schedules], dtype=torch.float64, device=lr.device)
        self.lr, self.multiplier = lr, torch.ones(len(schedules), dtype=torch.float64, device=lr.device)

    def step(self, step, changes):
        j = len(changes)
        if step >= 1:
            along_delta = (changes * self.delta[:j]).sum(1).double()
            along_previous = (changes * self.previous[:j]).sum(1).double()
            gamma = (1.0 + 0.1 * along_delta / self.clients[:j] + along_previous).clamp(max=1.1)
            self.multiplier[:j] = torch.clamp(gamma * self.multiplier[:j], 1 / self.bound[:j], self.bound[:j])
            self.previous[:j] = changes
        return self.lr[:j] * self.multiplier[:j]


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
        self.last_update: torch.Tensor | None = None  # the last round's global update, Delta
        self.clients_in_round = 1

    def configure(self, round, clients):
        self.clients_in_round = len(clients)
        return dict.fromkeys(clients, replace(self.base, lr=self.beta))

    def local_schedule(self, round, client):
        """The client-side scheduler, from the second round (the first has no global update yet)."""
        if "client_local" not in self.schedulers or self.last_update is None:
            return None
        return HypergradientLR(self.last_update, self.clients_in_round, self.gamma_beta)

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
        """The round's server settings, after a hypergradient step on the mean update of the
        clients that uploaded a finite one (none in a round: no step)."""
        finite = [u for u in updates if not u.diverged]
        if finite:
            delta = weighted_mean([u.weights for u in finite], [u.num_samples for u in finite]) - weights
            if torch.isfinite(delta).all():
                self.step(delta)
        return replace(server, lr=server.lr * self.alpha) if "global" in self.schedulers else server

    def observe(self, report):
        self.last_update = report.weights_after - report.weights_before

    def state(self):
        return {"fedhyper/alpha": self.alpha, "fedhyper/beta": self.beta, "fedhyper/hypergradient": self.hypergradient}

    def chosen(self):
        """The client learning rate the schedule ended at (the global rate is a schedule, not a setting)."""
        return {"lr": self.beta}
