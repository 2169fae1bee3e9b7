"""Auto-FedRL: Guo et al., "Auto-FedRL: Federated Hyperparameter Optimization for Multi-institutional
Medical Image Segmentation", ECCV 2022 (reference code NVIDIA/NVFlare `research/auto-fed-rl`,
`pt_autofedrl.py`; notes in `../shared/papers/personalized-fidelity-compression-notes.md`, section 4).

A policy pi draws one action a per round in the box [-0.5, 0.5]^d, each coordinate mapped affinely
to one hyperparameter of the round (the paper's continuous search, "CS"):
- each tuned client setting, shared by every client of the round: linearly over its range, or in
  log space where the distribution is log-scaled, ints rounded, a categorical by index over its
  sorted choices;
- one aggregation weight aw_i in [0.1, 1] per client of the federation: the clients' factors on
  their sample weights in the aggregate are N softmax(aw) (they average 1);
- the server learning rate, [0.5, 1.5] x the fixed one.
pi = N(mu, Sigma), mu starting at 0 (the box's centre) and clamped to the box before each draw, as
the reference does. A sample outside the box is clipped to it, every coordinate, so that the
configurations stay in the study's space (the reference only floors the lr, the epochs and the
server lr at small positive values, so its coordinates leave their ranges); log pi is of the
unclipped sample. Then (REINFORCE):
1. L = sum_i n_i^val l_i / sum_i n_i^val over the round's clients, l_i the loss of the global model
   client i received on its own validation split (`VAL_LOSS_BEFORE`);
2. r = -(L_t / L_{t-1} - 1): the relative decrease of L over the round whose action it rewards;
3. the baseline b = the mean reward of the last `window` rounds rewarded;
4. the loss -sum_window log pi(a) (r - b);
5. one Adam step (lr `policy_lr`, betas (0.7, 0.7)) on pi's parameters.

The clients evaluate the model they receive as it arrives, so L_{t-1}, the loss of round t-1's
aggregate, comes with round t's report, after round t's action was drawn: the reward of round t-1's
action is learned at `observe` of round t, and the policy update lags one round. So does the
reference's (it draws a round's action before its evaluation exchange), but it broadcasts the model
once more for that exchange; here the evaluation rides on the round's own download. L is over the
round's clients (the reference's over every client that answers its broadcast). A round whose L is
not finite (diverged, or no client with a validation split) updates nothing and starts the rewards
afresh. log pi(a) of the window's actions is recomputed under the current parameters at each update
(the reference keeps each draw's graph, `retain_graph`): the gradient is taken at most `window` Adam
steps later, and no graph outlives a round.

Options (`AutoFedRL.PAPER` is the reference's reading; the defaults are ours):
- `policy`: "cs" (mu and the scale are the learned parameters) or "drl" (the reference's
  `PolicyNet`: an MLP k-256-256-k, tanh output / 100, maps the last (mu, scale) to an update of
  them, k their number of values; Adam learns the network). The last state is kept detached (the
  reference chains every round's state into the graph, so memory grows with the rounds), mu is
  clamped to the box straight through like the reference's in-place clamp (whose DRL clamps to
  [-1, 1], beyond the box the actions are clipped to), and the precision is F F^T of a learned
  factor F, as there. On the least-squares problem of `tests/test_autofedrl.py` (150 rounds, 8
  seeds) the network's tanh saturates within about 50 rounds and walks mu to the box's edge at
  0.01 a round, past the best learning rate, in every seed; CS comes within a quarter of the
  range of it in every seed.
- `scale`: "log-std" (ours: a log standard deviation per coordinate, Sigma = diag(exp(2 s)): every
  value is a distribution) or "precision" (the reference's: a learned matrix P passed straight to
  the Gaussian as its precision, which an Adam step can take out of the positive-definite cone, and
  the reference then crashes; here under "cs" that step is undone, parameters and Adam's state, and
  counted: `autofedrl/invalid_precision_updates`). Adam's steps of about 0.01 barely move a
  precision of about 9: on the least-squares problem the standard deviation went from 0.33 to 0.31
  in 150 rounds (to 0.10 with the log std), and mu came within a quarter of the range of the best
  learning rate in 5 seeds of 8 (8 of 8 with the log std).
- `initial_precision`: 85. The reference's precision matrix is sqrt(85 I), so its initial standard
  deviation is 85^-1/4 ~ 0.33 of each range; every variant starts from it (the reference's DRL, from
  F = sqrt(85 I), from 85^-1/2 ~ 0.11).
- `window_loss`: "sum" (ours) or "assign" (the reference's loop assigns the loss where it means to
  add to it, so only its last term, the window's oldest, counts).
- `window` 5, `policy_lr` 0.01; `tune_weights`, `tune_server_lr`: whether the action holds the
  aggregation weights, the server learning rate.
"""

