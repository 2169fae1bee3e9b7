"""The task contract: what a federated learning problem gives fedhpo, and how a task is named.

A `Task` says, from the run's settings and seed, what the federation learns:

- `load(root)`: the data, read once per process and shared by every client and trial: training
  rows (with a client id per row when the data comes partitioned, `Dataset.groups`) and test rows;
- `partition(dataset, settings)`: the server's validation rows and each client's training and
  validation rows (default: the partitioner the settings name, or the data's own clients);
- `model(input_shape, outputs)`: a fresh `nn.Module` (built under the run's seed for round 0);
- `loss(outputs, targets)`: the per-sample training loss (cross-entropy for integer targets,
  squared error for float ones);
- `metrics`: what is measured on validation and test data, the first one scoring: its name and
  direction are what studies optimize and what runs, tables and registered models show.

The bundled datasets are tasks like any other (`ImageTask`); so is a table with a client column
(`TableTask`) or a folder with a subfolder per client (`FolderTask`). A task is named by a string
(`--task`, the `task` flow parameter): a bundled or installed name (entry-point group
`fedhpo.tasks`), ``package.module:attribute``, a ``.py`` file (``path.py`` or ``path.py:attribute``),
a ``.csv``/``.parquet`` table, or a folder. The attribute is a `Task` instance, a `Task` subclass
or a function returning a task.
"""

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import math
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedhpo_core import seeding
from fedhpo_core.data import DATASETS, Dataset, load_dataset, split_sizes
from fedhpo_core.errors import SettingsError, one_line
from fedhpo_core.partition import NATURAL, Partition, natural_sizes, partition_dataset

ENTRY_POINTS = "fedhpo.tasks"
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
TEST_FRACTION = 0.2  # of each client's rows, for tables and folders: the same split for every seed
TASK_TYPES = ("auto", "classification", "regression")


class TaskError(SettingsError):
    """A task that cannot be named, imported, built or fed its data; the message is one line."""


# --- metrics and losses ------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A score of a model's outputs: the mean over samples of `per_sample(outputs, targets)`, then
    `finish` (RMSE is the square root of the mean squared error). `direction` is "maximize" or
    "minimize". Means of several splits or clients are sample-weighted before `finish`."""

    name: str
    direction: str
    per_sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    finish: Callable[[float], float] = float
    unit_power: int = 0  # the metric's unit is the target's to this power (RMSE 1, MSE 2, accuracy 0)
    scale: float = 1.0  # the target's scale where it was standardized for training (`Dataset.target_scale`)

    def __post_init__(self):
        if self.direction not in ("maximize", "minimize"):
            raise TaskError(f"metric {self.name!r}: direction must be maximize or minimize, got {self.direction!r}")
        if not self.name.isidentifier():
            raise TaskError(f"metric name {self.name!r} must be an identifier (it names MLflow metrics)")

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    def value(self, mean: float) -> float:
        """The metric from the mean of its per-sample values, in the target's own units."""
        return self.finish(mean) * self.scale**self.unit_power

    def worst(self) -> float:
        """The value a diverged run is scored with: the worst possible."""
        return 0.0 if self.maximize else math.inf

    def better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b

    def sign(self) -> float:
        """+1 or -1: `sign * value` is larger when better."""
        return 1.0 if self.maximize else -1.0


def _correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(-1) == targets).to(outputs.dtype)


