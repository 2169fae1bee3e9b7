"""Clustered hyperparameter experts with a router: a mixture of FedEx tuners, one per group of clients.

Where the idea comes from: the "mixture of experts" of personalized federated HPO ("train different
global hyperparameter experts and learn a router to assign clients",
../shared/papers/fedhpo-methods-overview.txt). No public implementation exists
(../shared/papers/personalized-fidelity-compression-notes.md, section 5); this is the minimal build
those notes sketch after IFCA (Ghosh et al., "An Efficient Framework for Clustered Federated
Learning", NeurIPS 2020), whose clients each round join the cluster whose model fits them best.
Here a cluster holds a hyperparameter tuner, not a model: every client trains the one global model.

The algorithm, round by round:
1. Grouping (`grouping`). "encoding": every client uploads its data encoding (`DataEncoding`,
   pFedHPO's noisy random-feature mean embedding, sent until the server holds every client's);
   once `min(clients, 2 k)` clients have sent theirs, k-means (k = `experts`, seeded) splits them,
   and a client first seen later joins the expert of the nearest centroid once its encoding
   arrives. "preference": for `warmup` rounds one shared expert configures everyone; then k-means
   splits the clients by their revealed preferences: per value of each setting, the client's mean
   residual (below) when it trained with that value, less the value's mean over all clients and
   the client's own mean, shrunk towards 0 by one pseudo-draw. A client not yet grouped is in
   expert 0.
2. Experts: one `FedEx` per group over the same candidates and with the fedex method's options.
   Each configures its own members and observes the round's report restricted to them, so its
   distribution moves only by what its members' updates say.
3. Router, every `route_every` rounds (0: never). Every round, each client with a finite signal s
   (the experts' `signal`, by default log(val loss after / before)) records its residual
   r = s - (the round's mean s over its clients, weighted by validation samples) against the
   values it trained with: the round's mean takes out what training does to everyone that round,
   and comparing a client with itself takes out its own level, so one client's residuals are
   comparable across rounds and experts. In a routing round a seeded fraction `probe` of the
   round's clients train with another expert's configuration (its `chosen()`: of the experts
   settled on another configuration than the client's own expert, the one whose configuration it
   has trained with least, ties at random); no expert learns from a probe. After that round each
   client is moved to the expert whose configuration its own residuals rate best: against its own
   expert h, expert e gains sum_f (mean r at h's value of setting f - mean r at e's value) over
   the settings f where their configurations differ; the client moves to the e of the largest gain
   above one standard error, sigma sqrt(sum_f 1/n_fh + 1/n_fe), where it has at least one
   residual at each of those values (n: its rounds with the value; sigma: the standard deviation
   of a client's residuals with one value, pooled over clients, settings and values). IFCA's
   "join the cluster that fits you best", the fit measured by the client's own outcomes under each
   expert's configuration, from every round in which it trained with those values (its own
   expert's draws, earlier experts', probes), not by a cluster model's loss. The means cover the
   whole run: where a setting's best value drifts as training goes on, old rounds still count.
4. What it settles on (`chosen`): every client's configuration is its expert's `FedEx.chosen()`, as
   per-client values.

What is ours: the whole build (the notes' sketch made concrete): the residual, the router's rating
of an expert's configuration by the client's own residuals with its values and its one-standard-error
margin, probes of another expert's configuration on routing rounds, kept out of the experts, the
preference vectors as a two-way model of clients and values, and expert 0 seeded as FedEx under the
run's seed, so that one expert is plain FedEx draw for draw.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from fedhpo_core import seeding
from fedhpo_core.registry import ROUND, Method, Options, option, register
from fedhpo_core.search.online import OnlineSearch, fixed_values
from fedhpo_core.search.space import client_key
from fedhpo_core.settings import ClientConfig, SettingsError
from fedhpo_core.statistics import DataEncoding
from fedhpo_core.tuners.base import Tuner
from fedhpo_core.tuners.fedex import BASELINES, SCHEDULES, SIGNALS, FedEx
from fedhpo_core.tuners.policy import Factors

GROUPINGS = ("encoding", "preference")
ENCODING = DataEncoding(dim=64, seed=0, noise=0.1)  # pFedHPO's sigma 0.1
PRIOR = 1.0  # pseudo-draws shrinking a client's preference for a value towards none
KMEANS_STARTS = 10


def kmeans(points: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and centroids of k-means on `points` (rows), the best of `KMEANS_STARTS` seeded starts."""
    from sklearn.cluster import KMeans

    fitted = KMeans(n_clusters=k, n_init=KMEANS_STARTS, random_state=seed).fit(points)
    return fitted.labels_.astype(int), fitted.cluster_centers_


