"""Time a 20-client MNIST round on a local Dask cluster against the thread runner.

One Prefect flow run trains the same rounds (MNIST, MLP, 20 IID clients, 1 local epoch, batch
32) with each backend, by the `--engine` (cohort or sequential): the thread runner (the round's
clients in one task run in the flow's process, torch using all cores) and a local Dask cluster of
`--dask-workers` processes with one thread each (a share of the clients per worker, its data
loaded on the worker once from a reference). A round is the clients' training, aggregation and
evaluation, timed from the flow. One untimed round per backend first: the Dask workers import
torch and load MNIST, the thread side fills its caches. The two backends' timed rounds alternate,
so drift in machine load hits both alike. The sequential engine gives both backends the same
weights bit for bit; cohorts agree to float rounding (the largest difference is printed).

    python bench/bench_dask.py --data-root ../shared/data
"""

import argparse
import os
import statistics
import time

from fedhpo_core.federation import FederatedData, Federation
from fedhpo_core.settings import ExecutionSettings, TrainSettings
from fedhpo_core.tuners import FixedConfig

SETTINGS = {"dataset": "mnist", "model": "mlp", "clients": 20, "local_epochs": 1, "batch_size": 32, "lr": 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per backend")
    parser.add_argument("--dask-workers", type=int, default=2)
    parser.add_argument("--engine", choices=["cohort", "sequential"], default="cohort")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///bench/results/mlflow.db")

    from prefect import flow

    from cli.main import local_prefect
    from tasks.training import load_data, partition_data, round_steps

    settings = TrainSettings(**SETTINGS, data_root=args.data_root)
    backends = {
        "thread": ExecutionSettings(engine=args.engine),
        "dask": ExecutionSettings("dask", dask_workers=args.dask_workers, engine=args.engine),
    }

    @flow(name="bench-dask-round")
    def bench() -> dict:
        data = FederatedData.build(
            load_data(settings.dataset, settings.data_root), partition_data(settings.data), "mlp"
        )
        federation = Federation(data, settings.server, 1.0, settings.seed)
        tuner = FixedConfig(settings.client_config)
        times: dict[str, list[float]] = {name: [] for name in backends}
        states = {}
        with (
            round_steps(backends["thread"], settings.data) as thread,
            round_steps(backends["dask"], settings.data) as dask,
        ):
            steps = {"thread": thread, "dask": dask}
            for name in backends:  # warm-up round
                states[name] = federation.run(tuner, 1, steps[name]).state
            for _ in range(args.rounds):
                for name in backends:
                    start = time.perf_counter()
                    states[name] = federation.run(tuner, 1, steps[name], start=states[name]).state
                    times[name].append(time.perf_counter() - start)
        difference = float((states["thread"].weights - states["dask"].weights).abs().max())
        assert args.engine == "cohort" or difference == 0, "the backends' weights differ"
        return times | {"difference": difference}

    with local_prefect():
        times = bench()
    thread, dask = (statistics.median(times[name]) for name in backends)
    runs = lambda name: ", ".join(f"{t:.2f}" for t in times[name])  # noqa: E731
    print(
        f"MNIST, MLP, 20 clients, 1 local epoch, batch 32, {args.engine} engine; {os.cpu_count()} CPU cores; "
        f"median of {args.rounds} rounds"
    )
    print(f"thread runner: {thread:.2f} s per round ({runs('thread')})")
    print(f"Dask local cluster, {args.dask_workers} workers x 1 thread: {dask:.2f} s per round ({runs('dask')})")
    print(
        f"speedup thread / dask: {thread / dask:.2f}x; largest weight difference after {args.rounds + 1} rounds: "
        f"{times['difference']:.1e}"
    )


if __name__ == "__main__":
    main()
