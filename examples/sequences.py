"""A sequence model over token ids: which DNA motif does a sequence carry?

The data is generated here, deterministically (nothing is read or downloaded): sequences of 48
bases (A, C, G, T as token ids 0..3), each carrying one of four 6-base motifs (TATAAT, GGGCGG,
CACGTG, TTGACA) at a random position; the motif is the class. Eight clients, as if eight labs
sequenced their own samples, hold 150 to 400 sequences each and differ in three ways: their
class mix (a Dirichlet draw, concentration 1), the GC content of the background (30% to 70%)
and how often a motif's base is misread (0% to 20%). The partition is "natural": the labs'
own data; 20% of each lab's sequences are the fixed test split.

The model, `MotifCNN`, embeds the ids (`nn.Embedding`), runs a 1-D convolution as wide as a
motif over them, keeps each filter's maximum over the sequence and maps those to the classes.
It is an `nn.Module` of its own taking integer inputs, and the cohort engine batches a round's
clients through torch.func's vmap of it (no fallback to the sequential engine).

Run from the repository root:

    fedhpo tune --task examples/sequences.py --budget 60 --n-configs 4 --final-rounds 20
"""

import numpy as np
import torch
from torch import nn

from fedhpo_core.data import Dataset
from fedhpo_core.task import Task

BASES = "ACGT"
MOTIFS = ("TATAAT", "GGGCGG", "CACGTG", "TTGACA")
LENGTH = 48
LABS = 8
SEQUENCES_PER_LAB = (150, 400)  # drawn uniformly, both ends included
TEST_FRACTION = 0.2  # of each lab's sequences
SEED = 0  # the data: the same sequences on every machine


def lab_sequences(rng: np.random.Generator, n: int, mix, gc: float, misread: float) -> tuple[np.ndarray, np.ndarray]:
    """n sequences of one lab: (n, LENGTH) base ids and (n,) motif classes."""
    background = np.array([(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2])  # A, C, G, T
    x = rng.choice(len(BASES), size=(n, LENGTH), p=background)
    y = rng.choice(len(MOTIFS), size=n, p=mix)
    motifs = np.array([[BASES.index(b) for b in m] for m in MOTIFS])
    width = motifs.shape[1]
    starts = rng.integers(0, LENGTH - width + 1, size=n)
    for i in range(n):
        motif = motifs[y[i]].copy()
        wrong = rng.random(width) < misread
        motif[wrong] = rng.integers(0, len(BASES), size=int(wrong.sum()))
        x[i, starts[i] : starts[i] + width] = motif
    return x, y


def generate() -> Dataset:
    """The eight labs' training sequences (with each one's lab as its group) and the pooled test ones."""
    rng = np.random.default_rng(SEED)
    train_x, train_y, groups, test_x, test_y = [], [], [], [], []
    for lab in range(LABS):
        n = int(rng.integers(SEQUENCES_PER_LAB[0], SEQUENCES_PER_LAB[1] + 1))
        mix = rng.dirichlet(np.ones(len(MOTIFS)))
        x, y = lab_sequences(rng, n, mix, gc=rng.uniform(0.3, 0.7), misread=rng.uniform(0.0, 0.2))
        held = int(round(n * TEST_FRACTION))  # the rows are random draws: the first ones are a random split
        test_x.append(x[:held]), test_y.append(y[:held])
        train_x.append(x[held:]), train_y.append(y[held:]), groups.append(np.full(n - held, lab))
    ids = lambda parts: torch.tensor(np.concatenate(parts), dtype=torch.int64)  # noqa: E731
    return Dataset(
        "sequences",
        ids(train_x),
        ids(train_y),
        ids(test_x),
        ids(test_y),
        outputs=len(MOTIFS),
        groups=np.concatenate(groups),
        group_names=tuple(f"lab_{lab}" for lab in range(LABS)),
    )


class MotifCNN(nn.Module):
    """Embedding (16 dimensions per base), a Conv1d of 32 filters as wide as a motif, ReLU, the
    maximum of each filter over the sequence, and a linear layer to the classes."""

    def __init__(self, vocabulary: int, outputs: int, width: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, 16)
        self.conv = nn.Conv1d(16, 32, width)
        self.head = nn.Linear(32, outputs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).transpose(1, 2)  # (batch, 16, length)
        h = torch.relu(self.conv(h)).amax(dim=2)  # (batch, 32): each filter's best match
        return self.head(h)


class Sequences(Task):
    """Motif classification of DNA-like sequences held by eight labs."""

    name = "sequences"

    def load(self, root):
        return generate()

    def model(self, input_shape, outputs):
        return MotifCNN(len(BASES), outputs, len(MOTIFS[0]))


sequences = Sequences()
