"""A task where clients need different hyperparameters, for a known reason: two groups of clients
whose inputs differ only in scale.

The training set is dealt at random (IID, from a fixed seed: the data's own clients) to `clients`
clients; the odd-numbered ones form group 1, whose inputs are multiplied by `scale` (10). Scaling a
linear model's inputs by s multiplies its loss's Hessian by s^2, so gradient descent's stable and
best learning rates shrink with it. Measured on MNIST with the MLP (FedAvg, 10 rounds, a rate per
group from the FedTune paper's five, `bench/personalization_grid.py`): group 0 does best at 0.1 and
group 1 at 0.01, and 0.1 for everyone diverges (on Fashion-MNIST the same pair is best, and the
best single rate is 0.01); with s = sqrt(10) both groups prefer 0.1 on MNIST. The
labels, classes and sizes are the same in both groups; only the learning rate that suits them
differs. Half the test set (every other row) is scaled the same way, so the server's test accuracy
weighs both groups equally.

Bundled as installed tasks (`fedhpo tasks`): `digits-scaled` (quick tests), `mnist-scaled` and
`fashion-scaled`, 20 clients each; the measured best learning rates are in docs/personalization.md.
"""

from dataclasses import dataclass

import numpy as np
import torch

from fedhpo_core import seeding
from fedhpo_core.data import Dataset, load_dataset
from fedhpo_core.task import Task

CLIENTS = 20
SCALE = 10.0


@dataclass(frozen=True)
class ScaledGroups(Task):
    """A bundled dataset dealt IID to `clients` clients, group 1 (odd clients) scaled by `scale`."""

    dataset: str
    clients: int = CLIENTS
    scale: float = SCALE
    model_name: str = "mlp"

    @property
    def name(self) -> str:
        return f"{self.dataset}-scaled"

    def load(self, root):
        base = load_dataset(self.dataset, root)
        owners = seeding.numpy_rng(0, seeding.PARTITION).permutation(len(base.y_train)) % self.clients
        factors = np.where(owners % 2 == 1, self.scale, 1.0).astype(np.float32)
        x_train = base.x_train * _as_rows(factors, base.x_train)
        test_factors = np.where(np.arange(len(base.y_test)) % 2 == 1, self.scale, 1.0).astype(np.float32)
        x_test = base.x_test * _as_rows(test_factors, base.x_test)
        names = tuple(f"group{c % 2}-client{c}" for c in range(self.clients))
        return Dataset(self.name, x_train, base.y_train, x_test, base.y_test, base.outputs, owners, names)

    def model(self, input_shape, outputs):
        from fedhpo_core.models import MODELS

        return MODELS[self.model_name](input_shape, outputs)


def _as_rows(factors: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """Per-row factors shaped to multiply `x` row by row."""
    return torch.from_numpy(factors).view(-1, *([1] * (x.dim() - 1)))


DIGITS = ScaledGroups("digits")
MNIST = ScaledGroups("mnist")
FASHION = ScaledGroups("fashion_mnist")