def _regression_outputs(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Outputs shaped like the targets: (n, 1) against (n,) targets is (n,)."""
    return outputs.squeeze(-1) if outputs.ndim == targets.ndim + 1 else outputs


def _squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    error = (_regression_outputs(outputs, targets) - targets) ** 2
    return error if error.ndim == 1 else error.flatten(1).mean(1)


def _absolute_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    error = (_regression_outputs(outputs, targets) - targets).abs()
    return error if error.ndim == 1 else error.flatten(1).mean(1)


ACCURACY = Metric("acc", "maximize", _correct)
RMSE = Metric("rmse", "minimize", _squared_error, math.sqrt, unit_power=1)
MAE = Metric("mae", "minimize", _absolute_error, unit_power=1)
MSE = Metric("mse", "minimize", _squared_error, unit_power=2)


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample loss: cross-entropy for integer (class) targets, squared error for float ones."""
    if targets.is_floating_point():
        return _squared_error(outputs, targets)
    return F.cross_entropy(outputs, targets, reduction="none")


# --- the contract --------------------------------------------------------------------------------


class Task(ABC):
    """A federated learning problem (the module docstring lists the contract). Subclass it, or
    return an instance from a function; `name` labels runs and studies."""

    name: str = "task"
    metrics: tuple[Metric, ...] = ()  # default: accuracy, or RMSE and MAE for float targets

    @abstractmethod
    def load(self, root: str) -> Dataset:
        """The task's data; `root` is the `data_root` setting (bundled datasets' folder)."""

    @abstractmethod
    def model(self, input_shape: tuple[int, ...], outputs: int) -> nn.Module:
        """A new model for inputs of `input_shape` (one sample's) with `outputs` outputs."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample training loss, (n,); traced by torch.func on the cohort engine, so no
        data-dependent Python control flow."""
        return default_loss(outputs, targets)

    def scoring(self, classification: bool) -> tuple[Metric, ...]:
        """The metrics measured, the scoring one first."""
        return self.metrics or ((ACCURACY,) if classification else (RMSE, MAE))

    def partition(self, dataset: Dataset, settings) -> Partition:
        """Server validation rows, then each client's training and validation rows (`settings`:
        the run's `DataSettings`)."""
        return partition_dataset(
            dataset.y_train.numpy() if not dataset.y_train.is_floating_point() else np.zeros(len(dataset.y_train)),
            settings.clients,
            settings.partition,
            settings.seed,
            settings.val_fraction,
            settings.client_val_fraction,
            alpha=settings.alpha,
            shards_per_client=settings.shards_per_client,
            groups=dataset.groups,
        )

    @property
    def default_loss(self) -> bool:
        """Whether the task keeps the default loss (the cohort engine's own MLP kernel assumes it)."""
        return type(self).loss is Task.loss


@dataclass(frozen=True)
class ImageTask(Task):
    """A bundled dataset (digits, MNIST, Fashion-MNIST, CIFAR-10) with a bundled model."""

    dataset: str
    model_name: str = "mlp"

    @property
    def name(self) -> str:
        return self.dataset

    def load(self, root):
        return load_dataset(self.dataset, root)

    def model(self, input_shape, outputs):
        from fedhpo_core.models import MODELS

        return MODELS[self.model_name](input_shape, outputs)


def feature_mlp(input_shape: tuple[int, ...], outputs: int) -> nn.Module:
    """The default model of a table: one hidden layer of 64 units on the standardized features."""
    features = int(np.prod(input_shape))
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, outputs))


def _fixed_test_split(groups: np.ndarray) -> np.ndarray:
    """A mask of test rows: TEST_FRACTION of each client's rows (at least one stays for training),
    drawn from seed 0 so that every run seed is scored on the same test rows."""
    rng = seeding.numpy_rng(0, seeding.SPLIT)
    test = np.zeros(len(groups), dtype=bool)
    for g in np.unique(groups):
        rows = rng.permutation(np.flatnonzero(groups == g))
        held = min(split_sizes(len(rows), TEST_FRACTION)[0], len(rows) - 1)
        test[rows[:held]] = True
    return test


def _dataset_of(name: str, x: torch.Tensor, y: torch.Tensor, groups: np.ndarray, names, outputs: int) -> Dataset:
    test = torch.from_numpy(_fixed_test_split(groups))
    return Dataset(name, x[~test], y[~test], x[test], y[test], outputs, groups[~test.numpy()], tuple(names))


