"""Client-level differential privacy for federated averaging: DP-FedAvg (McMahan, Ramage, Talwar,
Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018, Algorithm 1).

Each round samples every client independently with probability q; each sampled client's update
Delta_k = w_k - x_t is clipped to L2 norm at most C (`clip`: Algorithm 1's flat ClipFn), the server
sums the clipped updates with the fixed denominator q N (the uniform weighting of Algorithm 1's
"fixed-denominator" estimator f~_f, every w_k = 1) and adds Gaussian noise N(0, (sigma C / (q N))^2 I):
the sum's sensitivity to adding or removing one client is C, so sigma is the noise multiplier.

The privacy spent is counted by Google's dp-accounting (`epsilon`): its RDP accountant composes the
Poisson-subsampled Gaussian mechanism over the rounds, the moments accountant McMahan et al. use.
dp-accounting, not Opacus: it has no dependence on a training loop, states the sampling and the
neighbouring relation as events, and offers the PLD accountant beside RDP.
"""

import math
from dataclasses import dataclass

import dp_accounting
import torch
from dp_accounting import rdp


@dataclass(frozen=True)
class Privacy:
    """DP-FedAvg's settings: the clip bound C, the noise multiplier sigma and the delta epsilon is
    counted at. Off (plain FedAvg) while C is 0."""

    clip: float = 0.0
    noise: float = 0.0
    delta: float = 1e-5

    @property
    def enabled(self) -> bool:
        return self.clip > 0


@dataclass(frozen=True)
class PrivateMean:
    """How one round's updates are averaged privately: `Privacy`'s C and sigma, the expected number
    of clients q N (the fixed denominator) and the seed of the round's noise."""

    clip: float
    noise: float
    expected: float
    seed: int


def clip(update: torch.Tensor, bound: float) -> torch.Tensor:
    """`update` scaled by min(1, C / ||update||_2): its L2 norm is at most C."""
    norm = float(torch.linalg.vector_norm(update))
    return update if norm <= bound else update * (bound / norm)


def private_mean(updates: list[torch.Tensor], bound: float, noise: float, expected: float, generator) -> torch.Tensor:
    """(sum_k clip(Delta_k, C) + N(0, (sigma C)^2 I)) / (q N): Algorithm 1's fixed-denominator
    estimate of the mean update, with `expected` = q N clients a round and `noise` = sigma."""
    total = torch.stack([clip(u, bound) for u in updates]).sum(0)
    total += torch.randn(total.shape, generator=generator, dtype=total.dtype).to(total.device) * (noise * bound)
    return total / expected


def epsilon(sampling: float, noise: float, rounds: int, delta: float) -> float:
    """The epsilon of (epsilon, delta)-DP spent by `rounds` rounds of the Poisson-subsampled Gaussian
    mechanism (sampling probability q, noise multiplier sigma): dp-accounting's RDP accountant,
    add-or-remove-one-client adjacency. inf without noise."""
    if noise <= 0:
        return math.inf
    if rounds == 0:
        return 0.0
    event = dp_accounting.PoissonSampledDpEvent(sampling, dp_accounting.GaussianDpEvent(noise))
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return accountant.get_epsilon(delta)
