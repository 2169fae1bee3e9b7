"""A client's round: local SGD (or FedProx) from the global model, then local validation."""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedhpo_core import seeding
from fedhpo_core.models import ModelSpec, flat_weights, workspace_model
from fedhpo_core.settings import ClientConfig

EVAL_BATCH = 4096


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


@dataclass(frozen=True, eq=False)
class ClientJob:
    """What the server sends a client for one round, apart from the weights."""

    client: int
    round: int
    config: ClientConfig
    seed: int
    global_update: torch.Tensor | None = None  # the last round's global update, for lr_hypergradient
    clients_in_round: int = 1

    @property
    def generator(self) -> torch.Generator:
        return seeding.torch_generator(self.seed, seeding.CLIENT, self.round, self.client)


@dataclass(frozen=True, eq=False)
class ClientUpdate:
    """What a client uploads: its model, sample count and the metrics it reports."""

    client: int
    weights: torch.Tensor
    num_samples: int
    train_loss: float  # mean data loss over the round's mini-batches (FedProx term excluded)
    val_loss: float  # on the client's local validation split, after training; nan when it has none
    val_acc: float
    num_val: int
    val_loss_before: float = math.nan  # the received global model on the same split (FedEx's "before")

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.train_loss)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on (x, y); (nan, nan) on an empty split."""
    if len(y) == 0:
        return math.nan, math.nan
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), EVAL_BATCH):
        logits = model(x[start : start + EVAL_BATCH])
        target = y[start : start + EVAL_BATCH]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    return loss_sum / len(y), correct / len(y)


GAMMA_BETA = 10.0  # FedHyper's bound on the client-side learning-rate multiplier


class HypergradientLR:
    """FedHyper's client-side local scheduler (arXiv 2310.03156; reference code ATP-1010/FedHyper,
    `update.py`). After each local step k >= 1 with parameter change u_k, the learning rate is
    multiplied by gamma = min(1.1, 1 + 0.1 <u_k, Delta> / m + <u_k, u_{k-1}>), the cumulative
    multiplier clipped to [1 / gamma_beta, gamma_beta]: Delta is the last global update, m the
    round's clients, and u_0's predecessor is Delta itself (the reference's choices)."""

    def __init__(self, params, optimizer, base_lr: float, global_update: torch.Tensor, clients: int):
        self.params, self.optimizer, self.base_lr = params, optimizer, base_lr
        self.global_update, self.clients = global_update, clients
        self.previous_step, self.multiplier, self.steps = global_update, 1.0, 0
        self.before = flat_weights_of(params)

    def after_step(self) -> None:
        now = flat_weights_of(self.params)
        step, self.before = now - self.before, now
        self.steps += 1
        if self.steps == 1:
            return
        alignment = 0.1 * float(step @ self.global_update) / self.clients + float(step @ self.previous_step)
        gamma = min(1.1, 1.0 + alignment)
        self.multiplier = min(GAMMA_BETA, max(1 / GAMMA_BETA, gamma * self.multiplier))
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * self.multiplier
        self.previous_step = step


def flat_weights_of(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def as_float32(value: float) -> float:
    """`value` rounded to float32 (inf beyond its range)."""
    return torch.tensor(value, dtype=torch.float32).item()


def train_locally(
    model: nn.Module,
    data: ClientData,
    config: ClientConfig,
    generator: torch.Generator,
    global_update: torch.Tensor | None = None,
    clients_in_round: int = 1,
) -> float:
    """`local_epochs` passes of mini-batch SGD over the client's shuffled training data.

    FedProx (Li et al. 2020, eq. 2) adds mu/2 ||w - w_global||^2 to the local objective; its
    gradient mu (w - w_global) is added to each parameter's gradient directly. With
    `lr_hypergradient` and a global update, `HypergradientLR` adapts the learning rate each step.
    Training stops at the first non-finite loss; the returned mean loss is then non-finite too.
    Hyperparameters are taken at float32, the weights' precision: a value beyond its range (lr
    1e308) becomes inf and the run diverges, where torch would refuse the double as an overflow.
    """
    params = list(model.parameters())
    lr, weight_decay, mu = (as_float32(v) for v in (config.lr, config.weight_decay, config.mu))
    anchor = [p.detach().clone() for p in params] if mu > 0 else None
    optimizer = torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=weight_decay)
    schedule = (
        HypergradientLR(params, optimizer, lr, global_update, clients_in_round)
        if config.lr_hypergradient and global_update is not None
        else None
    )
    model.train()
    loss_sum = torch.zeros((), device=data.x.device)
    steps = 0
    for _ in range(config.local_epochs):
        order = data.train[torch.randperm(data.num_train, generator=generator).to(data.train.device)]
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = F.cross_entropy(model(data.x[batch]), data.y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if anchor is not None:
                for p, p0 in zip(params, anchor, strict=True):
                    p.grad.add_(p.detach() - p0, alpha=mu)
            optimizer.step()
            if schedule:
                schedule.after_step()
            loss_sum += loss.detach()
            steps += 1
        if not torch.isfinite(loss_sum):
            break
    return float(loss_sum) / steps


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
    """One client's round: train from the global weights, then validate locally, single-threaded."""
    with one_intra_op_thread():
        model = workspace_model(spec, global_weights)
        val_loss_before, _ = evaluate(model, data.x_val, data.y_val)
        train_loss = train_locally(model, data, job.config, job.generator, job.global_update, job.clients_in_round)
        finite = math.isfinite(train_loss)
        val_loss, val_acc = evaluate(model, data.x_val, data.y_val) if finite else (math.nan, math.nan)
    return ClientUpdate(
        client=job.client,
        weights=flat_weights(model),
        num_samples=data.num_train,
        train_loss=train_loss,
        val_loss=val_loss,
        val_acc=val_acc,
        num_val=data.num_val,
        val_loss_before=val_loss_before,
    )
