"""The `federated-training` flow: partition, train round by round, evaluate, track in MLflow."""

import inspect
import time
from dataclasses import asdict, fields

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.utilities.names import generate_slug

from cli.interrupts import cooperative_interrupts
from cli.progress import bar
from fedhpo_core.federation import Evaluation, FederatedData, Federation, RoundReport
from fedhpo_core.models import load_flat_weights
from fedhpo_core.partition import label_histogram, label_skew
from fedhpo_core.reports import ConfigTrajectory, partition_figure, partition_table, round_metrics
from fedhpo_core.settings import ExecutionSettings, TrainSettings
from fedhpo_core.task import TaskRef, prepared
from fedhpo_core.tracking import ROLE_TAG, Tracker
from fedhpo_core.trial import FROZEN_TAG, personal_metrics
from fedhpo_core.tuners import FixedConfig
from tasks.training import announce_engine, load_data, partition_data, round_steps, task_params


def run_parameters(flow_function) -> dict:
    """The current flow run's parameters over the flow function's defaults (a deployment's run
    holds only those it was given)."""
    defaults = {name: p.default for name, p in inspect.signature(flow_function).parameters.items()}
    return defaults | flow_run.parameters


def training_run_name() -> str:
    """A training's flow run (and MLflow run) is named for its dataset, model and seed, and a random
    slug: a week of scheduled runs reads apart in the Prefect UI."""
    parameters = run_parameters(federated_training.fn)
    ref = TaskRef(parameters.get("task") or parameters["dataset"])
    model = f"-{parameters['model']}" if ref.bundled else ""
    return f"{ref.label}{model}-s{parameters['seed']}-{generate_slug(2)}"


def partition_title(settings: TrainSettings) -> str:
    detail = {"dirichlet": f" alpha={settings.alpha}", "shards": f" k={settings.shards_per_client}"}
    label = settings.task_ref.label
    return f"{label}, {settings.clients} clients, {settings.partition}{detail.get(settings.partition, '')}"


