"""SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, option II) in the round loop, both engines."""

import io
from dataclasses import fields, replace

import pytest
import torch
from test_cohort import CONFIGS
from torch.nn import functional as F

from cli.main import main
from fedhpo_core.aggregators import ServerSettings
from fedhpo_core.client import ClientData, ClientJob, Controls
from fedhpo_core.cohort import train_cohort
from fedhpo_core.data import load_dataset
from fedhpo_core.federation import (
    FederatedData,
    Federation,
    FederationState,
    RoundSteps,
    partition_of,
    train_sequentially,
)
from fedhpo_core.models import ModelSpec
from fedhpo_core.settings import ClientConfig, SettingsError, TrainSettings
from fedhpo_core.tuners import FixedConfig, PerClientConfig

ENGINES = ["sequential", "cohort"]
FEDAVG = ServerSettings("fedavg", 1.0, 0.9, 0.99, 1e-3)
SPEC = ModelSpec("mlp", (4,), 3)
SIZES = [5, 8, 6]  # training samples of the tiny problem's clients
LRS = [0.5, 0.3, 0.4]
K = 2  # local steps: full batches, K epochs


def tiny_federation(algorithm: str) -> Federation:
    """3 clients of a 4-feature, 3-class problem; 2 of them sampled per round."""
    generator = torch.Generator().manual_seed(0)

    def split(n):
        return torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)

    clients = tuple(ClientData.of(*split(n), *split(2)) for n in SIZES)
    data = FederatedData(clients, split(10), split(10), SPEC)
    return Federation(data, FEDAVG, participation=0.67, seed=0, algorithm=algorithm)


def gradient(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The full-batch cross-entropy gradient g_i(w) of the MLP at flat weights w."""
    model = SPEC.build()
    shapes = [p.shape for p in model.parameters()]
    w = w.clone().requires_grad_()
    parts = [part.view(shape) for part, shape in zip(w.split([s.numel() for s in shapes]), shapes, strict=True)]
    params = dict(zip([name for name, _ in model.named_parameters()], parts, strict=True))
    loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    return torch.autograd.grad(loss, w)[0]


def scaffold_round(federation, t, x, c_clients, c, paper: bool):
    """Algorithm 1's round t written out: local steps y <- y - eta (g_i(y) - c_i + c), option II's
    c_i+ = c_i - c + (x - y_i) / (K eta); the paper's server: the plain mean of the y_i (at server lr
    1) and c <- c + |S| / N mean_S (c_i+ - c_i); fedhpo's: the y_i and the Delta c_i weighted by
    the clients' shares of all training samples, n_i / n (the y_i renormalized over the sampled)."""
    sampled = federation.sample_clients(t)
    ys, deltas, c_next = [], [], c_clients.clone()
    for i in sampled:
        data, lr = federation.data.clients[i], LRS[i]
        y = x.clone()
        for _ in range(K):
            y = y - lr * (gradient(y, data.x_train, data.y_train) - c_clients[i] + c)
        c_plus = c_clients[i] - c + (x - y) / (K * lr)
        ys.append(y)
        deltas.append(c_plus - c_clients[i])
        c_next[i] = c_plus
    if paper:
        return torch.stack(ys).mean(0), c_next, c + len(sampled) / len(SIZES) * torch.stack(deltas).mean(0)
    n = torch.tensor([float(SIZES[i]) for i in sampled])
    return (n / n.sum()) @ torch.stack(ys), c_next, c + (n / sum(SIZES)) @ torch.stack(deltas)


@pytest.mark.parametrize("algorithm", ["scaffold", "scaffold-paper"])
@pytest.mark.parametrize("engine", ENGINES)
def test_three_rounds_match_algorithm_1_by_hand(engine, algorithm):
    federation = tiny_federation(algorithm)
    tuner = PerClientConfig([ClientConfig(lr=lr, batch_size=max(SIZES), local_epochs=K) for lr in LRS])
    state = federation.initial_state()
    x, c_clients, c = state.weights, state.client_controls, state.server_control
    for t in (1, 2, 3):
        x, c_clients, c = scaffold_round(federation, t, x, c_clients, c, paper=algorithm == "scaffold-paper")
        state = federation.run(tuner, 1, RoundSteps(engine), start=state).state
        assert torch.allclose(state.weights, x, rtol=1e-4, atol=1e-6)
        assert torch.allclose(state.client_controls, c_clients, rtol=1e-4, atol=1e-5)
        assert torch.allclose(state.server_control, c, rtol=1e-4, atol=1e-5)
    assert len(federation.sample_clients(1)) == 2 and c.abs().max() > 0.01  # |S| < N, the controls moved
    shares = torch.full((3,), 1 / 3) if algorithm == "scaffold-paper" else torch.tensor(SIZES) / sum(SIZES)
    assert torch.allclose(c, shares.to(c.dtype) @ c_clients, atol=1e-6)  # c stays the clients' weighted mean


