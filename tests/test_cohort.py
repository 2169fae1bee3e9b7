"""The cohort engine against the sequential one: same algorithm, agreement to float rounding."""

import math

import pytest
import torch
from torch.nn import functional as F

from fedhpo_core import cohort
from fedhpo_core.aggregators import ServerSettings
from fedhpo_core.client import ClientData, ClientJob, LocalSchedule, RunningSchedules
from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, Federation, RoundSteps, partition_of, train_sequentially
from fedhpo_core.models import ModelSpec, flat_weights, load_flat_weights
from fedhpo_core.settings import ClientConfig, ExecutionSettings, SettingsError, TrainSettings
from fedhpo_core.tuners import FixedConfig, PerClientConfig
from fedhpo_core.tuners.fedhyper import FedHyper, HypergradientLR

# Weights after one round, cohort against sequential: measured differences are 1e-8 to 3e-7.
TOLERANCE = 1e-5

CONFIGS = [  # every client trains differently: rate, momentum, decay, FedProx, batch size, epochs
    ClientConfig(lr=0.05),
    ClientConfig(lr=0.1, momentum=0.9, batch_size=16),
    ClientConfig(lr=0.02, weight_decay=1e-2, local_epochs=3),
    ClientConfig(lr=0.08, mu=0.5, momentum=0.5, local_epochs=2),
    ClientConfig(lr=0.03, weight_decay=1e-3, mu=0.1, batch_size=16),
    ClientConfig(lr=0.05, batch_size=7, local_epochs=2),
]


def digits_data(model: str, clients: int = 6) -> FederatedData:
    settings = TrainSettings(clients=clients, partition="dirichlet", alpha=0.3, seed=2)
    return FederatedData.build(load_dataset("digits", "unused"), partition_of(settings.data), model)


def jobs_for(configs, round=1, schedules=None):
    schedules = schedules or [None] * len(configs)
    return [ClientJob(c, round, config, 0, schedules[c]) for c, config in enumerate(configs)]


class HalvingRate(LocalSchedule):
    """A planted schedule: the rate halves after every local step."""

    @classmethod
    def start(cls, schedules, lr):
        return HalvedRates(lr)


class HalvedRates(RunningSchedules):
    def __init__(self, lr):
        self.lr = lr

    def step(self, step, changes):
        return self.lr[: len(changes)] / 2 ** (step + 1)


class Halving(FixedConfig):
    """Plain federated training whose clients halve their rate after every local step."""

    def local_schedule(self, round, client):
        return HalvingRate()


def assert_agree(sequential, batched):
    for a, b in zip(sequential, batched, strict=True):
        assert (a.client, a.num_samples, a.num_val) == (b.client, b.num_samples, b.num_val)
        assert (a.weights - b.weights).abs().max() < TOLERANCE, a.client
        assert a.train_loss == pytest.approx(b.train_loss, abs=TOLERANCE)
        assert a.val_loss == pytest.approx(b.val_loss, abs=TOLERANCE, nan_ok=True)
        assert a.val_score == pytest.approx(b.val_score, nan_ok=True)


@pytest.mark.parametrize("model", ["mlp", "lenet5", "cnn"])
def test_cohort_matches_sequential_with_every_client_configured_differently(model):
    data = digits_data(model)
    sizes = [c.num_train for c in data.clients]
    assert max(sizes) > 2 * min(sizes)  # the Dirichlet partition is unequal
    start = data.spec.initial_weights(0)
    jobs = jobs_for(CONFIGS)
    sequential = train_sequentially(data.spec, start, jobs, data.clients)
    for kernel in ["vmap", cohort.kernel_name(data.spec)]:
        cohort.KERNELS[model] = kernel
        try:
            batched = cohort.train_cohort(data.spec, start, jobs, data.clients)
        finally:
            del cohort.KERNELS[model]
        assert_agree(sequential, batched)
    assert not torch.equal(sequential[0].weights, start)


