"""The federated round loop: the one place where rounds run.

Each round follows the template configure -> train -> aggregate -> evaluate -> observe. The loop
owns that order; a `Tuner` supplies each client's configuration and `RoundSteps` says how each
step executes (in this process here; as Prefect task runs, in the flow or on Dask, in
`tasks.training`).
"""

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch

from fedhpo_core import seeding
from fedhpo_core.aggregators import ServerSettings, State, server_step
from fedhpo_core.client import (
    ClientData,
    ClientJob,
    ClientUpdate,
    Controls,
    evaluate_metrics,
    local_steps,
    train_sequentially,
)
from fedhpo_core.cohort import train_cohort
from fedhpo_core.compression import Compressor, Uncompressed, compressor_of
from fedhpo_core.cost import Cost
from fedhpo_core.data import Dataset
from fedhpo_core.devices import Devices, RoundPlan, profiles_of
from fedhpo_core.models import ModelSpec, workspace_model
from fedhpo_core.partition import Partition
from fedhpo_core.postprocess import ClientWeights, Compress, DropNonFinite, Link, UniformWeights, apply_chain
from fedhpo_core.privacy import Privacy, epsilon
from fedhpo_core.settings import ClientConfig, DataSettings, TrainSettings
from fedhpo_core.task import TaskRef, load_task_data, resolve
from fedhpo_core.tuners.base import Tuner

Split = tuple[torch.Tensor, torch.Tensor]
FLOAT_BYTES = 4


def partition_of(data: DataSettings) -> Partition:
    """The partition the data settings describe (deterministic in them): the task's."""
    return resolve(data.task).partition(load_task_data(data.task, data.data_root), data)


def _take(dataset: Dataset, indices) -> Split:
    index = torch.from_numpy(indices)
    return dataset.x_train[index], dataset.y_train[index]


def client_splits(dataset: Dataset, partition: Partition, device: str = "cpu") -> tuple[ClientData, ...]:
    """Each client's rows of the training set (which every client shares as its pool, on `device`)."""
    x, y = dataset.x_train.to(device), dataset.y_train.to(device)
    return tuple(
        ClientData(x, y, torch.from_numpy(train).to(device), torch.from_numpy(val).to(device))
        for train, val in zip(partition.client_train, partition.client_val, strict=True)
    )


@functools.lru_cache(maxsize=2)
def clients_of(data: DataSettings, device: str = "cpu") -> tuple[ClientData, ...]:
    """Every client's data under these settings, built once per process: how a Dask worker gets a
    client's data from a reference (data settings, client id) instead of over the network."""
    return client_splits(load_task_data(data.task, data.data_root), partition_of(data), device)


@dataclass(frozen=True, eq=False)
class FederatedData:
    """Each client's data, the server's validation split and the test set (for reporting only)."""

    clients: tuple[ClientData, ...]
    server_val: Split
    test: Split
    spec: ModelSpec

    @classmethod
    def build(
        cls, dataset: Dataset, partition: Partition, model: str, device: str = "cpu", task: TaskRef | None = None
    ) -> "FederatedData":
        """The federation's data on `device` (where its model trains): the bundled `model`, or the
        `task`'s model, loss and metrics."""
        name = model if task is None or task.bundled else task.label
        task = None if task is not None and task.bundled and task.model == model else task
        spec = ModelSpec(
            name,
            dataset.input_shape,
            dataset.outputs,
            task,
            dataset.classification,
            dataset.target_scale,
            dataset.x_train.dtype,
        )
        x, y = _take(dataset, partition.server_val)
        return cls(
            client_splits(dataset, partition, device),
            (x.to(device), y.to(device)),
            (dataset.x_test.to(device), dataset.y_test.to(device)),
            spec,
        )

    @property
    def device(self) -> torch.device:
        return self.test[0].device


@dataclass(frozen=True)
class Fidelity:
    """How much of a full training a configuration gets besides rounds (successive halving's rungs):
    the fraction of the clients sampled each round (of the participation) and of each client's
    local steps."""

    clients: float = 1.0
    steps: float = 1.0


