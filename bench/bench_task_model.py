"""Time one round of a user's model (a task's `nn.Module` subclass) on the cohort engine against
the same architecture's built-in kernel (`linear` for the MLP, `batched` for LeNet-5), the
sequential engine, and a bare sequential PyTorch loop (the reference a user would write). The
user's modules are chains of known layers, which the cohort engine lowers (torch.fx) to the
built-in kernels; forced through torch.func (`VmapKernel`), the path of any other module, they
show what a model that is not such a chain costs.

The user models are plain `nn.Module` subclasses with the bundled models' architectures (the MLP:
Flatten, Linear 784->128, ReLU, Linear 128->10; LeNet-5), named as a task by this file's path
(``bench_task_model.py:user_mlp``), so they reach the engines the way any `--task` does. Their
parameters are created in the bundled models' order, so both start from the same weights and
end the round with the same ones up to float rounding (the last column, user model against
built-in kernel). Rounding can be amplified where it flips a ReLU: on MNIST's LeNet-5, 2 of the
10 clients end ~4e-4 apart, because one of their pre-activations in a step lies within ~2e-8 of
zero (the built-in kernel and the sequential engine happen to agree to 3e-8 there).

MNIST, `--clients` IID clients (their first `--samples` training samples each, and a tenth as
many validation samples, which every path scores after training), 1 local epoch, batch 32,
lr 0.05, in this process, with torch's default threads; each timing the median of `--repeats` after one untimed run.
The issue's target: the user model within 1.5x of the built-in kernel per round.

    python bench/bench_task_model.py --data-root ../shared/data
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedhpo_core import cohort
from fedhpo_core.client import ClientData, ClientJob
from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, partition_of, train_sequentially
from fedhpo_core.models import flat_weights, load_flat_weights
from fedhpo_core.settings import ClientConfig, TrainSettings
from fedhpo_core.task import Task, TaskRef

TARGET = 1.5  # the user model's round within this many times the built-in kernel's


class UserMLP(nn.Module):
    """The bundled MLP written as a user would: Flatten, Linear 784->128, ReLU, Linear 128->10."""

    def __init__(self, input_shape, outputs):
        super().__init__()
        self.hidden = nn.Linear(int(torch.tensor(input_shape).prod()), 128)
        self.out = nn.Linear(128, outputs)

    def forward(self, x):
        return self.out(F.relu(self.hidden(x.flatten(1))))


class UserLeNet5(nn.Module):
    """LeNet-5 as `fedhpo_core.models.lenet5` builds it (padded 5x5 convolutions, 6 and 16 maps,
    then 120 and 84 units), as a user would write it."""

    def __init__(self, input_shape, outputs):
        super().__init__()
        channels, height, width = input_shape
        self.conv1 = nn.Conv2d(channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=2)
        self.fc1 = nn.Linear(16 * (height // 4) * (width // 4), 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, outputs)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.fc1(h.flatten(1)))
        return self.fc3(F.relu(self.fc2(h)))


class UserTask(Task):
    """MNIST with a user's model."""

    def __init__(self, module: type[nn.Module]):
        self.module = module
        self.name = module.__name__

    def load(self, root):
        return load_dataset("mnist", root)

    def model(self, input_shape, outputs):
        return self.module(input_shape, outputs)


user_mlp = UserTask(UserMLP)
user_lenet5 = UserTask(UserLeNet5)
BUILT_IN = {"mlp": ("user_mlp", "linear"), "lenet5": ("user_lenet5", "batched")}


def through_torch_func(spec, *arguments):
    """The cohort engine with the spec's model through torch.func (`VmapKernel`), as a module that
    is not a chain of known layers trains."""
    cohort.KERNELS[spec.name] = "vmap"
    try:
        return cohort.train_cohort(spec, *arguments)
    finally:
        del cohort.KERNELS[spec.name]


