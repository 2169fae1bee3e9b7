"""The learning rates each group of a scaled-groups task prefers (`fedhpo_core.scaled_groups`):
FedAvg with a learning rate per group, every pair of the FedTune paper's rates, scored by each
group's mean personalized accuracy (after `--finetune-steps` k local steps; k = 0: the global
model on each client's own validation split) and the server's validation accuracy. The diagonal is
the best single global rate (the grid oracle of a global search); the best off-diagonal pair is
what a personalized method can reach.

    python bench/personalization_grid.py --task mnist-scaled --rounds 10
    python bench/personalization_grid.py --task mnist-scaled --rounds 50 --finetune-steps 5 \
        --group0 0.1,0.05 --group1 0.05,0.01,0.005 --seeds 0,1,2
"""

import argparse
import itertools
import time
from dataclasses import replace

from fedhpo_core.federation import TRAIN_CLIENTS, FederatedData, Federation, partition_of
from fedhpo_core.personalization import personalize
from fedhpo_core.settings import TrainSettings
from fedhpo_core.task import load_task_data, prepared
from fedhpo_core.tuners import PerClientConfig

LRS = (0.1, 0.05, 0.01, 0.005, 0.001)
TRAIN = TRAIN_CLIENTS["cohort"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-scaled")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--group0", default=",".join(map(str, LRS)), help="group 0's rates")
    parser.add_argument("--group1", default=",".join(map(str, LRS)), help="group 1's rates")
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()
    print("seed  lr group0  lr group1  val_acc  personal group0  group1  mean    worst10  s")
    for seed in map(int, args.seeds.split(",")):
        settings = prepared(
            TrainSettings(task=args.task, data_root=args.data_root, seed=seed, finetune_steps=args.finetune_steps)
        )
        dataset = load_task_data(settings.task_ref, settings.data_root)
        data = FederatedData.build(dataset, partition_of(settings.data), settings.model, task=settings.task_ref)
        federation = Federation.of(data, settings)
        clients = len(data.clients)
        rates = itertools.product(map(float, args.group0.split(",")), map(float, args.group1.split(",")))
        for lr0, lr1 in rates:
            configs = [replace(settings, lr=lr0 if c % 2 == 0 else lr1).client_config for c in range(clients)]
            started = time.perf_counter()
            result = federation.run(PerClientConfig(configs), args.rounds)
            personal = personalize(
                data.spec, result.state.weights, data.clients, dict(enumerate(configs)), seed, args.rounds, TRAIN
            )
            groups = [sum(s for c, s in personal.scores.items() if c % 2 == g) / (clients // 2) for g in (0, 1)]
            print(
                f"{seed:<5} {lr0:<10g} {lr1:<10g} {result.evaluations[-1].val_score:.4f}   {groups[0]:.4f}          "
                f"{groups[1]:.4f}  {personal.mean:.4f}  {personal.worst:.4f}   {time.perf_counter() - started:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
