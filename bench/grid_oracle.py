"""The grid oracle of a comparison: every fixed configuration of a grid trained for the final
rounds from the same seed (partition, initial model, client sampling) as the studies, scored on the
test set and by the clients' personalized accuracy (`fedhpo_core.personalization`, after
`--finetune-steps` local steps). The best of them is what a search that finds the best fixed
configuration can reach.

    python bench/grid_oracle.py --dataset mnist --data-root ../shared/data --partition dirichlet \
        --alpha 0.1 --rounds 100 --seeds 0,1,2 --out bench/results/oracle.csv
    python bench/grid_oracle.py --task mnist-scaled --finetune-steps 5 --rounds 100 \
        --out bench/results/oracle-mnist-scaled.csv --by final_personal_acc

Writes one row per (seed, lr, weight_decay) with its final test accuracy and personalized
accuracies (mean, worst tenth); prints the best per seed by `--by`.
"""

import argparse
import itertools
from dataclasses import replace
from pathlib import Path

import pandas as pd

from fedhpo_core.federation import TRAIN_CLIENTS, FederatedData, Federation, partition_of
from fedhpo_core.personalization import personalize
from fedhpo_core.search.space import FEDTUNE_SPACE
from fedhpo_core.settings import TrainSettings
from fedhpo_core.task import load_task_data, prepared
from fedhpo_core.tuners import FixedConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--task", default="", help="a task instead of --dataset (its own partition and clients)")
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--by", default="final_test_acc", help="the column the oracle maximizes")
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
    where = {"task": args.task} if args.task else {"dataset": args.dataset, "partition": args.partition}
    train = TRAIN_CLIENTS["cohort"]
    rows = []
    for seed in map(int, args.seeds.split(",")):
        base = prepared(
            TrainSettings(
                **where,
                data_root=args.data_root,
                alpha=args.alpha,
                clients=args.clients,
                rounds=args.rounds,
                finetune_steps=args.finetune_steps,
                seed=seed,
            )
        )
        dataset = load_task_data(base.task_ref, base.data_root)
        data = FederatedData.build(dataset, partition_of(base.data), base.model, task=base.task_ref)
        federation = Federation(data, base.server, base.participation, seed)
        grid = itertools.product(map(float, args.lrs.split(",")), map(float, args.weight_decays.split(",")))
        for lr, weight_decay in grid:
            config = replace(base, lr=lr, weight_decay=weight_decay).client_config
            result = federation.run(FixedConfig(config), args.rounds)
            test_acc = 0.0 if result.diverged else result.evaluations[-1].test_score
            configs = dict.fromkeys(range(len(data.clients)), config)
            personal = personalize(data.spec, result.state.weights, data.clients, configs, seed, args.rounds, train)
            scores = {f"final_{k}": 0.0 if result.diverged else v for k, v in personal.metrics().items()}
            rows.append({"seed": seed, "lr": lr, "weight_decay": weight_decay, "final_test_acc": test_acc} | scores)
            print(rows[-1], flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(args.out, index=False)
    table = pd.DataFrame(rows)
    best = table.loc[table.groupby("seed")[args.by].idxmax()]
    print(best.to_string(index=False))
    print(f"oracle by {args.by}: mean {best[args.by].mean():.4f} ± {best[args.by].std():.4f}")


if __name__ == "__main__":
    main()
