"""Personalized evaluation: how well the trained global model serves each client once the client has
adapted it to its own data.

Each client takes `finetune_steps` (k) local SGD steps from the global model w on mini-batches of
its own training data, at `finetune_lr` (0: its own configured rate), with its own batch size,
momentum and weight decay, and is scored on its own held-out validation split. With k = 0 the
global model is scored on each client's split as it is. `ditto_lambda` (lambda) adds Ditto's
proximal term to those steps: the personal model v_i minimizes F_i(v) + lambda/2 ||v - w||^2
(Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021, eq. 2 / Algorithm 1, lines 6-7 with the FedProx term the engines already have), so
lambda blends the two: 0 is free fine-tuning, large lambda keeps the global model. Deviation from
Ditto: v_i is solved from the final global model by k steps when the client is evaluated, not
carried through the rounds and updated each time the client is sampled (which would double every
round's client computation and keep a model per client); Ditto's own "local fine-tuning" baseline
is this with lambda = 0.

The settings are client settings, so they can be searched (per client with `--scope
personalized`), and the two summaries are objectives a study can optimize (`--objective
personalized`, `personalized-worst`): the clients' mean personalized score, and the mean over the
worst tenth of the clients (at least one), the fairness view of personalization (Ditto's
"worst 10%" accuracy).
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedhpo_core import seeding
from fedhpo_core.client import ClientData, ClientJob, evaluate
from fedhpo_core.models import ModelSpec, workspace_model
from fedhpo_core.settings import ClientConfig
from fedhpo_core.task import Metric

WORST_FRACTION = 0.1
OBJECTIVES = {"personalized": "", "personalized-worst": "_worst10"}  # a study's objective -> metric suffix


def objective_key(objective: str, metric: Metric) -> str:
    """The personalized metric a study's `objective` scores trials by: `personal_acc[_worst10]`."""
    return f"personal_{metric.name}{OBJECTIVES[objective]}"


@dataclass(frozen=True)
class Personalized:
    """Each client's personalized score, of the clients with a validation split (a client whose
    fine-tuning diverged scores the metric's worst)."""

    scores: Mapping[int, float]
    metric: Metric

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.scores.values()))) if self.scores else math.nan

    @property
    def worst(self) -> float:
        """The mean over the worst tenth of the clients (at least one), by the metric's direction."""
        if not self.scores:
            return math.nan
        ranked = np.sort(np.array(list(self.scores.values())) * self.metric.sign())
        return float(ranked[: max(1, math.ceil(WORST_FRACTION * len(ranked)))].mean() * self.metric.sign())

    def metrics(self) -> dict[str, float]:
        """`personal_<score>` and `personal_<score>_worst10`, as logged and as objectives."""
        values = {"personalized": self.mean, "personalized-worst": self.worst}
        return {objective_key(k, self.metric): v for k, v in values.items()}


def finetune_rows(data: ClientData, steps: int, batch_size: int, generator: torch.Generator) -> ClientData:
    """The client with exactly `steps` batches of training rows: its rows in a random order, repeated
    as often as `steps` batches need, so one local epoch over them is k steps."""
    order = data.train[torch.randperm(data.num_train, generator=generator).to(data.train.device)]
    needed = steps * batch_size
    rows = order.repeat(-(-needed // len(order)))[:needed]
    return ClientData(data.x, data.y, rows, data.val)


def personal_config(config: ClientConfig) -> ClientConfig:
    """The local training of personalization: k steps at the fine-tuning rate, Ditto's lambda as
    the proximal weight."""
    return replace(config, lr=config.finetune_lr or config.lr, mu=config.ditto_lambda, local_epochs=1)


def personalize(
    spec: ModelSpec,
    weights: torch.Tensor,
    clients: Sequence[ClientData],
    configs: Mapping[int, ClientConfig],
    seed: int,
    round: int,
    train_clients,
) -> Personalized:
    """Every client's personalized score of the global `weights` (`configs[c]`: client c's settings),
    the fine-tuning done by `train_clients` (an engine: `federation.TRAIN_CLIENTS`), all the clients
    that fine-tune in one call."""
    scores: dict[int, float] = {}
    scored = [c for c in configs if clients[c].num_val > 0]
    tuning = [c for c in scored if configs[c].finetune_steps > 0 and clients[c].num_train > 0]
    plain = [c for c in scored if c not in tuning]
    if plain:
        model = workspace_model(spec, weights)
        for c in plain:
            scores[c] = evaluate(model, clients[c].x_val, clients[c].y_val, spec)[1]
    if tuning:
        jobs, data = [], []
        for c in tuning:
            config = configs[c]
            generator = seeding.torch_generator(seed, seeding.PERSONALIZE, round, c)
            data.append(finetune_rows(clients[c], config.finetune_steps, config.batch_size, generator))
            jobs.append(ClientJob(c, round, personal_config(config), seed))
        for update in train_clients(spec, weights, jobs, data):
            scores[update.client] = update.val_score
    worst = spec.score.worst()
    return Personalized({c: scores[c] if math.isfinite(scores[c]) else worst for c in scored}, spec.score)