FULL = Fidelity()


@dataclass(frozen=True, eq=False)
class FederationState:
    """Where a run stands: enough to continue it (successive halving resumes from this). A run
    continues under the algorithm its state started with: SCAFFOLD where it has control variates."""

    round: int  # rounds completed
    weights: torch.Tensor
    server_state: State = field(default_factory=dict)
    sim_time_s: float = 0.0  # simulated seconds the rounds so far took
    client_controls: torch.Tensor | None = None  # SCAFFOLD's c_i of every client, (N, P)
    server_control: torch.Tensor | None = None  # SCAFFOLD's c, (P,)
    residuals: Mapping[int, torch.Tensor] = field(default_factory=dict)  # top-k's unsent error, by client
    broadcast: torch.Tensor | None = None  # under compressed downloads: the model the clients hold

    def controls(self, client: int) -> Controls | None:
        """What `client` receives under SCAFFOLD besides the weights: its c_i and the server's c (c_i
        a copy, not a view of every client's controls, which would travel whole to a Dask worker)."""
        if self.client_controls is None:
            return None
        return Controls(self.client_controls[client].clone(), self.server_control)

    def controls_after(
        self, updates: Sequence[ClientUpdate], shares: Sequence[float]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """SCAFFOLD's server step for the controls (Karimireddy et al. 2020, Algorithm 1): each
        aggregated client's c_i <- c_i + Delta c_i (line 13) and c <- c + sum_S share_i Delta c_i
        (line 17 with share_i = 1 / N, which keeps c the mean of the c_i; with share_i = n_i / n, the
        sample-weighted mean). New tensors: a state is never changed."""
        if self.client_controls is None or not updates:
            return self.client_controls, self.server_control
        deltas = torch.stack([u.control_delta.to(self.server_control.device) for u in updates])
        index = torch.tensor([u.client for u in updates], device=deltas.device)
        clients = self.client_controls.index_add(0, index, deltas)
        weights = torch.tensor(list(shares), dtype=deltas.dtype, device=deltas.device)
        return clients, self.server_control + weights @ deltas


@dataclass(frozen=True)
class Evaluation:
    """The global model on the server's validation split and the test set: loss and scoring metric,
    and the task's other metrics by their logged names (`val_mae`, `test_mae`)."""

    val_loss: float
    val_score: float
    test_loss: float
    test_score: float
    others: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, metrics: Mapping[str, tuple[float, dict[str, float]]]) -> "Evaluation":
        """From `evaluate_splits`' val and test entries (loss, every metric by name, the score first)."""
        (val_loss, val), (test_loss, test) = metrics["val"], metrics["test"]
        score, *rest = val
        others = {f"{split}_{k}": values[k] for split, values in (("val", val), ("test", test)) for k in rest}
        return cls(val_loss, val[score], test_loss, test[score], others)


def local_samples(num_train: int, config: ClientConfig) -> int:
    """Training samples a client processes in a round: its local epochs' passes over its data, or
    the first `step_fraction` of their mini-batch steps (at least one)."""
    full = num_train * config.local_epochs
    return full if config.step_fraction >= 1 else min(full, local_steps(num_train, config) * config.batch_size)


def _weighted(values: Sequence[float], weights: Sequence[int]) -> float:
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


