"""What a sampled client computes on its own data in a round and uploads beside its weights (pfl's
`train_one_user` returning statistics).

A tuner declares the statistics it reads (`Tuner.statistics`); the round loop puts them on every
job, both engines compute exactly those into `ClientUpdate.statistics` (the cohort engine batched
over its clients) and the round's `bytes_sent` counts their uploads.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedhpo_core import seeding

if TYPE_CHECKING:
    from fedhpo_core.client import ClientData, ClientJob
    from fedhpo_core.models import ModelSpec


class Statistic(ABC):
    """Something a client computes in the round and uploads: `name` is its key in
    `ClientUpdate.statistics`. Values are frozen dataclasses (they travel on jobs to Dask workers).
    `privatized`: whether DP-FedAvg's postprocessor chain privatizes it (a method that asks for one
    that is not cannot run under DP). `on_client` False: a message whose inputs the server holds
    anyway (FTS's posterior sample of a client's own observations, kept by the tuner in the client's
    name as SCAFFOLD's c_i are kept in the federation's state): the engines do not compute it, its
    upload is charged all the same."""

    name: str
    privatized: bool = False
    on_client: bool = True  # computed by the client's engine; False: by the tuner in the client's name

    @abstractmethod
    def floats(self, spec: "ModelSpec", data: "ClientData") -> int:
        """The float32 values one client uploads (4 bytes each)."""

    def samples(self, data: "ClientData") -> int:
        """Samples the client passes through its model or features for it beyond its training and
        its usual validation after training: charged to its simulated round time. Default: none."""
        return 0


@dataclass(frozen=True)
class ValidationLoss(Statistic):
    """The model's mean cross-entropy on the client's local validation split, a float (nan when the
    client has none): the received global model's before local training (`before`), or the trained
    model's after."""

    before: bool

    @property
    def name(self) -> str:
        return "val_loss_before" if self.before else "val_loss_after"

    def floats(self, spec, data):
        return 1

    def samples(self, data):
        """The validation before training is an extra pass over the split; the one after is made anyway."""
        return data.num_val if self.before else 0


VAL_LOSS_BEFORE = ValidationLoss(before=True)  # FedEx's and FedTune's "before"
VAL_LOSS_AFTER = ValidationLoss(before=False)  # the same number as `ClientUpdate.val_loss`


class DataStatistic(Statistic):
    """A statistic of the client's data alone, whatever the model: computed for a whole cohort of
    clients in one call."""

    @abstractmethod
    def compute(
        self, spec: "ModelSpec", clients: Sequence["ClientData"], ids: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Each client's value (a tensor of `floats` values), in the clients' order; `ids` are the
        clients' ids in the federation (default 0, 1, ...), for what a client draws of its own."""


@dataclass(frozen=True)
class DataEncoding(DataStatistic):
    """The random-Fourier-feature mean embedding of the client's training pairs (x, onehot(y)),
    e = (1/n) sum_i phi(x_i) (outer) onehot(y_i), flattened (dim x classes values; a regression's
    target y_i stands for onehot(y_i)): DP-MERF's
    encoding as pFedHPO uses it to condition a client's hyperparameters on its data (Cheng et al.,
    "A Practical Approach to Personalized Federated Hyperparameter Optimization", arXiv 2304.05195).

    phi(x) = sqrt(2 / D) cos(W x + b) on the flattened input (d values), W ~ N(0, I / l^2) and
    b ~ U(0, 2 pi) drawn from `seed`, the same for every client so that encodings are comparable.
    The lengthscale l is sqrt(d), fixed: the median heuristic would depend on the data. Zeros for a
    client without training samples. `noise` sigma adds pFedHPO's Gaussian noise N(0, (2 sigma / n)^2)
    to every value (`pfedhpo/utils.py: noisy_dataset_embedding`, sigma 0.1 there; 2 / n bounds how far
    one sample moves the mean), drawn once per client from `seed` and the client's id, so a client
    sends the same encoding every round. Not privatized by DP-FedAvg's chain: the noise is the
    encoding's own, without an accountant.
    """

    dim: int = 64  # D, the random features
    seed: int = 0
    noise: float = 0.0

    name = "data_encoding"

    def floats(self, spec, data):
        return self.dim * spec.outputs

    def samples(self, data):
        return data.num_train

    def features(self, inputs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """W, (D, d), and b, (D,), for inputs of d values."""
        generator = torch.Generator().manual_seed(self.seed)
        w = torch.randn(self.dim, inputs, generator=generator) / math.sqrt(inputs)
        b = torch.rand(self.dim, generator=generator) * (2 * math.pi)
        return w, b

    def compute(self, spec, clients, ids=None):
        encodings = self.means(spec, clients)
        if not self.noise:
            return encodings
        ids = range(len(clients)) if ids is None else ids
        return [e + self.perturbation(e, c.num_train, i) for e, c, i in zip(encodings, clients, ids, strict=True)]

    def perturbation(self, encoding: torch.Tensor, n: int, client: int) -> torch.Tensor:
        """pFedHPO's N(0, (2 sigma / n)^2) on each value, from the client's own stream."""
        generator = seeding.torch_generator(self.seed, seeding.ENCODING_NOISE, client)
        noise = torch.randn(encoding.shape, generator=generator) * (2 * self.noise / max(n, 1))
        return noise.to(encoding.device, encoding.dtype)

    def means(self, spec, clients) -> list[torch.Tensor]:
        """The noiseless mean embeddings e of the clients, one batched computation."""
        x = torch.cat([c.x_train for c in clients]).flatten(1).float()
        y = torch.cat([c.y_train for c in clients])
        counts = torch.tensor([c.num_train for c in clients], device=x.device)
        w, b = (t.to(x.device) for t in self.features(x.shape[1]))
        phi = torch.cos(torch.addmm(b, x, w.T)) * math.sqrt(2 / self.dim)
        owner = torch.repeat_interleave(torch.arange(len(clients), device=x.device), counts)
        if not spec.classification:  # a regression's target in place of the one-hot label
            targets = y.float().view(len(y), -1)
            sums = torch.zeros(len(clients), self.dim, targets.shape[1], device=x.device)
            sums.index_add_(0, owner, phi.unsqueeze(2) * targets.unsqueeze(1))
            return [e.flatten().clone() for e in sums / counts.clamp(min=1).view(-1, 1, 1)]
        # Row (client, class) sums the features of that client's samples of that class.
        classes = spec.outputs
        sums = torch.zeros(len(clients) * classes, self.dim, device=x.device).index_add_(0, owner * classes + y, phi)
        means = sums.view(len(clients), classes, self.dim).transpose(1, 2) / counts.clamp(min=1).view(-1, 1, 1)
        return [e.flatten().clone() for e in means]  # own storage: a view would travel with the whole


def data_statistics(
    spec: "ModelSpec", jobs: Sequence["ClientJob"], data: Sequence["ClientData"]
) -> list[dict[str, torch.Tensor]]:
    """Each job's data statistics by name: each statistic computed once for all the clients whose
    jobs ask for it."""
    values: list[dict[str, torch.Tensor]] = [{} for _ in jobs]
    wanted = dict.fromkeys(s for job in jobs for s in job.statistics if isinstance(s, DataStatistic))
    for statistic in wanted:
        asking = [i for i, job in enumerate(jobs) if statistic in job.statistics]
        ids = [jobs[i].client for i in asking]
        for i, value in zip(asking, statistic.compute(spec, [data[i] for i in asking], ids), strict=True):
            values[i][statistic.name] = value
    return values
