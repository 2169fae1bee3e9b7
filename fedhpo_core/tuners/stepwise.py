"""Step-wise adaptive HPO with Optuna and straggler-aware client selection (arXiv 2411.12244;
summary in `../shared/papers/stepwise-adaptive-hpo-2411.12244-summary.md`).

Each round Optuna proposes the round's configuration (ask), every selected client trains with
it, and Optuna is told the round's step-wise feedback (tell), combining global feedback (the
server's validation accuracy) and local feedback (the clients' sample-weighted validation
accuracy), alpha = 0.5, chance accuracy before the first round. The paper leaves the feedback's
form open; improvements, not accuracies, are what one round's configuration contributes, while
the accuracies themselves grow with training whatever the configuration. Two readings
(`Stepwise.PAPER` is the first of each; the defaults are what worked on digits and MNIST):
- `feedback`: "difference", alpha (acc_server_t - acc_server_{t-1}) + (1 - alpha) (acc_clients_t -
  acc_clients_{t-1}); or "log-error", the same with log(err_{t-1} / err_t), err = 1 - acc. An
  accuracy gain shrinks round after round whatever is proposed (MNIST: +0.6 in round 1, +0.01 by
  round 20), so the difference rates the first rounds' configurations best; under a geometric
  convergence err_t = err_0 rho^t the log-error decrement is the same every round, and only the
  configuration's own effect on rho remains.
- `baseline`: "none" (Optuna is told the gain) or "window" (the gain minus the mean gain of the
  previous 3 rounds, 0 in the first: what remains of a slowing trend is charged to no one).
- `choice`: "best" (the best single trial: Optuna's best_trial) or "mean" (each round's gain minus
  the mean gain of its neighbours, up to 2 rounds either side, averaged per configuration over
  the rounds it was proposed and shrunk towards 0 by one pseudo-round: TPE proposes good
  configurations again, and one lucky round is not a finding).

Straggler-aware selection: client c needs tau_c simulated seconds for a round, its download,
local epochs and upload on its device (`devices`: the federation's profiles, the same ones that
time every run); a round lasts as long as its slowest client. Clients are admitted stalest first
(longest since they last took part) while the round stays within the deadline D, the median tau
over all clients; the stalest is always admitted, so every client takes part over time and a
round exceeds D only when that one client alone does.
"""

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import optuna

from fedhpo_core.settings import ClientConfig
from fedhpo_core.tuners.base import Tuner

ALPHA = 0.5
FEEDBACKS, BASELINES, CHOICES = ("difference", "log-error"), ("none", "window"), ("best", "mean")
WINDOW = 3  # previous rounds whose mean gain is the baseline
NEIGHBOURS = 2  # rounds either side whose mean gain a round's gain is compared with, for `choice="mean"`


class Stepwise(Tuner):
    PAPER = {"feedback": "difference", "baseline": "none", "choice": "best"}

    def __init__(
        self,
        parameters: Mapping[str, optuna.distributions.BaseDistribution],
        base: ClientConfig,
        round_seconds: Sequence[float],
        num_classes: int,
        seed: int,
        feedback: str = "log-error",
        baseline: str = "window",
        choice: str = "mean",
    ):
        assert feedback in FEEDBACKS and baseline in BASELINES and choice in CHOICES
        self.parameters, self.base = dict(parameters), base
        self.feedback_kind, self.baseline, self.choice = feedback, baseline, choice
        self.gains: list[tuple[dict, float]] = []  # each completed round's configuration and gain
        self.study = optuna.create_study(
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=False),
        )
        self.round_seconds = np.asarray(round_seconds, dtype=float)  # tau_c at the base configuration
        self.deadline = float(np.median(self.round_seconds))
        self.last_seen = dict.fromkeys(range(len(self.round_seconds)), 0)
        self.previous = (1 / num_classes, 1 / num_classes)
        self.trial: optuna.trial.Trial | None = None
        self.round_time = 0.0
        self.feedback = 0.0

    def select(self, round, clients):
        order = sorted(clients, key=lambda c: (self.last_seen[c], c))
        times = {c: float(self.round_seconds[c]) for c in order}
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
        current = (report.val_score, report.client_val_score)
        deltas = [self.gain(before, now) for now, before in zip(current, self.previous, strict=True)]
        if report.diverged or not all(np.isfinite(deltas)):
            self.study.tell(self.trial, state=optuna.trial.TrialState.FAIL)
            return
        gain = ALPHA * deltas[0] + (1 - ALPHA) * deltas[1]
        recent = [g for _, g in self.gains[-WINDOW:]]
        self.feedback = gain - (float(np.mean(recent)) if self.baseline == "window" and recent else 0.0)
        self.gains.append((self.trial.params, gain))
        self.study.tell(self.trial, self.feedback)
        self.previous = current

    def gain(self, before: float, now: float) -> float:
        if self.feedback_kind == "difference":
            return now - before
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.log(max(1 - before, 1e-6) / max(1 - now, 1e-6)))

    def state(self):
        return {"stepwise/feedback": self.feedback, "stepwise/round_time_s": self.round_time}

    def chosen(self):
        if self.choice == "best":
            return dict(self.study.best_trial.params)
        gains = [g for _, g in self.gains]
        scores: dict[tuple, list[float]] = {}
        for t, (params, gain) in enumerate(self.gains):
            neighbours = gains[max(0, t - NEIGHBOURS) : t] + gains[t + 1 : t + 1 + NEIGHBOURS]
            residual = gain - float(np.mean(neighbours)) if neighbours else 0.0
            scores.setdefault(tuple(sorted(params.items())), []).append(residual)
        return dict(max(scores, key=lambda k: sum(scores[k]) / (len(scores[k]) + 1)))
