"""A task's own model on the engines: the cohort engine batches any `nn.Module` through torch.func
(`VmapKernel`), or through the built-in kernels where its forward is a chain of layers they know,
and agrees with the sequential engine to float rounding; a model it cannot batch
(batch normalization, data-dependent control flow) is named in one line and trained client after
client, exactly as the sequential engine trains it.

The tasks below are named by this file's path (``tests/test_task_engines.py:attribute``), as a
user names a task of theirs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedhpo_core import cohort
from fedhpo_core.data import Dataset, load_dataset
from fedhpo_core.federation import FederatedData, partition_of, train_sequentially
from fedhpo_core.models import ModelSpec
from fedhpo_core.settings import ClientConfig, TrainSettings
from fedhpo_core.task import Task, load_task_data, prepared

# Weights after one round, cohort against sequential: as tests/test_cohort.py bounds them.

CONFIGS = [  # every client trains differently (no momentum): rate, decay, FedProx, batch size, epochs
    ClientConfig(lr=0.05),
    ClientConfig(lr=0.1, batch_size=16),
    ClientConfig(lr=0.02, weight_decay=1e-2, local_epochs=2),
    ClientConfig(lr=0.08, mu=0.5, batch_size=16),
    ClientConfig(lr=0.03, weight_decay=1e-3, mu=0.1, batch_size=7),
]


# --- user models ---------------------------------------------------------------------------------


class ResidualMLP(nn.Module):
    """Two hidden layers, the second with a skip connection."""

    def __init__(self, input_shape, outputs):
        super().__init__()
        self.inp = nn.Linear(int(np.prod(input_shape)), 32)
        self.hidden = nn.Linear(32, 32)
        self.out = nn.Linear(32, outputs)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)))
        return self.out(h + F.relu(self.hidden(h)))


class ResidualConv(nn.Module):
    """A convolution, a residual convolution block, average pooling and a linear head."""

    def __init__(self, input_shape, outputs):
        super().__init__()
        channels, height, width = input_shape
        self.stem = nn.Conv2d(channels, 4, 3, padding=1)
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * (height // 2) * (width // 2), outputs)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + F.relu(self.block(h))
        return self.head(F.avg_pool2d(h, 2).flatten(1))


class Normalized(nn.Module):
    """A hidden layer under batch normalization (1d)."""

    def __init__(self, input_shape, outputs):
        super().__init__()
        self.inp = nn.Linear(int(np.prod(input_shape)), 16)
        self.norm = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, outputs)

    def forward(self, x):
        return self.out(F.relu(self.norm(self.inp(x.flatten(1)))))


class NormalizedConv(nn.Module):
    """A convolution under batch normalization (2d)."""

    def __init__(self, input_shape, outputs):
        super().__init__()
        channels, height, width = input_shape
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.out = nn.Linear(4 * height * width, outputs)

    def forward(self, x):
        return self.out(F.relu(self.norm(self.conv(x))).flatten(1))


class Branching(nn.Module):
    """Data-dependent control flow: which branch runs depends on the batch's values."""

    def __init__(self, input_shape, outputs):
        super().__init__()
        self.out = nn.Linear(int(np.prod(input_shape)), outputs)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 0.5
        return self.out(x.flatten(1))


# --- tasks ---------------------------------------------------------------------------------------


class Digits(Task):
    """scikit-learn's digits with a model of the user's."""

    def __init__(self, module: type[nn.Module]):
        self.module = module

    def load(self, root):
        return load_dataset("digits", root)

    def model(self, input_shape, outputs):
        return self.module(input_shape, outputs)


class SmoothedDigits(Digits):
    """Digits under a loss of the task's own: cross-entropy with label smoothing."""

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=0.1)


class Regression(Task):
    """A noisy linear target of 6 features, held by five clients of different sizes."""

    def __init__(self, module: type[nn.Module] | None = None):
        self.module = module

    def load(self, root):
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(400, 6, generator=generator)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0]) + 0.1 * torch.randn(400, generator=generator)
        groups = np.repeat(np.arange(5), [20, 40, 60, 80, 120])
        return Dataset("regression", x[:320], y[:320], x[320:], y[320:], 1, groups[:320], tuple("abcde"))

    def model(self, input_shape, outputs):
        if self.module is None:
            return nn.Sequential(nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, outputs))
        return self.module(input_shape, outputs)