@dataclass(frozen=True, eq=False)
class RoundReport:
    """What the server knows after round `round`; the whole of what a tuner sees."""

    round: int
    configs: Mapping[int, ClientConfig]
    updates: tuple[ClientUpdate, ...]
    val_loss: float  # global model on the server's validation split
    val_score: float
    weights_before: torch.Tensor
    weights_after: torch.Tensor
    plan: RoundPlan = RoundPlan((), (), (), 0.0)  # who uploaded in time, who dropped out or was late, how long
    sim_time_s: float = 0.0  # simulated seconds of the run so far, this round included
    cost: Cost = Cost()  # the round's: its clients, their samples, the bytes down and up, its simulated seconds
    left_out: tuple[int, ...] = ()  # uploads the postprocessor chain left out (non-finite)
    epsilon: float | None = None  # the privacy spent so far, under DP-FedAvg

    @property
    def clients(self) -> list[int]:
        return [u.client for u in self.updates]

    @property
    def bytes_sent(self) -> int:
        """The model down to every participant, each upload's payload and statistics up."""
        return self.cost.bytes

    @property
    def aggregated(self) -> list[ClientUpdate]:
        """The uploads in the aggregate: the round's metrics are theirs."""
        return [u for u in self.updates if u.client not in self.left_out]

    @property
    def train_loss(self) -> float:
        """Sample-weighted mean of the clients' reported training losses."""
        return _weighted([u.train_loss for u in self.aggregated], [u.num_samples for u in self.aggregated])

    @property
    def client_val_loss(self) -> float:
        """Sample-weighted mean of the clients' local validation losses."""
        return _weighted([u.val_loss for u in self.aggregated], [u.num_val for u in self.aggregated])

    @property
    def client_val_score(self) -> float:
        return _weighted([u.val_score for u in self.aggregated], [u.num_val for u in self.aggregated])

    @property
    def diverged(self) -> bool:
        """The global model turned non-finite, or every upload did (none was left to aggregate)."""
        everyone_left_out = bool(self.updates) and len(self.left_out) == len(self.updates)
        return everyone_left_out or not bool(torch.isfinite(self.weights_after).all())


def aggregate_updates(
    server: ServerSettings, weights: torch.Tensor, updates: Sequence[ClientUpdate], state: State, links: Sequence[Link]
) -> tuple[torch.Tensor, State, tuple[int, ...], dict[int, torch.Tensor]]:
    """New global weights and server state: the uploads through the postprocessor chain, then the
    server optimizer; with the clients the chain left out, and what compressing with error
    feedback left unsent, by client."""
    mean, kept = apply_chain(links, weights, [(u.client, u.weights, u.num_samples) for u in updates])
    new_weights, new_state = server_step(server, weights, mean, state)
    unsent = {c: r for link in links if isinstance(link, Compress) for c, r in link.unsent.items()}
    return new_weights, new_state, tuple(u.client for u in updates if u.client not in kept), unsent


def evaluate_splits(spec: ModelSpec, weights: torch.Tensor, splits: Mapping[str, Split]) -> dict[str, tuple]:
    """(loss, {metric: value}) of the global model on each named split, the scoring metric first."""
    model = workspace_model(spec, weights)
    return {name: evaluate_metrics(model, x, y, spec) for name, (x, y) in splits.items()}


TRAIN_CLIENTS: dict[str, Callable[..., list[ClientUpdate]]] = {"cohort": train_cohort, "sequential": train_sequentially}


class RoundSteps:
    """How each step of a round executes: here, directly in this process, clients trained by the
    named engine. Subclasses change the execution (Prefect tasks, a Dask cluster), never the
    arithmetic."""

    def __init__(self, engine: str = "cohort"):
        self.engine = engine

    def train_clients(
        self, spec: ModelSpec, weights: torch.Tensor, jobs: Sequence[ClientJob], data: Sequence[ClientData]
    ) -> list[ClientUpdate]:
        return TRAIN_CLIENTS[self.engine](spec, weights, jobs, data)

    def aggregate(self, server, weights, updates, state, links) -> tuple:
        return aggregate_updates(server, weights, updates, state, links)

    def evaluate(self, spec, weights, splits) -> dict[str, tuple]:
        return evaluate_splits(spec, weights, splits)


RoundObserver = Callable[[RoundReport, Evaluation], None]


@dataclass
class FederationResult:
    state: FederationState
    evaluations: list[Evaluation]
    diverged_round: int | None
    # Every round trained left the global weights as they were, bit for bit: an update that
    # underflows (a huge FedOpt tau, a tiny learning rate) or no upload at all. The run learned nothing.
    frozen: bool = False

    @property
    def diverged(self) -> bool:
        return self.diverged_round is not None


