"""`ClientConfig.step_fraction`, a fidelity's cap on local steps: both engines take the first
max(1, ceil(f * full)) steps of the uncapped run, and nothing else."""

from dataclasses import replace

import pytest
import torch
from test_cohort import TOLERANCE, HalvingRate, assert_agree, digits_data
from torch.nn import functional as F

from fedhpo_core import cohort
from fedhpo_core.client import (
    ClientData,
    ClientJob,
    Controls,
    LocalSchedule,
    RunningSchedules,
    as_float32,
    local_steps,
    local_update,
    one_intra_op_thread,
    train_sequentially,
)
from fedhpo_core.models import ModelSpec, flat_weights, load_flat_weights
from fedhpo_core.settings import ClientConfig
from fedhpo_core.task import default_loss

SPEC = ModelSpec("mlp", (1, 4, 4), 3)
ENGINES = {"sequential": train_sequentially, "cohort": cohort.train_cohort}


def make_client(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return ClientData.of(x, y, x[:4], y[:4])


def reference(start: torch.Tensor, data: ClientData, job: ClientJob, steps: int) -> tuple[torch.Tensor, float]:
    """Plain local SGD written out: one shuffle per epoch from the job's generator, mini-batches in
    order, stopped after `steps` steps; the weights and the mean loss of the steps taken."""
    config, generator = job.config, job.generator
    with one_intra_op_thread():
        model = load_flat_weights(SPEC.build(), start)
        optimizer = torch.optim.SGD(model.parameters(), lr=as_float32(config.lr))
        taken, loss_sum = 0, torch.zeros(())
        while taken < steps:
            order = data.train[torch.randperm(data.num_train, generator=generator)]
            for first in range(0, len(order), config.batch_size):
                if taken == steps:
                    break
                batch = order[first : first + config.batch_size]
                loss = default_loss(model(data.x[batch]), data.y[batch]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                taken += 1
    return flat_weights(model), float(loss_sum) / taken


def test_local_steps_caps_the_full_count():
    config = ClientConfig(batch_size=5, local_epochs=2)  # 24 samples: 5 steps an epoch, 10 in all
    expected = {1.0: 10, 0.5: 5, 0.35: 4, 0.72: 8, 0.05: 1, 1e-6: 1}
    assert {f: local_steps(24, replace(config, step_fraction=f)) for f in expected} == expected
    assert local_steps(25, config) == 10 and local_steps(26, config) == 12


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.35, 0.72, 0.05])
def test_the_sequential_engine_takes_the_first_steps_of_the_full_run(fraction):
    client, start = make_client(), SPEC.initial_weights(3)
    config = ClientConfig(lr=0.3, batch_size=5, local_epochs=2, step_fraction=fraction)
    job = ClientJob(0, 1, config, seed=4)
    update = local_update(SPEC, start, client, job)
    weights, loss = reference(start, client, job, local_steps(client.num_train, config))
    assert torch.equal(update.weights, weights) and update.train_loss == loss
    if fraction < 1:
        full = local_update(SPEC, start, client, ClientJob(0, 1, ClientConfig(lr=0.3, batch_size=5, local_epochs=2), 4))
        assert not torch.allclose(update.weights, full.weights)


class CountedRate(LocalSchedule):
    """Halves the rate after every local step and counts the steps it is shown."""

    def __init__(self):
        self.seen = 0

    @classmethod
    def start(cls, schedules, lr):
        return CountedRates(list(schedules), lr)


class CountedRates(RunningSchedules):
    def __init__(self, schedules, lr):
        self.schedules, self.lr = schedules, lr

    def step(self, step, changes):
        for schedule in self.schedules[: len(changes)]:  # the clients still training: a prefix
            schedule.seen += 1
        return self.lr[: len(changes)] / 2 ** (step + 1)