@pytest.mark.parametrize("engine", ["sequential", "cohort"])
def test_a_tuners_local_schedule_sets_each_local_steps_rate(engine):
    spec = ModelSpec("mlp", (1, 4, 4), 3)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 4, 4, generator=generator), torch.randint(0, 3, (24,), generator=generator)
    client = ClientData.of(x, y, x[:0], y[:0])
    data = FederatedData((client,), (x, y), (x, y), spec)
    federation = Federation(data, ServerSettings("fedavg", 1.0, 0.9, 0.99, 1e-3), participation=1.0, seed=7)
    config = ClientConfig(lr=0.4, batch_size=24, local_epochs=3)
    result = federation.run(Halving(config), 1, RoundSteps(engine))

    # By hand: three full-batch gradient steps at rates 0.4, 0.2 and 0.1.
    model = load_flat_weights(spec.build(), spec.initial_weights(7))
    for lr in (0.4, 0.2, 0.1):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    assert torch.allclose(result.state.weights, flat_weights(model), atol=1e-6)
    plain = federation.run(FixedConfig(config), 1, RoundSteps(engine))
    assert not torch.allclose(result.state.weights, plain.state.weights, atol=1e-4)


def test_local_schedules_of_several_kinds_batch_in_one_cohort():
    data = digits_data("mlp")
    start = data.spec.initial_weights(0)
    generator = torch.Generator().manual_seed(1)
    delta, other = (torch.randn(data.spec.size, generator=generator) * 0.01 for _ in range(2))
    # One batch size: one cohort, its clients of unequal steps, some scheduled by FedHyper (two
    # global updates), some halving, some not scheduled at all.
    configs = [ClientConfig(lr=0.1 + 0.01 * c, momentum=0.5 * (c % 2), batch_size=16) for c in range(6)]
    schedules = [HypergradientLR(delta, 6), None, HalvingRate(), HypergradientLR(other, 6), HalvingRate(), None]
    jobs = jobs_for(configs, schedules=schedules)
    sequential = train_sequentially(data.spec, start, jobs, data.clients)
    assert_agree(sequential, cohort.train_cohort(data.spec, start, jobs, data.clients))
    plain = train_sequentially(data.spec, start, jobs_for(configs), data.clients)
    moved = [not torch.allclose(a.weights, b.weights) for a, b in zip(sequential, plain, strict=True)]
    assert moved == [s is not None for s in schedules]  # the schedules changed the rates


def test_engines_agree_over_rounds_of_fedhyper():
    data = digits_data("mlp")
    federation = Federation(data, TrainSettings().server, 1.0, seed=3)
    runs = [federation.run(FedHyper(ClientConfig(lr=0.1)), 4, RoundSteps(e)) for e in ("cohort", "sequential")]
    assert (runs[0].state.weights - runs[1].state.weights).abs().max() < 100 * TOLERANCE


def test_a_cohort_split_by_memory_gives_the_same_weights_to_rounding(monkeypatch):
    data = digits_data("mlp")
    start = data.spec.initial_weights(0)
    jobs = jobs_for([ClientConfig(lr=0.05, momentum=0.5)] * 6)
    whole = cohort.train_cohort(data.spec, start, jobs, data.clients)
    monkeypatch.setattr(cohort, "COHORT_BYTES", 2 * 4 * 4 * data.spec.size)
    assert cohort.clients_per_cohort(data.spec, 32) == 1
    split = cohort.train_cohort(data.spec, start, jobs, data.clients)
    for a, b in zip(whole, split, strict=True):
        assert (a.weights - b.weights).abs().max() < 1e-6 and a.train_loss == pytest.approx(b.train_loss, rel=1e-6)


def test_clients_with_their_own_tensors_and_no_validation_split():
    generator = torch.Generator().manual_seed(0)
    clients = [
        ClientData.of(torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,)), *empty)
        for n, empty in ((20, (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))),) * 2
    ]
    spec = digits_data("mlp").spec
    jobs = jobs_for([ClientConfig(batch_size=8), ClientConfig(batch_size=8, lr=0.2)])
    updates = cohort.train_cohort(spec, spec.initial_weights(0), jobs, clients)
    assert all(math.isnan(u.val_loss) and u.num_val == 0 for u in updates)
    assert_agree(train_sequentially(spec, spec.initial_weights(0), jobs, clients), updates)


