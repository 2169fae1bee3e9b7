"""The contract between the round loop and whatever chooses hyperparameters.

The loop (`fedhpo_core.federation.Federation.run`) knows nothing about hyperparameter
optimization; it asks the tuner, and tells it what a federated server may see.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from fedhpo_core.settings import ClientConfig

if TYPE_CHECKING:
    from fedhpo_core.federation import RoundReport


class Tuner(ABC):
    """Chooses client configurations round by round.

    Lifecycle, for each round t = 1, 2, ... of a federated run:

    1. The loop samples the round's clients, then calls ``configure(t, clients)`` once; the
       tuner returns a `ClientConfig` for every sampled client (they may all differ).
    2. The loop trains those clients, aggregates their uploads and evaluates the new global model
       on the server's validation split.
    3. The loop calls ``observe(report)`` once with the `RoundReport`: client-reported metrics,
       uploads, the global weights before and after, the server validation metrics. The test set
       is never in it.

    Only ``configure`` is abstract; ``observe`` is a no-op hook, so a fixed schedule stays simple.
    """

    @abstractmethod
    def configure(self, round: int, clients: Sequence[int]) -> Mapping[int, ClientConfig]:
        """The configuration of each sampled client for round `round`."""

    def observe(self, report: "RoundReport") -> None:
        """Learn from a finished round. Default: nothing to learn."""


class FixedConfig(Tuner):
    """The same configuration for every client in every round: plain federated training."""

    def __init__(self, config: ClientConfig):
        self.config = config

    def configure(self, round: int, clients: Sequence[int]) -> Mapping[int, ClientConfig]:
        return dict.fromkeys(clients, self.config)


class PerClientConfig(Tuner):
    """A fixed configuration per client, the same in every round: a personalized trial."""

    def __init__(self, configs: Sequence[ClientConfig]):
        self.configs = list(configs)

    def configure(self, round: int, clients: Sequence[int]) -> Mapping[int, ClientConfig]:
        return {c: self.configs[c] for c in clients}
