"""The task contract (`fedhpo_core.task`): naming a task, tables, the natural partition, metrics,
refusals of unusable tasks through the real `fedhpo` command, and a task of an installed plugin."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fedhpo_core import task as task_module
from fedhpo_core.client import evaluate
from fedhpo_core.federation import FederatedData, partition_of
from fedhpo_core.partition import natural_partition, natural_sizes, partition_dataset
from fedhpo_core.settings import TrainSettings
from fedhpo_core.task import (
    ACCURACY,
    MAE,
    MSE,
    RMSE,
    Metric,
    Task,
    TaskError,
    TaskRef,
    fingerprint,
    load_task_data,
    prepared,
    resolve,
)

FEDHPO = str(Path(sys.executable).with_name("fedhpo"))
REGIONS = {"north": 10, "south": 15, "west": 20}  # rows per client; their 20% test rows: 2, 3 and 4


def fedhpo(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The installed command, in `cwd`, its MLflow store (and so its Optuna storage) there too."""
    environment = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"} | env
    return subprocess.run(
        [FEDHPO, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300, check=False
    )


def write_table(path: Path, target: list, sizes: dict[str, int] = REGIONS, nan_row: int | None = None) -> pd.DataFrame:
    """A table of clients `sizes` (rows in client order): the client column `region`, features `row`
    (the row's number, so a test can tell rows apart after standardization) and `f2`, and `target`."""
    regions = [name for name, n in sizes.items() for _ in range(n)]
    rows = np.arange(len(regions), dtype=float)
    table = pd.DataFrame({"region": regions, "row": rows, "f2": (rows * 7) % 11 + 0.5, "target": target})
    if nan_row is not None:
        table.loc[nan_row, "f2"] = np.nan
    table.to_csv(path, index=False)
    return table


def float_targets(n: int) -> list[float]:
    """Many distinct floats: a regression target under `--task-type auto`."""
    return [round(0.5 * i + 3 * math.sin(i), 3) for i in range(n)]


N = sum(REGIONS.values())

# --- refusals through the real command -------------------------------------------------------------

LABELS_TASK = '''
import torch
from torch import nn

from fedhpo_core.data import Dataset
from fedhpo_core.task import Task


class Labels(Task):
    """Labels 0..10 for a model of 10 outputs."""

    def load(self, root):
        x = torch.randn(110, 4, generator=torch.Generator().manual_seed(0))
        y = torch.arange(110) % 11
        return Dataset("labels", x[:88], y[:88], x[88:], y[88:], 10)

    def model(self, input_shape, outputs):
        return nn.Linear(input_shape[0], outputs)


task = Labels()
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "broken.py").write_text("import nonexistent_module\n")
    (folder / "labels.py").write_text(LABELS_TASK)
    five = {name: 30 for name in "abcde"}
    write_table(folder / "five.csv", [i % 3 for i in range(150)], five)
    write_table(folder / "tiny.csv", [i % 3 for i in range(122)], {"a": 30, "b": 30, "c": 30, "d": 30, "e": 2})
    write_table(folder / "nan.csv", [i % 3 for i in range(150)], five, nan_row=17)
    return folder


TABLE = ["--client-column", "region", "--target", "target"]
REFUSALS = {  # flags (INPUTS stands for the inputs folder), and what the one line names
    "module raises on import": (
        ["--task", "INPUTS/broken.py"],
        ("task module INPUTS/broken.py does not import", "ModuleNotFoundError", "'nonexistent_module'"),
    ),
    "missing attribute": (
        ["--task", "fedhpo_core.task:no_such_task"],
        ("fedhpo_core.task has no attribute 'no_such_task'",),
    ),
    # Client e keeps both its rows for training (20% of 2 rounds to 0 test rows): its local
    # validation split of 0.1 needs 7 (server share round(0.7) = 1, then round(6 * 0.1) = 1).
    "client too small for its validation split": (
        ["--task", "INPUTS/tiny.csv", *TABLE, "--client-val-fraction", "0.1"],
        ("client 'e' has 2 ", "validation split of 0.1", "(at least 7)"),
    ),
    "labels outside the model's outputs": (
        ["--task", "INPUTS/labels.py"],
        ("labels", "0..10", "10 outputs"),
    ),
    "NaN features": (["--task", "INPUTS/nan.csv", *TABLE], ("feature column", "non-finite", "NaN", "in 1 rows")),
    "missing client column": (
        ["--task", "INPUTS/five.csv", "--client-column", "city", "--target", "target"],
        ("client column 'city' is not a column of INPUTS/five.csv",),
    ),
    "missing target column": (
        ["--task", "INPUTS/five.csv", "--client-column", "region", "--target", "price"],
        ("target 'price' is not a column of INPUTS/five.csv",),
    ),
    "clients other than the table's": (
        ["--task", "INPUTS/five.csv", *TABLE, "--clients", "3"],
        ("--clients 3", "5 clients"),
    ),
}


def assert_refused(result: subprocess.CompletedProcess, command: str, names: tuple[str, ...], work: Path) -> None:
    """Exit status 2, one line naming what is wrong, and nothing written: no MLflow store, no study."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"fedhpo {command}: error: "), result.stderr
    assert all(name in result.stderr for name in names), (names, result.stderr)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("case", list(REFUSALS))
def test_an_unusable_task_is_refused_in_one_line_before_any_work(case, inputs, tmp_path):
    flags, names = REFUSALS[case]
    flags = [flag.replace("INPUTS", str(inputs)) for flag in flags]
    result = fedhpo("train", *flags, "--rounds", "1", cwd=tmp_path)
    assert_refused(result, "train", tuple(name.replace("INPUTS", str(inputs)) for name in names), tmp_path)


@pytest.mark.parametrize("command", ["tune", "compare"])
@pytest.mark.parametrize("case", ["module raises on import", "labels outside the model's outputs"])
def test_tune_and_compare_refuse_an_unusable_task_the_same_way(command, case, inputs, tmp_path):
    flags, names = REFUSALS[case]
    flags = [flag.replace("INPUTS", str(inputs)) for flag in flags]
    extra = ["--method", "random"] if command == "tune" else ["--methods", "random,tpe", "--seeds", "0"]
    budget = ["--budget" if command == "tune" else "--budgets", "4", "--n-configs", "2"]
    result = fedhpo(command, *flags, *extra, *budget, cwd=tmp_path)
    assert_refused(result, command, tuple(name.replace("INPUTS", str(inputs)) for name in names), tmp_path)


# --- the natural partition ------------------------------------------------------------------------


def test_natural_sizes_by_hand():
    # n = 10: server round(1.0) = 1, local round(9 * 0.2) = 2, training 7.
    assert natural_sizes(10, 0.1, 0.2) == (1, 2, 7)
    # n = 25: round(2.5) = 2 (half to even), round(23 * 0.2) = 5, 18 left.
    assert natural_sizes(25, 0.1, 0.2) == (2, 5, 18)
    # Caps: one row always stays for training.
    assert natural_sizes(3, 0.9, 0.5) == (2, 0, 1)  # round(2.7) = 3 capped at 2
    assert natural_sizes(2, 0.5, 0.9) == (1, 0, 1)  # round(0.9) = 1 capped at 0
    assert natural_sizes(1, 0.9, 0.9) == (0, 0, 1)


def test_natural_partition_puts_every_row_in_one_place_of_its_own_client():
    sizes = [10, 3, 1, 25]
    groups = np.random.default_rng(5).permutation(np.repeat(np.arange(4), sizes))
    partition = natural_partition(groups, seed=4, val_fraction=0.1, client_val_fraction=0.2)
    places = [partition.server_val, *partition.client_train, *partition.client_val]
    every = np.concatenate(places)
    assert sorted(every) == list(range(len(groups)))  # every row exactly once
    assert [int((groups[partition.server_val] == g).sum()) for g in range(4)] == [1, 0, 0, 2]
    assert [len(v) for v in partition.client_val] == [2, 1, 0, 5]
    assert [len(t) for t in partition.client_train] == [7, 2, 1, 18]
    for g in range(4):
        assert (groups[partition.client_train[g]] == g).all() and (groups[partition.client_val[g]] == g).all()

    again = natural_partition(groups, seed=4, val_fraction=0.1, client_val_fraction=0.2)
    other = natural_partition(groups, seed=5, val_fraction=0.1, client_val_fraction=0.2)
    again_places = [again.server_val, *again.client_train, *again.client_val]
    assert all(np.array_equal(a, b) for a, b in zip(places, again_places, strict=True))
    assert not np.array_equal(other.client_train[3], partition.client_train[3])  # 25! orders: a new draw
    # The general entry point takes the same path (and "auto" resolves to it for data with groups).
    for name in ("natural", "auto"):
        through = partition_dataset(np.zeros(len(groups)), 99, name, 4, 0.1, 0.2, groups=groups)
        assert all(np.array_equal(a, b) for a, b in zip(through.client_train, partition.client_train, strict=True))


# --- tables --------------------------------------------------------------------------------------


def rows_of(data) -> tuple[np.ndarray, np.ndarray]:
    """The table rows (their `row` feature) of the training and the test split: standardization is
    increasing, so the rows sorted by the standardized feature are the rows 0..N-1 in order."""
    standardized = torch.cat([data.x_train[:, 0], data.x_test[:, 0]])
    rows = np.empty(len(standardized), dtype=int)
    rows[standardized.argsort().numpy()] = np.arange(len(standardized))
    return rows[: len(data.x_train)], rows[len(data.x_train) :]


def table_task(path: Path, **settings) -> TrainSettings:
    return prepared(TrainSettings(task=str(path), client_column="region", target="target", **settings))


def test_a_table_holds_out_a_fixed_fifth_of_each_client_and_standardizes_its_features(tmp_path):
    path = tmp_path / "regions.csv"
    table = write_table(path, [["cat", "dog", "emu"][i % 3] for i in range(N)])
    settings = table_task(path)
    assert (settings.partition, settings.clients) == ("natural", 3)
    data = load_task_data(settings.task_ref, settings.data_root)
    assert data.group_names == ("north", "south", "west") and data.outputs == 3 and data.classification
    train, test = rows_of(data)
    assert sorted([*train, *test]) == list(range(N))
    regions = table["region"].to_numpy()
    assert [int((regions[test] == name).sum()) for name in REGIONS] == [2, 3, 4]  # round(0.2 n)
    assert np.bincount(data.groups).tolist() == [8, 12, 16]
    assert (regions[train] == np.array(data.group_names)[data.groups]).all()
    # Standardized with the training rows' mean and (sample) deviation, test rows alike.
    for column, feature in (("row", 0), ("f2", 1)):
        raw = table[column].to_numpy()
        mean, std = raw[train].mean(), raw[train].std(ddof=1)
        assert np.allclose(data.x_train[:, feature].numpy(), (raw[train] - mean) / std, atol=1e-5)
        assert np.allclose(data.x_test[:, feature].numpy(), (raw[test] - mean) / std, atol=1e-5)
    assert data.y_train.tolist() == [int(r) % 3 for r in train]  # classes in sorted order: cat, dog, emu
    # The same test rows whatever the run's seed; the partition of the training rows is the seed's.
    built = {}
    for seed in (0, 3):
        seeded = table_task(path, seed=seed)
        built[seed] = FederatedData.build(data, partition_of(seeded.data), seeded.model, task=seeded.task_ref)
    assert torch.equal(built[0].test[0], built[3].test[0]) and torch.equal(built[0].test[1], built[3].test[1])
    assert not torch.equal(built[0].clients[2].train, built[3].clients[2].train)


@pytest.mark.parametrize(
    ("target", "kind", "outputs", "classification"),
    [
        ([["cat", "dog", "emu"][i % 3] for i in range(N)], "auto", 3, True),  # strings: classes
        ([i % 4 for i in range(N)], "auto", 4, True),  # integers: classes
        ([float(i % 2) for i in range(N)], "auto", 2, True),  # floats with few values: classes
        (float_targets(N), "auto", 1, False),  # floats with many values: a regression
        ([i % 4 for i in range(N)], "regression", 1, False),  # --task-type decides
        (float_targets(N), "classification", N, True),
    ],
)
def test_a_tables_target_decides_classification_or_regression(tmp_path, target, kind, outputs, classification):
    path = tmp_path / "table.csv"
    write_table(path, target)
    settings = table_task(path, task_type=kind)
    data = load_task_data(settings.task_ref, settings.data_root)
    assert (data.outputs, data.classification) == (outputs, classification)
    assert data.y_train.dtype == (torch.int64 if classification else torch.float32)
    metric = resolve(settings.task_ref).scoring(data.classification)[0]
    assert (metric.name, metric.direction) == (("acc", "maximize") if classification else ("rmse", "minimize"))


def test_a_string_target_cannot_be_regressed(tmp_path):
    path = tmp_path / "table.csv"
    write_table(path, [["cat", "dog"][i % 2] for i in range(N)])
    with pytest.raises(TaskError, match="target 'target' is not numeric: it cannot be regressed"):
        table_task(path, task_type="regression")


def test_regression_metrics_are_in_the_targets_units(tmp_path):
    path = tmp_path / "prices.csv"
    table = write_table(path, float_targets(N))
    settings = table_task(path)
    data = load_task_data(settings.task_ref, settings.data_root)
    train, test = rows_of(data)
    y = table["target"].to_numpy()
    assert data.target_scale == pytest.approx(y[train].std(ddof=1), rel=1e-5)
    assert data.y_train.mean().item() == pytest.approx(0, abs=1e-5)  # trained on the standardized target
    spec = FederatedData.build(data, partition_of(settings.data), settings.model, task=settings.task_ref).spec
    assert [m.name for m in spec.metrics] == ["rmse", "mae"]

    # A model that predicts the training mean exactly: 0 in standardized units.
    model = nn.Linear(2, 1)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    errors = y[test] - y[train].mean()  # by hand, in the target's units
    loss, rmse = evaluate(model, data.x_test, data.y_test, spec)
    assert rmse == pytest.approx(math.sqrt(np.mean(errors**2)), rel=1e-5)
    assert loss == pytest.approx(np.mean(errors**2) / y[train].var(ddof=1), rel=1e-5)  # standardized units
    outputs = model(data.x_test).detach()
    mae = spec.metrics[1]
    assert mae.value(float(mae.per_sample(outputs, data.y_test).mean())) == pytest.approx(np.abs(errors).mean(), 1e-5)


# --- metrics -------------------------------------------------------------------------------------


def test_metric_directions():
    assert (ACCURACY.worst(), RMSE.worst(), MAE.worst()) == (0.0, math.inf, math.inf)
    assert ACCURACY.better(0.9, 0.8) and not ACCURACY.better(0.8, 0.9)
    assert RMSE.better(0.8, 0.9) and not RMSE.better(0.9, 0.8)
    assert not ACCURACY.better(0.5, 0.5) and not RMSE.better(0.5, 0.5)
    assert (ACCURACY.sign(), RMSE.sign()) == (1.0, -1.0)
    assert (ACCURACY.maximize, RMSE.maximize) == (True, False)
    # In the target's units: RMSE scales with the target, MSE with its square, accuracy not at all.
    scaled = {m.name: Metric(m.name, m.direction, m.per_sample, m.finish, m.unit_power, 3.0) for m in (RMSE, MSE)}
    assert scaled["rmse"].value(4.0) == pytest.approx(6.0) and scaled["mse"].value(4.0) == pytest.approx(36.0)
    assert Metric("acc", "maximize", ACCURACY.per_sample, scale=3.0).value(0.5) == 0.5
    with pytest.raises(TaskError, match="direction must be maximize or minimize"):
        Metric("f1", "up", ACCURACY.per_sample)
    with pytest.raises(TaskError, match="must be an identifier"):
        Metric("top-5", "maximize", ACCURACY.per_sample)


# --- naming a task -------------------------------------------------------------------------------

TASKS_SOURCE = """
import torch
from torch import nn

from fedhpo_core.data import Dataset
from fedhpo_core.task import Task


class Tiny(Task):
    def __init__(self, width=3):
        self.width = width

    def load(self, root):
        x = torch.arange(40.0).view(10, 4)
        return Dataset("tiny", x[:8], torch.arange(8) % 2, x[8:], torch.arange(2), 2)

    def model(self, input_shape, outputs):
        return nn.Linear(input_shape[0], outputs)


def make():
    return Tiny(width=7)


instance = Tiny(width=5)
number = 3
"""


@pytest.fixture
def task_file(tmp_path) -> Path:
    path = tmp_path / "my_tasks.py"
    path.write_text(TASKS_SOURCE)
    return path


def test_a_task_is_named_by_file_and_attribute(task_file):
    assert resolve(TaskRef(f"{task_file}:instance")).width == 5  # an instance
    assert resolve(TaskRef(f"{task_file}:Tiny")).width == 3  # a Task subclass, made with no arguments
    assert resolve(TaskRef(f"{task_file}:make")).width == 7  # a function returning a task
    assert resolve(TaskRef(str(task_file))).width == 5  # the file's one Task instance
    by_file = resolve(TaskRef(f"{task_file}:instance"))
    assert isinstance(by_file, Task) and type(by_file).__module__.startswith("fedhpo_task_")
    assert TaskRef(f"{task_file}:make").label == "make" and TaskRef(str(task_file)).label == "my_tasks"
    with pytest.raises(TaskError, match="is a int, not a fedhpo_core.task.Task"):
        resolve(TaskRef(f"{task_file}:number"))


def test_a_file_with_several_task_instances_needs_an_attribute(tmp_path):
    path = tmp_path / "two.py"
    path.write_text(TASKS_SOURCE + "other = Tiny(width=9)\n")
    with pytest.raises(TaskError, match=re.escape(f"{path} defines 2 Task instances: name one as {path}:attribute")):
        resolve(TaskRef(str(path)))
    assert resolve(TaskRef(f"{path}:other")).width == 9


def test_a_task_is_named_by_module_and_attribute(monkeypatch, tmp_path, task_file):
    monkeypatch.syspath_prepend(str(tmp_path))
    task = resolve(TaskRef("my_tasks:make"))
    assert task.width == 7 and type(task).__module__ == "my_tasks"
    with pytest.raises(TaskError, match="unknown task 'no_such_thing'"):
        resolve(TaskRef("no_such_thing"))


def test_a_changed_table_is_read_again(tmp_path):
    path = tmp_path / "table.csv"
    write_table(path, [i % 3 for i in range(N)])
    first = TrainSettings(task=str(path), client_column="region", target="target").task_ref
    data = load_task_data(first, "data")
    assert len(data.y_train) + len(data.y_test) == N
    write_table(path, [i % 3 for i in range(N + 5)], {**REGIONS, "east": 5})
    second = TrainSettings(task=str(path), client_column="region", target="target").task_ref
    assert second.fingerprint != first.fingerprint and fingerprint(str(path)) == second.fingerprint
    again = load_task_data(second, "data")
    assert len(again.y_train) + len(again.y_test) == N + 5 and again.group_names[0] == "east"
    assert load_task_data(first, "data") is data  # an unchanged reference is the cached data
    assert fingerprint("digits") == "" and fingerprint(str(tmp_path / "missing.csv")) == ""


# --- an installed plugin -------------------------------------------------------------------------

PLUGIN_SOURCE = '''
import numpy as np
import torch
from torch import nn

from fedhpo_core.data import Dataset
from fedhpo_core.task import Task


class Blobs(Task):
    """Three Gaussian blobs in 6 dimensions, held by four clients."""

    name = "blobs"

    def load(self, root):
        generator = torch.Generator().manual_seed(0)
        centers = torch.randn(3, 6, generator=generator) * 2
        y = torch.randint(0, 3, (240,), generator=generator)
        x = centers[y] + torch.randn(240, 6, generator=generator)
        groups = np.arange(200) % 4
        return Dataset("blobs", x[:200], y[:200], x[200:], y[200:], 3, groups, ("n", "e", "s", "w"))

    def model(self, input_shape, outputs):
        return nn.Sequential(nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, outputs))


