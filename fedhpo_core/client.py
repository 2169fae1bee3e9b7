"""A client's round: local SGD (or FedProx, or SCAFFOLD) from the global model, then local validation."""

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from fedhpo_core import seeding
from fedhpo_core.models import ModelSpec, flat_weights, workspace_model
from fedhpo_core.settings import ClientConfig
from fedhpo_core.statistics import VAL_LOSS_AFTER, VAL_LOSS_BEFORE, Statistic, data_statistics
from fedhpo_core.stopping import StopChecks
from fedhpo_core.task import ACCURACY, default_loss

EVAL_BATCH = 4096
# Local steps between two looks at `between_steps` (a list test and a call: nothing next to a step).
STEPS_BETWEEN_CHECKS = 8
# Called every `STEPS_BETWEEN_CHECKS` local steps, in whatever thread trains: the innermost check
# given to `steps_interrupted_by` may abandon the round by raising. A round can be long (many local
# epochs), and a stop asked for at its end would wait for all of it.
between_steps = StopChecks()
steps_interrupted_by = between_steps.during


@dataclass(frozen=True, eq=False)
class ClientData:
    """A client's samples as rows of a pool (its federation's training set): its training and local
    validation indices. Clients of one federation share the pool, so a cohort gathers every
    client's batch from one tensor and no client's data is ever copied out."""

    x: torch.Tensor  # the pool's inputs and labels
    y: torch.Tensor
    train: torch.Tensor  # int64 row indices
    val: torch.Tensor

    @classmethod
    def of(cls, x_train, y_train, x_val, y_val) -> "ClientData":
        """A client of its own: training and validation samples pooled."""
        n, m = len(y_train), len(y_val)
        return cls(torch.cat([x_train, x_val]), torch.cat([y_train, y_val]), torch.arange(n), torch.arange(n, n + m))

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_val(self) -> int:
        return len(self.val)

    @property
    def x_train(self) -> torch.Tensor:
        return self.x[self.train]

    @property
    def y_train(self) -> torch.Tensor:
        return self.y[self.train]

    @property
    def x_val(self) -> torch.Tensor:
        return self.x[self.val]

    @property
    def y_val(self) -> torch.Tensor:
        return self.y[self.val]


class RunningSchedules(ABC):
    """The local schedules of k clients during one local training, their state stacked along a
    leading client axis (`LocalSchedule.start` makes them)."""

    @abstractmethod
    def step(self, step: int, changes: torch.Tensor) -> torch.Tensor:
        """The rates of local step `step` + 1, (j,), of the first j clients (the others have
        finished), from their flat weights' changes over local step `step` (0, 1, ...), (j, P)."""


class LocalSchedule(ABC):
    """A learning rate that a client changes step by step during its local training, put on its
    job by the tuner (`Tuner.local_schedule`); without one, the configured `lr` holds throughout.

    A schedule is a value that training never changes: an engine starts it afresh each time it
    trains the job, so a job trains the same twice (another engine, a retried task). Both engines
    apply schedules to k clients at once, stacked along a leading axis: the sequential engine to
    its one client, the cohort engine to the cohort's clients whose schedules share a class.

    1. ``type(schedule).start(schedules, lr)`` before the first local step, with the clients'
       configured rates, (k,), returns their `RunningSchedules`.
    2. After each local step s = 0, 1, ... its ``step(s, changes)`` gets the change of each
       still-training client's flat weights over step s, (j, P) (clients finish in stack order, so
       they are the first j), and returns their rates for step s + 1, (j,).
    """

    @classmethod
    @abstractmethod
    def start(cls, schedules: Sequence["LocalSchedule"], lr: torch.Tensor) -> RunningSchedules:
        """The running schedules of k clients of configured rates `lr`, (k,), before their first step."""


@dataclass(frozen=True, eq=False)
class Controls:
    """SCAFFOLD's control variates as a client receives them, flat like the weights (Karimireddy et
    al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", Algorithm 1)."""

    client: torch.Tensor  # c_i
    server: torch.Tensor  # c

    @property
    def correction(self) -> torch.Tensor:
        """c - c_i, added to every local gradient: y <- y - eta_l (g_i(y) - c_i + c) (line 10)."""
        return self.server - self.client

    def delta(self, x: torch.Tensor, y: torch.Tensor, lr_sum: float) -> torch.Tensor:
        """Delta c_i = c_i+ - c_i (line 13) with option II's c_i+ = c_i - c + (x - y_i) / (K eta_l)
        (line 12), K eta_l being the sum of the K local steps' rates (a `LocalSchedule` varies them)."""
        return (x - y) / lr_sum - self.server