def scaffold_jobs(configs, schedules, size):
    generator = torch.Generator().manual_seed(5)
    controls = [Controls(*(torch.randn(size, generator=generator) * 0.01 for _ in range(2))) for _ in configs]
    return [
        ClientJob(c, 1, config, 0, schedule, control)
        for c, (config, schedule, control) in enumerate(zip(configs, schedules, controls, strict=True))
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_half_of_two_epochs_is_one_epoch_bit_for_bit(engine):
    """The first epoch of a 2-epoch run draws the 1-epoch run's shuffle: capping two epochs at half
    gives the 1-epoch run exactly, its loss, SCAFFOLD's lr_sum and its local schedules' steps."""
    data = digits_data("mlp")
    start = data.spec.initial_weights(0)
    runs = {}
    for epochs, fraction in ((1, 1.0), (2, 0.5)):
        configs = [
            ClientConfig(lr=0.05 + 0.01 * c, weight_decay=1e-3 * (c % 2), mu=0.1 * (c % 3), batch_size=16)
            for c in range(6)
        ]
        configs = [replace(c, local_epochs=epochs, step_fraction=fraction) for c in configs]
        schedules = [CountedRate() if c % 2 else None for c in range(6)]
        updates = ENGINES[engine](data.spec, start, scaffold_jobs(configs, schedules, data.spec.size), data.clients)
        runs[epochs] = updates, schedules
        for client, schedule in zip(data.clients, schedules, strict=True):
            if schedule:
                assert schedule.seen == -(-client.num_train // 16)
    (one, _), (capped, _) = runs[1], runs[2]
    for a, b in zip(one, capped, strict=True):
        assert torch.equal(a.weights, b.weights) and a.train_loss == b.train_loss
        assert torch.equal(a.control_delta, b.control_delta)  # lr_sum over the steps taken
        assert a.val_loss == b.val_loss
    assert not torch.equal(capped[0].weights, start)


@pytest.mark.parametrize("kernel", ["vmap", "linear"])
def test_engines_agree_with_mixed_step_fractions_in_one_cohort(kernel):
    data = digits_data("mlp")
    start = data.spec.initial_weights(0)
    fractions = [0.2, 1.0, 0.5, 0.05, 0.75, 0.34]
    configs = [  # one batch size: one cohort; no momentum
        ClientConfig(
            lr=0.05 + 0.01 * c,
            weight_decay=1e-3 * (c % 2),
            mu=0.2 * (c % 3 == 1),
            batch_size=16,
            local_epochs=1 + c % 3,
            step_fraction=f,
        )
        for c, f in enumerate(fractions)
    ]
    steps = [local_steps(d.num_train, config) for d, config in zip(data.clients, configs, strict=True)]
    full = [
        local_steps(d.num_train, replace(config, step_fraction=1.0))
        for d, config in zip(data.clients, configs, strict=True)
    ]
    assert sorted(range(6), key=lambda i: -steps[i]) != sorted(range(6), key=lambda i: -full[i])  # the cap reorders
    schedules = [HalvingRate() if c in (1, 2) else CountedRate() if c in (0, 4) else None for c in range(6)]
    jobs = scaffold_jobs(configs, schedules, data.spec.size)
    sequential = train_sequentially(data.spec, start, jobs, data.clients)
    sequential_seen = [s.seen if isinstance(s, CountedRate) else None for s in schedules]
    for s in schedules:
        if isinstance(s, CountedRate):
            s.seen = 0
    cohort.KERNELS["mlp"] = kernel
    try:
        batched = cohort.train_cohort(data.spec, start, jobs, data.clients)
        plan = cohort.Cohort(data.spec, start, jobs, data.clients)
    finally:
        del cohort.KERNELS["mlp"]
    assert_agree(sequential, batched)
    for a, b in zip(sequential, batched, strict=True):
        assert (a.control_delta - b.control_delta).abs().max() < 100 * TOLERANCE  # divided by lr_sum
    seen = [s.seen if isinstance(s, CountedRate) else None for s in schedules]
    assert (
        seen == sequential_seen == [steps[c] if isinstance(s, CountedRate) else None for c, s in enumerate(schedules)]
    )
    assert plan.steps.tolist() == sorted(steps, reverse=True)  # the capped counts order the cohort
    assert [steps[i] for i in plan.order] == plan.steps.tolist()
    # Each capped client took the first steps of its full run.
    uncapped = [ClientJob(j.client, j.round, replace(j.config, step_fraction=1.0), j.seed) for j in jobs]
    for job, d, n in zip(uncapped, data.clients, steps, strict=True):
        rows, weights = cohort.batches(d, job)
        capped_rows, capped_weights = cohort.batches(d, jobs[job.client])
        assert torch.equal(capped_rows, rows[:n]) and torch.equal(capped_weights, weights[:n])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_step_fraction_of_one_changes_nothing(engine):
    data = digits_data("mlp")
    start = data.spec.initial_weights(0)
    base = [ClientConfig(lr=0.05, momentum=0.5 * (c % 2), batch_size=16, local_epochs=1 + c % 2) for c in range(6)]
    explicit = [replace(c, step_fraction=1.0) for c in base]
    runs = [
        ENGINES[engine](data.spec, start, scaffold_jobs(cs, [None] * 6, data.spec.size), data.clients)
        for cs in (base, explicit)
    ]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a.weights, b.weights) and a.train_loss == b.train_loss
        assert torch.equal(a.control_delta, b.control_delta)


def test_uncapped_cohort_batches_are_every_epochs_shuffle():
    client = make_client(n=23)
    job = ClientJob(0, 2, ClientConfig(batch_size=5, local_epochs=3), seed=1)
    rows, weights = cohort.batches(client, job)
    generator = job.generator
    orders = []
    for _ in range(3):
        order = torch.randperm(23, generator=generator)
        orders.append(
            torch.cat([order, order[:1], order[:1]])
        )  # 23 samples: the last batch padded by 2 (its first row)
    assert torch.equal(rows, client.train[torch.cat(orders)].view(15, 5))
    assert weights.shape == (15, 5) and torch.equal(weights[4], torch.tensor([1 / 3] * 3 + [0.0] * 2))


def test_a_capped_run_is_not_the_full_run():
    client, start = make_client(), SPEC.initial_weights(3)
    full = local_update(SPEC, start, client, ClientJob(0, 1, ClientConfig(lr=0.3, batch_size=6), 0))
    half = local_update(SPEC, start, client, ClientJob(0, 1, ClientConfig(lr=0.3, batch_size=6, step_fraction=0.5), 0))
    assert not torch.allclose(full.weights, half.weights)
    # Two steps of four, by hand: the first two batches of the same shuffle.
    model = load_flat_weights(SPEC.build(), start)
    order = client.train[torch.randperm(24, generator=ClientJob(0, 1, ClientConfig(), 0).generator)]
    for first in (0, 6):
        batch = order[first : first + 6]
        model.zero_grad()
        F.cross_entropy(model(client.x[batch]), client.y[batch]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.3 * p.grad
    assert torch.allclose(half.weights, flat_weights(model), atol=1e-6)
