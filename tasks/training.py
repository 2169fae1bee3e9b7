"""Prefect tasks over fedhpo_core's training steps.

Only the partition is cached, on its (small) settings. Tasks that take weights or datasets use
NO_CACHE: Prefect's default policy would hash every input, megabytes of tensors per client per
round, on the hot path.
"""

import inspect

import torch
from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy
from prefect.utilities.hashing import hash_objects

from fedhpo_core import partition as partitioning
from fedhpo_core.client import ClientData, ClientJob, ClientUpdate, local_update
from fedhpo_core.data import Dataset, load_dataset
from fedhpo_core.federation import RoundSteps, aggregate_updates, evaluate_splits
from fedhpo_core.models import ModelSpec
from fedhpo_core.settings import DataSettings

# The task's own source is not enough: a change to a partitioner must miss the old cache entries.
PARTITIONER_SOURCE = CacheKeyFnPolicy(cache_key_fn=lambda *_: hash_objects(inspect.getsource(partitioning)))


@task(name="load-dataset", cache_policy=NO_CACHE)
def load_data(name: str, root: str) -> Dataset:
    return load_dataset(name, root)


@task(name="partition", cache_policy=INPUTS + TASK_SOURCE + PARTITIONER_SOURCE, persist_result=True)
def partition_data(data: DataSettings) -> partitioning.Partition:
    """Server validation split, client splits and client validation splits, reused across runs
    with the same data settings."""
    labels = load_dataset(data.dataset, data.data_root).y_train.numpy()
    return partitioning.partition_dataset(
        labels,
        data.clients,
        data.partition,
        data.seed,
        data.val_fraction,
        data.client_val_fraction,
        alpha=data.alpha,
        shards_per_client=data.shards_per_client,
    )


@task(name="client-update", cache_policy=NO_CACHE, task_run_name="round-{job.round}-client-{job.client}")
def client_update(spec: ModelSpec, weights: torch.Tensor, data: ClientData, job: ClientJob) -> ClientUpdate:
    return local_update(spec, weights, data, job)


aggregate_task = task(name="aggregate", cache_policy=NO_CACHE)(aggregate_updates)
evaluate_task = task(name="evaluate", cache_policy=NO_CACHE)(evaluate_splits)


class PrefectSteps(RoundSteps):
    """Each step of a round as a Prefect task run: one per client, then aggregation and evaluation.

    The task runs execute one after another in the flow's own thread. Measured on 2 CPU cores
    (MNIST MLP, 10 clients): clients in concurrent threads ran a round slower, since small ops
    hold the GIL, and any second thread that runs torch gets its own OpenMP team whose spinning
    workers contend with the first (a round took 2.0 s instead of 1.1 s). Parallel execution
    belongs to process-based backends that load client data where they run.
    """

    def train_clients(self, spec, weights, jobs, data):
        return [client_update(spec, weights, d, job) for job, d in zip(jobs, data, strict=True)]

    def aggregate(self, server, weights, updates, state):
        return aggregate_task(server, weights, updates, state)

    def evaluate(self, spec, weights, splits):
        return evaluate_task(spec, weights, splits)
