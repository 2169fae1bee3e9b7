"""Step-wise adaptive HPO with Optuna and straggler-aware client selection (arXiv 2411.12244;
summary in `../shared/papers/stepwise-adaptive-hpo-2411.12244-summary.md`).

Each round Optuna proposes the round's configuration (ask), every selected client trains with
it, and Optuna is told the round's step-wise feedback (tell), combining local feedback (the
clients' sample-weighted validation accuracy) and global feedback (the server's validation
accuracy):
    feedback_t = alpha (acc_server_t - acc_server_{t-1}) + (1 - alpha) (acc_clients_t - acc_clients_{t-1}),
with alpha = 0.5 and chance accuracy before the first round. The paper leaves the feedback's
form open; improvements, not accuracies, are what one round's configuration contributes, while
the accuracies themselves grow with training whatever the configuration.

Straggler-aware selection: clients get seeded compute speeds (log-normal, sigma 0.5), so client c
needs tau_c = samples_c x local_epochs / speed_c simulated seconds; a round lasts as long as its
slowest client. Clients are admitted stalest first (longest since they last took part) while the
round stays within the deadline D, the median tau over all clients; the stalest is always
admitted, so every client takes part over time and a round exceeds D only when that one client
alone does.
"""

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import optuna

from fedhpo_core import seeding
from fedhpo_core.settings import ClientConfig
from fedhpo_core.tuners.base import Tuner

STEPWISE = 10  # seeding key of the simulated speeds
ALPHA = 0.5


class Stepwise(Tuner):
    def __init__(
        self,
        parameters: Mapping[str, optuna.distributions.BaseDistribution],
        base: ClientConfig,
        client_samples: Sequence[int],
        num_classes: int,
        seed: int,
    ):
        self.parameters, self.base = dict(parameters), base
        self.study = optuna.create_study(
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=False),
        )
        self.samples = np.asarray(client_samples, dtype=float)
        self.speeds = seeding.numpy_rng(seed, STEPWISE).lognormal(0.0, 0.5, len(self.samples))
        self.deadline = float(np.median(self.seconds(range(len(self.samples)), base.local_epochs)))
        self.last_seen = dict.fromkeys(range(len(self.samples)), 0)
        self.previous = (1 / num_classes, 1 / num_classes)
        self.trial: optuna.trial.Trial | None = None
        self.round_time = 0.0
        self.feedback = 0.0

    def seconds(self, clients, local_epochs: int) -> np.ndarray:
        """Simulated compute time of each client for one round."""
        clients = list(clients)
        return self.samples[clients] * local_epochs / self.speeds[clients]

    def select(self, round, clients):
        order = sorted(clients, key=lambda c: (self.last_seen[c], c))
        times = dict(zip(order, self.seconds(order, self.base.local_epochs), strict=True))
        chosen = [order[0]]
        for client in order[1:]:
            if max(times[c] for c in [*chosen, client]) <= self.deadline:
                chosen.append(client)
        for client in chosen:
            self.last_seen[client] = round
        self.round_time = max(times[c] for c in chosen)
        return sorted(chosen)

    def configure(self, round, clients):
        self.trial = self.study.ask(self.parameters)
        config = replace(self.base, **self.trial.params)
        return dict.fromkeys(clients, config)

    def observe(self, report):
        current = (report.val_acc, report.client_val_acc)
        deltas = [now - before for now, before in zip(current, self.previous, strict=True)]
        if report.diverged or not all(np.isfinite(deltas)):
            self.study.tell(self.trial, state=optuna.trial.TrialState.FAIL)
            return
        self.feedback = ALPHA * deltas[0] + (1 - ALPHA) * deltas[1]
        self.study.tell(self.trial, self.feedback)
        self.previous = current

    def state(self):
        return {"stepwise/feedback": self.feedback, "stepwise/round_time_s": self.round_time}

    def chosen(self):
        return dict(self.study.best_trial.params)