@dataclass(frozen=True)
class TableTask(Task):
    """A CSV or Parquet table partitioned by a client column: every other column but the target is
    a numeric feature (standardized with the training rows' mean and deviation); the target is a
    class (integers or strings) or a number (`kind` "auto": regression for float targets with more
    than 20 distinct values, else classification). A regression trains on the standardized target
    and is scored in the target's units. 20% of each client's rows are its test rows."""

    path: str
    client_column: str
    target: str
    kind: str = "auto"

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def read(self):
        import pandas as pd

        try:
            if Path(self.path).suffix in (".parquet", ".pq"):
                return pd.read_parquet(self.path)
            return pd.read_csv(self.path)
        except Exception as error:  # pandas raises many kinds for a file it cannot read
            raise TaskError(f"table {self.path} does not read: {' '.join(str(error).split())}") from error

    def load(self, root):
        table = self.read()
        for role, column in (("client column", self.client_column), ("target", self.target)):
            if not column:
                raise TaskError(f"a table task needs --{role.replace(' ', '-')}: one of its columns")
            if column not in table.columns:
                raise TaskError(f"{role} {column!r} is not a column of {self.path}; it has {', '.join(table.columns)}")
        features = table.drop(columns=[self.client_column, self.target])
        text = [c for c in features.columns if not np.issubdtype(features[c].dtype, np.number)]
        if text:
            raise TaskError(f"{self.path}: feature columns must be numeric; {', '.join(text)} are not")
        for role, frame in (
            ("feature", features),
            ("target", table[[self.target]]),
            ("client", table[[self.client_column]]),
        ):
            bad = frame.isna().to_numpy() | (np.isinf(frame.to_numpy()) if role == "feature" else False)
            if bad.any():
                row, column = np.argwhere(bad)[0]
                raise TaskError(
                    f"{self.path}: {role} column {frame.columns[column]!r} has missing or non-finite values "
                    f"(NaN, inf) in {int(bad.any(1).sum())} rows (first: data row {row + 1})"
                )
        clients, groups = np.unique(table[self.client_column].astype(str).to_numpy(), return_inverse=True)
        x = torch.tensor(features.to_numpy(dtype=np.float32))
        y, outputs = self.targets(table[self.target])
        data = _dataset_of(self.name, x, y, groups, clients, outputs)
        mean, std = data.x_train.mean(0), data.x_train.std(0).clamp(min=1e-8)
        data = replace(data, x_train=(data.x_train - mean) / std, x_test=(data.x_test - mean) / std)
        if not data.classification:  # trained on standardized targets, scored in the target's units
            y_mean, scale = float(data.y_train.mean()), max(float(data.y_train.std()), 1e-8)
            y_train, y_test = (data.y_train - y_mean) / scale, (data.y_test - y_mean) / scale
            data = replace(data, y_train=y_train, y_test=y_test, target_scale=scale)
        return data

    def targets(self, column) -> tuple[torch.Tensor, int]:
        values = column.to_numpy()
        numeric = np.issubdtype(values.dtype, np.number)
        regression = self.kind == "regression" or (
            self.kind == "auto" and numeric and np.issubdtype(values.dtype, np.floating) and len(np.unique(values)) > 20
        )
        if regression:
            if not numeric:
                raise TaskError(f"target {self.target!r} is not numeric: it cannot be regressed")
            return torch.tensor(values.astype(np.float32)), 1
        classes, labels = np.unique(values.astype(str) if not numeric else values, return_inverse=True)
        return torch.tensor(labels, dtype=torch.int64), len(classes)

    def model(self, input_shape, outputs):
        return feature_mlp(input_shape, outputs)


@dataclass(frozen=True)
class FolderTask(Task):
    """A folder with one subfolder per client, each holding images in one subfolder per class
    (torchvision's ImageFolder layout, classes named alike across clients): grayscale or RGB, all
    of one size, scaled to [0, 1] and standardized per channel. 20% of each client's images are its
    test rows. The model: the bundled one named (LeNet-5 by default)."""

    path: str
    model_name: str = "lenet5"

    @property
    def name(self) -> str:
        return Path(self.path).name

    def load(self, root):
        from PIL import Image

        folder = Path(self.path)
        clients = sorted(p for p in folder.iterdir() if p.is_dir())
        if not clients:
            raise TaskError(f"folder {self.path} has no client subfolders")
        classes = sorted({c.name for client in clients for c in client.iterdir() if c.is_dir()})
        if not classes:
            raise TaskError(f"folder {self.path}: client folders hold no class subfolders")
        images, labels, groups = [], [], []
        for g, client in enumerate(clients):
            for label, name in enumerate(classes):
                for file in sorted((client / name).glob("*")) if (client / name).is_dir() else []:
                    try:
                        with Image.open(file) as image:
                            images.append(np.asarray(image))
                    except Exception as error:  # PIL raises several kinds for a file that is no image
                        raise TaskError(f"{file} is not an image: {' '.join(str(error).split())}") from error
                    labels.append(label)
                    groups.append(g)
        shapes = {a.shape for a in images}
        if len(shapes) != 1:
            raise TaskError(f"folder {self.path}: images differ in size ({', '.join(map(str, sorted(shapes)))})")
        x = torch.tensor(np.stack(images)).float().div_(255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True).clamp(min=1e-8)
        y = torch.tensor(labels, dtype=torch.int64)
        names = [c.name for c in clients]
        return _dataset_of(self.name, ((x - mean) / std).contiguous(), y, np.array(groups), names, len(classes))

    def model(self, input_shape, outputs):
        from fedhpo_core.models import MODELS

        return MODELS[self.model_name](input_shape, outputs)


