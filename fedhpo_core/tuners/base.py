"""The contract between the round loop and whatever chooses hyperparameters.

The loop (`fedhpo_core.federation.Federation.run`) knows nothing about hyperparameter
optimization; it asks the tuner, and tells it what a federated server may see.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from fedhpo_core.settings import ClientConfig
from fedhpo_core.statistics import Statistic

if TYPE_CHECKING:
    import torch

    from fedhpo_core.aggregators import ServerSettings
    from fedhpo_core.client import LocalSchedule
    from fedhpo_core.federation import RoundReport


class Tuner(ABC):
    """Chooses client configurations round by round.

    Lifecycle, for each round t = 1, 2, ... of a federated run:

    1. The loop samples the round's clients and lets ``select(t, clients)`` keep some of them
       (default: all), then calls ``configure(t, clients)`` once; the tuner returns a
       `ClientConfig` for every selected client (they may all differ). Then, for each of them,
       ``local_schedule(t, client)`` may give a `LocalSchedule`, which sets the client's learning
       rate step by step during its local training (default: none, the configured rate throughout).
    2. The loop asks ``global_weights(configs, weights)`` which global model the round starts
       from (default: the latest) and trains the clients from it; each also computes the tuner's
       ``statistics`` (a class attribute, default none) and uploads them beside its weights, in
       `ClientUpdate.statistics`. The loop asks ``server_settings(server, weights, updates)`` how to
       aggregate (default: as configured) and ``aggregation_weights(t, clients)`` for a factor on
       each uploading client's weight in the aggregate (default: none, FedAvg's weights), then
       aggregates and evaluates the new global model on the server's validation split.
    3. The loop calls ``observe(report)`` once with the `RoundReport`: client-reported metrics,
       uploads, the global weights before and after, the server validation metrics. The test set
       is never in it.

    ``state()`` and ``client_state()`` are read after ``observe`` for the run's trajectory (say, a
    method's distribution): the first as a few named numbers, logged as metrics every round; the
    second per client, kept in the trajectory table only (a metric series per client does not scale).
    Only ``configure`` is abstract; the other hooks have defaults, so a fixed schedule stays simple.

    A run is checkpointed between rounds: ``state_dict()`` is stored with the federation's state,
    and a run continued from that checkpoint rebuilds the tuner as the method built it and calls
    ``load_state_dict`` before its next round, so it goes on exactly as the uninterrupted run.
    """

    statistics: tuple[Statistic, ...] = ()  # asked of every participating client every round
    # Attributes `state_dict` leaves out: construction inputs the method gives again when it rebuilds
    # the tuner (data, a task's spec), large or not worth storing every round.
    given: tuple[str, ...] = ()

    @abstractmethod
    def configure(self, round: int, clients: Sequence[int]) -> Mapping[int, ClientConfig]:
        """The configuration of each sampled client for round `round`."""

    def select(self, round: int, clients: Sequence[int]) -> Sequence[int]:
        """The sampled clients that take part in this round. Default: all of them."""
        return clients

    def local_schedule(self, round: int, client: int) -> "LocalSchedule | None":
        """The learning-rate schedule of the client's local training this round. Default: none."""
        return None

    def global_weights(self, configs: Mapping[int, ClientConfig], weights: "torch.Tensor") -> "torch.Tensor":
        """The global model this round's clients start from. Default: the latest aggregate."""
        return weights

    def server_settings(self, server: "ServerSettings", weights: "torch.Tensor", updates) -> "ServerSettings":
        """The server optimizer settings for aggregating `updates` into `weights`. Default: unchanged."""
        return server

    def aggregation_weights(self, round: int, clients: Sequence[int]) -> Mapping[int, float] | None:
        """A factor (>= 0) on the aggregation weight of each of the round's uploading clients: FedAvg's
        n_k becomes n_k x factor, 1 leaves it, a client left out of the map keeps 1 (the
        postprocessor link `ClientWeights`; under DP-FedAvg each factor is capped at 1). SCAFFOLD's
        control variates are averaged as without factors. Default: None, FedAvg's weights."""
        return None

    def observe(self, report: "RoundReport") -> None:
        """Learn from a finished round. Default: nothing to learn."""

    def state(self) -> dict[str, float]:
        """The method's own state as named numbers, for the trajectory. Default: none."""
        return {}

    def client_state(self) -> dict[int, dict[str, float]]:
        """The method's per-client state, {client: {name: value}}, for the trajectory. Default: none."""
        return {}

    def chosen(self) -> dict[str, object]:
        """The configuration the method settles on, as search-space parameter values. Default: none."""
        return {}

    def state_dict(self) -> dict[str, object]:
        """What the tuner has learned, to continue its run from a checkpoint: by default every
        attribute but those `given` (distributions, baselines, networks with their optimizers, random
        generators), pickled with the checkpoint. Streams drawn from the seed and the round number
        (`fedhpo_core.seeding`) need nothing stored."""
        return {name: value for name, value in vars(self).items() if name not in self.given}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Continue from `state_dict()` of a tuner built the same way."""
        vars(self).update(state)


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
