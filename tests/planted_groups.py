"""A planted two-group problem for the personalized methods, with no training: 20 clients, half of
them (the odd ones) holding features scaled by sqrt(10). For a linear model that multiplies the
loss's Hessian by 10, so their best learning rate is ten times smaller: 0.05 for group 0, 0.005 for
group 1 (`BEST`), three steps apart on the grid `LRS`. A client's data encoding (`DataEncoding`,
pFedHPO's noisy random-feature mean embedding) is computed from its real features, so a method can
tell the groups apart only through what the clients send.

A round's outcome is a known function of the learning rate each client drew, as in
`tests/test_planted.py`: the client's validation loss falls from `before` (its own level times a
trend that shrinks with the rounds) to before * exp(-q + noise), with
q = 0.4 - 0.25 |log10(lr / best of its group)| and noise sd `NOISE`; its validation accuracy after
training is 1 - after / 4; the server's validation accuracy is the mean of the clients'.
"""

import math
from collections.abc import Mapping

import numpy as np
import torch

from fedhpo_core import seeding
from fedhpo_core.client import ClientData, ClientUpdate
from fedhpo_core.federation import RoundReport
from fedhpo_core.models import ModelSpec
from fedhpo_core.settings import ClientConfig
from fedhpo_core.statistics import DataEncoding

LRS = (0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
VALUES = [{"lr": lr} for lr in LRS]
CONFIGS = [ClientConfig(lr=lr) for lr in LRS]
BEST = {0: 0.05, 1: 0.005}
CLIENTS = 20
FEATURES = 8
SAMPLES = 60
NOISE = 0.1
SPEC = ModelSpec("mlp", (FEATURES,), 2)
ENCODING = DataEncoding(dim=32, seed=0, noise=0.1)


def group_of(client: int) -> int:
    return client % 2


def quality(client: int, lr: float) -> float:
    return 0.4 - 0.25 * abs(math.log10(lr / BEST[group_of(client)]))


def client_data(seed: int = 0) -> list[ClientData]:
    """Each client's own samples: Gaussian features (scaled by sqrt(10) in group 1), labels by a
    random linear rule, 50 for training and 10 for validation."""
    generator = torch.Generator().manual_seed(seed)
    rule = torch.randn(FEATURES, generator=generator)
    clients = []
    for client in range(CLIENTS):
        x = torch.randn(SAMPLES, FEATURES, generator=generator) * (math.sqrt(10) if group_of(client) else 1.0)
        y = (x @ rule > 0).long()
        clients.append(ClientData(x, y, torch.arange(50), torch.arange(50, SAMPLES)))
    return clients


def encodings(seed: int = 0, shuffled: bool = False) -> dict[int, torch.Tensor]:
    """Every client's data encoding; `shuffled`: handed to the clients in a random order (a method
    that learns from them then learns nothing about the groups)."""
    values = ENCODING.compute(SPEC, client_data(seed), list(range(CLIENTS)))
    order = seeding.numpy_rng(seed, 77).permutation(CLIENTS) if shuffled else np.arange(CLIENTS)
    return {client: values[order[client]] for client in range(CLIENTS)}


def planted_round(
    round: int, configs: Mapping[int, ClientConfig], rng: np.random.Generator, encoded: Mapping[int, torch.Tensor]
) -> RoundReport:
    """The round's report when each client trained with `configs[client]`: its validation loss
    before and after, its accuracy after, its encoding; the server's accuracy the clients' mean."""
    levels = np.linspace(0.5, 2.0, CLIENTS)
    trend = 1 / math.sqrt(round)
    updates = []
    for client, config in configs.items():
        before = levels[client] * trend
        after = before * math.exp(-quality(client, config.lr) + rng.normal(0, NOISE))
        statistics = {"val_loss_before": before, "val_loss_after": after, ENCODING.name: encoded[client]}
        updates.append(ClientUpdate(client, torch.zeros(1), 50, after, after, 1 - after / 4, 10, statistics=statistics))
    val_loss = float(np.mean([u.val_loss for u in updates]))
    val_score = float(np.mean([u.val_score for u in updates]))
    return RoundReport(round, dict(configs), tuple(updates), val_loss, val_score, torch.zeros(1), torch.zeros(1))


def run(tuner, rounds: int, seed: int = 0, shuffled: bool = False):
    """`rounds` planted rounds of every client with the tuner's configurations."""
    rng = seeding.numpy_rng(seed, 99)
    encoded = encodings(seed, shuffled)
    for round in range(1, rounds + 1):
        configs = tuner.configure(round, list(range(CLIENTS)))
        tuner.observe(planted_round(round, configs, rng, encoded))
    return tuner


def on_group_best(lrs: Mapping[int, float]) -> float:
    """The fraction of clients whose learning rate is their group's best within one grid step."""
    near = [abs(LRS.index(lr) - LRS.index(BEST[group_of(c)])) <= 1 for c, lr in lrs.items()]
    return sum(near) / len(near)
