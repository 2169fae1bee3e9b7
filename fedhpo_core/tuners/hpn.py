"""pFedHPO's hypernetwork (HPN): Cheng, Wang, Li & Cheng, "A Practical Approach to Personalized
Federated Hyperparameter Optimization", arXiv 2304.05195 (reference FederatedScope
`federatedscope/autotune/pfedhpo/{server,fl_server,client,utils}.py`; notes in
`../shared/papers/personalized-fidelity-compression-notes.md`, sections 1b, 1c and 5).

A network maps a client's data encoding to a distribution over the candidate configurations; it
is trained on one-round continuations of an anchor run. The paper's steps, within one federated
run of the budget's rounds:
1. Client encoding: each client sends, in its first round, the noisy random-feature mean embedding
   of its training pairs (x, onehot(y)) (DP-MERF's; noise sd 2 * 0.1 / n), its features drawn from
   the run's seed so that encodings are comparable (`statistics.DataEncoding`). Later rounds ask for
   it only while some client of the federation has not sent it.
2. Anchor run: the first R = `anchor_fraction` x budget rounds train every client with the study's
   fixed configuration. The tuner records each round's aggregate validation score and each client's
   validation score and loss after local training, and keeps the global models of `checkpoints`
   rounds spread over 1 .. R - 1 (the reference keeps one per round).
3. Policy rounds, every later round: a start round r drawn uniformly from the kept ones
   (`seeding.HPN`); the round starts from checkpoint r (`global_weights`); the network gives each
   encoded client of the round a softmax per setting over its values (a grid, `factorized`), or one
   over all candidates (random draws), and the client draws its configuration from it. After the
   round, a reward against the anchor at the same round count, r + 1 (the paper's "debiasing of
   low-fidelity evaluations"), and one REINFORCE step on -sum_i (R_i - b_i) sum_f log pi_f(a_if | e_i):
   Adam with weight decay 1e-4, the gradient's norm clipped at 10, as in the paper.
4. Deployment: each client's most likely configuration under the network (`chosen`), retrained
   from scratch by the study, as the paper's final run does.
A client not yet encoded trains with the fixed configuration, and settles on it.

The network is the reference's `DisHyperNet`: EncNet (Linear(hidden), ReLU, Linear(hidden)) and a
linear softmax head per setting, built at the first policy round. Unlike the reference its layers
have biases and no spectral normalization, and its inputs are the encodings centred on the mean of
those received by then and divided by the RMS of what is left (frozen then). The reference feeds
the raw encodings, whose values are at most (2 / D)^0.5, through 1-Lipschitz layers into fixed
heads, so its logits stay within a few tenths of each other.

Deviations in the training signal, each an option (`HPN.PAPER` is the faithful reading). Figures:
the planted two-group problem of `tests/planted_groups.py`, 60 rounds, seeds 0-7, the share of
clients given their group's best learning rate within one grid step (`tests/test_hpn.py`):
- `reward`: "aggregate" (the paper: the aggregate's validation score after the round less the
  anchor's, times the anchor's, as the reference's discrete mode does for its accuracy), or per
  client (ours) "log-ratio", log(L_i^anchor(r + 1) / L_i) of the client's validation loss after
  local training, on which clients' levels cancel, or "score", the client's validation score after
  local training less the anchor's. A client the anchor did not train at round r + 1 is compared
  with an additive model of the anchor's values, round effects plus client effects fitted by least
  squares (a client never trained: the round's effect). The aggregate credits every client with
  what all of them did: with our baseline, 0.0-1.0 (mean 0.56); log-ratio 1.0 in every seed,
  score 1.0 in six.
- `baseline`: "none" (the paper), "running" (the running mean of the rounds' mean rewards) or
  "round" (ours: the mean reward of the round's other clients; for the aggregate's reward, the
  running mean). A round's clients all start from checkpoint r, so what r and the round add to
  every reward cancels; on the planted problem that term (the anchor's r + 1 against the round's
  own trend) is up to twenty times the gap between neighbouring learning rates. With log-ratio,
  none fails one seed (0.5), running and round none.
- `clip_reward`: the paper clips the reward at 0, so without a baseline there is no negative
  signal (a bad configuration is only reinforced less); ours does not clip.
- `train_heads`: the reference hands Adam only EncNet's parameters, so its heads keep their
  initial weights; ours trains all of them.
- `policy_lr` 0.003 (the paper's 0.001): the reference trains the network on its own, for as many
  rounds as it likes. With 5 of the 20 clients a round and noise 0.3, 0.001 reaches 0.8-1.0 in 60
  rounds, 0.003 0.95-1.0, and 0.01 commits some seeds to one group's learning rate (0.0-0.5).
The paper's reading (`hpn-paper`) scores 0.0-1.0 (mean 0.46) in 60 rounds and no better in 300.

Other departures: the anchor run, the network's training and the final run are one study's
rounds, not three runs; server optimizer state and SCAFFOLD's controls are not rewound with the
checkpoints; `encoding_dim` serves every task (the reference hard-codes it per dataset); the
network sums over clients and settings where the reference averages (Adam scales the step anyway);
the reference reads the anchor's evaluation at index r - 1, here the anchor's round r + 1, the
round count the continuation reaches; its learnable `encoding` parameter, never trained there, is
the fixed encoding here; and the continuous mode (a Gaussian head) is not implemented.

The network tells clients apart by their own encodings, noise included, as well as by what they
share: with shuffled encodings the planted problem's share is 0.55-0.75 after 60 rounds, but
0.6-0.95 after 100, as it learns each client's best from its encoding alone.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedhpo_core import seeding
from fedhpo_core.registry import ROUND, Method, Options, option, register
from fedhpo_core.search.online import OnlineSearch
from fedhpo_core.search.space import client_key
from fedhpo_core.settings import ClientConfig, SettingsError
from fedhpo_core.statistics import DataEncoding
from fedhpo_core.tuners.base import Tuner
from fedhpo_core.tuners.policy import Factors
from fedhpo_core.tuners.policy import entropy as entropy_of

REWARDS, BASELINES = ("log-ratio", "score", "aggregate"), ("round", "running", "none")
NOISE = 0.1  # pFedHPO's sigma of the encodings' noise
CLIP_NORM = 10.0  # the paper's gradient clip
WEIGHT_DECAY = 1e-4  # the paper's Adam weight decay
RUNNING_DECAY = 0.9  # of the running baseline
FIT_ITERATIONS = 20  # of the anchor's additive model, for clients it did not train in a round
ENCODING = DataEncoding.name


class Policy(nn.Module):
    """The reference's `DisHyperNet`: EncNet (encoding -> hidden -> ReLU -> hidden) and a softmax
    head per setting."""

    def __init__(self, inputs: int, hidden: int, sizes: Sequence[int], generator: torch.Generator):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.heads = nn.ModuleList(nn.Linear(hidden, size) for size in sizes)
        with torch.no_grad():  # torch's default initialization, drawn from the run's seed
            for layer in (self.encoder[0], self.encoder[2], *self.heads):
                bound = layer.in_features**-0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """Each head's log-probabilities, (clients, size)."""
        hidden = self.encoder(inputs)
        return [F.log_softmax(head(hidden), dim=-1) for head in self.heads]