def median_times(paths: dict, repeats: int) -> tuple[dict[str, float], dict[str, list]]:
    """Median seconds of `repeats` calls of each path after an untimed one, the paths taking turns
    (a busy machine slows them alike), and each path's last result."""
    results = {name: train(*arguments) for name, (train, arguments) in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, (train, arguments) in paths.items():
            start = time.perf_counter()
            results[name] = train(*arguments)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def bare_loop(build, start: torch.Tensor, clients: list[ClientData], seed: int) -> list[torch.Tensor]:
    """The reference: each client trained in turn by the textbook PyTorch loop (a copy of the
    model, torch.optim.SGD, one shuffled pass of mini-batches), then scored on its validation rows;
    no fedhpo in the way."""
    model = load_flat_weights(build(), start)
    weights = []
    for c, data in enumerate(clients):
        local = copy.deepcopy(model)
        optimizer = torch.optim.SGD(local.parameters(), lr=0.05)
        generator = torch.Generator().manual_seed(seed + c)
        x, y = data.x_train, data.y_train
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), 32):
            batch = order[i : i + 32]
            optimizer.zero_grad()
            F.cross_entropy(local(x[batch]), y[batch]).backward()
            optimizer.step()
        with torch.no_grad():
            (local.eval()(data.x_val).argmax(1) == data.y_val).float().mean()
        weights.append(flat_weights(local))
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--samples", type=int, default=600, help="training samples per client")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(BUILT_IN), choices=list(BUILT_IN))
    args = parser.parse_args()
    settings = TrainSettings(dataset="mnist", data_root=args.data_root, clients=args.clients, partition="iid")
    dataset = load_dataset("mnist", args.data_root)
    partition = partition_of(settings.data)
    jobs = [ClientJob(c, 1, ClientConfig(lr=0.05), 0) for c in range(args.clients)]
    print(
        f"MNIST, {args.clients} clients x {args.samples} samples, 1 epoch, batch 32, lr 0.05, "
        f"{torch.get_num_threads()} threads, CPU; seconds per round (median of {args.repeats})"
    )
    print("| model | path | kernel | seconds | vs built-in | vs bare loop | largest weight difference |")
    print("|---|---|---|---|---|---|---|")
    verdicts = []
    for model, (attribute, built_in) in BUILT_IN.items():
        if model not in args.models:
            continue
        bundled = FederatedData.build(dataset, partition, model)
        task = TaskRef(f"{Path(__file__).resolve()}:{attribute}")
        user = FederatedData.build(dataset, partition, model, task=task)
        assert cohort.kernel_name(bundled.spec) == built_in and cohort.kernel_name(user.spec) == built_in
        assert cohort.cohort_refusal(user.spec) is None
        clients = [ClientData(c.x, c.y, c.train[: args.samples], c.val[: args.samples // 10]) for c in bundled.clients]
        start = bundled.spec.initial_weights(0)
        assert torch.equal(start, user.spec.initial_weights(0)), "the user model should start from the same weights"
        paths = {
            "bare": (bare_loop, (bundled.spec.build, start, clients, 0)),
            "sequential": (train_sequentially, (bundled.spec, start, jobs, clients)),
            "built-in": (cohort.train_cohort, (bundled.spec, start, jobs, clients)),
            "user": (cohort.train_cohort, (user.spec, start, jobs, clients)),
            "torch.func": (through_torch_func, (user.spec, start, jobs, clients)),
        }
        seconds, results = median_times(paths, args.repeats)
        bare, fast, lowered, general = (seconds[k] for k in ("bare", "built-in", "user", "torch.func"))
        reference = results["built-in"]
        lowered_difference, difference = (
            max(float((a.weights - b.weights).abs().max()) for a, b in zip(reference, results[k], strict=True))
            for k in ("user", "torch.func")
        )
        print(f"| {model} | bare PyTorch loop, client after client | | {bare:.3f} | {bare / fast:.2f}x | 1.00x | |")
        print(
            f"| {model} | built-in model, sequential engine | | {seconds['sequential']:.3f} | "
            f"{seconds['sequential'] / fast:.2f}x | {seconds['sequential'] / bare:.2f}x | |"
        )
        print(f"| {model} | built-in model, cohort engine | {built_in} | {fast:.3f} | 1.00x | {fast / bare:.2f}x | |")
        print(
            f"| {model} | user nn.Module, cohort engine (a chain: {built_in} kernel) | {built_in} | {lowered:.3f} | "
            f"{lowered / fast:.2f}x | {lowered / bare:.2f}x | {lowered_difference:.1e} |"
        )
        print(
            f"| {model} | user nn.Module through torch.func | vmap | {general:.3f} | {general / fast:.2f}x | "
            f"{general / bare:.2f}x | {difference:.1e} |"
        )
        verdicts.append(
            f"{model}: user model {lowered / fast:.2f}x the built-in kernel, {general / fast:.2f}x through torch.func "
            f"(target <= {TARGET}x)"
        )
    print()
    print(*verdicts, sep="\n")


if __name__ == "__main__":
    main()
