"""Step-wise adaptive Optuna, one change at a time: the configuration each variant settles on after
the search budget, on the partitions and seeds of the MNIST comparison in docs/compare.md (search only, no
retraining; what a configuration is worth after 100 rounds is the grid oracle's table).

    python bench/stepwise_ablation.py --data-root ../shared/data --seeds 0,1,2

Variants: the paper's reading (`Stepwise.PAPER`), each default change alone on top of it, all of
them (the default), and the default with every client in every round (no straggler-aware
selection), which shows how much of the signal is which clients a round took.
"""

import argparse

from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, Federation, partition_of
from fedhpo_core.search.space import SearchSpace
from fedhpo_core.settings import TrainSettings
from fedhpo_core.tuners.stepwise import Stepwise

VARIANTS = {
    "paper": Stepwise.PAPER,
    "log-error only": Stepwise.PAPER | {"feedback": "log-error"},
    "window baseline only": Stepwise.PAPER | {"baseline": "window"},
    "mean choice only": Stepwise.PAPER | {"choice": "mean"},
    "all (default)": {},
}


class EveryClient(Stepwise):
    """The default step-wise tuner without straggler-aware selection."""

    def select(self, round, clients):
        return clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=30)
    args = parser.parse_args()
    dataset = load_dataset("mnist", args.data_root)
    space = SearchSpace.load(None).parameters("global", 10)
    print("| variant | " + " | ".join(f"seed {s}" for s in args.seeds.split(",")) + " |")
    print("|---|" + "---|" * len(args.seeds.split(",")))
    rows = {name: [] for name in [*VARIANTS, "all, every client every round"]}
    for seed in map(int, args.seeds.split(",")):
        fixed = TrainSettings(
            dataset="mnist", data_root=args.data_root, partition="dirichlet", alpha=0.1, clients=10, seed=seed
        )
        data = FederatedData.build(dataset, partition_of(fixed.data), fixed.model)
        federation = Federation(data, fixed.server, fixed.participation, seed)
        seconds = federation.client_seconds(fixed.local_epochs)
        for name in rows:
            options = VARIANTS.get(name, {})
            kind = EveryClient if name.startswith("all, every") else Stepwise
            tuner = kind(space, fixed.client_config, seconds, data.spec.num_classes, seed, **options)
            federation.run(tuner, args.budget)
            chosen = tuner.chosen()
            rows[name].append(f"lr {chosen['lr']}, wd {chosen['weight_decay']}")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