residual_mlp = Digits(ResidualMLP)
residual_conv = Digits(ResidualConv)
smoothed = SmoothedDigits(ResidualMLP)
smoothed_sequential = SmoothedDigits(lambda shape, outputs: nn.Sequential(nn.Flatten(), nn.Linear(64, outputs)))
regression_residual = Regression(ResidualMLP)
regression_sequential = Regression()
normalized = Digits(Normalized)
normalized_conv = Digits(NormalizedConv)
branching = Digits(Branching)

HERE = Path(__file__).resolve()


def federation(attribute: str, clients: int = 5) -> FederatedData:
    """The named task of this file, prepared as a command prepares it: a regression in its own five
    clients, digits (no clients of its own) split between `clients` by a Dirichlet partition."""
    ref = f"{HERE}:{attribute}"
    settings = prepared(TrainSettings(task=ref, seed=1, clients=clients))
    if settings.partition == "iid":  # unequal clients: cohorts whose clients take unequal steps
        settings = prepared(TrainSettings(task=ref, seed=1, clients=clients, partition="dirichlet"))
    data = load_task_data(settings.task_ref, settings.data_root)
    return FederatedData.build(data, partition_of(settings.data), settings.model, task=settings.task_ref)


@pytest.mark.parametrize(
    ("attribute", "kernel", "score"),
    [
        ("residual_mlp", "vmap", "acc"),  # an nn.Module subclass: torch.func's vmap
        ("residual_conv", "vmap", "acc"),
        ("smoothed", "vmap", "acc"),  # a loss of the task's own, traced by torch.func
        ("smoothed_sequential", "batched", "acc"),  # a Sequential of known layers, not the MLP's own backward
        ("regression_residual", "vmap", "rmse"),  # float targets: squared error, scored by RMSE
        ("regression_sequential", "batched", "rmse"),
    ],
)
def test_a_tasks_model_trains_on_the_cohort_engine_as_on_the_sequential_one(attribute, kernel, score):
    from test_cohort import assert_agree, jobs_for  # not at the top: this file is also a task module

    data = federation(attribute)
    spec = data.spec
    assert cohort.kernel_name(spec) == kernel and cohort.cohort_refusal(spec) is None
    assert spec.score.name == score and spec.task is not None
    sizes = [c.num_train for c in data.clients]
    assert len(sizes) == 5 and max(sizes) > 2 * min(sizes)  # unequal clients: cohorts of unequal steps
    start = spec.initial_weights(0)
    jobs = jobs_for(CONFIGS)
    sequential = train_sequentially(spec, start, jobs, data.clients)
    batched = cohort.train_cohort(spec, start, jobs, data.clients)
    assert_agree(sequential, batched)
    assert not torch.equal(sequential[0].weights, start)
    assert all(np.isfinite(u.val_score) for u in batched)


def test_a_custom_loss_is_the_one_trained_on():
    from test_cohort import jobs_for  # not at the top: this file is also a task module

    """The smoothed task trains differently from the same model under plain cross-entropy."""
    smoothed_data, plain_data = federation("smoothed"), federation("residual_mlp")
    start = smoothed_data.spec.initial_weights(0)
    assert torch.equal(start, plain_data.spec.initial_weights(0))
    jobs = jobs_for(CONFIGS[:1])
    with_smoothing = cohort.train_cohort(smoothed_data.spec, start, jobs, smoothed_data.clients[:1])[0]
    without = cohort.train_cohort(plain_data.spec, start, jobs, plain_data.clients[:1])[0]
    assert (with_smoothing.weights - without.weights).abs().max() > 1e-4
    assert with_smoothing.train_loss > without.train_loss  # smoothing's floor on the loss


# --- models the cohort engine cannot batch -------------------------------------------------------

UNBATCHABLE = {  # the task, and what its one line names
    "normalized": ("BatchNorm1d", "batch normalization"),
    "normalized_conv": ("BatchNorm2d", "batch normalization"),
    "branching": ("Branching", "data-dependent control flow"),
}


@pytest.mark.parametrize("attribute", list(UNBATCHABLE))
def test_a_model_the_cohort_engine_cannot_batch_trains_client_after_client(attribute):
    from test_cohort import jobs_for  # not at the top: this file is also a task module

    data = federation(attribute, clients=4)
    spec = data.spec
    reason = cohort.cohort_refusal(spec)
    assert reason is not None and "\n" not in reason
    assert all(name in reason for name in UNBATCHABLE[attribute]), reason
    start = spec.initial_weights(0)
    jobs = jobs_for(CONFIGS[:4])
    sequential = train_sequentially(spec, start, jobs, data.clients)
    batched = cohort.train_cohort(spec, start, jobs, data.clients)
    for a, b in zip(sequential, batched, strict=True):
        assert torch.equal(a.weights, b.weights)
        assert (a.train_loss, a.val_loss, a.val_score) == (b.train_loss, b.val_loss, b.val_score)
    assert not torch.equal(sequential[0].weights, start)