class HPN(Tuner):
    PAPER = {"reward": "aggregate", "baseline": "none", "clip_reward": True, "train_heads": False, "policy_lr": 1e-3}

    def __init__(
        self,
        candidates: Sequence[ClientConfig],
        values: Sequence[Mapping[str, object]],
        clients: int,
        anchor: ClientConfig,
        rounds: int,
        seed: int,
        maximize: bool = True,
        reward: str = "log-ratio",
        baseline: str = "round",
        clip_reward: bool = False,
        train_heads: bool = True,
        anchor_fraction: float = 0.2,
        checkpoints: int = 10,
        encoding_dim: int = 64,
        hidden: int = 64,
        policy_lr: float = 0.003,
        factorized: bool = True,
    ):
        """`candidates[k]` and its search-space values `values[k]`; `anchor` the study's fixed
        configuration; `rounds` the run's; `maximize` whether a larger validation score is better."""
        assert reward in REWARDS and baseline in BASELINES
        self.candidates, self.values, self.clients, self.anchor = list(candidates), list(values), clients, anchor
        self.seed, self.sign = seed, 1.0 if maximize else -1.0
        self.reward, self.baseline_kind, self.clip_reward, self.train_heads = reward, baseline, clip_reward, train_heads
        self.hidden, self.policy_lr = hidden, policy_lr
        self.factors = Factors(self.values, factorized)
        self.encoding = DataEncoding(dim=encoding_dim, seed=seed, noise=NOISE)
        self.anchor_rounds = max(1, min(rounds - 1, round(anchor_fraction * rounds)))
        last = self.anchor_rounds - 1
        spread = np.linspace(1, last, min(checkpoints, last)) if last >= 1 else np.zeros(1)
        self.kept = sorted({int(r) for r in spread.round()})  # rounds whose global model is kept
        self.checkpoint: dict[int, torch.Tensor] = {}
        self.anchor_server: dict[int, float] = {}  # round: the aggregate's validation score
        self.anchor_client: dict[int, dict[int, tuple[float, float]]] = {}  # round: {client: (score, log loss)}
        self.fits: dict[int, tuple[dict[int, float], dict[int, float]]] = {}  # metric: the anchor's additive model
        self.encodings: dict[int, torch.Tensor] = {}
        self.policy: Policy | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.trained: list[nn.Parameter] = []  # what Adam steps and the clip measures
        self.centre = self.spread = None  # the inputs' frozen normalization
        self.start: int | None = None  # this round's checkpoint r (None in the anchor run)
        self.draws: dict[int, tuple[int, ...]] = {}
        self.rewards: dict[int, float] = {}
        self.running = math.nan  # the running baseline
        self.baseline = math.nan  # the mean baseline of the last step

    @property
    def statistics(self) -> tuple[DataEncoding, ...]:
        """The encoding, while a client of the federation has not sent its own."""
        return (self.encoding,) if len(self.encodings) < self.clients else ()

    def build(self) -> None:
        """The network, at the first policy round: its inputs normalized by the encodings so far."""
        stacked = torch.stack(list(self.encodings.values()))
        self.centre = stacked.mean(0)
        self.spread = float((stacked - self.centre).square().mean().sqrt()) or 1.0
        generator = seeding.torch_generator(self.seed, seeding.HPN)
        self.policy = Policy(stacked.shape[1], self.hidden, self.factors.sizes, generator)
        self.trained = list(self.policy.parameters() if self.train_heads else self.policy.encoder.parameters())
        self.optimizer = torch.optim.Adam(self.trained, lr=self.policy_lr, weight_decay=WEIGHT_DECAY)

    def inputs(self, clients: Sequence[int]) -> torch.Tensor:
        return (torch.stack([self.encodings[c] for c in clients]) - self.centre) / self.spread

    def distributions(self, clients: Sequence[int]) -> list[np.ndarray]:
        """Per setting, the clients' probabilities of its values, (clients, size)."""
        with torch.no_grad():
            return [p.exp().numpy().astype(np.float64) for p in self.policy(self.inputs(clients))]

    def configure(self, round, clients):
        self.draws, self.start, self.rewards = {}, None, {}
        if round <= self.anchor_rounds:
            return dict.fromkeys(clients, self.anchor)
        if self.policy is None:
            self.build()
        rng = seeding.numpy_rng(self.seed, seeding.HPN, round)
        self.start = int(rng.choice(self.kept))
        encoded = [c for c in clients if c in self.encodings]
        if encoded:
            per_setting = self.distributions(encoded)
            for i, client in enumerate(encoded):
                self.draws[client] = tuple(int(rng.choice(len(p[i]), p=p[i] / p[i].sum())) for p in per_setting)
        configs = dict.fromkeys(clients, self.anchor)
        return configs | {c: self.candidates[self.factors.candidate(d)] for c, d in self.draws.items()}

    def global_weights(self, configs, weights):
        return weights if self.start is None else self.checkpoint[self.start].to(weights.device)

    def observe(self, report):
        for update in report.updates:
            if update.client not in self.encodings and ENCODING in update.statistics:
                self.encodings[update.client] = update.statistics[ENCODING].detach().float().cpu()
        if report.round <= self.anchor_rounds:
            self.record_anchor(report)
        elif self.draws and not report.diverged:
            self.rewards = self.rewards_of(report)
            if self.rewards:
                self.step(self.rewards)

    def record_anchor(self, report) -> None:
        """Step 2: the anchor's scores of the round, and its global model if the round is kept."""
        if report.round == 1 and 0 in self.kept:
            self.checkpoint[0] = report.weights_before
        if report.round in self.kept:
            self.checkpoint[report.round] = report.weights_after
        self.anchor_server[report.round] = report.val_score
        self.fits = {}
        self.anchor_client[report.round] = {
            u.client: (u.val_score, math.log(u.val_loss))
            for u in report.aggregated
            if math.isfinite(u.val_score) and math.isfinite(u.val_loss) and u.val_loss > 0
        }

    def anchor_of(self, client: int, round: int, metric: int) -> float:
        """The anchor's `metric` (0 the score, 1 the log loss) of `client` at `round`: its own, or
        else an additive model's, the round's effect plus the client's (0 for one never trained)."""
        recorded = self.anchor_client[round]
        if client in recorded:
            return recorded[client][metric]
        if not recorded:
            return math.nan
        if metric not in self.fits:
            self.fits[metric] = self.fit(metric)
        rounds, clients = self.fits[metric]
        return rounds[round] + clients.get(client, 0.0)

    def fit(self, metric: int) -> tuple[dict[int, float], dict[int, float]]:
        """The anchor's `metric` as round effects plus client effects, least squares over what it
        recorded (alternating means, from no client effects)."""
        recorded = {s: values for s, values in self.anchor_client.items() if values}
        clients: dict[int, float] = {}
        for _ in range(FIT_ITERATIONS):
            rounds = {
                s: float(np.mean([v[metric] - clients.get(c, 0.0) for c, v in values.items()]))
                for s, values in recorded.items()
            }
            residuals: dict[int, list[float]] = {}
            for s, values in recorded.items():
                for c, v in values.items():
                    residuals.setdefault(c, []).append(v[metric] - rounds[s])
            clients = {c: float(np.mean(r)) for c, r in residuals.items()}
        return rounds, clients

    def rewards_of(self, report) -> dict[int, float]:
        """Each drawing client's reward against the anchor at round r + 1."""
        target = self.start + 1
        if self.reward == "aggregate":
            anchor = self.anchor_server[target]
            reward = self.sign * (report.val_score - anchor) * (anchor if self.sign > 0 else 1.0)
            rewards = dict.fromkeys(self.draws, reward) if math.isfinite(reward) else {}
        else:
            rewards = {}
            for u in report.aggregated:
                if u.client not in self.draws:
                    continue
                if self.reward == "log-ratio" and u.val_loss > 0:
                    rewards[u.client] = self.anchor_of(u.client, target, 1) - math.log(u.val_loss)
                elif self.reward == "score":
                    rewards[u.client] = self.sign * (u.val_score - self.anchor_of(u.client, target, 0))
            rewards = {c: r for c, r in rewards.items() if math.isfinite(r)}
        return {c: max(r, 0.0) for c, r in rewards.items()} if self.clip_reward else rewards

    def baselines(self, rewards: Mapping[int, float]) -> dict[int, float]:
        """b_i: none, the running mean of the rounds' mean rewards (before this round's), or the
        mean of the round's other clients' rewards (the running mean for a client alone, and for the
        aggregate's reward, which is every client's)."""
        mean = float(np.mean(list(rewards.values())))
        running = 0.0 if math.isnan(self.running) else self.running
        self.running = mean if math.isnan(self.running) else RUNNING_DECAY * self.running + (1 - RUNNING_DECAY) * mean
        if self.baseline_kind == "none":
            return dict.fromkeys(rewards, 0.0)
        if self.baseline_kind == "running" or self.reward == "aggregate" or len(rewards) < 2:
            return dict.fromkeys(rewards, running)
        total, n = sum(rewards.values()), len(rewards)
        return {c: (total - r) / (n - 1) for c, r in rewards.items()}

    def step(self, rewards: Mapping[int, float]) -> None:
        """Step 3's REINFORCE update: -sum_i (R_i - b_i) log pi(a_i | e_i), one clipped Adam step."""
        baselines = self.baselines(rewards)
        self.baseline = float(np.mean(list(baselines.values())))
        clients = list(rewards)
        advantages = torch.tensor([rewards[c] - baselines[c] for c in clients])
        log_pi = sum(
            p.gather(1, torch.tensor([[self.draws[c][f]] for c in clients])).squeeze(1)
            for f, p in enumerate(self.policy(self.inputs(clients)))
        )
        self.optimizer.zero_grad()
        (-(advantages * log_pi).sum()).backward()
        nn.utils.clip_grad_norm_(self.trained, CLIP_NORM)
        self.optimizer.step()

    def most_likely(self) -> dict[int, int]:
        """Every encoded client's most likely candidate under the network."""
        if self.policy is None or not self.encodings:
            return {}
        encoded = sorted(self.encodings)
        per_setting = self.distributions(encoded)
        return {
            c: self.factors.candidate(tuple(int(np.argmax(p[i])) for p in per_setting)) for i, c in enumerate(encoded)
        }

    def state(self):
        """The mean entropy of the clients' distributions (summed over the settings), the start round r,
        the last round's mean reward and baseline."""
        entropy = math.nan
        if self.policy is not None:
            per_setting = self.distributions(sorted(self.encodings))
            entropy = float(sum(np.mean([entropy_of(row) for row in p]) for p in per_setting))
        reward = float(np.mean(list(self.rewards.values()))) if self.rewards else math.nan
        start = math.nan if self.start is None else float(self.start)
        return {"hpn/entropy": entropy, "hpn/start_round": start, "hpn/reward": reward, "hpn/baseline": self.baseline}

    def client_state(self):
        """The last round's reward of each client it rewarded."""
        return {c: {"hpn/reward": r} for c, r in self.rewards.items()}

    def chosen(self):
        """Every client's most likely configuration (the paper's deployment); a client never
        encoded keeps the fixed configuration."""
        best = self.most_likely()
        fixed = {name: getattr(self.anchor, name) for name in (self.values[0] if self.values else {})}
        return {
            client_key(name, c): value
            for c in range(self.clients)
            for name, value in (self.values[best[c]] if c in best else fixed).items()
        }