def digits_federation(algorithm: str, clients: int = 6) -> Federation:
    settings = TrainSettings(clients=clients, partition="dirichlet", alpha=0.3, seed=2, algorithm=algorithm)
    data = FederatedData.build(load_dataset("digits", "unused"), partition_of(settings.data), "mlp")
    return Federation(data, settings.server, 0.5, settings.seed, algorithm=settings.algorithm)


def stored(state: FederationState) -> FederationState:
    """The state through a checkpoint: its fields saved and read back as `tracking.load_state` does."""
    buffer = io.BytesIO()
    torch.save({f.name: getattr(state, f.name) for f in fields(state)}, buffer)
    buffer.seek(0)
    return FederationState(**torch.load(buffer, weights_only=True))


@pytest.mark.parametrize("engine", ENGINES)
def test_controls_persist_across_rounds_and_through_a_checkpoint(engine):
    federation, tuner, steps = digits_federation("scaffold"), FixedConfig(ClientConfig(lr=0.1)), RoundSteps(engine)
    whole = federation.run(tuner, 4, steps).state
    half = stored(federation.run(tuner, 2, steps).state)
    rest = federation.run(tuner, 2, steps, start=half).state
    assert rest.round == 4
    for name in ("weights", "client_controls", "server_control"):
        assert torch.equal(getattr(whole, name), getattr(rest, name)), name
    no_controls = torch.zeros_like(half.client_controls)
    forgotten = replace(half, client_controls=no_controls, server_control=torch.zeros_like(half.weights))
    amnesiac = federation.run(tuner, 2, steps, start=forgotten).state
    assert not torch.allclose(amnesiac.weights, whole.weights, atol=1e-4)  # the controls carried over matter


@pytest.mark.parametrize("engine", ENGINES)
def test_first_round_is_fedavgs_and_the_second_is_not(engine):
    tuner, steps = FixedConfig(ClientConfig(lr=0.1, momentum=0.5, weight_decay=1e-3)), RoundSteps(engine)
    scaffold, fedavg = digits_federation("scaffold"), digits_federation("fedavg")
    assert torch.equal(scaffold.run(tuner, 1, steps).state.weights, fedavg.run(tuner, 1, steps).state.weights)
    assert not torch.allclose(scaffold.run(tuner, 2, steps).state.weights, fedavg.run(tuner, 2, steps).state.weights)
    assert fedavg.initial_state().client_controls is None


def test_engines_agree_on_a_corrected_round():
    """Nonzero controls with momentum, decay, FedProx, several batch sizes and epochs: the cohort's
    batched corrections (in `CohortSGD.update` and `update_product`) are the sequential engine's."""
    federation = digits_federation("scaffold")
    generator = torch.Generator().manual_seed(1)
    x = federation.initial_state().weights
    server = 0.01 * torch.randn(len(x), generator=generator)
    jobs = [
        ClientJob(c, 1, config, 0, controls=Controls(0.01 * torch.randn(len(x), generator=generator), server))
        for c, config in enumerate(CONFIGS)  # the cohort tests' clients, each training differently
    ]
    data = list(federation.data.clients)
    sequential = train_sequentially(federation.data.spec, x, jobs, data)
    cohort = train_cohort(federation.data.spec, x, jobs, data)
    for s, b in zip(sequential, cohort, strict=True):
        assert torch.allclose(s.weights, b.weights, atol=1e-5)
        assert torch.allclose(s.control_delta, b.control_delta, rtol=1e-3, atol=1e-4)
    uncorrected = train_cohort(
        federation.data.spec, x, [ClientJob(c, 1, j.config, 0) for c, j in enumerate(jobs)], data
    )
    assert all(not torch.allclose(u.weights, b.weights, atol=1e-4) for u, b in zip(uncorrected, cohort, strict=True))


def test_unknown_algorithm_and_scaffold_with_dp_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--algorithm", "fedsgd"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown algorithm 'fedsgd'; choose from fedavg, scaffold" in error
    with pytest.raises(SettingsError, match="algorithm scaffold cannot run with dp_clip"):
        TrainSettings(algorithm="scaffold", dp_clip=1.0)


@pytest.mark.usefixtures("prefect_server")
def test_the_training_flow_runs_scaffold_and_logs_it(mlflow_client):
    from flows.training import federated_training

    summary = federated_training(clients=4, rounds=2, participation=0.5, algorithm="scaffold", experiment="scaffold")
    run = mlflow_client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["algorithm"] == "scaffold"
    assert summary["rounds_completed"] == 2 and not summary["diverged"]