@dataclass(frozen=True, eq=False)
class ClientJob:
    """What the server sends a client for one round, apart from the weights."""

    client: int
    round: int
    config: ClientConfig
    seed: int
    schedule: LocalSchedule | None = None  # the tuner's learning rate per local step, if any
    controls: Controls | None = None  # under SCAFFOLD
    statistics: tuple[Statistic, ...] = ()  # what the client uploads beside its weights (`Tuner.statistics`)

    @property
    def generator(self) -> torch.Generator:
        return seeding.torch_generator(self.seed, seeding.CLIENT, self.round, self.client)


@dataclass(frozen=True, eq=False)
class ClientUpdate:
    """What a client uploads: its model, sample count, the metrics it reports and the statistics its
    job asks for."""

    client: int
    weights: torch.Tensor
    num_samples: int
    train_loss: float  # mean data loss over the round's mini-batches (FedProx term excluded)
    val_loss: float  # on the client's local validation split, after training; nan when it has none
    val_score: float  # the task's scoring metric there
    num_val: int
    control_delta: torch.Tensor | None = None  # SCAFFOLD's Delta c_i (`Controls.delta`)
    statistics: Mapping[str, float | torch.Tensor] = field(default_factory=dict)  # exactly the job's, by name

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.train_loss)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: ModelSpec | None = None) -> tuple[float, float]:
    """Mean loss and score of `model` on (x, y), by the spec's loss and scoring metric (without a
    spec: cross-entropy and accuracy); (nan, nan) on an empty split."""
    loss, values = evaluate_metrics(model, x, y, spec, scoring_only=True)
    return loss, next(iter(values.values()))


@torch.no_grad()
def evaluate_metrics(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: ModelSpec | None = None, scoring_only: bool = False
) -> tuple[float, dict[str, float]]:
    """Mean loss and every metric of the spec (the scoring one first; only it with `scoring_only`)
    of `model` on (x, y); nan on an empty split."""
    loss_of = spec.loss if spec else default_loss
    metrics = spec.metrics if spec else (ACCURACY,)
    metrics = metrics[:1] if scoring_only else metrics
    if len(y) == 0:
        return math.nan, {m.name: math.nan for m in metrics}
    model.eval()
    loss_sum, sums = 0.0, [0.0] * len(metrics)
    for start in range(0, len(y), EVAL_BATCH):
        outputs = model(x[start : start + EVAL_BATCH])
        target = y[start : start + EVAL_BATCH]
        loss_sum += float(loss_of(outputs, target).sum(dtype=torch.float64))
        for i, metric in enumerate(metrics):
            sums[i] += float(metric.per_sample(outputs, target).sum(dtype=torch.float64))
    return loss_sum / len(y), {m.name: m.value(total / len(y)) for m, total in zip(metrics, sums, strict=True)}


def as_float32(value: float) -> float:
    """`value` rounded to float32 (inf beyond its range)."""
    return torch.tensor(value, dtype=torch.float32).item()


