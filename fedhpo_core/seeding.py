"""Every random stream of a run derives from its seed and a fixed purpose key, so runs repeat."""

import numpy as np
import torch

# One key per independent stream, all of them here: adding a stream never shifts the others.
PARTITION = 1  # clients' shares of the data
SAMPLING = 2  # the clients of each round
CLIENT = 3  # a client's shuffling in a round
INIT = 4  # the initial weights
SPLIT = 5  # the validation split of a dataset without one
SEARCH = 6  # a study's sampler
FEDEX = 7  # FedEx's configuration draws
FEDTUNE = 8  # FedTune's Z_i draws
PBT = 9  # population-based training's exploit and explore, per generation
# 10: retired (step-wise Optuna's own client speeds, now the federation's devices)
DP_NOISE = 11  # DP-FedAvg's noise on a round's aggregate
EVALUATION = 12  # noisy evaluation's clients and Laplace noise, per trial and round
DEVICES = 13  # simulated devices: their profiles, and who is online or drops out in a round
AUTOFEDRL = 14  # Auto-FedRL's policy: its actions per round, and its DRL network's initial weights
ENCODING_NOISE = 15  # the noise a client adds to its data encoding (pFedHPO), per client
FTS = 16  # FTS: the shared random features, the agents' posterior samples and choices
HPN = 17  # pFedHPO's hypernetwork: its initial weights, anchor rounds and configuration draws
CLUSTERED = 18  # clustered experts: k-means's start, the experts' draws and the router's probes
PERSONALIZE = 19  # personalized evaluation: each client's fine-tuning batches
COMPRESSION = 20  # stochastic quantization of a client's upload (and of the server's download), per round


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A NumPy generator for the stream named by `keys` under `seed`."""
    return np.random.default_rng([seed, *keys])


def torch_seed(seed: int, *keys: int) -> int:
    """A 63-bit integer seed for a torch generator, derived like `numpy_rng`."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)[0] >> 1)


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(torch_seed(seed, *keys))