def train(settings: TrainSettings, execution: ExecutionSettings = ExecutionSettings()) -> dict:
    """One tracked federated run with a fixed configuration; returns its summary (the task's score
    under its name: `final_test_acc`, `final_test_rmse`)."""
    logger = get_run_logger()
    started = time.perf_counter()
    settings = prepared(settings)
    dataset = load_data(settings.task_ref, settings.data_root)
    partition = partition_data(settings.data)
    data = FederatedData.build(dataset, partition, settings.model, execution.resolved_device, settings.task_ref)
    metric = data.spec.score
    announce_engine(data.spec, execution, logger)
    federation = Federation.of(data, settings)
    histogram = label_histogram(dataset.y_train.numpy(), partition, dataset.num_classes)

    tags = {ROLE_TAG: "train", "prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": flow_run.name}
    with cooperative_interrupts() as stop, Tracker(settings.experiment, flow_run.name, tags) as tracker:
        tracker.log_params(
            {**asdict(settings), "server_lr": settings.server.lr, "model_parameters": data.spec.size}
            | task_params(settings, data.spec)
            | {
                "partition_label_skew": label_skew(histogram),
                **{f"execution.{k}": v for k, v in asdict(execution).items()},
            }
        )

        configs = ConfigTrajectory()
        bar().plan(settings.rounds)

        reached: list[float] = []  # the simulated time at which the validation score first reached target_acc
        bytes_sent: list[int] = []

        def observe(report: RoundReport, evaluation: Evaluation) -> None:
            configs.record(report)
            bytes_sent.append(report.bytes_sent)
            if settings.target_acc and not reached and not metric.better(settings.target_acc, evaluation.val_score):
                reached.append(report.sim_time_s)
            tracker.log_metrics(round_metrics(report, evaluation, metric.name), step=report.round)
            bar().advance(1)
            logger.info(
                "round %d/%d: train_loss %.4f val_%s %.4f test_%s %.4f",
                report.round,
                settings.rounds,
                report.train_loss,
                metric.name,
                evaluation.val_score,
                metric.name,
                evaluation.test_score,
            )
            stop.check()  # Ctrl-C ends the run here, between rounds

        with round_steps(execution, settings.data) as steps:
            result = federation.run(FixedConfig(settings.client_config), settings.rounds, steps, observe=observe)
        tracker.log_client_configs(configs)
        tracker.log_table(partition_table(partition, histogram), "partition/partition.csv")
        tracker.log_figure(partition_figure(histogram, partition_title(settings)), "partition/partition.png")
        final = result.evaluations[-1]
        summary = {
            f"final_val_{metric.name}": final.val_score,
            f"final_test_{metric.name}": final.test_score,
            "final_val_loss": final.val_loss,
            "final_test_loss": final.test_loss,
            **{f"final_{k}": v for k, v in final.others.items()},
            "rounds_completed": result.state.round,
            "total_bytes_sent": float(sum(bytes_sent)),
            "diverged": float(result.diverged),
            "frozen": float(result.frozen),
            "wall_time_s": time.perf_counter() - started,
        }
        summary |= {"time_to_target_s": reached[0]} if reached else {}
        if not result.diverged:  # how well the model serves each client once it adapts it
            everyone = dict.fromkeys(range(len(data.clients)), settings.client_config)
            personal = personal_metrics(data, result.state.weights, everyone, settings.seed, result.state.round, steps)
            summary |= {f"final_{k}": v for k, v in personal.items()}
        tracker.log_metrics(summary)
        tracker.set_tags({FROZEN_TAG: str(result.frozen).lower(), "fedhpo.diverged": str(result.diverged).lower()})
        if result.diverged:
            tracker.set_tags({"fedhpo.diverged_round": result.diverged_round})
            logger.warning("diverged at round %d (non-finite loss or weights); model not logged", result.diverged_round)
        elif result.frozen:
            logger.warning("frozen: no round changed the global model (its update underflows); model not logged")
        else:
            model = load_flat_weights(data.spec.build(), result.state.weights)
            tracker.log_model(model, input_example=data.test[0][:8].cpu().numpy())
    return {
        **summary,
        "score": metric.name,
        "direction": metric.direction,
        "sim_time_s": result.state.sim_time_s,  # also the last round's metric of that name
        "run_id": tracker.run_id,
        "experiment_id": tracker.experiment_id,
        "diverged_round": result.diverged_round,
    }


