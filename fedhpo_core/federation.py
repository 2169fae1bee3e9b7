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

import torch

from fedhpo_core import seeding
from fedhpo_core.aggregators import ServerSettings, State, aggregate
from fedhpo_core.client import ClientData, ClientJob, ClientUpdate, Controls, evaluate, local_update
from fedhpo_core.cohort import train_cohort
from fedhpo_core.data import Dataset, load_dataset
from fedhpo_core.models import ModelSpec, workspace_model
from fedhpo_core.partition import Partition, partition_dataset
from fedhpo_core.privacy import Privacy, PrivateMean, epsilon
from fedhpo_core.settings import ClientConfig, DataSettings
from fedhpo_core.tuners.base import Tuner

Split = tuple[torch.Tensor, torch.Tensor]


def partition_of(data: DataSettings) -> Partition:
    """The partition the data settings describe (deterministic in them)."""
    return partition_dataset(
        load_dataset(data.dataset, data.data_root).y_train.numpy(),
        data.clients,
        data.partition,
        data.seed,
        data.val_fraction,
        data.client_val_fraction,
        alpha=data.alpha,
        shards_per_client=data.shards_per_client,
    )


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
    return client_splits(load_dataset(data.dataset, data.data_root), partition_of(data), device)


@dataclass(frozen=True, eq=False)
class FederatedData:
    """Each client's data, the server's validation split and the test set (for reporting only)."""

    clients: tuple[ClientData, ...]
    server_val: Split
    test: Split
    spec: ModelSpec

    @classmethod
    def build(cls, dataset: Dataset, partition: Partition, model: str, device: str = "cpu") -> "FederatedData":
        """The federation's data on `device` (where its model trains)."""
        spec = ModelSpec(model, dataset.input_shape, dataset.num_classes)
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
    client_controls: torch.Tensor | None = None  # SCAFFOLD's c_i of every client, (N, P)
    server_control: torch.Tensor | None = None  # SCAFFOLD's c, (P,)

    def controls(self, client: int) -> Controls | None:
        """What `client` receives under SCAFFOLD besides the weights: its c_i and the server's c (c_i
        a copy, not a view of every client's controls, which would travel whole to a Dask worker)."""
        if self.client_controls is None:
            return None
        return Controls(self.client_controls[client].clone(), self.server_control)

    def controls_after(self, updates: Sequence[ClientUpdate]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """SCAFFOLD's server step for the controls (Karimireddy et al. 2020, Algorithm 1): each
        sampled client's c_i <- c_i + Delta c_i (line 13) and c <- c + (|S| / N) mean_S Delta c_i
        (line 17), which keeps c the mean of the c_i. New tensors: a state is never changed."""
        if self.client_controls is None or not updates:
            return self.client_controls, self.server_control
        deltas = torch.stack([u.control_delta.to(self.server_control.device) for u in updates])
        index = torch.tensor([u.client for u in updates], device=deltas.device)
        clients = self.client_controls.index_add(0, index, deltas)
        return clients, self.server_control + len(updates) / len(clients) * deltas.mean(0)


@dataclass(frozen=True)
class Evaluation:
    val_loss: float
    val_acc: float
    test_loss: float
    test_acc: float


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
    val_acc: float
    weights_before: torch.Tensor
    weights_after: torch.Tensor
    epsilon: float | None = None  # the privacy spent so far, under DP-FedAvg

    @property
    def clients(self) -> list[int]:
        return [u.client for u in self.updates]

    @property
    def train_loss(self) -> float:
        """Sample-weighted mean of the clients' reported training losses."""
        return _weighted([u.train_loss for u in self.updates], [u.num_samples for u in self.updates])

    @property
    def client_val_loss(self) -> float:
        """Sample-weighted mean of the clients' local validation losses."""
        return _weighted([u.val_loss for u in self.updates], [u.num_val for u in self.updates])

    @property
    def client_val_acc(self) -> float:
        return _weighted([u.val_acc for u in self.updates], [u.num_val for u in self.updates])

    @property
    def diverged(self) -> bool:
        return any(u.diverged for u in self.updates) or not bool(torch.isfinite(self.weights_after).all())


def aggregate_updates(
    server: ServerSettings,
    weights: torch.Tensor,
    updates: Sequence[ClientUpdate],
    state: State,
    private: PrivateMean | None = None,
) -> tuple[torch.Tensor, State]:
    return aggregate(server, weights, [(u.weights, u.num_samples) for u in updates], state, private)


def evaluate_splits(spec: ModelSpec, weights: torch.Tensor, splits: Mapping[str, Split]) -> dict[str, tuple]:
    """(loss, accuracy) of the global model on each named split."""
    model = workspace_model(spec, weights)
    return {name: evaluate(model, x, y) for name, (x, y) in splits.items()}


def train_sequentially(
    spec: ModelSpec, weights: torch.Tensor, jobs: Sequence[ClientJob], data: Sequence[ClientData]
) -> list[ClientUpdate]:
    """The sequential engine: one client after another, each with one intra-op thread."""
    return [local_update(spec, weights, d, job) for job, d in zip(jobs, data, strict=True)]


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

    def aggregate(self, server, weights, updates, state, private=None) -> tuple[torch.Tensor, State]:
        return aggregate_updates(server, weights, updates, state, private)

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
    algorithm: str = "fedavg"  # or "scaffold": local steps corrected by control variates

    @property
    def num_clients(self) -> int:
        return len(self.data.clients)

    def initial_state(self) -> FederationState:
        """Round 0: the seed's initial weights; under SCAFFOLD, every control variate zero."""
        weights = self.data.spec.initial_weights(self.seed).to(self.data.device)
        if self.algorithm != "scaffold":
            return FederationState(0, weights)
        controls = torch.zeros(self.num_clients, len(weights), device=weights.device)
        return FederationState(0, weights, {}, controls, torch.zeros_like(weights))

    def sample_clients(self, t: int) -> list[int]:
        """max(1, round(participation * N)) distinct clients for round t, drawn from the run's seed;
        with privacy, each client independently with probability q = participation (DP-FedAvg's
        sampling, which its accountant assumes; a round may have none)."""
        rng = seeding.numpy_rng(self.seed, seeding.SAMPLING, t)
        if self.privacy.enabled:
            return [int(c) for c in (rng.random(self.num_clients) < self.participation).nonzero()[0]]
        count = max(1, round(self.participation * self.num_clients))
        return sorted(int(c) for c in rng.choice(self.num_clients, size=count, replace=False))

    def private_mean(self, t: int) -> PrivateMean | None:
        """Round t's private averaging, when privacy is on."""
        if not self.privacy.enabled:
            return None
        expected = self.participation * self.num_clients
        seed = seeding.torch_seed(self.seed, seeding.DP_NOISE, t)
        return PrivateMean(self.privacy.clip, self.privacy.noise, expected, seed)

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
        """Run `rounds` rounds from `start` (default: round 0, fresh weights). A round whose loss or
        weights turn non-finite ends the run: divergence is a result, not an error."""
        steps = steps or RoundSteps()
        state = start or self.initial_state()
        spec = self.data.spec
        splits = {"val": self.data.server_val, "test": self.data.test}
        evaluations: list[Evaluation] = []
        for t in range(state.round + 1, state.round + rounds + 1):
            clients = list(tuner.select(t, self.sample_clients(t)))
            configs = tuner.configure(t, clients)
            start_weights = tuner.global_weights(configs, state.weights)
            jobs = [
                ClientJob(c, t, configs[c], self.seed, tuner.local_schedule(t, c), state.controls(c)) for c in clients
            ]
            data = [self.data.clients[c] for c in clients]
            updates = steps.train_clients(spec, start_weights, jobs, data) if clients else []
            server = tuner.server_settings(self.server, start_weights, updates)
            private = self.private_mean(t)
            weights, server_state = steps.aggregate(server, start_weights, updates, state.server_state, private)
            metrics = steps.evaluate(spec, weights, splits)
            evaluation = Evaluation(*metrics["val"], *metrics["test"])
            report = RoundReport(
                t,
                configs,
                tuple(updates),
                evaluation.val_loss,
                evaluation.val_acc,
                start_weights,
                weights,
                self.epsilon(t),
            )
            state = FederationState(t, weights, server_state, *state.controls_after(updates))
            evaluations.append(evaluation)
            tuner.observe(report)
            if observe:
                observe(report, evaluation)
            if report.diverged:
                return FederationResult(state, evaluations, t)
        return FederationResult(state, evaluations, None)
