"""Time one round of local training of each model with the sequential engine and with the cohort
engine's kernels (`fedhpo_core.cohort`): which kernel `kernel_name` should pick for each model.

MNIST, 10 IID clients (their first `--samples` training samples each), 1 local epoch, batch 32,
lr 0.05, in this process; each timing the median of `--repeats` after one untimed run. The cohort
kernels are checked against the sequential engine (largest weight difference after the round).
`--device cuda` trains the cohorts on the GPU (the sequential engine stays on the CPU).

    python bench/bench_cohort.py --data-root ../shared/data
"""

import argparse
import statistics
import time

import torch

from fedhpo_core import cohort
from fedhpo_core.client import ClientData, ClientJob
from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, partition_of, train_sequentially
from fedhpo_core.settings import ClientConfig, TrainSettings

KERNELS_OF = {"mlp": ("vmap", "batched", "linear"), "lenet5": ("vmap", "batched"), "cnn": ("vmap", "batched")}


def median_time(train, arguments: tuple, repeats: int) -> tuple[float, list]:
    """Median seconds of `repeats` calls after an untimed one, and the last call's updates."""
    updates = train(*arguments)
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        updates = train(*arguments)
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), updates


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--samples", type=int, default=1024, help="training samples per client")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(KERNELS_OF))
    parser.add_argument("--device", default="cpu", help="where the cohorts train: cpu or cuda")
    args = parser.parse_args()
    settings = TrainSettings(dataset="mnist", data_root=args.data_root, clients=args.clients)
    dataset = load_dataset("mnist", args.data_root)
    threads = torch.get_num_threads()
    print(
        f"MNIST, {args.clients} clients x {args.samples} samples, 1 epoch, batch 32, {threads} threads, {args.device}"
    )
    print("| model | engine | kernel | seconds | speed-up | largest weight difference |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        data = FederatedData.build(dataset, partition_of(settings.data), model)
        clients = [ClientData(c.x, c.y, c.train[: args.samples], c.val) for c in data.clients]
        jobs = [ClientJob(c, 1, ClientConfig(lr=0.05), 0) for c in range(args.clients)]
        arguments = (data.spec, data.spec.initial_weights(0), jobs, clients)
        sequential, reference = median_time(train_sequentially, arguments, args.repeats)
        print(f"| {model} | sequential | | {sequential:.2f} | 1.00x | |")
        device_data = FederatedData.build(dataset, partition_of(settings.data), model, args.device)
        device_clients = [ClientData(c.x, c.y, c.train[: args.samples], c.val) for c in device_data.clients]
        on_device = (data.spec, arguments[1].to(args.device), jobs, device_clients)
        chosen = cohort.kernel_name(data.spec)
        for kernel in KERNELS_OF[model]:
            cohort.KERNELS[model] = kernel
            seconds, updates = median_time(cohort.train_cohort, on_device, args.repeats)
            difference = max(
                float((a.weights - b.weights.cpu()).abs().max()) for a, b in zip(reference, updates, strict=True)
            )
            name = f"{kernel} (chosen)" if kernel == chosen else kernel
            print(f"| {model} | cohort | {name} | {seconds:.2f} | {sequential / seconds:.2f}x | {difference:.1e} |")
        del cohort.KERNELS[model]


if __name__ == "__main__":
    main()
