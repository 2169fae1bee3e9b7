"""Time the `federated-training` flow against bare PyTorch FedAvg loops doing the same work, and
time the start-up of a `fedhpo train` command.

In one process, on the same tensors and partition (MNIST, MLP, 1 local epoch, batch 32, lr 0.05,
full participation), at 10 and at 100 clients:
- the flow (cohort engine): Prefect task runs, MLflow params, per-round metrics, artifacts and the
  final model included;
- a bare sequential loop: one client after another, a torch.nn model and torch.optim.SGD each;
- a bare batched loop: every client's weights stacked on a client axis, one batched matrix
  product per layer, autograd, one SGD update for all.
Each round, each side trains every client, validates it locally, averages the models by sample
count and evaluates the global model on the server's validation split and the test set. Each runs
once untimed first; then the sides alternate, so drift in the machine's load hits all alike.

Start-up: `fedhpo train` as a subprocess, from the command to the log line of its first round
(which includes loading MNIST and training that round), with the warm runner and the local
Prefect server already up (the first command starts them; that is timed too).

    python bench/bench_training.py --data-root ../shared/data
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from torch.nn import functional as F

from fedhpo_core.data import load_dataset
from fedhpo_core.partition import partition_dataset
from fedhpo_core.settings import TrainSettings

SETTINGS = {"dataset": "mnist", "model": "mlp", "local_epochs": 1, "batch_size": 32, "lr": 0.05}


def federation_tensors(settings: TrainSettings):
    dataset = load_dataset(settings.dataset, settings.data_root)
    d = settings.data
    part = partition_dataset(
        dataset.y_train.numpy(), d.clients, d.partition, d.seed, d.val_fraction, d.client_val_fraction, d.alpha
    )
    x, y = dataset.x_train, dataset.y_train
    clients = [
        (x[torch.from_numpy(t)], y[torch.from_numpy(t)], x[torch.from_numpy(v)], y[torch.from_numpy(v)])
        for t, v in zip(part.client_train, part.client_val, strict=True)
    ]
    server_val = (x[torch.from_numpy(part.server_val)], y[torch.from_numpy(part.server_val)])
    return dataset, clients, server_val


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def evaluate(model, x, y) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def bare_sequential(settings: TrainSettings, rounds: int) -> float:
    """Plain PyTorch FedAvg, one client after another; returns the final test accuracy."""
    dataset, clients, server_val = federation_tensors(settings)
    torch.manual_seed(settings.seed)
    model = mlp()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    test_acc = 0.0
    for _ in range(rounds):
        states, sizes = [], []
        for x_train, y_train, x_val, y_val in clients:
            model.load_state_dict(global_state)
            optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr)
            order = torch.randperm(len(y_train))
            for start in range(0, len(y_train), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            evaluate(model, x_val, y_val)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            sizes.append(len(y_train))
        total = sum(sizes)
        global_state = {k: sum(s[k] * (n / total) for s, n in zip(states, sizes, strict=True)) for k in global_state}
        model.load_state_dict(global_state)
        evaluate(model, *server_val)
        test_acc = evaluate(model, dataset.x_test, dataset.y_test)[1]
    return test_acc


def bare_batched(settings: TrainSettings, rounds: int) -> float:
    """Plain PyTorch FedAvg with every client's weights stacked on a client axis: each step one
    batched matrix product per layer over every client, autograd, one SGD update for all (a client
    whose batches ran out, or the padded part of a partial batch, has loss weight 0); returns the
    final test accuracy."""
    dataset, clients, server_val = federation_tensors(settings)
    torch.manual_seed(settings.seed)
    model = mlp()
    global_params = [p.detach().clone() for p in model.parameters()]  # W1, b1, W2, b2
    x_pool = torch.cat([c[0] for c in clients]).flatten(1)
    y_pool = torch.cat([c[1] for c in clients])
    offsets = torch.tensor([0] + [len(c[1]) for c in clients]).cumsum(0)[:-1]
    sizes = torch.tensor([len(c[1]) for c in clients])
    batch, k = settings.batch_size, len(clients)
    steps = int(-(-sizes.max() // batch))
    test_acc = 0.0

    def forward(params, x):
        w1, b1, w2, b2 = params
        hidden = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)).relu()
        return torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))

    for _ in range(rounds):
        params = [p.expand(k, *p.shape).clone() for p in global_params]
        rows = torch.zeros(k, steps * batch, dtype=torch.long)
        weights = torch.zeros(k, steps * batch)
        for i, n in enumerate(sizes.tolist()):
            rows[i, :n] = offsets[i] + torch.randperm(n)
            counts = torch.full((steps * batch,), float(batch))
            counts[(n // batch) * batch :] = n % batch or batch
            weights[i, :n] = 1.0 / counts[:n]
        for step in range(steps):
            columns = slice(step * batch, (step + 1) * batch)
            x, y = x_pool[rows[:, columns]], y_pool[rows[:, columns]]
            w = [p.requires_grad_() for p in params]
            losses = F.cross_entropy(forward(w, x).flatten(0, 1), y.flatten(), reduction="none")
            grads = torch.autograd.grad((losses * weights[:, columns].flatten()).sum(), w)
            with torch.no_grad():
                params = [p.detach() - settings.lr * g for p, g in zip(w, grads, strict=True)]
        with torch.no_grad():
            for i, (_, _, x_val, y_val) in enumerate(clients):
                logits = forward([p[i : i + 1] for p in params], x_val.flatten(1).unsqueeze(0))[0]
                F.cross_entropy(logits, y_val).item(), (logits.argmax(1) == y_val).float().mean().item()
            shares = sizes.float() / sizes.sum()
            global_params = [torch.tensordot(shares, p, dims=1) for p in params]
        for p, value in zip(model.parameters(), global_params, strict=True):
            p.data.copy_(value)
        evaluate(model, *server_val)
        test_acc = evaluate(model, dataset.x_test, dataset.y_test)[1]
    return test_acc


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def median(times: list[float]) -> float:
    return statistics.median(times)


def time_training(data_root: str, clients: int, rounds: int, repeats: int) -> dict[str, float]:
    from flows.training import federated_training

    settings = TrainSettings(**SETTINGS, clients=clients, data_root=data_root, rounds=rounds, experiment="bench")
    sides = {
        "flow": lambda: federated_training(**vars(settings))["final_test_acc"],
        "bare sequential": lambda: bare_sequential(settings, rounds),
        "bare batched": lambda: bare_batched(settings, rounds),
    }
    for run in sides.values():  # untimed: caches fill, the dataset loads, the flow's server connection opens
        run()
    times = {name: [] for name in sides}
    accuracy = {}
    for _ in range(repeats):
        for name, run in sides.items():
            seconds, accuracy[name] = timed(run)
            times[name].append(seconds)
    print(
        f"\nMNIST, MLP, {clients} clients, {rounds} rounds, 1 local epoch, batch 32, {torch.get_num_threads()} threads"
    )
    for name in sides:
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:16s} {median(times[name]):7.2f} s (runs {runs}), test_acc {accuracy[name]:.4f}")
    sequential = median(times["bare sequential"])
    for name in ("flow", "bare batched"):
        print(f"  ratio {name} / bare sequential: {median(times[name]) / sequential:.3f}")
    return {name: median(t) for name, t in times.items()}


ROUND_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) .*round 1/")


def time_startup(data_root: str, repeats: int) -> None:
    """Seconds from launching `fedhpo train` to its first round's log line: once starting the warm
    runner (and the Prefect server, if this PREFECT_HOME has none), then warm."""
    fedhpo = str(Path(sys.executable).with_name("fedhpo"))
    command = [
        fedhpo,
        "train",
        "--dataset",
        "mnist",
        "--data-root",
        data_root,
        "--rounds",
        "1",
        "--experiment",
        "bench",
    ]
    subprocess.run([fedhpo, "server", "stop"], capture_output=True, check=True)
    seconds = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats + 1):
            launched = datetime.now()
            done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True)
            lines = (done.stderr + done.stdout).splitlines()
            stamp = next(match for line in lines if (match := ROUND_LINE.match(line)))
            first_round = datetime.combine(launched.date(), datetime.strptime(stamp.group(1), "%H:%M:%S.%f").time())
            seconds.append((first_round - launched).total_seconds())
    print("\nStart-up, `fedhpo train` on MNIST to its first round's log line (the round included):")
    print(f"  starting the runner and the Prefect server: {seconds[0]:.2f} s")
    print(f"  warm: {median(seconds[1:]):.2f} s (runs {', '.join(f'{s:.2f}' for s in seconds[1:])})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the median is reported")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--startup-repeats", type=int, default=3, help="warm start-ups timed (0: none)")
    args = parser.parse_args()
    data_root = os.path.abspath(args.data_root)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{os.path.abspath('bench/results/mlflow.db')}")
    os.makedirs("bench/results", exist_ok=True)

    if args.startup_repeats:
        time_startup(data_root, args.startup_repeats)
    from cli.main import local_prefect

    with local_prefect():
        for clients in args.clients:
            time_training(data_root, clients, args.rounds, args.repeats)


if __name__ == "__main__":
    main()
