"""What checkpointing a round-level run as it goes costs: a study of each method, its one run
stored every round (`--checkpoint-every 1`, the default: the federation's state and the tuner's,
as an MLflow artifact, and the trial's recorded result) against the same study stored only at its
end, in this process, with the MLflow and Optuna SQLite stores of a new temporary folder.

MNIST, MLP, 10 Dirichlet-0.1 clients (the FedTune paper's Table 1 task), the default search space,
`--rounds` rounds. The two settings alternate (`--repeats` each, the order swapped every
repetition) so that drift in the machine's load hits both alike; the figure is the median ratio
of their wall times, and the checkpoint's size is the last stored file's.

    OMP_NUM_THREADS=1 python bench/round_level_checkpoint.py --data-root ../shared/data
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, RoundSteps, partition_of
from fedhpo_core.registry import method
from fedhpo_core.search.base import CHECKPOINT_ATTR
from fedhpo_core.search.space import SearchSpace
from fedhpo_core.search.study import open_study, run_search
from fedhpo_core.settings import TrainSettings
from fedhpo_core.tracking import Tracker, load_state
from fedhpo_core.trial import TrialTrainer


def study_seconds(name: str, data, fixed: TrainSettings, rounds: int, every: int, folder: Path) -> tuple[float, int]:
    """Wall seconds of a study of `rounds` rounds stored every `every` rounds, and its last checkpoint's bytes."""
    searched = method(name).build()
    study = open_study(searched, f"sqlite:///{folder / 'optuna.db'}", f"{name}-{every}-{time.monotonic_ns()}", False)
    trainer = TrialTrainer(
        data, fixed, "server", Tracker(fixed.experiment, "study"), name, RoundSteps("cohort"), checkpoint_every=every
    )
    started = time.perf_counter()
    run_search(searched, study, SearchSpace.load(None), "global", fixed.clients, trainer, rounds, 30, 0, fixed, data)
    seconds = time.perf_counter() - started
    stored = load_state(study.trials[0].user_attrs[CHECKPOINT_ATTR])
    return seconds, sum(v.numel() * v.element_size() for v in stored.values() if hasattr(v, "numel"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--methods", default="fedex,fedtune,hpn")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    fixed = TrainSettings(dataset="mnist", clients=10, partition="dirichlet", alpha=0.1, data_root=args.data_root)
    data = FederatedData.build(load_dataset("mnist", fixed.data_root), partition_of(fixed.data), fixed.model)
    with tempfile.TemporaryDirectory() as folder:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        study_seconds("fedex", data, fixed, 2, 1, Path(folder))  # warm-up: the stores' tables, the engine
        print(f"{'method':<10} {'stored every round':>20} {'stored at the end':>18} {'ratio':>6} {'checkpoint':>11}")
        for name in args.methods.split(","):
            times: dict[int, list[float]] = {1: [], args.rounds + 1: []}
            for repeat in range(args.repeats):
                for every in sorted(times, reverse=bool(repeat % 2)):
                    seconds, size = study_seconds(name, data, fixed, args.rounds, every, Path(folder))
                    times[every].append(seconds)
            each, end = statistics.median(times[1]), statistics.median(times[args.rounds + 1])
            print(f"{name:<10} {each:>19.2f}s {end:>17.2f}s {each / end:>6.3f} {size / 2**20:>9.1f} MB")


if __name__ == "__main__":
    main()
