"""Simulated time to a target validation accuracy on phones (`--devices cross-device`): how the
server's deadline and the clients' local epochs trade rounds against seconds.

    python bench/time_to_accuracy.py --data-root ../shared/data --seeds 0,1,2

MNIST, MLP, 100 clients (Dirichlet 0.5), 20 sampled a round, lr 0.05, FedAvg; each variant trains
until the server's validation accuracy reaches the target (or the round limit). A deadline D
leaves out the participants whose round would take longer (stragglers), so rounds are shorter
but aggregate fewer clients; printed per seed (paired: the same profiles, partition and model).
"""

import argparse

import numpy as np

from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, Federation, partition_of
from fedhpo_core.settings import TrainSettings
from fedhpo_core.tuners import FixedConfig

# name -> (local epochs, deadline as a multiple of the median client's round time; 0: none)
VARIANTS = {
    "1 epoch, no deadline": (1, 0.0),
    "1 epoch, deadline 1x median": (1, 1.0),
    "1 epoch, deadline 2x median": (1, 2.0),
    "2 epochs, no deadline": (2, 0.0),
    "2 epochs, deadline 2x median": (2, 2.0),
}


def time_to_target(federation: Federation, settings: TrainSettings, target: float, limit: int):
    """(simulated seconds, rounds) until val_acc >= target; (nan, limit) if never."""
    state, tuner = None, FixedConfig(settings.client_config)
    for _ in range(limit):
        result = federation.run(tuner, 1, start=state)
        state = result.state
        if result.evaluations[-1].val_score >= target:
            return state.sim_time_s, state.round
    return float("nan"), limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--max-rounds", type=int, default=80)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    dataset = load_dataset("mnist", args.data_root)
    rows: dict[str, list[tuple[float, int]]] = {name: [] for name in VARIANTS}
    for seed in seeds:
        base = TrainSettings(
            dataset="mnist", data_root=args.data_root, clients=100, partition="dirichlet", alpha=0.5,
            participation=0.2, devices="cross-device", seed=seed,
        )  # fmt: skip
        data = FederatedData.build(dataset, partition_of(base.data), base.model)
        for name, (epochs, multiple) in VARIANTS.items():
            plain = TrainSettings(**{**vars(base), "local_epochs": epochs})
            median = float(np.median(Federation.of(data, plain).client_seconds(epochs)))
            settings = TrainSettings(**{**vars(plain), "deadline_s": multiple * median})
            rows[name].append(time_to_target(Federation.of(data, settings), settings, args.target, args.max_rounds))
    print(f"Simulated seconds (rounds) to validation accuracy {args.target}, cross-device preset:\n")
    print("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean seconds |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for name, results in rows.items():
        cells = [f"{s:.0f} ({r})" if s == s else f"not in {r}" for s, r in results]
        print(f"| {name} | " + " | ".join(cells) + f" | {np.nanmean([s for s, _ in results]):.0f} |")


if __name__ == "__main__":
    main()
