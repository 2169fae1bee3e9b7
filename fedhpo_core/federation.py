"""The federated round loop: the one place where rounds run.

Each round follows the template configure -> train -> aggregate -> evaluate -> observe. The loop
owns that order; a `Tuner` supplies each client's configuration and `RoundSteps` says how each
step executes (in this process here; as Prefect task runs, in the flow or on Dask, in
`tasks.training`).
"""

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from fedhpo_core import seeding
from fedhpo_core.aggregators import ServerSettings, State, server_step
from fedhpo_core.client import ClientData, ClientJob, ClientUpdate, Controls, evaluate_metrics, train_sequentially
from fedhpo_core.cohort import train_cohort
from fedhpo_core.data import Dataset
from fedhpo_core.devices import Devices, RoundPlan, profiles_of
from fedhpo_core.models import ModelSpec, workspace_model
from fedhpo_core.partition import Partition
from fedhpo_core.postprocess import ClientWeights, DropNonFinite, Link, UniformWeights, apply_chain
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
    bytes_sent: int = 0  # the model down to every participant, the model and statistics up from every upload
    left_out: tuple[int, ...] = ()  # uploads the postprocessor chain left out (non-finite)
    epsilon: float | None = None  # the privacy spent so far, under DP-FedAvg

    @property
    def clients(self) -> list[int]:
        return [u.client for u in self.updates]

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
) -> tuple[torch.Tensor, State, tuple[int, ...]]:
    """New global weights and server state: the uploads through the postprocessor chain, then the
    server optimizer; with the clients the chain left out."""
    mean, kept = apply_chain(links, weights, [(u.client, u.weights, u.num_samples) for u in updates])
    new_weights, new_state = server_step(server, weights, mean, state)
    return new_weights, new_state, tuple(u.client for u in updates if u.client not in kept)


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

    def aggregate(self, server, weights, updates, state, links) -> tuple[torch.Tensor, State, tuple[int, ...]]:
        return aggregate_updates(server, weights, updates, state, links)

    def evaluate(self, spec, weights, splits) -> dict[str, tuple]:
        return evaluate_splits(spec, weights, splits)


RoundObserver = Callable[[RoundReport, Evaluation], None]


@dataclass
class FederationResult:
    state: FederationState
    evaluations: list[Evaluation]
    diverged_round: int | None

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

    @classmethod
    def of(cls, data: FederatedData, settings: TrainSettings) -> "Federation":
        """The federation the settings describe: server, participation, privacy, devices, algorithm."""
        profiles = profiles_of(settings.devices, len(data.clients), settings.seed)
        devices = Devices(profiles, settings.dropout, settings.deadline_s, settings.seed)
        return cls(
            data, settings.server, settings.participation, settings.seed, settings.privacy, devices, settings.algorithm
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

    def sample_clients(self, t: int) -> list[int]:
        """max(1, round(participation * N)) distinct clients for round t, drawn from the run's seed;
        with privacy, each client independently with probability q = participation (DP-FedAvg's
        sampling, which its accountant assumes; a round may have none)."""
        rng = seeding.numpy_rng(self.seed, seeding.SAMPLING, t)
        if self.privacy.enabled:
            return [int(c) for c in (rng.random(self.num_clients) < self.participation).nonzero()[0]]
        count = max(1, round(self.participation * self.num_clients))
        return sorted(int(c) for c in rng.choice(self.num_clients, size=count, replace=False))

    def links(self, t: int, factors: Mapping[int, float] | None = None) -> list[Link]:
        """Round t's postprocessor chain: non-finite uploads left out, then DP-FedAvg's links if on,
        or every client weighing the same under the paper's SCAFFOLD (Algorithm 1, line 16); a
        tuner's `factors` on the clients' weights once those are set (under DP capped at 1, before
        the clipping)."""
        if not self.privacy.enabled:
            chain: list[Link] = [DropNonFinite()]
            if self.algorithm == "scaffold-paper":
                chain.append(UniformWeights())
            return chain if factors is None else [*chain, ClientWeights(factors)]
        noise_seed = seeding.torch_seed(self.seed, seeding.DP_NOISE, t)
        uniform, *mechanism = self.privacy.links(self.participation * self.num_clients, noise_seed)
        weighted = [] if factors is None else [ClientWeights(factors, cap=1.0)]
        return [DropNonFinite(), uniform, *weighted, *mechanism]

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
    ) -> FederationResult:
        """Run `rounds` rounds from `start` (default: round 0, fresh weights). Sampled clients that
        are offline sit the round out; those that drop out or miss the deadline are not waited for
        (`devices`). A round whose weights turn non-finite, or whose every upload is non-finite,
        ends the run: divergence is a result, not an error."""
        steps = steps or RoundSteps()
        state = start or self.initial_state()
        spec = self.data.spec
        splits = {"val": self.data.server_val, "test": self.data.test}
        model_bytes = spec.size * FLOAT_BYTES
        evaluations: list[Evaluation] = []
        for t in range(state.round + 1, state.round + rounds + 1):
            clients = list(tuner.select(t, self.device_rules.online(t, self.sample_clients(t))))
            configs = tuner.configure(t, clients)
            start_weights = tuner.global_weights(configs, state.weights)
            samples = {c: self.data.clients[c].num_train for c in clients}
            epochs = {c: configs[c].local_epochs for c in clients}
            extra = {c: sum(s.samples(self.data.clients[c]) for s in tuner.statistics) for c in clients}
            plan = self.device_rules.plan(t, clients, samples, epochs, model_bytes, extra)
            jobs = [
                ClientJob(c, t, configs[c], self.seed, tuner.local_schedule(t, c), state.controls(c), tuner.statistics)
                for c in plan.uploading
            ]
            data = [self.data.clients[c] for c in plan.uploading]
            updates = steps.train_clients(spec, start_weights, jobs, data) if jobs else []
            server = tuner.server_settings(self.server, start_weights, updates)
            factors = tuner.aggregation_weights(t, [u.client for u in updates])
            weights, server_state, left_out = steps.aggregate(
                server, start_weights, updates, state.server_state, self.links(t, factors)
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
                (len(configs) + len(updates)) * model_bytes + self.statistics_bytes(jobs),
                left_out,
                self.epsilon(t),
            )
            aggregated = report.aggregated
            controls = state.controls_after(aggregated, [self.control_share(u.client) for u in aggregated])
            state = FederationState(t, weights, server_state, sim_time_s, *controls)
            evaluations.append(evaluation)
            tuner.observe(report)
            if observe:
                observe(report, evaluation)
            if report.diverged:
                return FederationResult(state, evaluations, t)
        return FederationResult(state, evaluations, None)