@pytest.mark.parametrize("engine", ["cohort", "sequential"])
def test_each_engine_is_deterministic_bit_for_bit(engine):
    data = digits_data("mlp")
    federation = Federation(data, TrainSettings().server, 0.5, seed=3)
    tuner = PerClientConfig(CONFIGS)
    first, second = (federation.run(tuner, 3, RoundSteps(engine)) for _ in range(2))
    assert torch.equal(first.state.weights, second.state.weights) and first.evaluations == second.evaluations


def test_engines_agree_over_rounds():
    data = digits_data("mlp")
    federation = Federation(data, TrainSettings().server, 1.0, seed=3)
    runs = [federation.run(FixedConfig(ClientConfig(lr=0.1)), 5, RoundSteps(e)) for e in ("cohort", "sequential")]
    # Rounding differences grow over rounds of SGD (1e-4 after 5 rounds here), not into a different model.
    assert (runs[0].state.weights - runs[1].state.weights).abs().max() < 100 * TOLERANCE
    assert runs[0].evaluations[-1].val_score == pytest.approx(runs[1].evaluations[-1].val_score, abs=0.01)


def test_device_cpu_keeps_everything_on_the_cpu():
    execution = ExecutionSettings(device="cpu")
    data = FederatedData.build(
        load_dataset("digits", "unused"), partition_of(TrainSettings(clients=3).data), "mlp", execution.resolved_device
    )
    result = Federation(data, TrainSettings().server, 1.0, 0).run(FixedConfig(ClientConfig()), 1)
    assert result.state.weights.device.type == "cpu" and data.clients[0].x.device.type == "cpu"
    with pytest.raises(SettingsError, match="unknown engine"):
        ExecutionSettings(engine="parallel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_a_cuda_federation_matches_the_cpu():
    """Data, model, cohorts, aggregation and evaluation on the GPU; FedTune's credits too."""
    from fedhpo_core.tuners.fedtune import mixture_credits

    partition = partition_of(TrainSettings(clients=4, partition="dirichlet", alpha=0.5).data)
    runs = {}
    for device in ("cpu", "cuda"):
        data = FederatedData.build(load_dataset("digits", "unused"), partition, "mlp", device)
        federation = Federation(data, TrainSettings(aggregator="fedadam").server, 1.0, 0)
        runs[device] = federation.run(FixedConfig(ClientConfig(lr=0.1, momentum=0.5)), 2)
        uploads = [(data.spec.initial_weights(c).to(device), 10 + c) for c in range(3)]
        runs[device + "-credits"] = mixture_credits(data.spec, uploads, *data.server_val)
    assert runs["cuda"].state.weights.is_cuda
    assert (runs["cuda"].state.weights.cpu() - runs["cpu"].state.weights).abs().max() < 1e-4
    assert runs["cuda-credits"] == pytest.approx(runs["cpu-credits"], abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_cohort_matches_the_cpu():
    data_cpu = digits_data("mlp")
    data_gpu = FederatedData.build(
        load_dataset("digits", "unused"),
        partition_of(TrainSettings(clients=6, partition="dirichlet", alpha=0.3, seed=2).data),
        "mlp",
        "cuda",
    )
    jobs = jobs_for(CONFIGS)
    start = data_cpu.spec.initial_weights(0)
    on_cpu = cohort.train_cohort(data_cpu.spec, start, jobs, data_cpu.clients)
    on_gpu = cohort.train_cohort(data_gpu.spec, start.cuda(), jobs, data_gpu.clients)
    assert all(u.weights.is_cuda for u in on_gpu)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert (a.weights - b.weights.cpu()).abs().max() < 1e-4


def test_without_cuda_asking_for_it_is_a_settings_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    with pytest.raises(SettingsError, match="no CUDA device"):
        ExecutionSettings(device="cuda")
    assert ExecutionSettings(device="auto").resolved_device == "cpu"
