"""Every random stream of a run derives from its seed and a fixed purpose key, so runs repeat."""

import numpy as np
import torch

# One key per independent stream: adding a stream never shifts the others.
PARTITION, SAMPLING, CLIENT, INIT, SPLIT = 1, 2, 3, 4, 5


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A NumPy generator for the stream named by `keys` under `seed`."""
    return np.random.default_rng([seed, *keys])


def torch_seed(seed: int, *keys: int) -> int:
    """A 63-bit integer seed for a torch generator, derived like `numpy_rng`."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)[0] >> 1)


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(torch_seed(seed, *keys))
