"""FTS: Dai, Low & Jaillet, "Federated Bayesian Optimization via Thompson Sampling", NeurIPS 2020
(reference code daizhongxiang/Federated_Bayesian_Optimization; FederatedScope's port
`federatedscope/autotune/fts`; notes in `../shared/papers/personalized-fidelity-compression-notes.md`,
section 1a).

Every client of the federation is an agent tuning its own configuration over the study's candidates
(the grid of the space's client settings, or draws from it). A candidate is a point x of [0, 1]^d:
each setting's range linearly, or in log10 where the distribution is log-scaled; a categorical by
its index among its choices (sorted where they are numbers).

The paper's algorithm (Algorithm 1), for each of a round's clients at its iteration t (the rounds it
has observed + 1):
1. random Fourier features, drawn once from the run's seed and shared by every agent:
   phi(x) = sqrt(2 / M) cos(S x + b), S ~ N(0, I / l^2), b ~ U(0, 2 pi), so that phi(x)^T phi(x')
   approximates the SE kernel exp(-|x - x'|^2 / (2 l^2)). phi is not renormalized: the reference and
   FederatedScope divide it by |phi(x)|, which changes the kernel when M is small;
2. with probability p_t = 1 - 1/t^2 (p_1 := p_2, as the reference sets pt[0] = pt[1]), Thompson
   sampling on the agent's own observations: fresh features (M_target) with its own GP's lengthscale,
   a posterior sample omega of their weights, the candidate maximizing phi(x)^T omega;
3. otherwise an agent n drawn uniformly among the others that have sent a sample, and the candidate
   maximizing phi(x)^T omega_n under the shared features;
4. after the round each agent appends (x, y) to its observations and sends a posterior sample of the
   shared features' weights, omega_n ~ N(nu, s^2 Sigma^-1), Sigma = Phi^T Phi + s^2 I,
   nu = Sigma^-1 Phi^T y, Phi its observations' features: M floats (`PosteriorSample`).

Deviations, each named (`FTS.PAPER`, method "fts-paper", is the faithful reading where one exists):
- The objective: the federated model's, not an isolated local model's (FederatedScope trains a fresh
  model for 50 epochs per evaluation, which tunes local training alone). A client's y for a round is
  -log(after / before) of its validation loss around its local training from the round's global model
  (`VAL_LOSS_BEFORE`, `VAL_LOSS_AFTER`: FedEx's log-ratio signal).
- Its scale: the reference fits raw values (GPy fits the target's kernel variance; the shared samples
  take variance 1). Here the kernel's variance is 1 and the signals are scaled to it: `centre` (ours)
  subtracts the round's mean over its clients, since the objective drifts as the global model
  improves, and divides by the spread of every agent's centred signals so far, a zero shared by all
  agents, so an agent's first observations already say which candidates beat their round; without it
  (the paper's reading) an agent's signals are standardized by their own mean and spread.
- Sent every round, not once: the paper's other agents have finished their BO when the target starts,
  and send one omega_n; here every agent runs at once, so each round's participants send a fresh
  sample of their posterior. An agent's observations are configurations the server assigned and
  losses it received, so the tuner draws omega_n in the agent's name, from the agent's own stream
  (`seeding.FTS`), as the server keeps SCAFFOLD's c_i: `PosteriorSample` is not computed by the
  client engines (`on_client = False`), its M floats are charged to the round's bytes all the same.
- The argmax is over the study's candidates (its grid, or its draws), not over 10,000 uniform points
  refined by DIRECT; a candidate may be chosen again (the objective is noisy), where the reference
  replaces a repeated point by a random one.
- An agent's own GP: lengthscale and noise by marginal likelihood over small grids (`fit_gp`; the
  reference optimizes them with GPy's restarts), or the shared `lengthscale` and `noise`; computed on
  the observations grouped by candidate, which is exact and costs O(candidates^3), not O(rounds^3).
  The shared samples use `noise` (the reference's, 1e-6, in "fts-paper").
- The round's clients are any sample of the federation (FederatedScope's server asserts all take part).
- `decay` (ours; 2, the paper's, by default): p_t = 1 - 1/t^decay. On the planted transfer check of
  `tests/test_fts.py` decay 1 borrows for longer: lower regret when the others share the target's
  optimum, and a higher one when they do not.

What a client settles on (`choice`): "mean" (ours), the candidate maximizing its own GP's posterior
mean, or "best" (the reference's incumbent), its best observed candidate: with noisy signals the
best observation is mostly the luckiest one. A client without observations settles on the candidate
maximizing the mean of the samples the agents sent (what FTS would borrow).
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import optuna

from fedhpo_core import seeding
from fedhpo_core.registry import ROUND, Method, Options, option, register
from fedhpo_core.search.online import OnlineSearch, fixed_values
from fedhpo_core.search.space import client_key, setting_of
from fedhpo_core.settings import ClientConfig
from fedhpo_core.statistics import VAL_LOSS_AFTER, VAL_LOSS_BEFORE, Statistic
from fedhpo_core.tuners.base import Tuner

CHOICES = ("mean", "best")
LENGTHSCALES = (0.05, 0.1, 0.2, 0.4, 0.8)  # an agent's own GP, in the unit box (`fit_gp`)
NOISES = (0.01, 0.1, 0.5)  # its noise variance, the signals standardized (`fit_gp`)
SHARED, COIN, THOMPSON, SAMPLE = range(4)  # sub-streams of seeding.FTS


@dataclass(frozen=True)
class PosteriorSample(Statistic):
    """omega_n, an agent's posterior sample of the shared features' weights: M floats a client sends
    each round it takes part in. The server holds what it is drawn from (the configurations it
    assigned, the losses it received), so the tuner draws it in the client's name (`on_client`)."""

    features: int = 100

    name = "fts_posterior_sample"
    on_client = False

    def floats(self, spec, data):
        return self.features