@flow(name="federated-training", flow_run_name=training_run_name)
def federated_training(
    dataset: str = "digits",
    task: str = "",
    client_column: str = "",
    target: str = "",
    task_type: str = "auto",
    data_root: str = "data",
    model: str = "mlp",
    clients: int = 10,
    partition: str = "auto",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    val_fraction: float = 0.1,
    client_val_fraction: float = 0.1,
    rounds: int = 20,
    participation: float = 1.0,
    local_epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    mu: float = 0.0,
    finetune_steps: int = 0,
    finetune_lr: float = 0.0,
    ditto_lambda: float = 0.0,
    compression: str = "none",
    compression_bits: int = 8,
    compression_bucket: int = 512,
    topk_fraction: float = 0.01,
    compress_downloads: bool = False,
    algorithm: str = "fedavg",
    aggregator: str = "fedavg",
    server_lr: float | None = None,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    dp_clip: float = 0.0,
    dp_noise: float = 0.0,
    dp_delta: float = 1e-5,
    devices: str = "uniform",
    dropout: float = 0.0,
    deadline_s: float = 0.0,
    target_acc: float = 0.0,
    seed: int = 0,
    experiment: str = "fedhpo",
    task_runner: str = "thread",
    dask_address: str | None = None,
    dask_workers: int = 2,
    engine: str = "cohort",
    device: str = "auto",
) -> dict:
    """Train one federated model and track it in MLflow.

    Args:
        dataset: digits, mnist, fashion_mnist or cifar10 (a bundled task).
        task: Any task: a bundled or installed name, package.module:attribute, a .py file, a .csv or
            .parquet table, or a folder with a subfolder per client (default: dataset).
        client_column: A table task's client-id column.
        target: A table task's target column.
        task_type: A table's target: classification, regression or auto.
        data_root: Folder holding datasets in torchvision's layout.
        model: mlp, lenet5 or cnn (bundled datasets and folders).
        clients: Number of simulated clients (under the natural partition: the data's own).
        partition: iid, dirichlet, shards, natural (the data's own clients) or auto (natural where the
            data has clients of its own, else iid).
        alpha: Dirichlet concentration (smaller: more label skew).
        shards_per_client: Classes per client for the shards partition.
        val_fraction: Fraction of the training set held by the server for validation.
        client_val_fraction: Fraction of each client's data kept for local validation.
        rounds: Communication rounds.
        participation: Fraction of clients sampled each round, in (0, 1].
        local_epochs: Local epochs per round.
        batch_size: Local mini-batch size.
        lr: Client learning rate.
        momentum: Client SGD momentum.
        weight_decay: Client weight decay.
        mu: FedProx proximal weight (0: plain FedAvg local SGD).
        finetune_steps: Personalized evaluation: local SGD steps each client takes from the global
            model before it is scored on its own validation split (0: the global model as it is).
        finetune_lr: The fine-tuning steps' learning rate (0: the client's lr).
        ditto_lambda: Ditto's lambda: the fine-tuned model's proximal pull to the global model.
        compression: How clients compress their updates: none, qsgd, topk (with error feedback) or cast.
        compression_bits: qsgd: bits per value's level; cast: 8-bit up to 8, else 16-bit.
        compression_bucket: qsgd and 8-bit cast: values sharing one float32 norm or scale.
        topk_fraction: topk: the fraction of an update's coordinates a client sends.
        compress_downloads: The server compresses the model it sends as clients compress uploads.
        algorithm: fedavg (local SGD), scaffold (local SGD corrected by control variates, weighted by
            clients' samples) or scaffold-paper (SCAFFOLD as its Algorithm 1, every client weighing the same).
        aggregator: fedavg, fedavgm, fedadagrad, fedadam or fedyogi.
        server_lr: Server learning rate (default 1.0 for fedavg/fedavgm, 0.01 for adaptive ones).
        beta1: Server momentum or first-moment decay.
        beta2: Second-moment decay (fedadam, fedyogi).
        tau: Adaptivity floor of FedOpt.
        dp_clip: DP-FedAvg's L2 bound on each client's update (0: no differential privacy).
        dp_noise: DP-FedAvg's noise multiplier (Gaussian noise of std dp_noise * dp_clip on the sum).
        dp_delta: The delta at which the privacy spent (epsilon) is counted.
        devices: Simulated device profiles: uniform or cross-device.
        dropout: Probability that a participant drops out mid-round (sends nothing).
        deadline_s: Simulated seconds the server waits for uploads (0: for the slowest).
        target_acc: Validation score whose first simulated time is logged as time_to_target_s (0: none).
        seed: Seed of every random choice in the run.
        experiment: MLflow experiment name.
        task_runner: thread (the round's clients in the flow's process) or dask (shares on a cluster).
        dask_address: Scheduler address of a running Dask cluster; default: start a local one.
        dask_workers: Worker processes of that local Dask cluster.
        engine: cohort (a round's clients train as one batched computation) or sequential.
        device: cpu, cuda, or auto (cuda when available).
    """
    arguments = dict(locals())
    execution = ExecutionSettings(**{f.name: arguments.pop(f.name) for f in fields(ExecutionSettings)})
    return train(TrainSettings(**arguments), execution)
