"""Datasets as normalized tensors: scikit-learn's bundled digits, and MNIST, Fashion-MNIST and
CIFAR-10 through torchvision from a folder in torchvision's layout (downloaded only when missing).
"""

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedhpo_core import seeding


@dataclass(frozen=True, eq=False)
class Dataset:
    """A task's data as tensors: float inputs, and integer class labels (classification) or float
    targets (regression). `groups`, for data partitioned at its source, is each training row's
    client (0 .. G-1, named by `group_names`); test rows are pooled."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    outputs: int  # the model's outputs: the number of classes, or the target's width
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] = ()
    target_scale: float = 1.0  # regression targets divided by this for training; metrics multiply it back

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def classification(self) -> bool:
        return not self.y_train.is_floating_point()

    @property
    def num_classes(self) -> int:
        """Classes of a classification task; 0 for regression."""
        return self.outputs if self.classification else 0

    @classmethod
    def of(cls, name: str, train, test, outputs: int | None = None) -> "Dataset":
        """A dataset from two labelled torch Datasets (or anything indexable whose items are
        (input, label) pairs), stacked into tensors once; `outputs` defaults to the number of
        classes the integer labels span (max + 1), or the target's width for float targets."""
        x_train, y_train = _stacked(train)
        x_test, y_test = _stacked(test)
        if outputs is None:
            targets = torch.cat([y_train, y_test])
            outputs = int(targets.max()) + 1 if not targets.is_floating_point() else (targets[0].numel() or 1)
        return cls(name, x_train, y_train, x_test, y_test, outputs)


def _stacked(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, labels = zip(*(pairs[i] for i in range(len(pairs))), strict=True)
    return torch.stack([torch.as_tensor(x) for x in inputs]), torch.as_tensor(labels)


@dataclass(frozen=True)
class DatasetSpec:
    load: Callable[[str], Dataset]
    num_train: int  # known up front, so settings are checked before anything is loaded
    num_classes: int = 10


def split_sizes(n: int, fraction: float) -> tuple[int, int]:
    """Sizes of a (held-out, rest) split of n samples; the held-out part gets round(n * fraction)."""
    held = int(round(n * fraction))
    return held, n - held


def _standardize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images (N, H, W[, C]) to float (N, C, H, W), scaled to [0, 1] then standardized."""
    x = images.float().div_(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


DIGITS_TEST_FRACTION = 0.2
DIGITS_MEAN, DIGITS_STD = 0.3050, 0.3761


def load_digits(root: str) -> Dataset:
    """scikit-learn's 1,797 8x8 digits; a fixed 20% test split, the same for every run seed,
    so that runs with different seeds are scored on the same test set."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0 - DIGITS_MEAN) / DIGITS_STD
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.from_numpy(seeding.numpy_rng(0, seeding.SPLIT).permutation(len(y)))
    n_test = split_sizes(len(y), DIGITS_TEST_FRACTION)[0]
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], 10)


def _torchvision_pair(cls, name: str, root: str):
    """Train and test sets of a torchvision dataset; read from `root`, downloaded if missing. A
    failed download leaves no folders behind; files that are there but do not read are reported
    as such, not as a failed download."""
    try:
        return cls(root, train=True), cls(root, train=False)
    except Exception as error:  # torchvision raises RuntimeError for missing files, and others for bad ones
        if "not found" not in str(error).lower():
            reason = _one_line(error)
            raise FileNotFoundError(f"{name} under {root!r} does not read (truncated or corrupt?): {reason}") from error
    created = [p for p in (Path(root), Path(root) / cls.__name__, Path(root) / cls.__name__ / "raw") if not p.exists()]
    try:
        return cls(root, train=True, download=True), cls(root, train=False, download=True)
    except Exception as error:  # torchvision raises URLError, RuntimeError or OSError offline
        for folder in reversed(created):
            with contextlib.suppress(OSError):  # only if still empty
                folder.rmdir()
        raise FileNotFoundError(
            f"{name} is not in torchvision's layout under {root!r} and could not be downloaded: {_one_line(error)}"
        ) from error


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # torchvision's messages span lines; ours is one


def _mnist_like(cls, name: str, root: str, mean: float, std: float) -> Dataset:
    train, test = _torchvision_pair(cls, name, root)
    return Dataset(
        name,
        _standardize(train.data, [mean], [std]),
        train.targets.long(),
        _standardize(test.data, [mean], [std]),
        test.targets.long(),
        10,
    )


def load_mnist(root: str) -> Dataset:
    from torchvision.datasets import MNIST

    return _mnist_like(MNIST, "mnist", root, 0.1307, 0.3081)


def load_fashion_mnist(root: str) -> Dataset:
    from torchvision.datasets import FashionMNIST

    return _mnist_like(FashionMNIST, "fashion_mnist", root, 0.2860, 0.3530)


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def load_cifar10(root: str) -> Dataset:
    from torchvision.datasets import CIFAR10

    train, test = _torchvision_pair(CIFAR10, "cifar10", root)
    return Dataset(
        "cifar10",
        _standardize(torch.from_numpy(train.data), CIFAR10_MEAN, CIFAR10_STD),
        torch.tensor(train.targets, dtype=torch.int64),
        _standardize(torch.from_numpy(test.data), CIFAR10_MEAN, CIFAR10_STD),
        torch.tensor(test.targets, dtype=torch.int64),
        10,
    )


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(load_digits, 1797 - split_sizes(1797, DIGITS_TEST_FRACTION)[0]),
    "mnist": DatasetSpec(load_mnist, 60_000),
    "fashion_mnist": DatasetSpec(load_fashion_mnist, 60_000),
    "cifar10": DatasetSpec(load_cifar10, 50_000),
}


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, root: str) -> Dataset:
    """The named dataset, loaded once per process (every client and trial shares the tensors)."""
    return DATASETS[name].load(root)