class RandomFeatures:
    """phi(x) = sqrt(2 / M) cos(S x + b) with S ~ N(0, I / l^2) and b ~ U(0, 2 pi): E[phi(x)^T phi(x')]
    is the SE kernel of lengthscale l (Rahimi & Recht 2007)."""

    def __init__(self, dim: int, count: int, lengthscale: float, rng: np.random.Generator):
        self.frequencies = rng.normal(0.0, 1.0 / lengthscale, (count, dim))  # S
        self.offsets = rng.uniform(0.0, 2 * math.pi, count)  # b

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """phi of each row of x, (n, M)."""
        return math.sqrt(2 / len(self.offsets)) * np.cos(x @ self.frequencies.T + self.offsets)


def weight_sample(phi: np.ndarray, y: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """omega ~ N(nu, s^2 Sigma^-1), Sigma = Phi^T Phi + s^2 I, nu = Sigma^-1 Phi^T y: a posterior sample
    of the weights of Bayesian linear regression on the features, prior N(0, I) (no observations: a
    draw of the prior GP). Drawn by pathwise conditioning, omega = w + Sigma^-1 Phi^T (y - Phi w - s e)
    with w ~ N(0, I_M), e ~ N(0, I_n), which is exact; Sigma^-1 Phi^T = Phi^T (Phi Phi^T + s^2 I)^-1
    lets the solve be of the smaller of the n observations and the M features."""
    count, observed = phi.shape[1], phi.shape[0]
    prior = rng.standard_normal(count)
    residual = y - phi @ prior - math.sqrt(noise) * rng.standard_normal(observed)
    if observed < count:
        return prior + phi.T @ np.linalg.solve(phi @ phi.T + noise * np.eye(observed), residual)
    return prior + np.linalg.solve(phi.T @ phi + noise * np.eye(count), phi.T @ residual)


def se_kernel(a: np.ndarray, b: np.ndarray, lengthscale: float) -> np.ndarray:
    squared = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return np.exp(-squared / (2 * lengthscale**2))


def by_candidate(indices: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Observations grouped by candidate: the distinct candidates, the mean signal and the count at
    each, and the sum of squared deviations from those means. A GP on the means with noise s^2 / count
    has the posterior of the GP on every observation, at O(candidates^3) however many rounds."""
    candidates, inverse, counts = np.unique(indices, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=y) / counts
    return candidates, means, counts, float(((y - means[inverse]) ** 2).sum())


def log_evidence(
    x: np.ndarray, means: np.ndarray, counts: np.ndarray, spread: float, lengthscale: float, noise: float
) -> float:
    """log p(y) of every observation under a GP with the SE kernel (variance 1) and noise s^2, from
    the observations grouped by point (`by_candidate`): log N(means; 0, K + s^2 diag(1 / counts)) plus
    the deviations' own likelihood, -spread / (2 s^2) - (n - m) / 2 log(2 pi s^2) - 1/2 sum log counts."""
    cholesky = np.linalg.cholesky(se_kernel(x, x, lengthscale) + np.diag(noise / counts))
    alpha = np.linalg.solve(cholesky, means)
    grouped = -0.5 * alpha @ alpha - np.log(np.diag(cholesky)).sum() - 0.5 * len(means) * math.log(2 * math.pi)
    within = counts.sum() - len(means)
    return float(
        grouped - 0.5 * spread / noise - 0.5 * within * math.log(2 * math.pi * noise) - 0.5 * np.log(counts).sum()
    )


def posterior_mean(
    x: np.ndarray, means: np.ndarray, counts: np.ndarray, points: np.ndarray, lengthscale: float, noise: float
) -> np.ndarray:
    """The GP's posterior mean at each point, from the observations grouped by point."""
    gram = se_kernel(x, x, lengthscale) + np.diag(noise / counts)
    return se_kernel(points, x, lengthscale) @ np.linalg.solve(gram, means)


def schedule(t: int, decay: float = 2.0) -> float:
    """p_t = 1 - 1/t^decay, the probability of an agent's own Thompson sample at its iteration t (from
    1), with p_1 := p_2 (the reference's pt[0] = pt[1]); decay 2 is the paper's."""
    return 1 - max(t, 2) ** -decay


def coordinates(
    values: Sequence[Mapping[str, object]], parameters: Mapping[str, optuna.distributions.BaseDistribution]
) -> np.ndarray:
    """Each candidate as a point of [0, 1]^d, (H, d): a range linearly or in log10 where log-scaled; a
    categorical (or a setting without a distribution) by index among its choices, sorted where they
    are numbers."""
    names = list(values[0]) if values else []
    columns = []
    for name in names:
        column = [v[name] for v in values]
        distribution = parameters.get(name)
        if distribution is None or isinstance(distribution, optuna.distributions.CategoricalDistribution):
            choices = list(distribution.choices) if distribution is not None else list(dict.fromkeys(column))
            if all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices):
                choices = sorted(choices)
            columns.append([choices.index(v) / max(len(choices) - 1, 1) for v in column])
            continue
        scale = math.log10 if distribution.log else float
        low, high = scale(distribution.low), scale(distribution.high)
        columns.append([(scale(v) - low) / (high - low) if high > low else 0.5 for v in column])
    return np.array(columns, dtype=float).T.reshape(len(values), len(names))


class FTS(Tuner):
    PAPER = {"noise": 1e-6, "centre": False, "choice": "best"}

    def __init__(
        self,
        candidates: Sequence[ClientConfig],
        values: Sequence[Mapping[str, object]],
        points: np.ndarray,
        clients: int,
        seed: int,
        features: int = 100,
        target_features: int = 200,
        lengthscale: float = 0.2,
        noise: float = 0.1,
        fit_gp: bool = True,
        centre: bool = True,
        choice: str = "mean",
        decay: float = 2.0,
        fixed: Mapping[str, object] | None = None,
    ):
        """`candidates[k]` is configuration k, `values[k]` its search-space values (for `chosen`),
        `points[k]` its coordinates in the unit box (`coordinates`); `fixed` the study's fixed values
        of the tuned settings (what a client settles on when no agent has observed anything)."""
        assert choice in CHOICES
        self.candidates, self.values, self.points = list(candidates), list(values), np.asarray(points, dtype=float)
        self.clients, self.seed, self.target_features = clients, seed, target_features
        self.lengthscale, self.noise, self.fit_gp, self.centre, self.choice = lengthscale, noise, fit_gp, centre, choice
        self.decay = decay
        self.statistics = (VAL_LOSS_BEFORE, VAL_LOSS_AFTER, PosteriorSample(features))
        dim = self.points.shape[1]
        self.shared = RandomFeatures(dim, features, lengthscale, seeding.numpy_rng(seed, seeding.FTS, SHARED))
        self.shared_phi = self.shared(self.points)  # (H, M)
        matches = [k for k, v in enumerate(self.values) if all((fixed or {}).get(n) == x for n, x in v.items())]
        self.default = matches[0] if matches else 0
        self.observed: list[list[tuple[int, float]]] = [[] for _ in range(clients)]  # (candidate, signal y)
        # The rounds each agent has observed, t - 1; observations given before its first round (the
        # reference's initial points) are not iterations.
        self.iterations = [0] * clients
        self.omegas: dict[int, np.ndarray] = {}  # the latest sample each agent sent
        self.draws: dict[int, int] = {}  # the round's candidate of each client
        self.sources: dict[int, int] = {}  # the agent whose sample chose it; the client itself for its own
        self.p: dict[int, float] = {}  # the round's p_t of each client
        self.signals: dict[int, float] = {}  # the round's raw signals

    def signals_of(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """The agent's observations: their candidates (n,) and signals standardized (n,): by the spread
        of every agent's centred signals (`centre`), or by the agent's own mean and spread."""
        indices = np.array([k for k, _ in self.observed[client]], dtype=int)
        y = np.array([s for _, s in self.observed[client]], dtype=float)
        if self.centre:
            spread = np.std([s for agent in self.observed for _, s in agent]) if any(self.observed) else 0.0
            return indices, y / spread if spread > 1e-12 else y
        y = y - y.mean() if len(y) else y
        spread = y.std() if len(y) > 1 else 0.0
        return indices, y / spread if spread > 1e-12 else y

    def hyperparameters(self, client: int) -> tuple[float, float]:
        """The agent's GP lengthscale and noise: the marginal likelihood's best over the grids (`fit_gp`,
        from two observations), else the shared ones."""
        indices, y = self.signals_of(client)
        if not self.fit_gp or len(y) < 2:
            return self.lengthscale, self.noise
        candidates, means, counts, spread = by_candidate(indices, y)
        grid = [(length, noise) for length in LENGTHSCALES for noise in NOISES]
        return max(grid, key=lambda h: log_evidence(self.points[candidates], means, counts, spread, *h))

    def thompson(self, client: int, round: int) -> int:
        """Step 2: the candidate maximizing a posterior sample of the agent's own GP, under fresh features."""
        rng = seeding.numpy_rng(self.seed, seeding.FTS, THOMPSON, round, client)
        indices, y = self.signals_of(client)
        lengthscale, noise = self.hyperparameters(client)
        features = RandomFeatures(self.points.shape[1], self.target_features, lengthscale, rng)
        phi = features(self.points)
        return int(np.argmax(phi @ weight_sample(phi[indices], y, noise, rng)))

    def choose(self, client: int, round: int) -> tuple[int, int]:
        """Steps 2-3: the client's candidate this round, and whose sample chose it."""
        rng = seeding.numpy_rng(self.seed, seeding.FTS, COIN, round, client)
        others = [n for n in sorted(self.omegas) if n != client]
        self.p[client] = schedule(self.iterations[client] + 1, self.decay)
        if others and rng.random() >= self.p[client]:
            agent = others[int(rng.integers(len(others)))]
            return int(np.argmax(self.shared_phi @ self.omegas[agent])), agent
        return self.thompson(client, round), client

    def configure(self, round, clients):
        chosen = {c: self.choose(c, round) for c in clients}
        self.draws = {c: k for c, (k, _) in chosen.items()}
        self.sources = {c: agent for c, (_, agent) in chosen.items()}
        return {c: self.candidates[k] for c, k in self.draws.items()}

    def sample(self, client: int, round: int) -> np.ndarray:
        """Step 4: omega_n, drawn from the agent's own stream."""
        rng = seeding.numpy_rng(self.seed, seeding.FTS, SAMPLE, round, client)
        indices, y = self.signals_of(client)
        return weight_sample(self.shared_phi[indices], y, self.noise, rng)

    def observe(self, report):
        """Each client's signal y = -log(after / before), less the round's mean (`centre`), appended to
        its observations; then every client that uploaded sends a fresh sample."""
        self.signals = {}
        for update in report.updates:
            before, after = update.statistics.get(VAL_LOSS_BEFORE.name), update.val_loss
            if update.client in self.draws and before and math.isfinite(before) and math.isfinite(after):
                self.signals[update.client] = -math.log(max(after, 1e-12) / before)
        mean = float(np.mean(list(self.signals.values()))) if self.centre and len(self.signals) > 1 else 0.0
        for client, signal in self.signals.items():
            self.observed[client].append((self.draws[client], signal - mean))
            self.iterations[client] += 1
        for update in report.updates:
            self.omegas[update.client] = self.sample(update.client, report.round)

    def state(self):
        """The fraction of the round's choices borrowed from other agents, the mean p_t of its
        clients, the agents that have sent a sample, the mean signal of the round."""
        borrowed = [self.sources[c] != c for c in self.draws]
        p = [self.p[c] for c in self.draws]
        return {
            "fts/from_others": float(np.mean(borrowed)) if borrowed else 0.0,
            "fts/p_t": float(np.mean(p)) if p else 1.0,
            "fts/agents_sent": float(len(self.omegas)),
            "fts/signal_mean": float(np.mean(list(self.signals.values()))) if self.signals else math.nan,
        }

    def client_state(self):
        """The round's clients: whose sample chose their candidate (their own id for their own GP),
        the candidate, their signal."""
        return {
            c: {
                "fts/source": float(self.sources[c]),
                "fts/candidate": float(k),
                "fts/signal": self.signals.get(c, math.nan),
            }
            for c, k in self.draws.items()
        }

    def settled(self, client: int) -> int:
        """The candidate the client settles on (`choice`)."""
        observed = self.observed[client]
        if observed and self.choice == "best":
            return max(observed, key=lambda o: o[1])[0]
        if observed:
            candidates, means, counts, _ = by_candidate(*self.signals_of(client))
            mean = posterior_mean(self.points[candidates], means, counts, self.points, *self.hyperparameters(client))
            return int(np.argmax(mean))
        if self.omegas:
            return int(np.argmax(self.shared_phi @ np.mean(list(self.omegas.values()), axis=0)))
        return self.default

    def chosen(self):
        """Every client's configuration, as per-client values."""
        return {
            client_key(name, c): value
            for c in range(self.clients)
            for name, value in self.values[self.settled(c)].items()
        }


@dataclass(frozen=True)
class FTSOptions(Options):
    features: int = option(100, "fts: M, the random features every agent shares (a sample is M floats)", low=1)
    target_features: int = option(200, "fts: M_target, the fresh random features of an agent's own sample", low=1)
    lengthscale: float = option(0.2, "fts: the shared features' SE lengthscale, in the candidates' unit box", low=1e-6)
    noise: float = option(0.1, "fts: the noise variance of the standardized signals in the shared samples", low=1e-12)
    fit_gp: bool = option(True, "fts: an agent's own GP lengthscale and noise by marginal likelihood (false: shared)")
    centre: bool = option(True, "fts: a signal less its round's mean (false: the paper's, standardized per agent)")
    choice: str = option("mean", "fts: a client settles on its GP's best mean, or its best observed (best)", CHOICES)
    decay: float = option(
        2.0, "fts: p_t = 1 - 1/t^decay, the chance of an agent's own sample (2: the paper's)", low=0.0
    )


class FTSSearch(OnlineSearch):
    """FTS (`fedhpo_core.tuners.fts`): a configuration per client, each client an agent."""

    statistics = (VAL_LOSS_BEFORE, VAL_LOSS_AFTER, PosteriorSample())

    def tuner(self, context, configs, values):
        parameters = {setting_of(n): d for n, d in context.parameters.items()}
        return FTS(
            configs,
            values,
            coordinates(values, parameters),
            len(context.data.clients),
            context.seed,
            fixed=fixed_values(context, values),
            **asdict(self.options),
        )


register(
    Method(
        "fts",
        ROUND,
        "Dai, Low & Jaillet, NeurIPS 2020 (reference daizhongxiang/Federated_Bayesian_Optimization)",
        "each client a Thompson-sampling agent that borrows other clients' random-feature posterior samples",
        FTSSearch,
        FTSOptions,
    )
)
register(
    Method(
        "fts-paper",
        ROUND,
        "FTS as its reference code runs it",
        "fts with the paper's objective (standardized per agent), its incumbent, and near-noiseless samples",
        FTSSearch,
        FTSOptions,
        defaults=FTS.PAPER,
    )
)
