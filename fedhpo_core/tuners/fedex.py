"""FedEx: Khodak et al., "Federated Hyperparameter Tuning: Challenges, Baselines, and Connections to
Weight-Sharing", NeurIPS 2021 (Algorithm 1; reference code mkhodak/FedEx, `hyper.py`).

A categorical distribution theta over local-training configurations. Each round every sampled
client draws its configuration j_i ~ theta, trains, and reports a validation loss s_i. theta
then takes an exponentiated-gradient step on the importance-weighted loss (Algorithm 1):
    g_j = sum_{i: j_i = j} w_i (s_i - lambda) / theta_j,   w_i = n_i^val / sum_i n_i^val,
    log theta <- log theta - eta_t g,  renormalized.

The options are the reference code's, plus one of ours:
- `signal`: "after" (s_i = the loss after local training; the paper and the reference's default),
  "difference" (after minus before local training: the reference's `diff=True`) or "log-ratio"
  (ours: log(after / before), the difference in log space: a client whose data the global model
  fits badly improves by more in absolute terms whatever it is given, which the raw difference
  charges to the configuration it drew; the log-ratio is on the same scale for every client).
- `baseline`: "previous" (lambda = the previous round's weighted mean signal, 0 in the first: the
  reference's default discount 0) or "round" (ours: this round's weighted mean, an advantage
  across the round's clients). The loss falls round after round whatever is drawn, so against the
  previous round every draw looks good, and the arms drawn early while the loss fell fastest are
  reinforced most: the collapse docs/compare.md records (lr 0.05, weight decay 0.01 after 30 MNIST
  rounds). Against the same round's mean only the differences between configurations remain.
  "fitted" (ours): the round's mean plus the client's own effect and the other settings' effects
  (`policy.FittedBaseline`): clients whose data the global model fits worse improve more whatever
  they draw, and on MNIST the learning rate moves the signal far more than the weight decay.
- `schedule` of eta_t with eta0 = sqrt(2 log k): "auto" (eta0 / sqrt(t)), "adaptive" (eta0 /
  sqrt(sum of squared max-norms of the gradients so far): scaled to the signal's magnitude, so no
  per-task step size), "aggressive" (eta0 / the max-norm), "constant" (eta0).
- `factorized`: one distribution per setting when the candidates are a grid (the reference's grid
  configs), else one over all candidates.
The configuration settled on is the most likely one (the reference's `mle`) or, with the fitted
baseline, per setting the most likely value where theta has settled on one (probability 0.5 or
more), else the value the fitted effects rate best, leaving the study's fixed value only on
evidence (`policy.FittedBaseline.best`): the argmax of a nearly flat theta is a coin toss (on
MNIST the weight decay's mass moved from 1e-5 to 0 within 10 rounds as single draws of rare
values swung it through their importance weights 1/theta_j). Server settings are not tuned here; FedEx leaves
them to an outer random search or successive halving.

`FedEx.PAPER` is the faithful reading (after, previous, auto, joint); the defaults are what worked
best on digits and MNIST (docs/methods.md, "Round-level methods").
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedhpo_core import seeding
from fedhpo_core.settings import ClientConfig
from fedhpo_core.statistics import VAL_LOSS_AFTER, VAL_LOSS_BEFORE
from fedhpo_core.tuners.base import Tuner
from fedhpo_core.tuners.policy import Factors, FittedBaseline, entropy

SIGNALS, BASELINES = ("after", "difference", "log-ratio"), ("previous", "round", "fitted")
SCHEDULES = ("auto", "adaptive", "aggressive", "constant")


def val_loss_before(update) -> float:
    """The client's validation loss before local training (`VAL_LOSS_BEFORE`)."""
    return update.statistics[VAL_LOSS_BEFORE.name]


