"""Models, and the flat weight vector in which they travel between server and clients."""

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedhpo_core import seeding

if TYPE_CHECKING:
    from fedhpo_core.task import Metric, Task, TaskRef


def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """One hidden layer of 128 units, the FedTune paper's model."""
    features = int(torch.tensor(input_shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, num_classes))


def _conv_net(input_shape, num_classes, channels: tuple[int, int], kernel: int, hidden: tuple[int, ...]):
    """Two conv-ReLU-maxpool blocks, then fully connected layers. Convolutions are padded to keep
    their input size, so the same net takes 8x8 digits, 28x28 MNIST and 32x32 CIFAR-10."""
    in_channels, height, width = input_shape
    pad = kernel // 2
    layers: list[nn.Module] = []
    for c_in, c_out in zip((in_channels, channels[0]), channels, strict=True):
        layers += [nn.Conv2d(c_in, c_out, kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2)]
    widths = (channels[1] * (height // 4) * (width // 4), *hidden)
    layers.append(nn.Flatten())
    for w_in, w_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998): 6 and 16 5x5 feature maps, then 120 and 84 units."""
    return _conv_net(input_shape, num_classes, (6, 16), 5, (120, 84))


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The CIFAR-10 CNN of McMahan et al. (2017): 32 and 64 5x5 feature maps, then 512 units."""
    return _conv_net(input_shape, num_classes, (32, 64), 5, (512,))


MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {"mlp": mlp, "lenet5": lenet5, "cnn": cnn}


@dataclass(frozen=True)
class ModelSpec:
    """What the engines need to train and score a task's model: how to build it (the bundled model
    `name`, or the `task`'s model), its loss and its metrics. Small and hashable: it keys the
    engines' caches and travels to Dask workers, which resolve the task themselves."""

    name: str  # a bundled model, or the task's label
    input_shape: tuple[int, ...]
    outputs: int
    task: "TaskRef | None" = None  # None: the bundled model `name` with the default loss, scored by accuracy
    classification: bool = True
    target_scale: float = 1.0  # `Dataset.target_scale`: metrics in the target's units
    input_dtype: torch.dtype = torch.float32  # token ids are integers

    def example_input(self, *batch: int) -> torch.Tensor:
        """Zeros shaped and typed like a batch of inputs, (*batch, *input_shape)."""
        return torch.zeros(*batch, *self.input_shape, dtype=self.input_dtype)

    @property
    def definition(self) -> "Task | None":
        from fedhpo_core.task import resolve

        return None if self.task is None else resolve(self.task)

    def build(self) -> nn.Module:
        if self.task is None:
            return MODELS[self.name](self.input_shape, self.outputs)
        return self.definition.model(self.input_shape, self.outputs)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample training loss."""
        from fedhpo_core.task import default_loss

        return default_loss(outputs, targets) if self.task is None else self.definition.loss(outputs, targets)

    @property
    def metrics(self) -> "tuple[Metric, ...]":
        """The metrics measured, the scoring one first (made once per spec: engines ask every round)."""
        return metrics_of(self)

    @property
    def score(self) -> "Metric":
        return self.metrics[0]

    @property
    def default_loss(self) -> bool:
        return self.task is None or self.definition.default_loss

    @property
    def size(self) -> int:
        """Number of parameters: the length of the flat weight vector."""
        return parameter_count(self)

    def initial_weights(self, seed: int) -> torch.Tensor:
        """The run's initial global model, as a flat vector, from the run's seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeding.torch_seed(seed, seeding.INIT))
            return flat_weights(self.build())


@functools.lru_cache(maxsize=32)
def metrics_of(spec: ModelSpec) -> "tuple[Metric, ...]":
    from fedhpo_core.task import ACCURACY

    if spec.task is None:
        return (ACCURACY,)
    return tuple(replace(m, scale=spec.target_scale) for m in spec.definition.scoring(spec.classification))


@functools.lru_cache(maxsize=32)
def parameter_count(spec: ModelSpec) -> int:
    return sum(p.numel() for p in spec.build().parameters())


def flat_weights(model: nn.Module) -> torch.Tensor:
    """A detached copy of all parameters as one vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def load_flat_weights(model: nn.Module, weights: torch.Tensor) -> nn.Module:
    """Copy a flat vector into the model's parameters (a copy: the vector is never aliased)."""
    offset = 0
    for p in model.parameters():
        p.copy_(weights[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return model


_workspace = threading.local()


def workspace_model(spec: ModelSpec, weights: torch.Tensor) -> nn.Module:
    """A module of this thread holding `weights` (on their device), reused across rounds to skip
    rebuilding one per client per round; every thread has its own, so concurrent clients never share."""
    models = _workspace.__dict__.setdefault("models", {})
    key = (spec, weights.device)
    if key not in models:
        models[key] = spec.build().to(weights.device)
    for module in models[key].modules():  # buffers are not federated: every use starts from fresh ones
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.reset_running_stats()
    return load_flat_weights(models[key], weights)