# --- naming a task -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRef:
    """What names a task: hashable and small, so it keys caches and travels to Dask workers, which
    resolve it themselves. `fingerprint` changes when the named file or folder does."""

    ref: str
    model: str = "mlp"
    client_column: str = ""
    target: str = ""
    kind: str = "auto"
    fingerprint: str = ""

    @property
    def bundled(self) -> bool:
        return self.ref in DATASETS

    @property
    def label(self) -> str:
        """A short name for run and study names: the dataset, file stem or attribute."""
        if self.bundled:
            return self.ref
        head, _, attribute = self.ref.partition(":")
        return attribute or Path(head).stem or head


def fingerprint(ref: str) -> str:
    """Size and modification time of the file or folder a reference names ("" for others)."""
    path = Path(ref.split(":")[0]) if ref.split(":")[0].endswith(".py") else Path(ref)
    if ref in DATASETS or not path.exists():
        return ""
    stats = [path.stat()] + ([p.stat() for p in sorted(path.rglob("*"))] if path.is_dir() else [])
    return hashlib.sha1(repr([(s.st_size, s.st_mtime_ns) for s in stats]).encode()).hexdigest()[:12]


def installed_tasks() -> dict[str, importlib.metadata.EntryPoint]:
    """Tasks of installed plugins, by name (entry-point group `fedhpo.tasks`)."""
    return {e.name: e for e in importlib.metadata.entry_points(group=ENTRY_POINTS)}


def _import_file(path: Path):
    """A .py file imported as a module named for its resolved path (once per process)."""
    name = "fedhpo_task_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_here(name: str):
    """A module importable from the current folder (as with `python -m`) or the environment."""
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(here)


def _as_task(value, where: str) -> Task:
    if callable(value) and not isinstance(value, Task):  # a Task subclass or a function making one
        try:
            value = value()
        except Exception as error:  # whatever the user's factory raises
            raise TaskError(f"{where} does not make a task: {type(error).__name__}: {one_line(error)}") from error
    if not isinstance(value, Task):
        raise TaskError(f"{where} is a {type(value).__name__}, not a fedhpo_core.task.Task (or a function making one)")
    return value


def _module_attribute(ref: str) -> Task:
    head, _, attribute = ref.partition(":")
    if head.endswith(".py"):
        path = Path(head)
        if not path.is_file():
            raise TaskError(f"task file {head} does not exist")
        load = functools.partial(_import_file, path)
    else:
        load = functools.partial(_import_here, head)
    try:
        module = load()
    except Exception as error:  # whatever the user's module raises while importing
        raise TaskError(f"task module {head} does not import: {type(error).__name__}: {one_line(error)}") from error
    if not attribute:
        found = [v for v in vars(module).values() if isinstance(v, Task)]
        if len(found) != 1:
            raise TaskError(f"{head} defines {len(found)} Task instances: name one as {head}:attribute")
        return found[0]
    if not hasattr(module, attribute):
        raise TaskError(f"task module {head} has no attribute {attribute!r}")
    return _as_task(getattr(module, attribute), ref)


