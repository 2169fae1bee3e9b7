"""Settings as frozen dataclasses, validated once where they enter (CLI, flow parameters).

`TrainSettings` is the flat list a user types; its fields carry their `--help` text, so the
command line and the flow are generated from, or checked against, this one declaration.
"""

import math
import os
from dataclasses import asdict, dataclass, field, fields

import torch

from fedhpo_core.aggregators import AGGREGATORS, DEFAULT_SERVER_LR, ServerSettings
from fedhpo_core.compression import check_compression
from fedhpo_core.data import DATASETS, split_sizes
from fedhpo_core.devices import PRESETS as DEVICE_PRESETS
from fedhpo_core.errors import SettingsError
from fedhpo_core.models import MODELS
from fedhpo_core.partition import NATURAL, PARTITIONERS
from fedhpo_core.privacy import Privacy
from fedhpo_core.task import TASK_TYPES, TaskRef, fingerprint

# Bounds on what multiplies a round's work or memory, or the processes a run starts, far beyond
# any published setting (docs/getting-started.md, "Bounds"): past them a run exhausts the machine.
MAX_LOCAL_EPOCHS = 100  # a client's local steps (and their shuffles) are local_epochs passes over its data
MAX_FINETUNE_STEPS = 1000  # personalized evaluation lays out finetune_steps batches per client
MAX_COMPRESSION_BUCKET = 2**20  # a bucket beyond an update is one scale for all of it anyway
# FedOpt's adaptivity floor: the update is server_lr * m / (sqrt(v) + tau), so a tau far above 1
# shrinks it below float32's resolution of the weights (past 3.4e38, to exactly 0): the model freezes.
MAX_TAU = 1.0
PROCESSES_PER_CPU = 2  # worker processes or trial threads a run starts, per CPU of this machine


def max_processes() -> int:
    """The most worker processes (or trials at once) a run starts here: PROCESSES_PER_CPU per CPU."""
    return PROCESSES_PER_CPU * (os.cpu_count() or 1)