class FedEx(Tuner):
    PAPER = {"signal": "after", "baseline": "previous", "schedule": "auto", "factorized": False}
    statistics = (VAL_LOSS_BEFORE, VAL_LOSS_AFTER)

    def __init__(
        self,
        configs: Sequence[ClientConfig],
        values: Sequence[Mapping[str, object]],
        seed: int,
        signal: str = "log-ratio",
        baseline: str = "fitted",
        schedule: str = "auto",
        factorized: bool = True,
        fixed: Mapping[str, object] | None = None,
    ):
        """`configs[j]` is configuration j; `values[j]` its search-space values (for `chosen`);
        `fixed` the study's fixed values of the tuned settings (where `chosen` stays without evidence)."""
        assert signal in SIGNALS and baseline in BASELINES and schedule in SCHEDULES
        self.configs, self.values, self.seed = list(configs), list(values), seed
        self.signal, self.baseline, self.schedule = signal, baseline, schedule
        self.factors = Factors(self.values, factorized)
        self.fixed = self.factors.draw_of_values(fixed or {})
        self.log_theta = [np.full(size, -math.log(size)) for size in self.factors.sizes]
        self.eta0 = [math.sqrt(2 * math.log(size)) if size > 1 else 0.0 for size in self.factors.sizes]
        self.steps = 0
        self.squared_norms = [0.0] * len(self.factors.sizes)
        self.previous: float | None = None
        self.fitted = FittedBaseline(self.factors.sizes)
        self.draws: dict[int, tuple[int, ...]] = {}

    @property
    def theta(self) -> np.ndarray:
        """The probability of each candidate configuration."""
        return self.factors.probabilities([np.exp(z) for z in self.log_theta])

    def configure(self, round, clients):
        rng = seeding.numpy_rng(self.seed, seeding.FEDEX, round)
        self.draws = {
            c: tuple(int(rng.choice(len(z), p=np.exp(z) / np.exp(z).sum())) for z in self.log_theta) for c in clients
        }
        return {c: self.configs[self.factors.candidate(d)] for c, d in self.draws.items()}

    def step_size(self, factor: int, gradient: np.ndarray) -> float:
        norm = float(np.abs(gradient).max())
        if self.schedule == "auto":
            return self.eta0[factor] / math.sqrt(self.steps)
        if self.schedule == "adaptive":
            self.squared_norms[factor] += norm**2
            return self.eta0[factor] / math.sqrt(self.squared_norms[factor]) if norm > 0 else 0.0
        if self.schedule == "aggressive":
            return self.eta0[factor] / norm if norm > 0 else 0.0
        return self.eta0[factor]

    def scored(self, updates) -> list:
        """The updates whose signal is defined: a finite validation loss after training and, for the
        signals relative to it, a positive finite one before."""
        scored = [u for u in updates if u.num_val > 0 and math.isfinite(u.val_loss)]
        if self.signal != "after":
            scored = [u for u in scored if math.isfinite(val_loss_before(u)) and val_loss_before(u) > 0]
        return scored

    def observe(self, report):
        scored = self.scored(report.updates)
        if not scored:
            return
        signals = {u.client: self.signal_of(u) for u in scored}
        total = sum(u.num_val for u in scored)
        weights = {u.client: u.num_val / total for u in scored}
        mean = sum(weights[c] * s for c, s in signals.items())
        if self.baseline == "fitted":
            residuals = self.fitted.residuals(signals, {c: self.draws[c] for c in signals})
        else:
            baseline = mean if self.baseline == "round" else (self.previous if self.previous is not None else 0.0)
            residuals = {c: [s - baseline] * len(self.log_theta) for c, s in signals.items()}
        self.steps += 1
        for f, z in enumerate(self.log_theta):
            theta = np.exp(z)
            gradient = np.zeros(len(z))
            for client, residual in residuals.items():
                j = self.draws[client][f]
                gradient[j] += weights[client] * residual[f] / theta[j]
            z -= self.step_size(f, gradient) * gradient
            z -= np.logaddexp.reduce(z)
        self.previous = mean

    def signal_of(self, update) -> float:
        if self.signal == "after":
            return update.val_loss
        if self.signal == "difference":
            return update.val_loss - val_loss_before(update)
        return math.log(max(update.val_loss, 1e-12) / val_loss_before(update))

    def state(self):
        """theta as probabilities: per setting's value when factorized, else per candidate; its entropy."""
        theta, probabilities = self.theta, [np.exp(z) for z in self.log_theta]
        if self.factors.factorized:
            named = {
                f"fedex/p/{name}/{value}": float(p)
                for name, choices, ps in zip(self.factors.names, self.factors.choices, probabilities, strict=True)
                for value, p in zip(choices, ps, strict=True)
            }
        else:
            named = {f"fedex/theta_{j}": float(p) for j, p in enumerate(theta)}
        return named | {"fedex/entropy": entropy(theta)}

    def chosen(self):
        """The most likely configuration (the reference's `mle`); with the fitted baseline, the one
        whose values have the lowest fitted effects on the signal: what the rounds measured."""
        if self.baseline == "fitted":
            best = self.fitted.best(larger=False, fixed=self.fixed, distributions=[np.exp(z) for z in self.log_theta])
        else:
            best = tuple(int(np.argmax(z)) for z in self.log_theta)
        return dict(self.values[self.factors.candidate(best)])
