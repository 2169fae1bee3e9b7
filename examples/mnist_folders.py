"""A custom convolutional network on MNIST read from a folder with one subfolder per client.

The federation's data is a folder of PNG files in the layout `fedhpo` reads for `--task FOLDER`
(`fedhpo_core.task.FolderTask`): `<folder>/<client>/<class>/<n>.png`. This example writes that
layout once from MNIST's training images: 10 clients ("client_00" .. "client_09") of 100 to 300
images each, with a label skew (each client's class mix drawn from a Dirichlet distribution with
concentration 0.5), then reads it back through `FolderTask`'s reader, so every image the
federation sees went through the per-client folder layout. 20% of each client's images are the
fixed test split; the partition is "natural": the folder's own clients.

Where the folder is written: `$FEDHPO_EXAMPLES_CACHE/mnist_folders` when that variable is set,
else `examples/.cache/mnist_folders` next to this file (ignored by git). It is written once
(about 2,000 small PNG files, a few seconds) and reused; delete it to rebuild it. MNIST itself is
read from `--data-root` in torchvision's layout (`MNIST/raw/...`), downloaded there if missing.

The model, `SmallCNN`, is an `nn.Module` of its own (not an `nn.Sequential`) whose forward is a
chain of layers the cohort engine knows: it lowers it (torch.fx) to its built-in batched kernel.

Run from the repository root (with MNIST under ../shared/data):

    fedhpo tune --task examples/mnist_folders.py --data-root ../shared/data --budget 60 --n-configs 4 --final-rounds 20
"""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedhpo_core.task import FolderTask, Task

CLIENTS = 10
IMAGES_PER_CLIENT = (100, 300)  # drawn uniformly, both ends included
ALPHA = 0.5  # Dirichlet concentration of each client's class mix (smaller: more skew)
SEED = 0  # the folder's contents: the same files on every machine


def cache_folder() -> Path:
    """Where the per-client folder lives: $FEDHPO_EXAMPLES_CACHE/mnist_folders, else next to this file."""
    base = os.environ.get("FEDHPO_EXAMPLES_CACHE")
    return (Path(base) if base else Path(__file__).resolve().parent / ".cache") / "mnist_folders"


def write_folders(root: str, folder: Path) -> None:
    """MNIST training images as `folder/client_XX/<digit>/<n>.png`, written to a temporary sibling
    and renamed into place, so a process never sees half a folder."""
    from PIL import Image
    from torchvision.datasets import MNIST

    mnist = MNIST(root, train=True, download=True)  # reads the files when they are there
    images, labels = mnist.data.numpy(), mnist.targets.numpy()
    rng = np.random.default_rng(SEED)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(10)]
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{folder.name}.partial-", dir=folder.parent))
    try:
        for client in range(CLIENTS):
            size = int(rng.integers(IMAGES_PER_CLIENT[0], IMAGES_PER_CLIENT[1] + 1))
            counts = rng.multinomial(size, rng.dirichlet(np.full(10, ALPHA)))
            for digit, count in enumerate(counts):
                if count == 0:
                    continue
                target = partial / f"client_{client:02d}" / str(digit)
                target.mkdir(parents=True)
                for n in range(count):
                    Image.fromarray(images[pools[digit].pop()]).save(target / f"{n}.png")
        try:
            partial.rename(folder)
        except OSError:  # another process wrote it first: theirs is the same
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (8 and 16 maps), each followed by ReLU and 2x2 max pooling, then a
    linear layer over the flattened maps."""

    def __init__(self, input_shape: tuple[int, ...], outputs: int):
        super().__init__()
        channels, height, width = input_shape
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * (height // 4) * (width // 4), outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


class MnistFolders(Task):
    """MNIST as 10 clients' image folders, learned by `SmallCNN`."""

    name = "mnist_folders"

    def load(self, root):
        folder = cache_folder()
        if not folder.is_dir():
            write_folders(root, folder)
        return FolderTask(str(folder)).load(root)

    def model(self, input_shape, outputs):
        return SmallCNN(input_shape, outputs)


mnist_folders = MnistFolders()