def check_processes(name: str, count: int) -> None:
    """Refuse `count` processes (or trials at once) named `name` beyond `max_processes`."""
    _check(
        count <= max_processes(),
        f"{name} must be <= {max_processes()} ({PROCESSES_PER_CPU} per CPU of this machine), got {count}",
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SettingsError(message)


def _one_of(name: str, value: str, choices) -> None:
    _check(value in choices, f"unknown {name} {value!r}; choose from {', '.join(sorted(choices))}")


def _finite(settings) -> None:
    """Every float setting is a finite number (inf and nan mean nothing for any of them)."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, float):
            _check(math.isfinite(value), f"{f.name} must be a finite number, got {value}")


@dataclass(frozen=True)
class ClientConfig:
    """One client's local-training hyperparameters for one round."""

    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    local_epochs: int = 1
    mu: float = 0.0  # FedProx proximal weight (Li et al. 2020, eq. 2); 0 is FedAvg's local SGD
    # Personalized evaluation (`fedhpo_core.personalization`): what the client does with the
    # trained global model before it is scored on its own data; nothing in the rounds.
    finetune_steps: int = 0  # k local SGD steps on its own data (0: the global model as it is)
    finetune_lr: float = 0.0  # their learning rate (0: the client's own lr)
    ditto_lambda: float = 0.0  # Ditto's lambda: the fine-tuned model's proximal pull to the global one
    # How the client's update is compressed for upload (`fedhpo_core.compression`).
    compression: str = "none"  # none, qsgd, topk or cast
    compression_bits: int = 8  # qsgd: bits per level index (2^b - 1 levels); cast: 8-bit up to 8, else 16
    compression_bucket: int = 512  # qsgd and 8-bit cast: values sharing one float32 scale
    topk_fraction: float = 0.01  # topk: the fraction of coordinates sent (error feedback keeps the rest)
    # A fidelity, never a hyperparameter: the fraction of its local steps the client takes this
    # round (successive halving's cap on local steps; 1: all of them).
    step_fraction: float = 1.0

    def __post_init__(self):
        _finite(self)
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(
            1 <= self.local_epochs <= MAX_LOCAL_EPOCHS,
            f"local_epochs must be in [1, {MAX_LOCAL_EPOCHS}], got {self.local_epochs}",
        )
        _check(self.mu >= 0, f"mu must be >= 0, got {self.mu}")
        _check(
            0 <= self.finetune_steps <= MAX_FINETUNE_STEPS,
            f"finetune_steps must be in [0, {MAX_FINETUNE_STEPS}], got {self.finetune_steps}",
        )
        _check(self.finetune_lr >= 0, f"finetune_lr must be >= 0, got {self.finetune_lr}")
        _check(self.ditto_lambda >= 0, f"ditto_lambda must be >= 0, got {self.ditto_lambda}")
        check_compression(self.compression, self.compression_bits, self.compression_bucket, self.topk_fraction)
        _check(
            self.compression_bucket <= MAX_COMPRESSION_BUCKET,
            f"compression_bucket must be <= {MAX_COMPRESSION_BUCKET}, got {self.compression_bucket}",
        )
        _check(0 < self.step_fraction <= 1, f"step_fraction must be in (0, 1], got {self.step_fraction}")


@dataclass(frozen=True)
class DataSettings:
    """What decides the clients' data: the partition task's cache key."""

    task: TaskRef
    data_root: str
    clients: int
    partition: str
    alpha: float
    shards_per_client: int
    val_fraction: float
    client_val_fraction: float
    seed: int


def setting(default, help: str):
    return field(default=default, metadata={"help": help})


AUTO_PARTITION = "auto"  # natural for data with its own clients, else iid
PARTITION_CHOICES = (AUTO_PARTITION, NATURAL, *PARTITIONERS)
DEFAULT_DATASET = "digits"
# Beyond this, Dir(alpha) proportions are uniform to many decimals, and past ~1e300 NumPy's draw
# degenerates (every proportion 0): IID is the partitioner for that.
MAX_ALPHA = 1e6
ALGORITHMS = ("fedavg", "scaffold", "scaffold-paper")
TASK_RUNNERS = ("thread", "dask")
ENGINES = ("cohort", "sequential")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ExecutionSettings:
    """How and where client training runs, never what it computes: the engines agree up to float
    rounding, and a seed gives the same result, bit for bit, with the same engine and device."""

    task_runner: str = setting(
        "thread", "thread: the round's clients in the flow's process; dask: shares of them on a Dask cluster"
    )
    dask_address: str | None = setting(None, "scheduler of a running Dask cluster (default: start a local one)")
    dask_workers: int = setting(2, "worker processes of the local Dask cluster (one thread each)")
    engine: str = setting(
        "cohort", "cohort: a round's clients train as one batched computation; sequential: one after another"
    )
    device: str = setting("auto", "where models and client data live: cpu, cuda, or auto (cuda when available)")

    def __post_init__(self):
        _one_of("task_runner", self.task_runner, TASK_RUNNERS)
        _one_of("engine", self.engine, ENGINES)
        _one_of("device", self.device, DEVICES)
        _check(self.dask_workers >= 1, f"dask_workers must be >= 1, got {self.dask_workers}")
        check_processes("dask_workers", self.dask_workers)
        _check(
            self.dask_address is None or self.task_runner == "dask",
            "dask_address needs task_runner dask",
        )
        _check(self.device != "cuda" or torch.cuda.is_available(), "device cuda: no CUDA device is available here")

    @property
    def resolved_device(self) -> str:
        """The device `auto` stands for here: cuda when available, else cpu."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


@dataclass(frozen=True)
class TrainSettings:
    """Every setting of one federated training run."""

    dataset: str = setting(
        DEFAULT_DATASET, "bundled dataset: " + ", ".join(DATASETS) + " (or name any task with --task)"
    )
    task: str = setting(
        "",
        "the task: a bundled or installed name (fedhpo tasks), package.module:attribute, a .py file, "
        "a .csv/.parquet table or a folder with a subfolder per client (default: --dataset)",
    )
    client_column: str = setting("", "a table task's client-id column: one client per value")
    target: str = setting("", "a table task's target column")
    task_type: str = setting(
        "auto", "a table's target: classification, regression, or auto (regression for many distinct floats)"
    )
    data_root: str = setting("data", "folder holding datasets in torchvision's layout")
    model: str = setting("mlp", "model of bundled datasets and folders: " + ", ".join(MODELS))
    clients: int = setting(10, "number of simulated clients (with --partition natural: the data's own)")
    partition: str = setting(
        AUTO_PARTITION,
        "partitioner: " + ", ".join(PARTITIONERS) + ", natural (the data's own clients) or auto "
        "(natural for data with its own clients, else iid)",
    )
    alpha: float = setting(0.5, "Dirichlet concentration for --partition dirichlet (smaller: more skew)")
    shards_per_client: int = setting(2, "classes per client for --partition shards")
    val_fraction: float = setting(0.1, "fraction of the training set held by the server for validation")
    client_val_fraction: float = setting(0.1, "fraction of each client's data kept for local validation")
    rounds: int = setting(20, "communication rounds")
    participation: float = setting(1.0, "fraction of clients sampled each round, in (0, 1]")
    local_epochs: int = setting(1, "local epochs per round")
    batch_size: int = setting(32, "local mini-batch size")
    lr: float = setting(0.05, "client learning rate")
    momentum: float = setting(0.0, "client SGD momentum")
    weight_decay: float = setting(0.0, "client weight decay")
    mu: float = setting(0.0, "FedProx proximal weight (0: plain FedAvg local SGD)")
    finetune_steps: int = setting(
        0, "personalized evaluation: local SGD steps each client takes from the global model before scoring it"
    )
    finetune_lr: float = setting(
        0.0, "personalized evaluation: the fine-tuning steps' learning rate (0: the client's lr)"
    )
    ditto_lambda: float = setting(
        0.0, "personalized evaluation: Ditto's lambda, the fine-tuned model's proximal pull to the global model"
    )
    compression: str = setting(
        "none",
        "how clients compress their updates: none, qsgd (unbiased stochastic quantization), topk (the largest "
        "coordinates, the rest kept for later: error feedback) or cast (8- or 16-bit values)",
    )
    compression_bits: int = setting(
        8, "qsgd: bits per value's level (2^b - 1 levels, and a sign bit); cast: 8-bit up to 8, else 16-bit"
    )
    compression_bucket: int = setting(512, "qsgd and 8-bit cast: values sharing one float32 norm or scale")
    topk_fraction: float = setting(0.01, "topk: the fraction of an update's coordinates a client sends")
    compress_downloads: bool = setting(
        False, "the server compresses the model it sends as clients compress uploads (the change from what they hold)"
    )
    algorithm: str = setting(
        "fedavg",
        "fedavg: local SGD; scaffold: local SGD corrected by control variates (Karimireddy et al. 2020), "
        "weighted by clients' samples; scaffold-paper: as its Algorithm 1, every client weighing the same",
    )
    aggregator: str = setting("fedavg", "server aggregator: " + ", ".join(AGGREGATORS))
    server_lr: float | None = setting(
        None, "server learning rate (default: 1.0 for fedavg/fedavgm, 0.01 for the adaptive ones)"
    )
    beta1: float = setting(0.9, "server momentum (fedavgm) or first-moment decay (fedadam, fedyogi, fedadagrad)")
    beta2: float = setting(0.99, "second-moment decay (fedadam, fedyogi)")
    tau: float = setting(1e-3, "adaptivity floor of FedOpt (Reddi et al. 2021)")
    dp_clip: float = setting(0.0, "DP-FedAvg: L2 bound C on each client's update (0: no differential privacy)")
    dp_noise: float = setting(0.0, "DP-FedAvg: noise multiplier sigma (Gaussian noise of std sigma C on the sum)")
    dp_delta: float = setting(1e-5, "DP-FedAvg: the delta at which the privacy spent (epsilon) is counted")
    devices: str = setting("uniform", "simulated device profiles: " + ", ".join(DEVICE_PRESETS))
    dropout: float = setting(0.0, "probability that a participant drops out mid-round (sends nothing)")
    deadline_s: float = setting(0.0, "simulated seconds the server waits for uploads (0: for the slowest)")
    target_acc: float = setting(0.0, "validation accuracy whose first simulated time is time_to_target_s (0: none)")
    seed: int = setting(0, "seed of every random choice in the run")
    experiment: str = setting("fedhpo", "MLflow experiment name")

    def __post_init__(self):
        _finite(self)
        _one_of("dataset", self.dataset, DATASETS)
        _one_of("model", self.model, MODELS)
        _one_of("partition", self.partition, PARTITION_CHOICES)
        _one_of("task_type", self.task_type, TASK_TYPES)
        _check(
            not self.task or self.dataset == DEFAULT_DATASET,
            f"--dataset {self.dataset} and --task {self.task} both name the data: give one",
        )
        _one_of("aggregator", self.aggregator, AGGREGATORS)
        _one_of("algorithm", self.algorithm, ALGORITHMS)
        _check(
            0 < self.alpha <= MAX_ALPHA,
            f"alpha must be in (0, {MAX_ALPHA:g}], got {self.alpha} (larger is IID: use --partition iid)",
        )
        _check(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        _check(0 < self.participation <= 1, f"participation must be in (0, 1], got {self.participation}")
        _check(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(
            0 <= self.client_val_fraction < 1,
            f"client_val_fraction must be in [0, 1), got {self.client_val_fraction}",
        )
        _check(self.clients >= 1, f"clients must be >= 1, got {self.clients}")
        _check(self.dp_clip >= 0, f"dp_clip must be >= 0, got {self.dp_clip}")
        _check(self.dp_noise >= 0, f"dp_noise must be >= 0, got {self.dp_noise}")
        _check(self.dp_noise == 0 or self.dp_clip > 0, "dp_noise needs dp_clip > 0: noise is scaled to the bound")
        _check(0 < self.dp_delta < 1, f"dp_delta must be in (0, 1), got {self.dp_delta}")
        _one_of("devices", self.devices, DEVICE_PRESETS)
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.deadline_s >= 0, f"deadline_s must be >= 0, got {self.deadline_s}")
        _check(0 <= self.target_acc <= 1, f"target_acc must be in [0, 1], got {self.target_acc}")
        _check(
            not self.algorithm.startswith("scaffold") or self.dp_clip == 0,
            f"algorithm {self.algorithm} cannot run with dp_clip: its control variates would leave the clients "
            "unprivatized",
        )
        _check(
            not (self.dp_clip and self.compression == "topk"),
            "compression topk cannot run with dp_clip: it picks coordinates from the data, which the noise does "
            "not privatize (use qsgd or cast)",
        )
        if self.task_name in DATASETS:
            self.check_size(DATASETS[self.task_name].num_train, DATASETS[self.task_name].num_classes)
        _check(self.server_lr is None or self.server_lr > 0, f"server_lr must be > 0, got {self.server_lr}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        _check(
            0 < self.tau <= MAX_TAU,
            f"tau must be in (0, {MAX_TAU:g}], got {self.tau} (a larger floor shrinks FedOpt's update to nothing)",
        )
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _check(bool(self.experiment.strip()), "experiment must be a non-empty name")
        _ = self.client_config  # ClientConfig checks lr, momentum, weight decay, batch size, epochs, mu

    def check_size(self, num_train: int, num_classes: int) -> None:
        """The server's validation split and the clients fit the task's training rows."""
        held, pool = split_sizes(num_train, self.val_fraction)
        name = TaskRef(self.task_name).label
        _check(held >= 1, f"val_fraction {self.val_fraction} leaves the server no validation sample of {name}")
        _check(
            self.clients <= pool,
            f"clients ({self.clients}) exceeds the {pool} training samples {name} leaves to clients",
        )
        if self.partition == "shards":
            _check(num_classes > 0, "partition shards needs class labels")
            classes, k = num_classes, self.shards_per_client
            _check(
                1 <= k <= classes and self.clients * k >= classes,
                f"shards_per_client must be in [1, {classes}] with clients * shards_per_client >= {classes}",
            )

    @property
    def task_name(self) -> str:
        """What `--task` names, else the bundled `--dataset`."""
        return self.task or self.dataset

    @property
    def task_ref(self) -> TaskRef:
        """The task these settings name, with the fingerprint of its file or folder (read here)."""
        name = self.task_name
        return TaskRef(name, self.model, self.client_column, self.target, self.task_type, fingerprint(name))

    @property
    def client_config(self) -> ClientConfig:
        return ClientConfig(
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            local_epochs=self.local_epochs,
            mu=self.mu,
            finetune_steps=self.finetune_steps,
            finetune_lr=self.finetune_lr,
            ditto_lambda=self.ditto_lambda,
            compression=self.compression,
            compression_bits=self.compression_bits,
            compression_bucket=self.compression_bucket,
            topk_fraction=self.topk_fraction,
        )

    @property
    def data(self) -> DataSettings:
        names = {f.name for f in fields(DataSettings)} - {"task"}
        return DataSettings(task=self.task_ref, **{k: v for k, v in asdict(self).items() if k in names})

    @property
    def privacy(self) -> Privacy:
        return Privacy(self.dp_clip, self.dp_noise, self.dp_delta)

    @property
    def server(self) -> ServerSettings:
        lr = DEFAULT_SERVER_LR[self.aggregator] if self.server_lr is None else self.server_lr
        return ServerSettings(self.aggregator, lr, self.beta1, self.beta2, self.tau)