@pytest.mark.parametrize("attribute", ["normalized", "branching"])
def test_the_command_says_once_why_the_cohort_engine_trains_client_after_client(attribute, tmp_path):
    environment = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("fedhpo")), "train", "--task", f"{HERE}:{attribute}"]
        + ["--rounds", "2", "--clients", "3", "--partition", "iid"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "cohort engine:" in line]
    assert len(lines) == 1, lines
    assert all(name in lines[0] for name in UNBATCHABLE[attribute]), lines[0]
    assert "Trained 2 rounds" in result.stdout
    # torch.export cannot trace the branch: the model is logged pickled, with one line saying so
    pickled = [line for line in (result.stdout + result.stderr).splitlines() if "is logged pickled" in line]
    assert len(pickled) == (attribute == "branching"), pickled


# --- user modules that are chains of known layers take the built-in kernels ----------------------


class ChainedLeNet(nn.Module):
    """LeNet-5 as a user writes it: modules and functional calls in one chain."""

    def __init__(self, input_shape, outputs):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=2)
        self.fc1 = nn.Linear(16 * (input_shape[1] // 4) * (input_shape[2] // 4), 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, outputs)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.fc3(F.relu(self.fc2(self.fc1(torch.flatten(h, 1)).relu())))


class ChainedMLP(nn.Module):
    def __init__(self, input_shape, outputs, tail=lambda h: h):
        super().__init__()
        self.hidden = nn.Linear(int(np.prod(input_shape)), 128)
        self.out = nn.Linear(128, outputs)
        self.tail = tail

    def forward(self, x):
        return self.tail(self.out(F.relu(self.hidden(x.flatten(1)))))


class HiddenFirst(ChainedMLP):
    """The same chain, its parameters registered in another order than the chain uses them."""

    def __init__(self, input_shape, outputs):
        nn.Module.__init__(self)
        self.out = nn.Linear(128, outputs)
        self.hidden = nn.Linear(int(np.prod(input_shape)), 128)
        self.tail = lambda h: h


class TwiceUsed(nn.Module):
    def __init__(self, input_shape, outputs):
        super().__init__()
        self.square = nn.Linear(int(np.prod(input_shape)), int(np.prod(input_shape)))
        self.out = nn.Linear(int(np.prod(input_shape)), outputs)

    def forward(self, x):
        return self.out(self.square(self.square(x.flatten(1))))


chained_lenet = Digits(ChainedLeNet)
chained_mlp = Digits(ChainedMLP)
scaled_mlp = Digits(lambda shape, outputs: ChainedMLP(shape, outputs, tail=lambda h: 2 * h))
hidden_first = Digits(HiddenFirst)
twice_used = Digits(TwiceUsed)
unbiased = Digits(lambda shape, outputs: nn.Sequential(nn.Flatten(), nn.Linear(64, outputs, bias=False)))


@pytest.mark.parametrize(
    ("attribute", "bundled", "kernel"), [("chained_mlp", "mlp", "linear"), ("chained_lenet", "lenet5", "batched")]
)
def test_a_users_chain_of_known_layers_trains_as_the_bundled_model_does(attribute, bundled, kernel):
    """The user's module, lowered to a Sequential by torch.fx, runs the bundled model's kernel on
    the same flat weights: the same round to the bit."""
    from test_cohort import jobs_for

    data = federation(attribute)
    assert cohort.kernel_name(data.spec) == kernel and cohort.cohort_refusal(data.spec) is None
    same = FederatedData(data.clients, data.server_val, data.test, ModelSpec(bundled, (1, 8, 8), 10))
    start = data.spec.initial_weights(0)
    assert torch.equal(start, same.spec.initial_weights(0))  # parameters created in the bundled order
    jobs = jobs_for(CONFIGS)
    users = cohort.train_cohort(data.spec, start, jobs, data.clients)
    theirs = cohort.train_cohort(same.spec, start, jobs, same.clients)
    for a, b in zip(users, theirs, strict=True):
        assert torch.equal(a.weights, b.weights) and a.train_loss == b.train_loss and a.val_score == b.val_score


@pytest.mark.parametrize("attribute", ["scaled_mlp", "hidden_first", "twice_used", "unbiased", "residual_mlp"])
def test_a_module_that_is_not_such_a_chain_goes_through_torch_func(attribute):
    spec = federation(attribute, clients=2).spec
    assert cohort.as_chain(spec.build()) is None and cohort.kernel_name(spec) == "vmap"