task = Blobs()
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> dict[str, str]:
    """A package installed as pip installs one (its dist-info with METADATA and entry_points.txt)
    in a folder of its own: the environment of commands that see it (through PYTHONPATH, which the
    warm runner applies to each command it forks)."""
    site = tmp_path_factory.mktemp("site")
    (site / "fedhpo_plugin_demo").mkdir()
    (site / "fedhpo_plugin_demo" / "__init__.py").write_text(PLUGIN_SOURCE)
    info = site / "fedhpo_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedhpo_plugin_demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedhpo.tasks]\ndemo = fedhpo_plugin_demo:task\n")
    return {"PYTHONPATH": str(site)}


def test_an_installed_plugins_task_is_listed(plugin, tmp_path):
    listed = r"^  demo +fedhpo_plugin_demo:task \(fedhpo_plugin_demo\)$"
    # The same warm runner serves a command with the plugin on its PYTHONPATH and commands without.
    for env in ({}, plugin, {}):
        result = fedhpo("tasks", cwd=tmp_path, **env)
        assert result.returncode == 0, result.stderr
        assert bool(re.search(listed, result.stdout, re.MULTILINE)) == bool(env), result.stdout


def test_an_installed_plugins_task_is_tuned_and_compared(plugin, tmp_path):
    from mlflow import MlflowClient

    tune = fedhpo(
        "tune", "--task", "demo", "--method", "random", "--budget", "6", "--n-configs", "2", "--final-rounds", "2",
        cwd=tmp_path, **plugin,
    )  # fmt: skip
    assert tune.returncode == 0, tune.stderr[-3000:]
    assert "demo-natural-4c" in tune.stdout  # the study is named for the task, its four clients its own
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(re.search(r"MLflow run (\w+)", tune.stdout).group(1))
    assert run.data.params["task"] == "demo"
    assert (run.data.params["score"], run.data.params["score_direction"]) == ("acc", "maximize")

    compare = fedhpo(
        "compare", "--task", "demo", "--methods", "random,tpe", "--seeds", "0", "--budgets", "4",
        "--n-configs", "2", "--final-rounds", "2", cwd=tmp_path, **plugin,
    )  # fmt: skip
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "final_test_acc (maximize)" in compare.stdout
    assert re.search(r"^\| random \| [0-9.]+ ± [0-9.]+ \| reference \|$", compare.stdout, re.MULTILINE)
    assert re.search(r"^\| tpe \| [0-9.]+ ± [0-9.]+ \|", compare.stdout, re.MULTILINE)


