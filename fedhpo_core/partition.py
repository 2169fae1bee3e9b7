"""Splitting a training set between a server-held validation split and simulated clients.

Every training sample lands in exactly one place: the server's validation split, or one client's
training or local validation split. No client is left empty: a client a partitioner leaves
without samples receives one from the largest client.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedhpo_core import seeding

Partitioner = Callable[..., list[np.ndarray]]


@dataclass(frozen=True, eq=False)
class Partition:
    """Indices into the training set."""

    server_val: np.ndarray
    client_train: tuple[np.ndarray, ...]
    client_val: tuple[np.ndarray, ...]

    @property
    def num_clients(self) -> int:
        return len(self.client_train)

    def client_indices(self, client: int) -> np.ndarray:
        return np.concatenate([self.client_train[client], self.client_val[client]])


def split_iid(labels: np.ndarray, clients: int, rng: np.random.Generator, **_) -> list[np.ndarray]:
    """A uniform random split into near-equal parts."""
    return np.array_split(rng.permutation(len(labels)), clients)


def split_dirichlet(labels: np.ndarray, clients: int, rng: np.random.Generator, alpha: float, **_) -> list[np.ndarray]:
    """Label skew (Hsu et al. 2019): each class is divided between clients in proportions drawn
    from Dir(alpha * 1). Small alpha gives each client few classes; large alpha tends to IID."""
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for client, piece in enumerate(np.split(members, cuts)):
            parts[client].append(piece)
    return [np.concatenate(p) for p in parts]


def split_shards(
    labels: np.ndarray, clients: int, rng: np.random.Generator, shards_per_client: int, **_
) -> list[np.ndarray]:
    """Pathological non-IID (McMahan et al. 2017) with exactly k = shards_per_client classes per
    client: clients take k consecutive classes of a seeded class order, round robin, and each
    class is split evenly among the clients holding it."""
    classes = rng.permutation(np.unique(labels))
    if shards_per_client > len(classes) or clients * shards_per_client < len(classes):
        raise ValueError(
            f"shards needs shards_per_client <= {len(classes)} classes and clients * shards_per_client "
            f">= {len(classes)}, got {clients} clients x {shards_per_client}"
        )
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(clients):
        for j in range(shards_per_client):
            holders[int(classes[(client * shards_per_client + j) % len(classes)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for label, owners in holders.items():
        members = rng.permutation(np.flatnonzero(labels == label))
        for client, piece in zip(owners, np.array_split(members, len(owners)), strict=True):
            parts[client].append(piece)
    return [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]


PARTITIONERS: dict[str, Partitioner] = {"iid": split_iid, "dirichlet": split_dirichlet, "shards": split_shards}
NATURAL = "natural"  # the data's own clients (`Dataset.groups`): a table's client column, a folder per client


def natural_sizes(n: int, val_fraction: float, client_val_fraction: float) -> tuple[int, int, int]:
    """(server validation, local validation, training) rows of a client of n rows under the
    natural partition: the server's share comes off every client, one row always stays."""
    server = min(int(round(n * val_fraction)), n - 1)
    local = min(int(round((n - server) * client_val_fraction)), n - server - 1)
    return server, local, n - server - local


def natural_partition(groups: np.ndarray, seed: int, val_fraction: float, client_val_fraction: float) -> Partition:
    """Clients as the data holds them: each group's rows shuffled, the server's validation share
    of every group first, then the group's local validation split, the rest for training."""
    rng = seeding.numpy_rng(seed, seeding.PARTITION)
    server, train, val = [], [], []
    for g in range(int(groups.max()) + 1):
        rows = rng.permutation(np.flatnonzero(groups == g))
        n_server, n_val, _ = natural_sizes(len(rows), val_fraction, client_val_fraction)
        server.append(rows[:n_server])
        val.append(rows[n_server : n_server + n_val])
        train.append(rows[n_server + n_val :])
    return Partition(np.sort(np.concatenate(server)), tuple(train), tuple(val))


def _fill_empty(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Give each empty client one sample taken from the currently largest client."""
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    for client, part in enumerate(parts):
        if len(part) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            parts[client], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts


def partition_dataset(
    labels: np.ndarray,
    clients: int,
    partition: str,
    seed: int,
    val_fraction: float,
    client_val_fraction: float,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    groups: np.ndarray | None = None,
) -> Partition:
    """Server validation split first (FedTune's setting), then the rest split between clients,
    then each client's local validation split (at least one training sample always stays). With
    partition "natural", the clients are the `groups` (a client id per sample) instead."""
    if partition == "auto":  # as `fedhpo_core.task.prepared` resolves it
        partition = NATURAL if groups is not None else "iid"
    if partition == NATURAL:
        if groups is None:
            raise ValueError("partition natural needs data with its own clients (a client column or folder)")
        return natural_partition(groups, seed, val_fraction, client_val_fraction)
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    rng = seeding.numpy_rng(seed, seeding.PARTITION)
    order = rng.permutation(len(labels))
    n_val = int(round(len(labels) * val_fraction))
    server_val, pool = order[:n_val], order[n_val:]
    if clients > len(pool):
        raise ValueError(f"{clients} clients but only {len(pool)} samples to share")
    split = PARTITIONERS[partition](labels[pool], clients, rng, alpha=alpha, shards_per_client=shards_per_client)
    train, val = [], []
    for part in _fill_empty(split):
        members = pool[rng.permutation(part)]
        n_local_val = min(int(round(len(members) * client_val_fraction)), len(members) - 1)
        val.append(members[:n_local_val])
        train.append(members[n_local_val:])
    return Partition(np.sort(server_val), tuple(train), tuple(val))


def label_histogram(labels: np.ndarray, partition: Partition, num_classes: int) -> np.ndarray:
    """Samples of each class held by each client (train and local validation), shape (clients,
    classes); one column of sample counts for regression targets (`num_classes` 0)."""
    if num_classes == 0:
        return np.array([[len(partition.client_indices(c))] for c in range(partition.num_clients)])
    return np.stack(
        [np.bincount(labels[partition.client_indices(c)], minlength=num_classes) for c in range(partition.num_clients)]
    )


def label_skew(histogram: np.ndarray) -> float:
    """Mean total-variation distance between each client's label distribution and the pooled one:
    0 for identical distributions, approaching 1 when clients hold disjoint classes."""
    client = histogram / histogram.sum(axis=1, keepdims=True)
    pooled = histogram.sum(axis=0) / histogram.sum()
    return float(0.5 * np.abs(client - pooled).sum(axis=1).mean())