def local_steps(num_train: int, config: ClientConfig) -> int:
    """The local steps a client of `num_train` training samples takes in a round: its full steps,
    `local_epochs` * ceil(num_train / batch_size), or with `step_fraction` f < 1 (a fidelity's cap)
    the first max(1, ceil(f * full)) of them. Both engines take exactly these steps."""
    full = config.local_epochs * -(-num_train // config.batch_size)
    if config.step_fraction >= 1:
        return full
    return min(full, max(1, math.ceil(config.step_fraction * full)))


def train_locally(
    model: nn.Module,
    data: ClientData,
    config: ClientConfig,
    generator: torch.Generator,
    schedule: LocalSchedule | None = None,
    controls: Controls | None = None,
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = default_loss,
) -> tuple[float, float]:
    """`local_epochs` passes of mini-batch SGD over the client's shuffled training data, cut short
    after `local_steps` steps (`step_fraction` < 1: the first steps of the full run, its shuffles
    drawn alike); returns the mean loss over the steps taken (per-sample `loss_of`, the task's) and
    the sum of their learning rates.

    FedProx (Li et al. 2020, eq. 2) adds mu/2 ||w - w_global||^2 to the local objective; its
    gradient mu (w - w_global) is added to each parameter's gradient directly, and so is SCAFFOLD's
    correction c - c_i (`Controls.correction`) with `controls`. A `schedule` sets the learning rate
    of every step after the first from the steps' weight changes.
    Training stops at the first non-finite loss; the returned mean loss is then non-finite too.
    Hyperparameters are taken at float32, the weights' precision: a value beyond its range (lr
    1e308) becomes inf and the run diverges, where torch would refuse the double as an overflow.
    """
    params = list(model.parameters())
    lr, weight_decay, mu = (as_float32(v) for v in (config.lr, config.weight_decay, config.mu))
    anchor = [p.detach().clone() for p in params] if mu > 0 else None
    if controls:
        flat = controls.correction.split([p.numel() for p in params])
        corrections = [c.view_as(p) for c, p in zip(flat, params, strict=True)]
    else:
        corrections = None
    optimizer = torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=weight_decay)
    running = type(schedule).start([schedule], torch.tensor([lr], device=params[0].device)) if schedule else None
    before = flat_weights(model) if running else None
    model.train()
    loss_sum = torch.zeros((), device=data.x.device)
    steps, rate, lr_sum = 0, lr, 0.0
    total = local_steps(data.num_train, config)
    for _ in range(config.local_epochs):
        order = data.train[torch.randperm(data.num_train, generator=generator).to(data.train.device)]
        for start in range(0, len(order), config.batch_size)[: total - steps]:
            batch = order[start : start + config.batch_size]
            loss = loss_of(model(data.x[batch]), data.y[batch]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if anchor is not None:
                for p, p0 in zip(params, anchor, strict=True):
                    p.grad.add_(p.detach() - p0, alpha=mu)
            if corrections:
                for p, correction in zip(params, corrections, strict=True):
                    p.grad.add_(correction)
            optimizer.step()
            lr_sum += rate
            if running:
                now = flat_weights(model)
                rate = float(running.step(steps, (now - before).unsqueeze(0))[0])
                before = now
                for group in optimizer.param_groups:
                    group["lr"] = rate
            loss_sum += loss.detach()
            steps += 1
            if steps % STEPS_BETWEEN_CHECKS == 0:
                between_steps()
        if steps == total or not torch.isfinite(loss_sum):
            break
    return float(loss_sum) / steps, lr_sum


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch's intra-op parallelism off for the block, in this thread.

    How many threads share a matrix product changes its rounding, so a client trained with two
    threads in the flow's process and with one on a Dask worker (which starts workers with
    OMP_NUM_THREADS=1) ended its MNIST round ~1e-7 apart. With one thread everywhere, a seed gives
    the same weights on every backend and machine; the cost is small at a client's batch size
    (MNIST MLP, 6 clients, 2 cores: 0.26 s with one thread, 0.22-0.38 s with two).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def local_update(spec: ModelSpec, global_weights: torch.Tensor, data: ClientData, job: ClientJob) -> ClientUpdate:
    """One client's round: train from the global weights, then validate locally, single-threaded;
    the statistics its job asks for computed on the way."""
    with one_intra_op_thread():
        model = workspace_model(spec, global_weights)
        computed = data_statistics(spec, [job], [data])[0]
        if VAL_LOSS_BEFORE in job.statistics:
            computed[VAL_LOSS_BEFORE.name], _ = evaluate(model, data.x_val, data.y_val, spec)
        train_loss, lr_sum = train_locally(
            model, data, job.config, job.generator, job.schedule, job.controls, spec.loss
        )
        finite = math.isfinite(train_loss)
        val_loss, val_score = evaluate(model, data.x_val, data.y_val, spec) if finite else (math.nan, math.nan)
    weights = flat_weights(model)
    return ClientUpdate(
        client=job.client,
        weights=weights,
        num_samples=data.num_train,
        train_loss=train_loss,
        val_loss=val_loss,
        val_score=val_score,
        num_val=data.num_val,
        control_delta=job.controls.delta(global_weights, weights, lr_sum) if job.controls else None,
        statistics=reported(job, computed, val_loss),
    )


def reported(
    job: ClientJob, computed: Mapping[str, float | torch.Tensor], val_loss: float
) -> dict[str, float | torch.Tensor]:
    """The statistics the job asks for, by name, from those computed and the validation loss after
    training (`VAL_LOSS_AFTER`)."""
    values = {**computed, VAL_LOSS_AFTER.name: val_loss}
    return {s.name: values[s.name] for s in job.statistics if s.on_client}


def train_sequentially(
    spec: ModelSpec, weights: torch.Tensor, jobs: Sequence[ClientJob], data: Sequence[ClientData]
) -> list[ClientUpdate]:
    """The sequential engine: one client after another, each with one intra-op thread."""
    return [local_update(spec, weights, d, job) for job, d in zip(jobs, data, strict=True)]