@functools.lru_cache(maxsize=16)
def resolve(ref: TaskRef) -> Task:
    """The task a reference names (imported once per process)."""
    name = ref.ref
    if ref.bundled:
        return ImageTask(name, ref.model)
    if name in installed_tasks():
        try:
            value = installed_tasks()[name].load()
        except Exception as error:  # the plugin's import
            raise TaskError(
                f"installed task {name!r} does not import: {type(error).__name__}: {one_line(error)}"
            ) from error
        return _as_task(value, f"installed task {name!r}")
    path = Path(name)
    if path.suffix in TABLE_SUFFIXES:
        if not path.is_file():
            raise TaskError(f"table {name} does not exist")
        return TableTask(name, ref.client_column, ref.target, ref.kind)
    if ":" in name or name.endswith(".py"):
        return _module_attribute(name)
    if path.is_dir():
        return FolderTask(name, ref.model if ref.model != "mlp" else "lenet5")
    known = ", ".join(sorted([*DATASETS, *installed_tasks()]))
    raise TaskError(
        f"unknown task {name!r}: name a bundled or installed task ({known}), module:attribute, a .py file, "
        "a .csv/.parquet table or a folder"
    )


@functools.lru_cache(maxsize=4)
def load_task_data(ref: TaskRef, root: str) -> Dataset:
    """The task's data, loaded once per process (every client and trial shares the tensors)."""
    task = resolve(ref)
    try:
        dataset = task.load(root)
    except (TaskError, FileNotFoundError):
        raise
    except Exception as error:  # whatever the user's loader raises
        raise TaskError(f"task {ref.label} does not load: {type(error).__name__}: {one_line(error)}") from error
    if not isinstance(dataset, Dataset):
        raise TaskError(f"task {ref.label}: load() returned a {type(dataset).__name__}, not a fedhpo_core.data.Dataset")
    return dataset


# --- checking a task before any work ----------------------------------------------------------


def check_dataset(data: Dataset) -> None:
    """Tensors that training can use: matching lengths, finite features, labels in range."""
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise TaskError(f"{data.name}: x_{split} and y_{split} must be torch tensors")
        if len(x) != len(y):
            raise TaskError(f"{data.name}: x_{split} has {len(x)} rows but y_{split} {len(y)}")
        if x.dtype == torch.bool or x.is_complex():
            raise TaskError(f"{data.name}: x_{split} must be real numbers or integer ids, got {x.dtype}")
        finite = (
            torch.isfinite(x.flatten(1)).all(1)
            if x.is_floating_point() and len(x)
            else torch.ones(len(x), dtype=torch.bool)
        )
        bad = ~finite
        if bad.any():
            raise TaskError(
                f"{data.name}: x_{split} has non-finite (NaN or inf) features in {int(bad.sum())} rows "
                f"(first: row {int(bad.nonzero()[0])})"
            )
        if y.is_floating_point() and not torch.isfinite(y).all():
            raise TaskError(f"{data.name}: y_{split} has non-finite targets")
        if not y.is_floating_point() and len(y) and (int(y.min()) < 0 or int(y.max()) >= data.outputs):
            raise TaskError(
                f"{data.name}: y_{split} has labels {int(y.min())}..{int(y.max())} outside the model's "
                f"{data.outputs} outputs (0..{data.outputs - 1})"
            )
    if len(data.y_train) == 0:
        raise TaskError(f"{data.name}: no training rows")
    if data.groups is not None and len(data.groups) != len(data.y_train):
        raise TaskError(f"{data.name}: groups has {len(data.groups)} entries for {len(data.y_train)} training rows")


def check_model(task: Task, data: Dataset, ref: TaskRef) -> None:
    """The model takes two training rows and gives outputs the targets and loss fit."""
    try:
        model = task.model(data.input_shape, data.outputs)
    except Exception as error:  # the user's model factory
        raise TaskError(
            f"task {ref.label}: its model does not build: {type(error).__name__}: {one_line(error)}"
        ) from error
    if not isinstance(model, nn.Module) or not list(model.parameters()):
        raise TaskError(f"task {ref.label}: model() must return an nn.Module with parameters")
    x, y = data.x_train[:2], data.y_train[:2]
    try:
        with torch.no_grad():
            outputs = model.eval()(x)
            loss = task.loss(outputs, y)
    except Exception as error:  # shape mismatches and the like
        raise TaskError(
            f"task {ref.label}: the model does not take the data (inputs {tuple(x.shape[1:])}): "
            f"{type(error).__name__}: {one_line(error)}"
        ) from error
    if not y.is_floating_point() and outputs.shape[-1] != data.outputs:
        raise TaskError(
            f"task {ref.label}: the model gives {outputs.shape[-1]} outputs for {data.outputs} classes "
            f"(labels 0..{data.outputs - 1})"
        )
    if loss.shape != (len(y),):
        raise TaskError(f"task {ref.label}: loss() must give one value per sample, got shape {tuple(loss.shape)}")


