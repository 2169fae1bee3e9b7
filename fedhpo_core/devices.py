"""Simulated devices: each client's system profile, who is online, who drops out, and how long a
round takes in simulated seconds.

A profile is drawn per client from the run's seed (`PRESETS`):
- "uniform": identical devices, always online: 1000 training samples per second, 10 Mbit/s up and
  down. Rounds differ in time only through the clients' data sizes and local epochs.
- "cross-device": phones. Compute speed and both bandwidths log-normal (speed median 500 samples/s,
  sigma 1; upload median 2 Mbit/s, download median 10 Mbit/s, sigma 1: a tenfold spread between
  the 10th and 90th percentile, and download five times upload as on mobile networks); each round
  a client is online with its own probability, drawn from Beta(4, 1) (mean 0.8). The spread's
  shape follows the heavy-tailed device traces FedScale reports (Lai et al., ICML 2022); the
  numbers are ours, round enough to read.

A round of client c lasts download + compute + upload = bits / down_c + samples_c x epochs_c /
speed_c + bits / up_c. A sampled client that is offline does not take part. A participant drops out
mid-round (sends nothing) with probability `dropout`. Without a deadline the server waits for the
slowest upload (it notices a dropout at once); with a deadline D it waits until every participant
has uploaded or D has passed, and leaves out the late (stragglers). Per-round draws come from the
run's seed and the round.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedhpo_core import seeding

MEGABIT = 1e6


@dataclass(frozen=True)
class Profiles:
    """Every client's device: arrays indexed by client."""

    speed: np.ndarray  # training samples per second
    upload_mbps: np.ndarray
    download_mbps: np.ndarray
    availability: np.ndarray  # probability of being online in a round

    def seconds(
        self,
        clients: Sequence[int],
        samples: Sequence[int],
        epochs: Sequence[int],
        model_bytes: int,
        extra: Sequence[int] | None = None,
        upload_bytes: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Each client's round time: the model down (`model_bytes`), `epochs` passes over `samples`
        and `extra` samples more (its client statistics' passes), its upload up (`upload_bytes`,
        by default the model's)."""
        c = np.asarray(clients, dtype=np.int64)
        bits = 8.0 * model_bytes
        up_bits = bits if upload_bytes is None else 8.0 * np.asarray(upload_bytes, dtype=float)
        passes = np.asarray(samples, dtype=float) * np.asarray(epochs, dtype=float)
        compute = (passes + (np.asarray(extra, dtype=float) if extra is not None else 0.0)) / self.speed[c]
        return bits / (self.download_mbps[c] * MEGABIT) + compute + up_bits / (self.upload_mbps[c] * MEGABIT)


def uniform(n: int, rng: np.random.Generator) -> Profiles:
    same = np.ones(n)
    return Profiles(1000.0 * same, 10.0 * same, 10.0 * same, same)


def cross_device(n: int, rng: np.random.Generator) -> Profiles:
    speed = 500.0 * rng.lognormal(0.0, 1.0, n)
    upload = 2.0 * rng.lognormal(0.0, 1.0, n)
    download = 10.0 * rng.lognormal(0.0, 1.0, n)
    return Profiles(speed, upload, download, rng.beta(4.0, 1.0, n))


PRESETS = {"uniform": uniform, "cross-device": cross_device}


def profiles_of(preset: str, clients: int, seed: int) -> Profiles:
    """The preset's profiles for `clients` clients, drawn from the run's seed."""
    return PRESETS[preset](clients, seeding.numpy_rng(seed, seeding.DEVICES))


@dataclass(frozen=True)
class RoundPlan:
    """Who of a round's participants uploads in time, who does not, and how long the round lasts."""

    uploading: tuple[int, ...]
    dropped: tuple[int, ...]  # dropped out mid-round
    late: tuple[int, ...]  # missed the deadline
    seconds: float


@dataclass(frozen=True)
class Devices:
    """The federation's devices and its rules for a round: dropout probability and deadline (0: none)."""

    profiles: Profiles
    dropout: float = 0.0
    deadline_s: float = 0.0
    seed: int = 0

    def online(self, t: int, clients: Sequence[int]) -> list[int]:
        """The sampled clients online in round t."""
        draws = seeding.numpy_rng(self.seed, seeding.DEVICES, t, 0).random(len(self.profiles.speed))
        return [c for c in clients if draws[c] < self.profiles.availability[c]]

    def plan(
        self,
        t: int,
        clients: Sequence[int],
        samples: Mapping[int, int],
        epochs: Mapping[int, int],
        model_bytes: int,
        extra: Mapping[int, int] | None = None,
        upload_bytes: Mapping[int, int] | None = None,
    ) -> RoundPlan:
        """Round t's outcome for its participants (their training samples, local epochs, samples
        passed for client statistics and bytes uploaded: by default the model's)."""
        draws = seeding.numpy_rng(self.seed, seeding.DEVICES, t, 1).random(len(self.profiles.speed))
        passes = [(extra or {}).get(c, 0) for c in clients]
        up = None if upload_bytes is None else [upload_bytes[c] for c in clients]
        times = self.profiles.seconds(
            clients, [samples[c] for c in clients], [epochs[c] for c in clients], model_bytes, passes, up
        )
        dropped = tuple(c for c in clients if draws[c] < self.dropout)
        late = tuple(
            c
            for c, s in zip(clients, times, strict=True)
            if c not in dropped and self.deadline_s and s > self.deadline_s
        )
        uploading = tuple(c for c in clients if c not in dropped and c not in late)
        waited = [s for c, s in zip(clients, times, strict=True) if c in uploading]
        seconds = self.deadline_s if (late or dropped) and self.deadline_s else max(waited, default=0.0)
        return RoundPlan(uploading, dropped, late, float(seconds))
