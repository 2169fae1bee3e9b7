"""Client-level differential privacy for federated averaging: DP-FedAvg (McMahan, Ramage, Talwar,
Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018, Algorithm 1).

Each round samples every client independently with probability q; each sampled client's update
Delta_k = w_k - x_t is clipped to L2 norm at most C (Algorithm 1's flat ClipFn), the server sums
the clipped updates, adds Gaussian noise N(0, (sigma C)^2 I) (the sum's sensitivity to adding or
removing one client is C, so sigma is the noise multiplier) and divides by the fixed denominator
q N (Algorithm 1's "fixed-denominator" estimator f~_f with every w_k = 1). These steps are links
of the postprocessor chain (`postprocess`) that `Privacy.links` gives the round loop.

The privacy spent is counted by Google's dp-accounting (`epsilon`): its RDP accountant composes the
Poisson-subsampled Gaussian mechanism over the rounds, the moments accountant McMahan et al. use.
dp-accounting, not Opacus: it has no dependence on a training loop, states the sampling and the
neighbouring relation as events, and offers the PLD accountant beside RDP.
"""

import functools
import logging
import math
from dataclasses import dataclass

import dp_accounting
from dp_accounting import rdp

from fedhpo_core.postprocess import ClipNorm, GaussianNoise, Link, UniformWeights

# dp-accounting's RDP accountant warns (through absl) for every Renyi order it cannot evaluate at a
# small sigma and leaves that order out; the epsilon it returns stays a valid upper bound.
logging.getLogger("absl").setLevel(logging.ERROR)


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

    def links(self, expected: float, seed: int) -> list[Link]:
        """Algorithm 1's aggregation as postprocessor links: every client weighs 1, its update is
        clipped to C, the sum gets N(0, (sigma C)^2 I) noise (from `seed`) and is divided by the
        expected number of clients q N."""
        return [UniformWeights(), ClipNorm(self.clip), GaussianNoise(self.noise, self.clip, expected, seed)]


@functools.lru_cache(maxsize=4096)  # ~80 ms a call; every trial of a study asks for the same rounds
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