def check_clients(data: Dataset, settings) -> None:
    """Each client of a dataset partitioned at its source keeps rows for training and, when the
    settings ask for one, for its local validation split."""
    if data.groups is None:
        return

    def enough(n: int) -> bool:
        _, val, train = natural_sizes(n, settings.val_fraction, settings.client_val_fraction)
        return train >= 1 and (val >= 1 or settings.client_val_fraction == 0)

    for g, count in enumerate(np.bincount(data.groups, minlength=len(data.group_names))):
        if not enough(int(count)):
            name = data.group_names[g] if g < len(data.group_names) else str(g)
            least = next(n for n in range(int(count) + 1, 10**6) if enough(n))
            raise TaskError(
                f"client {name!r} has {count} rows, fewer than its validation split of "
                f"{settings.client_val_fraction} needs (at least {least})"
            )


def prepared(settings):
    """`settings` (a TrainSettings) with its task imported, its data loaded and checked, before any
    work: the partition "auto" resolved (natural for data with its own clients, else iid) and,
    under the natural partition, `clients` set to the data's number of clients, and the batch size
    checked against the clients' data. Raises TaskError (one line) for a task that cannot be used."""
    from fedhpo_core.settings import TrainSettings

    ref = settings.task_ref
    task = resolve(ref)
    if not isinstance(task, ImageTask | FolderTask) and settings.model != TrainSettings.model:
        raise TaskError(f"task {ref.label} builds its own model: --model applies to bundled datasets and folders")
    if not isinstance(task, TableTask) and (settings.client_column or settings.target or settings.task_type != "auto"):
        raise TaskError("--client-column, --target and --task-type apply to table tasks (.csv or .parquet)")
    data = load_task_data(ref, settings.data_root)
    check_dataset(data)
    check_model(task, data, ref)
    partition = settings.partition
    if partition == "auto":
        partition = NATURAL if data.groups is not None else "iid"
    if partition != NATURAL:
        settings = replace(settings, partition=partition)
        settings.check_size(len(data.y_train), data.num_classes)
    elif data.groups is None:
        raise TaskError(f"partition natural needs data with its own clients; {ref.label} has none (try iid)")
    else:
        clients = int(data.groups.max()) + 1
        if settings.clients not in (clients, TrainSettings.clients):
            raise TaskError(f"--clients {settings.clients}: {ref.label} holds {clients} clients of its own")
        settings = replace(settings, partition=partition, clients=clients)
        check_clients(data, settings)
    check_batch_size(settings.batch_size, settings)
    return settings


@functools.lru_cache(maxsize=16)
def largest_client(data_settings) -> int:
    """The most training samples any client holds under these `DataSettings` (their partition
    made once per process)."""
    task = resolve(data_settings.task)
    try:
        split = task.partition(load_task_data(data_settings.task, data_settings.data_root), data_settings)
    except SettingsError:
        raise
    except Exception as error:  # whatever the task's own partition raises
        raise TaskError(
            f"task {data_settings.task.label} does not partition: {type(error).__name__}: {one_line(error)}"
        ) from error
    return max((len(rows) for rows in split.client_train), default=0)


def check_batch_size(batch_size: int, settings) -> None:
    """A mini-batch larger than the default is at most the largest client's training data: a
    larger one only pads every step of every client with samples that weigh nothing (memory and
    time for no learning)."""
    from fedhpo_core.settings import TrainSettings

    most = largest_client(settings.data)
    if batch_size > max(most, TrainSettings.batch_size):
        raise TaskError(
            f"batch_size {batch_size} exceeds the largest client's {most} training samples "
            f"({settings.task_ref.label}, {settings.clients} clients): a batch is at most a client's data"
        )


def scoring_metric(settings) -> Metric:
    """The metric that scores the settings' task (its data loaded once per process)."""
    ref = settings.task_ref
    return resolve(ref).scoring(load_task_data(ref, settings.data_root).classification)[0]
