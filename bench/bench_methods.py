"""What a round-level method adds to a round: its client statistics and its own work (policy
updates, distributions, selection), against the round's training time, at 100 clients.

Each method runs R rounds of a real federation (MNIST, MLP, 100 Dirichlet-0.5 clients, all of
them every round, 1 local epoch, batch 32, cohort engine) driven by its tuner as its study builds
it, its hooks timed (configure, observe, ...: its policy updates). Then the same rounds are
replayed by a plain tuner giving each round the clients and configurations the method gave (the
same training work), alternately without and with the method's client statistics and local
schedules, three times each; each round's client training keeps its fastest time. The method's
overhead per round is its hooks' time plus what its statistics and schedules add to the clients'
training, as a share of that training without them.

    python bench/bench_methods.py --data-root ../shared/data
"""

import argparse
import time
from collections.abc import Sequence

import optuna

from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, Federation, RoundSteps, partition_of
from fedhpo_core.registry import ROUND, methods
from fedhpo_core.search.base import Budget, SearchContext
from fedhpo_core.search.space import SearchSpace
from fedhpo_core.settings import TrainSettings
from fedhpo_core.tuners.base import FixedConfig, Tuner

REPEATS = 3


class Timed(Tuner):
    """The method's tuner, its hooks timed and its choices recorded for the replay."""

    def __init__(self, inner: Tuner):
        self.inner, self.statistics, self.hook_s = inner, inner.statistics, 0.0
        self.selected: dict[int, list[int]] = {}
        self.configs: dict[int, dict] = {}

    def timed(self, name, *args):
        started = time.perf_counter()
        value = getattr(self.inner, name)(*args)
        self.hook_s += time.perf_counter() - started
        return value

    def select(self, round, clients):
        self.selected[round] = list(self.timed("select", round, clients))
        return self.selected[round]

    def configure(self, round, clients):
        self.configs[round] = dict(self.timed("configure", round, clients))
        return self.configs[round]

    def local_schedule(self, round, client):
        return self.timed("local_schedule", round, client)

    def global_weights(self, configs, weights):
        return self.timed("global_weights", configs, weights)

    def server_settings(self, server, weights, updates):
        return self.timed("server_settings", server, weights, updates)

    def aggregation_weights(self, round, clients):
        return self.timed("aggregation_weights", round, clients)

    def observe(self, report):
        self.timed("observe", report)
        self.timed("state")
        self.timed("client_state")


class Replay(Tuner):
    """The recorded clients and configurations, round by round; with `extras`, the method's client
    statistics and local schedules too."""

    def __init__(self, timed: Timed, extras: bool):
        self.selected, self.configs = timed.selected, timed.configs
        self.inner, self.extras = timed.inner, extras
        self.statistics = timed.statistics if extras else ()

    def local_schedule(self, round, client):
        return self.inner.local_schedule(round, client) if self.extras else None

    def select(self, round, clients: Sequence[int]):
        return self.selected[round]

    def configure(self, round, clients):
        return self.configs[round]


class TimedSteps(RoundSteps):
    """Each round's client training time."""

    def __init__(self):
        super().__init__("cohort")
        self.train_s: list[float] = []

    def train_clients(self, spec, weights, jobs, data):
        started = time.perf_counter()
        updates = super().train_clients(spec, weights, jobs, data)
        self.train_s.append(time.perf_counter() - started)
        return updates


def tuner_of(name: str, fixed: TrainSettings, data: FederatedData, rounds: int) -> Tuner:
    """The method's tuner as its study builds it, over the FedTune paper's space."""
    space = SearchSpace.load(None).parameters("global", fixed.clients)
    study = optuna.create_study(direction="maximize")
    method = methods()[name].build()
    context = SearchContext(study, method, space, None, Budget(rounds), 30, fixed.seed, fixed, data)
    return method.tuner_for(context)


def training_s(federation: Federation, tuner: Tuner, rounds: int) -> list[float]:
    """The client training time of each round."""
    steps = TimedSteps()
    federation.run(tuner, rounds, steps)
    return steps.train_s


def fastest(runs: list[list[float]]) -> float:
    """The sum over rounds of each round's fastest time among the runs."""
    return sum(min(times) for times in zip(*runs, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--methods", default=",".join(n for n, m in methods().items() if m.kind == ROUND))
    args = parser.parse_args()
    fixed = TrainSettings(
        dataset=args.dataset,
        data_root=args.data_root,
        clients=args.clients,
        partition="dirichlet",
        alpha=0.5,
        lr=0.05,
    )
    data = FederatedData.build(load_dataset(fixed.dataset, fixed.data_root), partition_of(fixed.data), fixed.model)
    federation = Federation.of(data, fixed)
    print(f"{args.dataset}, {args.clients} clients, {args.rounds} rounds after one untimed, cohort engine")
    print("| method | training a round | its statistics and schedules | its hooks | overhead |")
    print("|---|---|---|---|---|")
    training_s(federation, FixedConfig(fixed.client_config), 1)  # warm-up: kernels, caches
    for name in args.methods.split(","):
        timed = Timed(tuner_of(name, fixed, data, args.rounds))
        federation.run(timed, args.rounds, RoundSteps())
        plain, extras = [], []
        for _ in range(REPEATS):
            plain.append(training_s(federation, Replay(timed, extras=False), args.rounds))
            extras.append(training_s(federation, Replay(timed, extras=True), args.rounds))
        train, added = fastest(plain) / args.rounds, (fastest(extras) - fastest(plain)) / args.rounds
        hooks = timed.hook_s / args.rounds
        print(
            f"| {name} | {train:.3f} s | {added:+.3f} s | {hooks:.3f} s | {(added + hooks) / train:+.1%} |", flush=True
        )


if __name__ == "__main__":
    main()
