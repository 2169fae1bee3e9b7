"""Time the `federated-training` flow against a bare PyTorch FedAvg loop doing the same work.

Both run in this process on the same tensors and partition: MNIST, MLP, 10 clients, 1 local
epoch, batch 32, full participation. Each round, both train every client, validate it locally,
average the models by sample count and evaluate the global model on the server's validation
split and the test set. The flow adds Prefect (a task run per client per round, aggregation and
evaluation tasks, the cached partition) and MLflow (params, per-round metrics, artifacts, the
final model). Each side runs once untimed first (Prefect's temporary server starts, caches fill).

    python bench/bench_training.py --data-root ../shared/data
"""

import argparse
import os
import time

import torch
from torch.nn import functional as F

from fedhpo_core.data import load_dataset
from fedhpo_core.partition import partition_dataset
from fedhpo_core.settings import TrainSettings

SETTINGS = {"dataset": "mnist", "model": "mlp", "clients": 10, "local_epochs": 1, "batch_size": 32, "lr": 0.05}


def bare_fedavg(settings: TrainSettings, rounds: int) -> float:
    """Plain PyTorch FedAvg, written without fedhpo's round loop; returns the final test accuracy."""
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
    torch.manual_seed(settings.seed)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    global_state = {k: v.clone() for k, v in model.state_dict().items()}

    def accuracy(xs, ys):
        with torch.no_grad():
            logits = model(xs)
            return F.cross_entropy(logits, ys).item(), (logits.argmax(1) == ys).float().mean().item()

    test_acc = 0.0
    for _ in range(rounds):
        states, sizes = [], []
        for x_train, y_train, x_val, y_val in clients:
            model.load_state_dict(global_state)
            optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr)
            for _ in range(settings.local_epochs):
                order = torch.randperm(len(y_train))
                for start in range(0, len(y_train), settings.batch_size):
                    batch = order[start : start + settings.batch_size]
                    loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            accuracy(x_val, y_val)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            sizes.append(len(y_train))
        total = sum(sizes)
        global_state = {k: sum(s[k] * (n / total) for s, n in zip(states, sizes, strict=True)) for k in global_state}
        model.load_state_dict(global_state)
        accuracy(*server_val)
        test_acc = accuracy(dataset.x_test, dataset.y_test)[1]
    return test_acc


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the median is reported")
    parser.add_argument("--torch-threads", type=int, help="intra-op threads for both sides (default: torch's)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///bench/results/mlflow.db")
    os.makedirs("bench/results", exist_ok=True)

    from flows.cli import local_prefect
    from flows.training import federated_training

    settings = TrainSettings(**SETTINGS, data_root=args.data_root, rounds=args.rounds, experiment="bench")
    flow_parameters = {**vars(settings)}

    bare_times, flow_times = [], []
    with local_prefect():
        bare_fedavg(settings, 1)
        federated_training(**{**flow_parameters, "rounds": 1})
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides alike
            seconds, bare_acc = timed(bare_fedavg, settings, args.rounds)
            bare_times.append(seconds)
            seconds, summary = timed(federated_training, **flow_parameters)
            flow_times.append(seconds)

    bare, flow = sorted(bare_times)[len(bare_times) // 2], sorted(flow_times)[len(flow_times) // 2]
    runs = lambda times: ", ".join(f"{t:.2f}" for t in times)  # noqa: E731
    print(f"MNIST, MLP, 10 clients, {args.rounds} rounds, 1 local epoch, batch 32, {torch.get_num_threads()} threads")
    print(f"bare PyTorch FedAvg loop: {bare:.2f} s (runs {runs(bare_times)}), test_acc {bare_acc:.4f}")
    print(f"federated-training flow:  {flow:.2f} s (runs {runs(flow_times)}), test_acc {summary['final_test_acc']:.4f}")
    print(f"ratio flow / bare: {flow / bare:.3f}")


if __name__ == "__main__":
    main()
