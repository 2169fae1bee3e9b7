"""The grid oracle of a comparison: every fixed configuration of a grid trained for the final
rounds from the same seed (partition, initial model, client sampling) as the studies, scored on the
test set. The best of them is what a search that finds the best fixed configuration can reach.

    python bench/grid_oracle.py --dataset mnist --data-root ../shared/data --partition dirichlet \
        --alpha 0.1 --rounds 100 --seeds 0,1,2 --out bench/results/oracle.csv

Writes one row per (seed, lr, weight_decay) with its final test accuracy; prints the best per seed.
"""

import argparse
import itertools
from dataclasses import replace
from pathlib import Path

import pandas as pd

from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, Federation, partition_of
from fedhpo_core.search.space import FEDTUNE_SPACE
from fedhpo_core.settings import TrainSettings
from fedhpo_core.tuners import FixedConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--partition", default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default=",".join(map(str, FEDTUNE_SPACE["lr"]["choices"])))
    parser.add_argument("--weight-decays", default=",".join(map(str, FEDTUNE_SPACE["weight_decay"]["choices"])))
    parser.add_argument("--out", default="bench/results/oracle.csv")
    args = parser.parse_args()
    dataset = load_dataset(args.dataset, args.data_root)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        base = TrainSettings(
            dataset=args.dataset,
            data_root=args.data_root,
            partition=args.partition,
            alpha=args.alpha,
            clients=args.clients,
            rounds=args.rounds,
            seed=seed,
        )
        data = FederatedData.build(dataset, partition_of(base.data), base.model)
        federation = Federation(data, base.server, base.participation, seed)
        grid = itertools.product(map(float, args.lrs.split(",")), map(float, args.weight_decays.split(",")))
        for lr, weight_decay in grid:
            config = replace(base, lr=lr, weight_decay=weight_decay).client_config
            result = federation.run(FixedConfig(config), args.rounds)
            test_acc = 0.0 if result.diverged else result.evaluations[-1].test_score
            rows.append({"seed": seed, "lr": lr, "weight_decay": weight_decay, "final_test_acc": test_acc})
            print(rows[-1], flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(args.out, index=False)
    table = pd.DataFrame(rows)
    best = table.loc[table.groupby("seed").final_test_acc.idxmax()]
    print(best.to_string(index=False))
    print(f"oracle mean {best.final_test_acc.mean():.4f} ± {best.final_test_acc.std():.4f}")


if __name__ == "__main__":
    main()