class ClusteredExperts(Tuner):
    """k FedEx experts, each configuring its group of clients, and a router moving clients between
    them (the module's steps 1-4); `expert(e)` makes expert e."""

    def __init__(
        self,
        configs: Sequence[ClientConfig],
        values: Sequence[Mapping[str, object]],
        clients: int,
        seed: int,
        grouping: str = "encoding",
        experts: int = 2,
        route_every: int = 5,
        probe: float = 0.25,
        warmup: int = 10,
        signal: str = "log-ratio",
        baseline: str = "fitted",
        schedule: str = "auto",
        factorized: bool = True,
        fixed: Mapping[str, object] | None = None,
    ):
        """`clients` is the federation's size (`chosen` gives each its configuration); the FedEx
        options and `fixed` are every expert's (`FedEx`)."""
        assert grouping in GROUPINGS and experts >= 1 and 0.0 <= probe <= 1.0
        self.configs, self.values, self.clients, self.seed = list(configs), list(values), clients, seed
        self.grouping, self.k = grouping, min(experts, clients)
        self.route_every, self.probe, self.warmup = route_every, probe, warmup
        self.fedex_options = {
            "signal": signal,
            "baseline": baseline,
            "schedule": schedule,
            "factorized": factorized,
            "fixed": fixed,
        }
        self.factors = Factors(self.values, factorized)
        encoded = grouping == "encoding" and self.k > 1
        self.statistics = (*FedEx.statistics, ENCODING) if encoded else FedEx.statistics
        # One expert until the clients are grouped; by encoding, all k from the start.
        self.experts: list[FedEx] = [self.expert(e) for e in range(self.k if encoded else 1)]
        self.grouped = self.k == 1
        self.assignment: dict[int, int] = {}  # client -> its expert; absent: expert 0
        self.encodings: dict[int, np.ndarray] = {}
        self.centroids: np.ndarray | None = None
        # client -> per setting, per value: the count, sum and sum of squares of its residuals
        self.counts: dict[int, list[np.ndarray]] = {}
        self.sums: dict[int, list[np.ndarray]] = {}
        self.squares: dict[int, list[np.ndarray]] = {}
        self.probing: dict[int, int] = {}  # this round's probing clients -> the expert they probe
        self.draws: dict[int, tuple[int, ...]] = {}  # this round's draw of every client, probes too
        self.moves = 0

    def expert(self, index: int) -> FedEx:
        """A fresh FedEx for expert `index`: expert 0 draws as FedEx under the run's seed would."""
        seed = self.seed if index == 0 else seeding.torch_seed(self.seed, seeding.CLUSTERED, 1, index)
        return FedEx(self.configs, self.values, seed, **self.fedex_options)

    def expert_of(self, client: int) -> int:
        return self.assignment.get(client, 0)

    def settled(self) -> list[tuple[int, ...]]:
        """Each expert's configuration (`FedEx.chosen`), as a draw: a value index per setting."""
        return [tuple(self.factors.draw_of_values(expert.chosen())) for expert in self.experts]

    def routing(self, round: int) -> bool:
        return self.grouped and len(self.experts) > 1 and self.route_every > 0 and round % self.route_every == 0

    def configure(self, round, clients):
        self.probing = self.probes(round, clients) if self.routing(round) and self.probe > 0 else {}
        configs, self.draws = {}, {}
        for e, expert in enumerate(self.experts):
            members = [c for c in clients if c not in self.probing and self.expert_of(c) == e]
            if members:
                configs.update(expert.configure(round, members))
                self.draws.update({c: expert.draws[c] for c in members})
        if self.probing:
            settled = self.settled()
            for client, e in self.probing.items():
                self.draws[client] = settled[e]
                configs[client] = self.configs[self.factors.candidate(settled[e])]
        return {c: configs[c] for c in clients}

    def probes(self, round: int, clients: Sequence[int]) -> dict[int, int]:
        """A seeded `probe` fraction of the round's clients, each with the expert it tries: among
        those settled on another configuration than its own expert, the one whose configuration it
        has trained with least, ties at random."""
        rng = seeding.numpy_rng(self.seed, seeding.CLUSTERED, 2, round)
        picked = rng.permutation(np.asarray(clients))[: int(math.floor(self.probe * len(clients) + 0.5))]
        settled, probing = self.settled(), {}
        for client in sorted(int(c) for c in picked):
            home = settled[self.expert_of(client)]
            others = [e for e, draw in enumerate(settled) if draw != home]
            if others:
                tried = [min(self.count(client, f, j) for f, j in enumerate(settled[e])) for e in others]
                least = [e for e, n in zip(others, tried, strict=True) if n == min(tried)]
                probing[client] = least[int(rng.integers(len(least)))]
        return probing

    def count(self, client: int, factor: int, value: int) -> int:
        return int(self.counts[client][factor][value]) if client in self.counts else 0

    def observe(self, report):
        self.moves = 0
        for e, expert in enumerate(self.experts):
            members = tuple(u for u in report.updates if u.client not in self.probing and self.expert_of(u.client) == e)
            if members:
                configs = {u.client: report.configs[u.client] for u in members}
                expert.observe(replace(report, updates=members, configs=configs))
        for client, residual in self.residuals(report.updates).items():
            self.record(client, self.draws[client], residual)
        if self.grouping == "encoding" and self.k > 1:
            self.group_by_encoding(report.updates)
        elif not self.grouped and report.round >= self.warmup:
            self.group_by_preference()
        if self.routing(report.round):
            self.route()

    def signal_of(self, update) -> float:
        """The experts' signal of an update (lower is better)."""
        return self.experts[0].signal_of(update)

    def residuals(self, updates) -> dict[int, float]:
        """Each scored client's signal less the round's mean (weighted by validation samples)."""
        scored = [u for u in self.experts[0].scored(updates) if u.client in self.draws]
        if len(scored) < 2:
            return {}
        signals = {u.client: self.signal_of(u) for u in scored}
        total = sum(u.num_val for u in scored)
        mean = sum(u.num_val * signals[u.client] for u in scored) / total
        return {c: s - mean for c, s in signals.items()}

    def record(self, client: int, draw: Sequence[int], residual: float) -> None:
        for table, value in ((self.counts, 1.0), (self.sums, residual), (self.squares, residual**2)):
            rows = table.setdefault(client, [np.zeros(size) for size in self.factors.sizes])
            for f, j in enumerate(draw):
                rows[f][j] += value

    def preferences(self, clients: Sequence[int]) -> np.ndarray:
        """Each client's revealed preference, one row: per value of each setting its mean residual
        with that value, less the value's mean over the clients and the client's own mean, shrunk
        towards 0 by `PRIOR` pseudo-draws (a value it hardly drew says little)."""
        rows = []
        for f in range(len(self.factors.sizes)):
            sums = np.array([self.sums[c][f] for c in clients])
            counts = np.array([self.counts[c][f] for c in clients])
            shared = sums.sum(axis=0) / np.maximum(counts.sum(axis=0), 1)
            own = (sums - counts * shared).sum(axis=1, keepdims=True) / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            rows.append((sums - counts * (shared + own)) / (counts + PRIOR))
        return np.concatenate(rows, axis=1)

    def group_by_encoding(self, updates) -> None:
        for u in updates:
            if ENCODING.name in u.statistics and u.client not in self.encodings:
                encoding = torch.as_tensor(u.statistics[ENCODING.name]).detach()  # on the engine's device
                self.encodings[u.client] = encoding.to("cpu", torch.float64).numpy().ravel()
        if len(self.encodings) == self.clients:  # the server holds every client's encoding
            self.statistics = FedEx.statistics
        if self.centroids is None:
            if len(self.encodings) < min(self.clients, 2 * self.k):
                return
            seen = sorted(self.encodings)
            labels, self.centroids = kmeans(np.stack([self.encodings[c] for c in seen]), self.k, self.kmeans_seed())
            self.assignment.update({c: int(label) for c, label in zip(seen, labels, strict=True)})
            self.grouped = True
        for client, encoding in self.encodings.items():
            if client not in self.assignment:  # first seen after the grouping
                self.assignment[client] = int(np.argmin(((self.centroids - encoding) ** 2).sum(axis=1)))

    def group_by_preference(self) -> None:
        seen = sorted(self.counts)
        if len(seen) < self.k:
            return
        labels, _ = kmeans(self.preferences(seen), self.k, self.kmeans_seed())
        self.assignment = {c: int(label) for c, label in zip(seen, labels, strict=True)}
        self.experts = [self.expert(e) for e in range(self.k)]
        self.grouped = True

    def kmeans_seed(self) -> int:
        return int(seeding.numpy_rng(self.seed, seeding.CLUSTERED, 0).integers(2**31))

    def route(self) -> None:
        """Move each client to the expert whose configuration its residuals rate best, when better
        than its own expert's by more than one standard error (`residual_sd`)."""
        settled, sigma = self.settled(), self.residual_sd()
        for client in sorted(self.counts):
            home = self.expert_of(client)
            best, margin = home, 0.0
            for e, draw in enumerate(settled):
                differ = [(f, settled[home][f], j) for f, j in enumerate(draw) if j != settled[home][f]]
                if not differ or any(
                    self.count(client, f, i) == 0 or self.count(client, f, j) == 0 for f, i, j in differ
                ):
                    continue
                n, total = self.counts[client], self.sums[client]
                gain = sum(total[f][i] / n[f][i] - total[f][j] / n[f][j] for f, i, j in differ)
                error = sigma * math.sqrt(sum(1 / n[f][i] + 1 / n[f][j] for f, i, j in differ))
                if gain - error > margin:
                    best, margin = e, gain - error
            if best != home:
                self.assignment[client] = best
                self.moves += 1

    def residual_sd(self) -> float:
        """The standard deviation of a client's residuals with one value of a setting, pooled over
        every client, setting and value."""
        squares, freedom = 0.0, 0.0
        for client, counts in self.counts.items():
            for n, total, square in zip(counts, self.sums[client], self.squares[client], strict=True):
                drawn = n > 0
                squares += float((square[drawn] - total[drawn] ** 2 / n[drawn]).sum())
                freedom += float((n[drawn] - 1).sum())
        return math.sqrt(max(squares, 0.0) / freedom) if freedom > 0 else 0.0

    def sizes(self) -> list[int]:
        return [sum(self.expert_of(c) == e for c in range(self.clients)) for e in range(len(self.experts))]

    def state(self):
        """Each expert's size (clients assigned, unseen ones in expert 0) and FedEx state; this
        round's probes and moves."""
        named = {f"clustered/size_{e}": float(n) for e, n in enumerate(self.sizes())}
        for e, expert in enumerate(self.experts):
            named |= {f"clustered/expert_{e}/{name}": value for name, value in expert.state().items()}
        return named | {"clustered/probes": float(len(self.probing)), "clustered/moves": float(self.moves)}

    def client_state(self):
        """Each client's expert (unseen ones: 0)."""
        return {c: {"clustered/expert": float(self.expert_of(c))} for c in range(self.clients)}

    def chosen(self):
        """Every client's configuration: what its expert settles on (`FedEx.chosen`)."""
        settled = [expert.chosen() for expert in self.experts]
        return {
            client_key(name, c): value
            for c in range(self.clients)
            for name, value in settled[self.expert_of(c)].items()
        }