def test_a_plugin_that_does_not_import_is_refused(plugin, tmp_path_factory, tmp_path):
    site = tmp_path_factory.mktemp("broken-site")
    (site / "broken_plugin").mkdir()
    (site / "broken_plugin" / "__init__.py").write_text("raise RuntimeError('no licence file')\n")
    info = site / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken_plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[fedhpo.tasks]\nbroken = broken_plugin:task\n")
    env = plugin | {"PYTHONPATH": f"{site}{os.pathsep}{plugin['PYTHONPATH']}"}
    result = fedhpo("train", "--task", "broken", cwd=tmp_path, **env)
    assert_refused(result, "train", ("installed task 'broken' does not import", "no licence file"), tmp_path)


def test_the_plugin_listing_names_how_to_name_any_task(tmp_path):
    result = fedhpo("tasks", cwd=tmp_path)
    assert result.returncode == 0
    for line in ("--task package.module:attribute", "--task path/to/file.py[:attribute]", "--client-column"):
        assert line in result.stdout


def test_a_module_in_the_current_folder_is_a_task_without_touching_sys_path(tmp_path, monkeypatch):
    (tmp_path / "here_task_module.py").write_text(
        "from fedhpo_core.task import ImageTask\ntask = ImageTask('digits', 'lenet5')\n"
    )
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    found = task_module.resolve(task_module.TaskRef("here_task_module:task"))
    assert isinstance(found, task_module.ImageTask) and found.model_name == "lenet5"
    assert sys.path == before