@dataclass(frozen=True)
class HPNOptions(Options):
    reward: str = option(
        "log-ratio",
        "hpn: a client's own log-ratio of the anchor's val loss to its own, or its val score less the anchor's "
        "(score), or the aggregate's val score less the anchor's (aggregate, the paper)",
        REWARDS,
    )
    baseline: str = option(
        "round", "hpn: none (the paper), running (mean of past rounds' rewards) or round (the round's other clients)"
    )
    clip_reward: bool = option(False, "hpn: clip rewards at 0 (the paper)")
    train_heads: bool = option(True, "hpn: Adam trains the heads too (false: the reference's, the encoder only)")
    anchor_fraction: float = option(0.2, "hpn: the share of the budget's rounds the anchor run takes", low=0.0)
    checkpoints: int = option(10, "hpn: anchor rounds whose global model is kept to start policy rounds from", low=1)
    encoding_dim: int = option(64, "hpn: random features of the clients' data encodings", low=1)
    hidden: int = option(64, "hpn: hidden units of the network over the encodings", low=1)
    policy_lr: float = option(0.003, "hpn: Adam's step size on the network (the paper's 0.001)", low=0.0)
    factorized: bool = option(True, "hpn: a softmax head per setting of a grid (false: one over all candidates)")

    def __post_init__(self):
        super().__post_init__()
        if self.baseline not in BASELINES:
            raise SettingsError(f"hpn's baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.anchor_fraction >= 1:
            raise SettingsError(f"option anchor_fraction must be < 1, got {self.anchor_fraction}")


class HPNSearch(OnlineSearch):
    """pFedHPO's HPN over the candidate configurations of the space's client settings: one run of
    the budget's rounds, anchor then policy rounds; the clients' most likely configurations retrained."""

    statistics = (DataEncoding(noise=NOISE),)  # the tuner's own carries the run's seed and dimension

    def tuner(self, context, configs, values):
        data = context.data
        return HPN(
            configs,
            values,
            len(data.clients),
            context.fixed.client_config,
            context.budget.total,
            context.seed,
            maximize=data.spec.score.maximize,
            **asdict(self.options),
        )


register(
    Method(
        "hpn",
        ROUND,
        "Cheng et al., arXiv 2304.05195 (pFedHPO; reference FederatedScope autotune/pfedhpo)",
        "a network from each client's data encoding to its configuration, trained on anchor checkpoints",
        HPNSearch,
        HPNOptions,
    )
)
register(
    Method(
        "hpn-paper",
        ROUND,
        "pFedHPO's HPN as the paper and its reference code train it",
        "hpn with the aggregate's reward clipped at 0, no baseline, only the encoder trained, lr 0.001",
        HPNSearch,
        HPNOptions,
        defaults=HPN.PAPER,
    )
)