@dataclass(frozen=True, eq=False)
class Federation:
    """A federated population and its server: everything about a run but the hyperparameters."""

    data: FederatedData
    server: ServerSettings
    participation: float
    seed: int
    privacy: Privacy = Privacy()  # DP-FedAvg when enabled
    devices: Devices | None = None  # default: the uniform preset, no dropout, no deadline
    algorithm: str = "fedavg"  # or scaffold, scaffold-paper: local steps corrected by control variates
    download: Compressor = Uncompressed()  # how the server compresses the model it sends

    @classmethod
    def of(cls, data: FederatedData, settings: TrainSettings) -> "Federation":
        """The federation the settings describe: server, participation, privacy, devices, algorithm."""
        profiles = profiles_of(settings.devices, len(data.clients), settings.seed)
        devices = Devices(profiles, settings.dropout, settings.deadline_s, settings.seed)
        download = compressor_of(settings) if settings.compress_downloads else Uncompressed()
        return cls(
            data,
            settings.server,
            settings.participation,
            settings.seed,
            settings.privacy,
            devices,
            settings.algorithm,
            download,
        )

    @property
    def num_clients(self) -> int:
        return len(self.data.clients)

    @cached_property
    def device_rules(self) -> Devices:
        return self.devices or Devices(profiles_of("uniform", self.num_clients, self.seed), seed=self.seed)

    def client_seconds(self, local_epochs: int) -> np.ndarray:
        """Each client's simulated round time on its device with `local_epochs` local epochs."""
        samples = [c.num_train for c in self.data.clients]
        epochs = [local_epochs] * self.num_clients
        return self.device_rules.profiles.seconds(
            range(self.num_clients), samples, epochs, self.data.spec.size * FLOAT_BYTES
        )

    def initial_state(self) -> FederationState:
        """Round 0: the seed's initial weights; under SCAFFOLD, every control variate zero."""
        weights = self.data.spec.initial_weights(self.seed).to(self.data.device)
        if not self.algorithm.startswith("scaffold"):
            return FederationState(0, weights)
        controls = torch.zeros(self.num_clients, len(weights), device=weights.device)
        return FederationState(0, weights, client_controls=controls, server_control=torch.zeros_like(weights))

    def control_share(self, client: int) -> float:
        """A client's share of SCAFFOLD's server control c. The paper's (`scaffold-paper`) is 1 / N
        with every client weighing the same in x's average too; `scaffold` keeps c the mean of the
        c_i weighted as x's average weighs the clients, by training samples, n_i / n: under label
        skew clients' sizes differ a lot, and an unweighted c corrects towards another objective than
        the weighted average descends (on MNIST, Dirichlet 0.1, seed 0: 0.9 validation accuracy in 7
        rounds against 23; FedAvg 16)."""
        if self.algorithm == "scaffold-paper":
            return 1.0 / self.num_clients
        return self.data.clients[client].num_train / self.total_train

    @cached_property
    def total_train(self) -> int:
        return sum(c.num_train for c in self.data.clients)

    def sample_clients(self, t: int, fraction: float = 1.0) -> list[int]:
        """max(1, round(participation * fraction * N)) distinct clients for round t, drawn from the
        run's seed (`fraction` < 1: a rung's client fidelity); with privacy, each client
        independently with probability q = participation (DP-FedAvg's sampling, which its
        accountant assumes; a round may have none)."""
        rng = seeding.numpy_rng(self.seed, seeding.SAMPLING, t)
        if self.privacy.enabled:
            return [int(c) for c in (rng.random(self.num_clients) < self.participation).nonzero()[0]]
        count = max(1, round(self.participation * fraction * self.num_clients))
        return sorted(int(c) for c in rng.choice(self.num_clients, size=count, replace=False))

    def links(
        self,
        t: int,
        factors: Mapping[int, float] | None = None,
        compressors: Mapping[int, Compressor] | None = None,
        residuals: Mapping[int, torch.Tensor] | None = None,
    ) -> list[Link]:
        """Round t's postprocessor chain: non-finite uploads left out, then DP-FedAvg's links if on,
        or every client weighing the same under the paper's SCAFFOLD (Algorithm 1, line 16); a
        tuner's `factors` on the clients' weights once those are set (under DP capped at 1, before
        the clipping); uploads compressed by their clients' `compressors` (top-k's error feedback
        from `residuals`). Under DP: clip, compress, clip again (a quantized update can be longer
        than its input, and the noise is calibrated to the bound), then noise."""
        compressing = {c: k for c, k in (compressors or {}).items() if not isinstance(k, Uncompressed)}
        compress = [Compress(compressing, residuals or {}, self.seed, t)] if compressing else []
        if not self.privacy.enabled:
            chain: list[Link] = [DropNonFinite()]
            if self.algorithm == "scaffold-paper":
                chain.append(UniformWeights())
            return [*chain, *([] if factors is None else [ClientWeights(factors)]), *compress]
        noise_seed = seeding.torch_seed(self.seed, seeding.DP_NOISE, t)
        uniform, clip, noise = self.privacy.links(self.participation * self.num_clients, noise_seed)
        weighted = [] if factors is None else [ClientWeights(factors, cap=1.0)]
        return [DropNonFinite(), uniform, *weighted, clip, *([*compress, clip] if compress else []), noise]

    def round_cost(
        self, plan: RoundPlan, samples: Mapping[int, int], up: Mapping[int, int], jobs: Sequence[ClientJob]
    ) -> Cost:
        """What a round costs (`fedhpo_core.cost`), known before it trains: its participants, the
        training samples of those who upload (`samples`), the model down to each participant, each
        upload's payload (`up`) and statistics, and its simulated seconds."""
        uploading = plan.uploading
        down = len(samples) * self.download.payload_bytes(self.data.spec.size)
        bytes_up = sum(up[c] for c in uploading) + self.statistics_bytes(jobs)
        return Cost(1, len(samples), sum(samples[c] for c in uploading), bytes_up, down, plan.seconds)

    def reference_cost(self, config: ClientConfig) -> Cost:
        """A round of `config` on every client at full fidelity, nobody offline: what a study plans
        a round to cost (a round on fewer clients, compressed, or cut by a deadline costs less)."""
        count = max(1, round(self.participation * self.num_clients))
        seconds = self.client_seconds(config.local_epochs)
        slowest = float(np.sort(seconds)[-count]) if len(seconds) else 0.0
        if self.device_rules.deadline_s:
            slowest = min(slowest, self.device_rules.deadline_s)
        size = self.data.spec.size
        mean_samples = self.total_train / self.num_clients * config.local_epochs
        up, down = compressor_of(config).payload_bytes(size), self.download.payload_bytes(size)
        return Cost(1, count, round(count * mean_samples), count * up, count * down, slowest)

    def received(
        self, weights: torch.Tensor, state: FederationState, t: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model the round's clients train from, and what the server records they hold. Without
        download compression, `weights` itself. With it, the server sends the change from what
        the clients hold, compressed: they hold w~_t = w~_(t-1) + C(x_t - w~_(t-1)) (w~_0 the
        initial weights, which every client derives from the seed), so what one round's compression
        loses the next round's change carries (error feedback through the held model)."""
        if isinstance(self.download, Uncompressed):
            return weights, None
        held = state.broadcast if state.broadcast is not None else self.data.spec.initial_weights(self.seed)
        held = held.to(weights.device)
        generator = seeding.numpy_rng(self.seed, seeding.COMPRESSION, t, self.num_clients)
        sent = self.download.compress_((weights - held).unsqueeze(0), [generator])
        received = held + sent[0]
        return received, received

    def statistics_bytes(self, jobs: Sequence[ClientJob]) -> int:
        """What the jobs' clients upload beside their models: every statistic's floats."""
        return sum(
            FLOAT_BYTES * s.floats(self.data.spec, self.data.clients[job.client])
            for job in jobs
            for s in job.statistics
        )

    def epsilon(self, rounds: int) -> float | None:
        """The privacy spent after `rounds` rounds, when privacy is on."""
        if not self.privacy.enabled:
            return None
        return epsilon(self.participation, self.privacy.noise, rounds, self.privacy.delta)

    def run(
        self,
        tuner: Tuner,
        rounds: int,
        steps: RoundSteps | None = None,
        start: FederationState | None = None,
        observe: RoundObserver | None = None,
        afford: Callable[[Cost], bool] | None = None,
        fidelity: Fidelity = FULL,
    ) -> FederationResult:
        """Run `rounds` rounds from `start` (default: round 0, fresh weights) at `fidelity`, ending
        before a round whose cost `afford` refuses. Sampled clients that are offline sit the round
        out; those that drop out or miss the deadline are not waited for (`devices`). A round whose
        weights turn non-finite, or whose every upload is non-finite, ends the run: divergence is a
        result, not an error; a run whose rounds never changed the global weights is `frozen`."""
        steps = steps or RoundSteps()
        state = start or self.initial_state()
        started_from = state.weights
        spec = self.data.spec
        splits = {"val": self.data.server_val, "test": self.data.test}
        evaluations: list[Evaluation] = []
        for t in range(state.round + 1, state.round + rounds + 1):
            clients = list(tuner.select(t, self.device_rules.online(t, self.sample_clients(t, fidelity.clients))))
            configs = tuner.configure(t, clients)
            if fidelity.steps < 1:
                configs = {c: replace(config, step_fraction=fidelity.steps) for c, config in configs.items()}
            start_weights = tuner.global_weights(configs, state.weights)
            received, broadcast = self.received(start_weights, state, t)
            samples = {c: local_samples(self.data.clients[c].num_train, configs[c]) for c in clients}
            extra = {c: sum(s.samples(self.data.clients[c]) for s in tuner.statistics) for c in clients}
            compressors = {c: compressor_of(configs[c]) for c in clients}
            up = {c: compressors[c].payload_bytes(spec.size) for c in clients}
            once = dict.fromkeys(clients, 1)  # `samples` counts every pass
            plan = self.device_rules.plan(t, clients, samples, once, self.download.payload_bytes(spec.size), extra, up)
            jobs = [
                ClientJob(c, t, configs[c], self.seed, tuner.local_schedule(t, c), state.controls(c), tuner.statistics)
                for c in plan.uploading
            ]
            cost = self.round_cost(plan, samples, up, jobs)
            if afford is not None and not afford(cost):
                break
            data = [self.data.clients[c] for c in plan.uploading]
            updates = steps.train_clients(spec, received, jobs, data) if jobs else []
            if received is not start_weights:  # each upload a change from what its client received
                updates = [replace(u, weights=u.weights + (start_weights - received)) for u in updates]
            server = tuner.server_settings(self.server, start_weights, updates)
            factors = tuner.aggregation_weights(t, [u.client for u in updates])
            links = self.links(t, factors, compressors, state.residuals)
            weights, server_state, left_out, unsent = steps.aggregate(
                server, start_weights, updates, state.server_state, links
            )
            metrics = steps.evaluate(spec, weights, splits)
            evaluation = Evaluation.of(metrics)
            sim_time_s = state.sim_time_s + plan.seconds
            report = RoundReport(
                t,
                configs,
                tuple(updates),
                evaluation.val_loss,
                evaluation.val_score,
                start_weights,
                weights,
                plan,
                sim_time_s,
                cost,
                left_out,
                self.epsilon(t),
            )
            aggregated = report.aggregated
            controls = state.controls_after(aggregated, [self.control_share(u.client) for u in aggregated])
            residuals = dict(state.residuals) | unsent
            state = FederationState(t, weights, server_state, sim_time_s, *controls, residuals, broadcast)
            evaluations.append(evaluation)
            tuner.observe(report)
            if observe:
                observe(report, evaluation)
            if report.diverged:
                return FederationResult(state, evaluations, t)
        frozen = bool(evaluations) and torch.equal(started_from, state.weights)
        return FederationResult(state, evaluations, None, frozen)