@dataclass(frozen=True)
class ClusteredOptions(Options):
    grouping: str = option(
        "encoding", "clustered: group clients by their data encodings, or by their revealed preferences", GROUPINGS
    )
    experts: int = option(2, "clustered: k, the groups of clients, each with its own FedEx", low=1)
    route_every: int = option(5, "clustered: rounds between the router's moves (0: never move a client)", low=0)
    probe: float = option(0.25, "clustered: the fraction of a routing round's clients that try another expert", low=0.0)
    warmup: int = option(10, "clustered: rounds of one shared expert before grouping by preference", low=1)
    signal: str = option(
        "log-ratio", "clustered: each expert's (fedex's) signal: after, difference or log-ratio", SIGNALS
    )
    baseline: str = option("fitted", "clustered: each expert's (fedex's) baseline: previous, round or fitted")
    schedule: str = option("auto", "clustered: each expert's (fedex's) step size schedule", SCHEDULES)
    factorized: bool = option(True, "clustered: each expert has one distribution per setting of a grid")

    def __post_init__(self):
        super().__post_init__()
        if self.baseline not in BASELINES:
            raise SettingsError(f"clustered's baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.probe > 1:
            raise SettingsError(f"option probe must be <= 1, got {self.probe}")


class ClusteredSearch(OnlineSearch):
    """Clustered experts (`fedhpo_core.tuners.clustered`): one FedEx per group of clients, a router
    moving clients between them; a configuration per client."""

    statistics = (*FedEx.statistics, ENCODING)  # what the default grouping asks for

    def tuner(self, context, configs, values):
        clients = len(context.data.clients)
        fixed = fixed_values(context, values)
        return ClusteredExperts(configs, values, clients, context.seed, fixed=fixed, **asdict(self.options))


register(
    Method(
        "clustered",
        ROUND,
        "ours: a mixture of hyperparameter experts with a router (IFCA-style; methods overview, notes section 5)",
        "clients grouped by k-means (data encodings or revealed preferences), a FedEx per group, a router",
        ClusteredSearch,
        ClusteredOptions,
    )
)
