"""Server aggregation: pure functions from (global weights, client uploads, state) to new ones.

All of them start from the mean pseudo-gradient, by default sample-weighted,
    delta_t = sum_i n_i (w_i - x_t) / sum_i n_i
(a postprocessor chain may clip, weight, noise or leave out updates: `postprocess`), and apply
a server optimizer to it: FedAvg and FedAvgM (Hsu et al. 2019), and FedAdagrad, FedAdam and
FedYogi from Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2 (no bias
correction; the second moment starts at tau^2, as there).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from fedhpo_core.postprocess import Link, apply_chain

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ServerSettings:
    """The aggregator and its hyperparameters (eta = lr, beta1, beta2, tau in Reddi et al.)."""

    aggregator: str
    lr: float
    beta1: float
    beta2: float
    tau: float


Step = Callable[[torch.Tensor, torch.Tensor, State, ServerSettings], tuple[torch.Tensor, State]]


def weighted_mean(weights: Sequence[torch.Tensor], num_samples: Sequence[int]) -> torch.Tensor:
    """sum_i n_i w_i / sum_i n_i."""
    shares = torch.tensor(num_samples, dtype=weights[0].dtype, device=weights[0].device)
    return (shares / shares.sum()) @ torch.stack(list(weights))


def fedavg(x, mean, state, hp):
    """McMahan et al. 2017: x_{t+1} = x_t + eta * delta_t; at eta = 1, the weighted mean itself."""
    return (mean if hp.lr == 1.0 else x + hp.lr * (mean - x)), state


def fedavgm(x, mean, state, hp):
    """Server momentum: m_t = beta1 m_{t-1} + delta_t; x_{t+1} = x_t + eta m_t."""
    m = hp.beta1 * state.get("m", torch.zeros_like(x)) + (mean - x)
    return x + hp.lr * m, {"m": m}


def _adaptive(second_moment: Callable[[torch.Tensor, torch.Tensor, ServerSettings], torch.Tensor]):
    """Algorithm 2 of Reddi et al.: m_t = beta1 m_{t-1} + (1 - beta1) delta_t, v_t by the method's
    rule, x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)."""

    def step(x, mean, state, hp):
        delta = mean - x
        m = hp.beta1 * state.get("m", torch.zeros_like(x)) + (1 - hp.beta1) * delta
        v = second_moment(state.get("v", torch.full_like(x, hp.tau**2)), delta, hp)
        return x + hp.lr * m / (v.sqrt() + hp.tau), {"m": m, "v": v}

    return step


fedadagrad = _adaptive(lambda v, d, hp: v + d.square())
fedadam = _adaptive(lambda v, d, hp: hp.beta2 * v + (1 - hp.beta2) * d.square())
fedyogi = _adaptive(lambda v, d, hp: v - (1 - hp.beta2) * d.square() * torch.sign(v - d.square()))

AGGREGATORS: dict[str, Step] = {
    "fedavg": fedavg,
    "fedavgm": fedavgm,
    "fedadagrad": fedadagrad,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
}
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadagrad": 0.01, "fedadam": 0.01, "fedyogi": 0.01}


def aggregate(
    server: ServerSettings,
    x: torch.Tensor,
    uploads: Sequence[tuple[torch.Tensor, int]],
    state: State,
    links: Sequence[Link] = (),
) -> tuple[torch.Tensor, State]:
    """New global weights and server state from (weights, num_samples) uploads: the mean update
    through the postprocessor chain `links` (none: the sample-weighted mean), then the server
    optimizer (`server_step`)."""
    mean, _ = apply_chain(links, x, [(i, w, n) for i, (w, n) in enumerate(uploads)])
    return server_step(server, x, mean, state)


def server_step(
    server: ServerSettings, x: torch.Tensor, mean: torch.Tensor, state: State
) -> tuple[torch.Tensor, State]:
    """The server optimizer applied to the mean update. The hyperparameters are taken at the
    weights' precision: beyond its range (tau 1e308) they are inf, and the run diverges where torch
    would refuse the double."""
    at_precision = {k: torch.tensor(getattr(server, k), dtype=x.dtype).item() for k in ("lr", "beta1", "beta2", "tau")}
    return AGGREGATORS[server.aggregator](x, mean, state, replace(server, **at_precision))
