"""What training costs: one explicit model, charged round by round and summed over a study.

A round costs one round, its sampled clients' updates (FedHPO-Bench's client sample rate times N),
the training samples its clients process, the bytes sent down (the model to every participant) and
up (each upload's payload as its compression encodes it, and its client statistics), counted
apart, and its simulated seconds (the device profiles' round time: `devices`). A study's budget
(`--budget`, `--budget-unit`) is in one of these currencies (`UNITS`); its driver charges each
training its costs in that unit and never lets the sum pass the budget.
"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

UNITS = ("rounds", "client-updates", "bytes", "sim-seconds")


@dataclass(frozen=True)
class Cost:
    """The cost of some rounds of training."""

    rounds: int = 0
    client_updates: int = 0  # sampled clients, summed over the rounds
    samples: int = 0  # training samples the clients processed (client compute)
    bytes_up: int = 0
    bytes_down: int = 0
    sim_seconds: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Cost)))

    @property
    def bytes(self) -> int:
        return self.bytes_up + self.bytes_down

    def in_unit(self, unit: str) -> float:
        """The cost in a budget's currency (one of `UNITS`)."""
        return {
            "rounds": self.rounds,
            "client-updates": self.client_updates,
            "bytes": self.bytes,
            "sim-seconds": self.sim_seconds,
        }[unit]

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def of(cls, recorded: Mapping[str, float] | None) -> "Cost":
        """A cost written by `as_dict` (nothing recorded: none)."""
        return cls(**{f.name: f.type(recorded[f.name]) for f in fields(cls) if f.name in (recorded or {})})
