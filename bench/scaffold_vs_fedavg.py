"""SCAFFOLD against FedAvg: communication rounds until the global model first reaches a target
accuracy on the server's validation split, paired per seed (the same partition, initial model and
client sampling for both; the same client learning rate and local steps).

    python bench/scaffold_vs_fedavg.py --data-root ../shared/data --seeds 0,1,2

Defaults: MNIST, MLP, 20 clients on a Dirichlet(0.1) label skew, half of them each round, one
local epoch of batch 32 at lr 0.05, target 0.9 within 50 rounds. Prints a markdown table: the
rounds each needed (a run that never reached the target within the rounds shows ">R") and each
one's validation accuracy after the last round all ran. Both SCAFFOLD variants: fedhpo's
(`scaffold`, clients weighted by their samples in x's average and in c's) and the paper's
Algorithm 1 (`scaffold-paper`, every client weighing the same).
"""

import argparse
import time

from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, Federation, partition_of
from fedhpo_core.settings import TrainSettings
from fedhpo_core.tuners import FixedConfig

ALGORITHMS = ("fedavg", "scaffold", "scaffold-paper")


def rounds_to_target(federation: Federation, settings: TrainSettings, target: float, rounds: int):
    """Rounds until the validation accuracy first reaches `target` (None if it does not within
    `rounds`), and the accuracy of each round run."""
    tuner, state, accuracies = FixedConfig(settings.client_config), federation.initial_state(), []
    for t in range(1, rounds + 1):
        result = federation.run(tuner, 1, start=state)
        state = result.state
        accuracies.append(result.evaluations[-1].val_score)
        if result.diverged or accuracies[-1] >= target:
            return (None if result.diverged else t), accuracies
    return None, accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--participation", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=50, help="the most rounds a run may take")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    dataset = load_dataset(args.dataset, args.data_root)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        runs = {}
        for algorithm in ALGORITHMS:
            settings = TrainSettings(
                dataset=args.dataset,
                data_root=args.data_root,
                clients=args.clients,
                partition="dirichlet",
                alpha=args.alpha,
                participation=args.participation,
                lr=args.lr,
                batch_size=args.batch_size,
                local_epochs=args.local_epochs,
                algorithm=algorithm,
                seed=seed,
            )
            data = FederatedData.build(dataset, partition_of(settings.data), settings.model)
            federation = Federation.of(data, settings)
            started = time.perf_counter()
            runs[algorithm] = rounds_to_target(federation, settings, args.target, args.rounds)
            print(f"seed {seed} {algorithm}: {runs[algorithm][0]} rounds ({time.perf_counter() - started:.0f} s)")
        both = min(len(accuracies) for _, accuracies in runs.values())
        rows.append((seed, {a: (reached, accuracies[both - 1]) for a, (reached, accuracies) in runs.items()}, both))

    def shown(reached):
        return f">{args.rounds}" if reached is None else str(reached)

    print(
        f"\n{args.dataset}, MLP, {args.clients} clients, Dirichlet {args.alpha}, participation {args.participation}, "
        f"lr {args.lr}, batch {args.batch_size}, {args.local_epochs} local epoch(s); "
        f"rounds to val_acc >= {args.target}\n"
    )
    print("| seed | FedAvg | SCAFFOLD | paper's SCAFFOLD | val_acc at round r: FedAvg / SCAFFOLD / paper's (r) |")
    print("|---|---|---|---|---|")
    for seed, result, both in rows:
        reached = " | ".join(shown(result[a][0]) for a in ALGORITHMS)
        accuracies = " / ".join(f"{result[a][1]:.4f}" for a in ALGORITHMS)
        print(f"| {seed} | {reached} | {accuracies} ({both}) |")


if __name__ == "__main__":
    main()
