"""Prefect tasks over fedhpo_core's training steps, and the execution backends that run them.

Only the partition is cached, on its (small) settings. Tasks that take weights or datasets use
NO_CACHE: Prefect's default policy would hash every input, megabytes of tensors per client per
round, on the hot path.
"""

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy
from prefect.task_runners import TaskRunner
from prefect.utilities.hashing import hash_objects

from fedhpo_core import partition as partitioning
from fedhpo_core.client import ClientData, ClientJob, ClientUpdate
from fedhpo_core.cohort import cohort_refusal
from fedhpo_core.data import Dataset
from fedhpo_core.federation import (
    TRAIN_CLIENTS,
    RoundSteps,
    aggregate_updates,
    clients_of,
    evaluate_splits,
    partition_of,
)
from fedhpo_core.models import ModelSpec
from fedhpo_core.settings import DataSettings, ExecutionSettings, TrainSettings
from fedhpo_core.task import TaskRef, load_task_data

# The task's own source is not enough: a change to a partitioner must miss the old cache entries.
PARTITIONER_SOURCE = CacheKeyFnPolicy(cache_key_fn=lambda *_: hash_objects(inspect.getsource(partitioning)))


@task(name="load-dataset", cache_policy=NO_CACHE)
def load_data(task: TaskRef, root: str) -> Dataset:
    """The task's data, loaded once per process."""
    return load_task_data(task, root)


def announce_engine(spec: ModelSpec, execution: ExecutionSettings, logger) -> None:
    """One line when the cohort engine cannot batch the task's model (its clients then train one
    after another, as on the sequential engine)."""
    if execution.engine == "cohort" and (reason := cohort_refusal(spec)):
        logger.warning("cohort engine: %s; training its clients one after another (sequential engine)", reason)


def task_params(settings: TrainSettings, spec: ModelSpec) -> dict:
    """The task's name, model and scoring metric with its direction, as run params (a task of
    one's own shows its name as the dataset and its model's class as the model)."""
    params = {"task": settings.task_ref.label, "score": spec.score.name, "score_direction": spec.score.direction}
    if not settings.task_ref.bundled:
        params |= {"dataset": settings.task_ref.label, "model": type(spec.build()).__name__}
    return params


@task(name="partition", cache_policy=INPUTS + TASK_SOURCE + PARTITIONER_SOURCE, persist_result=True)
def partition_data(data: DataSettings) -> partitioning.Partition:
    """Server validation split, client splits and client validation splits, reused across runs
    with the same data settings."""
    return partition_of(data)


@task(name="train-clients", cache_policy=NO_CACHE, task_run_name="round-{jobs[0].round}-clients")
def train_clients(
    engine: str, spec: ModelSpec, weights: torch.Tensor, jobs: list[ClientJob], data: list[ClientData]
) -> list[ClientUpdate]:
    """The round's sampled clients, trained by the engine in this process."""
    return TRAIN_CLIENTS[engine](spec, weights, jobs, data)


@task(
    name="train-client-share",
    cache_policy=NO_CACHE,
    task_run_name="round-{jobs[0].round}-clients-from-{jobs[0].client}",
)
def train_client_share(
    engine: str, spec: ModelSpec, weights: torch.Tensor, data: DataSettings, device: str, jobs: list[ClientJob]
) -> list[ClientUpdate]:
    """A share of the round's clients, trained by the engine where the task runner puts it (a Dask
    worker). Each client's data is loaded there from the data settings, once per worker process:
    only the weights and the jobs travel, and each update's weights come back as their own copy
    (not a view of the share's stacked weights, which would travel whole with every client)."""
    clients = clients_of(data, device)
    updates = TRAIN_CLIENTS[engine](spec, weights.to(device), jobs, [clients[job.client] for job in jobs])
    return [replace(update, weights=update.weights.clone()) for update in updates]


aggregate_task = task(name="aggregate", cache_policy=NO_CACHE)(aggregate_updates)
evaluate_task = task(name="evaluate", cache_policy=NO_CACHE)(evaluate_splits)


class PrefectSteps(RoundSteps):
    """Each step of a round as a Prefect task run: the round's clients, then aggregation and
    evaluation; three task runs a round, however many clients it has.

    Without a task runner the clients train in one task run in the calling thread, by the engine
    (a cohort: one batched computation). Measured on 2 CPU cores (MNIST MLP, 10 clients): clients
    in concurrent threads ran a round slower, since small ops hold the GIL, and any second thread
    that runs torch gets its own OpenMP team whose spinning workers contend with the first.

    With a task runner (Dask), the round's clients are split into `slots` contiguous shares, one
    task run each (a cohort per share), submitted at once. Not one task run per client: a Prefect
    task run on a Dask worker costs ~120-170 ms of API calls (measured on 2 cores, trivial body),
    three times a client's MNIST round.

    A worker that dies mid-round costs time, not results: Dask's scheduler runs its share again
    elsewhere, from the same weights and jobs, and a client's shuffling derives from its job's seed
    alone, so the round ends bit for bit as without the death; the share's task run keeps its id and
    ends COMPLETED. A share that has seen more workers die than `distributed.scheduler.allowed-failures`
    (3) is taken for their cause: `KilledWorker` fails the round and the flow.
    """

    def __init__(
        self,
        engine: str = "cohort",
        runner: TaskRunner | None = None,
        data: DataSettings | None = None,
        slots: int = 1,
        device: str = "cpu",
    ):
        super().__init__(engine)
        self.runner, self.data, self.slots, self.device = runner, data, slots, device

    def train_clients(self, spec, weights, jobs, data):
        if self.runner is None:
            return train_clients(self.engine, spec, weights, list(jobs), list(data))
        parameters = {"engine": self.engine, "spec": spec, "weights": weights, "data": self.data, "device": self.device}
        shares = np.array_split(np.arange(len(jobs)), min(self.slots, len(jobs)))  # contiguous, sizes within 1
        futures = [
            self.runner.submit(train_client_share, parameters | {"jobs": [jobs[i] for i in share]}) for share in shares
        ]
        updates = [update for future in futures for update in future.result()]
        return [replace(update, weights=update.weights.to(weights.device)) for update in updates]

    def aggregate(self, server, weights, updates, state, links):
        return aggregate_task(server, weights, updates, state, links)

    def evaluate(self, spec, weights, splits):
        return evaluate_task(spec, weights, splits)


@contextmanager
def dask_scheduler(execution: ExecutionSettings) -> Iterator[str | None]:
    """The Dask scheduler address to send clients to: the given one, or a local cluster's, started
    here and stopped on exit (bound to 127.0.0.1); None for the thread backend."""
    if execution.task_runner != "dask" or execution.dask_address:
        yield execution.dask_address
        return
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=execution.dask_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        yield cluster.scheduler_address


@contextmanager
def round_steps(execution: ExecutionSettings, data: DataSettings) -> Iterator[PrefectSteps]:
    """PrefectSteps with the chosen engine on the chosen backend, open for the duration of the block."""
    with dask_scheduler(execution) as address:
        if address is None:
            yield PrefectSteps(execution.engine, device=execution.resolved_device)
            return
        from prefect_dask import DaskTaskRunner

        with DaskTaskRunner(address=address) as runner:
            workers = runner.client.scheduler_info()["workers"].values()
            slots = max(1, sum(worker["nthreads"] for worker in workers))
            yield PrefectSteps(execution.engine, runner, data, slots, execution.resolved_device)