import copy
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import optuna
import torch
from torch import nn
from torch.distributions import MultivariateNormal, constraints

from fedhpo_core import seeding
from fedhpo_core.registry import ROUND, Method, Options, option, register
from fedhpo_core.search.online import OnlineSearch
from fedhpo_core.search.space import setting_of
from fedhpo_core.settings import ClientConfig
from fedhpo_core.statistics import VAL_LOSS_BEFORE
from fedhpo_core.tuners.base import Tuner

POLICIES, SCALES, WINDOW_LOSSES = ("cs", "drl"), ("log-std", "precision"), ("sum", "assign")
BOX = 0.5  # actions lie in [-BOX, BOX]^d
WEIGHT_RANGE = (0.1, 1.0)  # a client's aggregation weight before the softmax (the reference's)
SERVER_LR_RANGE = (0.5, 1.5)  # the factor on the fixed server learning rate (the reference's)
DTYPE = torch.float64


def linear(u: float, low: float, high: float) -> float:
    """The point of [low, high] at coordinate u of the box, a coordinate outside it clipped."""
    return low + min(max(u + BOX, 0.0), 1.0) * (high - low)


def value_of(distribution: optuna.distributions.BaseDistribution, u: float):
    """The search-space value at coordinate u."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        choices = sorted(distribution.choices)
        return choices[min(int(linear(u, 0, len(choices))), len(choices) - 1)]
    low, high = distribution.low, distribution.high
    value = math.exp(linear(u, math.log(low), math.log(high))) if distribution.log else linear(u, low, high)
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return int(round(value))
    return min(max(value, low), high)  # exp(log(high)) may overshoot by a rounding


def gaussian(mean: torch.Tensor, scale: torch.Tensor, kind: str) -> MultivariateNormal:
    """N(mean, Sigma) from a log standard deviation per coordinate, or from a precision matrix."""
    if kind == "log-std":
        return MultivariateNormal(mean, scale_tril=torch.diag(scale.exp()))
    return MultivariateNormal(mean, precision_matrix=scale)


class Continuous(nn.Module):
    """CS: mu and the scale are the learned parameters (the reference's `LearnableGaussianContinuousSearch`)."""

    def __init__(self, dim: int, std: float, kind: str):
        super().__init__()
        self.kind = kind
        self.mean = nn.Parameter(torch.zeros(dim, dtype=DTYPE))
        initial = torch.full((dim,), math.log(std)) if kind == "log-std" else torch.eye(dim) / std**2
        self.scale = nn.Parameter(initial.to(DTYPE))

    def condition(self) -> None:
        """Before a draw: mu clamped to the box, in place, as the reference does."""
        with torch.no_grad():
            self.mean.clamp_(-BOX, BOX)

    def forward(self, inputs: None = None) -> MultivariateNormal:  # a CS draw conditions on nothing
        return gaussian(self.mean, self.scale, self.kind)

    def current(self) -> MultivariateNormal:
        return self()


class Deep(nn.Module):
    """DRL: the reference's `LearnableGaussianContinuousSearchDRL`, its state (mu, scale) moved each
    draw by `PolicyNet`'s update; the scale a log std or the factor F of the precision F F^T."""

    def __init__(self, dim: int, std: float, kind: str, generator: torch.Generator):
        super().__init__()
        self.kind = kind
        scale = torch.full((dim,), math.log(std)) if kind == "log-std" else torch.eye(dim) / std
        self.state = (torch.zeros(dim, dtype=DTYPE), scale.to(DTYPE))
        k = dim + scale.numel()
        self.net = nn.Sequential(
            nn.Linear(k, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, k), nn.Tanh()
        ).to(DTYPE)
        with torch.no_grad():  # torch's default initialization, drawn from the run's seed
            for layer in self.net[::2]:
                bound = layer.in_features**-0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)

    def step(self, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (mu, scale): the state plus the network's update of it."""
        mean, scale = state
        update = self.net(torch.cat([mean, scale.flatten()])) / 100
        mean = mean + update[: len(mean)]
        mean = mean + (mean.clamp(-BOX, BOX) - mean).detach()  # clamped straight through
        return mean, scale + update[len(mean) :].view_as(scale)

    def condition(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Before a draw: the state it is drawn from; the draw's own becomes the next one's, detached."""
        inputs = self.state
        with torch.no_grad():
            self.state = self.step(inputs)
        return inputs

    def gaussian(self, mean: torch.Tensor, scale: torch.Tensor) -> MultivariateNormal:
        return gaussian(mean, scale if self.kind == "log-std" else scale @ scale.T, self.kind)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> MultivariateNormal:
        return self.gaussian(*self.step(inputs))

    def current(self) -> MultivariateNormal:
        return self.gaussian(*self.state)


class AutoFedRL(Tuner):
    PAPER = {"policy": "cs", "scale": "precision", "window_loss": "assign", "window": 5, "policy_lr": 0.01}
    statistics = (VAL_LOSS_BEFORE,)

    def __init__(
        self,
        parameters: Mapping[str, optuna.distributions.BaseDistribution],
        base: ClientConfig,
        clients: int,
        server_lr: float,
        seed: int,
        policy: str = "cs",
        scale: str = "log-std",
        window_loss: str = "sum",
        window: int = 5,
        policy_lr: float = 0.01,
        initial_precision: float = 85.0,
        tune_weights: bool = True,
        tune_server_lr: bool = True,
    ):
        """`parameters`: the tuned client settings' distributions; `base`: the others' values;
        `clients`: the federation's size N; `server_lr`: the fixed server learning rate."""
        assert policy in POLICIES and scale in SCALES and window_loss in WINDOW_LOSSES
        self.parameters, self.base, self.clients, self.seed = dict(parameters), base, clients, seed
        self.server_lr = server_lr
        self.window_loss, self.tune_weights, self.tune_server_lr = window_loss, tune_weights, tune_server_lr
        self.dim = len(self.parameters) + (clients if tune_weights else 0) + (1 if tune_server_lr else 0)
        std = initial_precision**-0.25
        if policy == "cs":
            self.policy = Continuous(self.dim, std, scale)
        else:
            self.policy = Deep(self.dim, std, scale, seeding.torch_generator(seed, seeding.AUTOFEDRL))
        self.checked = policy == "cs" and scale == "precision"  # whose steps may leave the cone
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=policy_lr, betas=(0.7, 0.7))
        self.draws: dict[int, tuple] = {}  # round: (what the draw conditioned on, action a)
        self.round = 0  # the last round drawn
        self.window: deque = deque(maxlen=window)  # (draw, reward) of the last rounds rewarded
        self.val_loss = (0, math.nan)  # (round, L) of the last report
        self.reward = self.baseline = math.nan
        self.invalid_precision_updates = 0

    def action(self, round: int) -> torch.Tensor:
        """Round `round`'s action a ~ pi, drawn on first use."""
        if round not in self.draws:
            inputs = self.policy.condition()
            generator = seeding.torch_generator(self.seed, seeding.AUTOFEDRL, round)
            noise = torch.randn(self.dim, generator=generator, dtype=DTYPE)
            with torch.no_grad():
                pi = self.policy(inputs)
                self.draws[round] = (inputs, pi.loc + pi.scale_tril @ noise)
            self.round = round
        return self.draws[round][1]

    def mean(self) -> torch.Tensor:
        """pi's mean, in the box."""
        return self.policy.current().loc.detach().clamp(-BOX, BOX)

    def settings(self, a: torch.Tensor) -> dict[str, object]:
        """The client settings' values at action a."""
        coordinates = a[: len(self.parameters)]
        return {name: value_of(d, float(u)) for (name, d), u in zip(self.parameters.items(), coordinates, strict=True)}

    def factors(self, a: torch.Tensor) -> torch.Tensor:
        """The clients' aggregation factors at action a: N softmax(aw)."""
        start = len(self.parameters)
        aw = torch.tensor([linear(float(u), *WEIGHT_RANGE) for u in a[start : start + self.clients]], dtype=DTYPE)
        return self.clients * torch.softmax(aw, 0)

    def server_factor(self, a: torch.Tensor) -> float:
        return linear(float(a[-1]), *SERVER_LR_RANGE)

    def configure(self, round, clients):
        config = replace(self.base, **self.settings(self.action(round)))
        return dict.fromkeys(clients, config)

    def aggregation_weights(self, round, clients):
        if not self.tune_weights:
            return None
        factors = self.factors(self.action(round))
        return {c: float(factors[c]) for c in clients}

    def server_settings(self, server, weights, updates):
        if not self.tune_server_lr:
            return server
        return replace(server, lr=self.server_lr * self.server_factor(self.action(self.round)))

    def observe(self, report):
        """Steps 1-2: L of the model this round's clients received rewards the previous round's action."""
        scored = [(u.statistics[VAL_LOSS_BEFORE.name], u.num_val) for u in report.updates if u.num_val > 0]
        scored = [(loss, n) for loss, n in scored if math.isfinite(loss)]
        val_loss = sum(loss * n for loss, n in scored) / sum(n for _, n in scored) if scored else math.nan
        (before_round, before), self.val_loss = self.val_loss, (report.round, val_loss)
        draw = self.draws.pop(report.round - 1, None)
        if draw is None or before_round != report.round - 1 or not (math.isfinite(val_loss) and before > 0):
            return
        self.window.append((draw, -(val_loss / before - 1)))
        self.update()

    def update(self) -> None:
        """Steps 3-5: the baseline, the REINFORCE loss over the window, one Adam step."""
        rewards = [r for _, r in self.window]
        self.reward, self.baseline = rewards[-1], sum(rewards) / len(rewards)
        terms = self.window if self.window_loss == "sum" else [self.window[0]]
        loss = -sum(self.policy(inputs).log_prob(a) * (r - self.baseline) for (inputs, a), r in terms)
        saved = copy.deepcopy((self.policy.state_dict(), self.optimizer.state_dict())) if self.checked else None
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if saved and not bool(constraints.positive_definite.check(self.policy.scale.detach())):
            self.policy.load_state_dict(saved[0])
            self.optimizer.load_state_dict(saved[1])
            self.invalid_precision_updates += 1

    def state(self):
        """pi's mean mapped to the hyperparameters, its mean standard deviation (in units of the
        ranges), the last reward and baseline."""
        pi, mean = self.policy.current(), self.mean()
        named = {f"autofedrl/{name}": float(value) for name, value in self.settings(mean).items()}
        if self.tune_server_lr:
            named["autofedrl/server_lr"] = self.server_lr * self.server_factor(mean)
        named |= {
            "autofedrl/std": float(pi.variance.detach().sqrt().mean()),
            "autofedrl/reward": self.reward,
            "autofedrl/baseline": self.baseline,
        }
        if self.checked:
            named["autofedrl/invalid_precision_updates"] = float(self.invalid_precision_updates)
        return named

    def client_state(self):
        """Each client's aggregation weight softmax(aw)_i at pi's mean (1/N each at the start)."""
        if not self.tune_weights:
            return {}
        weights = self.factors(self.mean()) / self.clients
        return {c: {"autofedrl/weight": float(w)} for c, w in enumerate(weights)}

    def chosen(self):
        """The client settings at pi's mean."""
        return self.settings(self.mean())


@dataclass(frozen=True)
class AutoFedRLOptions(Options):
    policy: str = option("cs", "autofedrl: cs (a learned Gaussian) or drl (an MLP moving it)", POLICIES)
    scale: str = option("log-std", "autofedrl: log-std (ours) or precision (the reference's matrix)", SCALES)
    window_loss: str = option(
        "sum", "autofedrl: sum the window's REINFORCE terms, or assign (the reference's: one counts)", WINDOW_LOSSES
    )
    window: int = option(5, "autofedrl: rounds of the moving-average baseline and of the REINFORCE loss", low=1)
    policy_lr: float = option(0.01, "autofedrl: Adam's step size on the policy", low=0.0)
    initial_precision: float = option(85.0, "autofedrl: the reference's initial precision (std 85^-1/4)", low=1e-9)
    tune_weights: bool = option(True, "autofedrl: the action holds a weight per client in the aggregate")
    tune_server_lr: bool = option(True, "autofedrl: the action holds the server learning rate (x0.5 to x1.5)")


class AutoFedRLSearch(OnlineSearch):
    """Auto-FedRL over the space's client settings (continuous ranges, or categoricals by index)."""

    statistics = AutoFedRL.statistics

    def tuner(self, context, configs, values):
        parameters = {setting_of(n): d for n, d in context.parameters.items()}
        fixed, clients = context.fixed, len(context.data.clients)
        options = asdict(self.options)
        return AutoFedRL(parameters, fixed.client_config, clients, fixed.server.lr, context.seed, **options)


register(
    Method(
        "autofedrl",
        ROUND,
        "Guo et al., ECCV 2022 (reference NVIDIA/NVFlare research/auto-fed-rl)",
        "a Gaussian policy over client settings, per-client aggregation weights and the server lr, by REINFORCE",
        AutoFedRLSearch,
        AutoFedRLOptions,
    )
)
register(
    Method(
        "autofedrl-paper",
        ROUND,
        "Auto-FedRL as its reference code runs it",
        "autofedrl with the reference's precision matrix and its windowed loss assigned, not summed",
        AutoFedRLSearch,
        AutoFedRLOptions,
        defaults=AutoFedRL.PAPER,
    )
)
