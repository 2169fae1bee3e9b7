"""FedTune: differentiable personalized HPO (`../shared/papers/fedtune-differentiable-personalized-hpo.md`,
Algorithm 1, eqs. 3, 5 and 10-12).

Each client i has a categorical distribution pi_i over the H candidate configurations. Each round
(Algorithm 1):
- lines 3-4: draw a one-hot Z_i ~ p(pi_i) and give client i the configuration h_i = Z_i^T H (eq. 3);
- line 6: start from the global model buffer G[h] for the joint configuration h = (h_1 .. h_N);
- lines 9-13: train, aggregate, and store the aggregate in G[h];
- lines 14-16: on the server's validation split, the loss of the sample-weighted mixture of the
  client models' outputs, each scaled by a dummy one 1_i:
      L = CE( sum_i (D_i / D) 1_i theta_i(x), y ),
  and the credit R_i = -dL/d1_i (eq. 12) at 1_i = 1;
- line 18: the policy-gradient step of eq. 11, pi_i <- pi_i - eta grad_pi_i log p(Z_i) dL/d1_i.

Choices the paper leaves open, and why:
- pi_i is kept as logits (pi_i = softmax(a_i)), so every step leaves a valid distribution; then
  grad_a log p(Z_i = k) = onehot(k) - pi_i, and eq. 11 reads a_i <- a_i + eta R_i (onehot(k) - pi_i).
- eta (the distribution learning rate) is 1.0: credits are sample-weighted derivatives of a mean
  cross-entropy, of order 0.1 for 10 clients, so a few tens of rounds can move pi_i decisively.
- G[h] is keyed by the joint configuration of the round's clients; a configuration not yet in the
  buffer starts from the latest aggregate (the paper does not say how a new entry starts).
- D_i / D uses the round's sampled clients, whose models the server holds.
"""

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from fedhpo_core import seeding
from fedhpo_core.models import ModelSpec, load_flat_weights
from fedhpo_core.settings import ClientConfig
from fedhpo_core.tuners.base import Tuner

FEDTUNE = 8  # seeding key of the Z_i draws
VAL_BATCH = 4096


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def mixture_credits(
    spec: ModelSpec, uploads: Sequence[tuple[torch.Tensor, int]], x: torch.Tensor, y: torch.Tensor
) -> np.ndarray:
    """R_i = -dL/d1_i at 1 = (1, ..., 1) for L = CE(sum_i (D_i/D) 1_i theta_i(x), y) (eqs. 5, 12)."""
    shares = torch.tensor([n for _, n in uploads], dtype=torch.float32, device=x.device)
    shares = shares / shares.sum()
    ones = torch.ones(len(uploads), requires_grad=True, device=x.device)
    model = spec.build().to(x.device)
    model.eval()
    outputs = []
    with torch.no_grad():
        for weights, _ in uploads:
            load_flat_weights(model, weights)
            outputs.append(torch.cat([model(x[s : s + VAL_BATCH]) for s in range(0, len(y), VAL_BATCH)]))
    stacked = torch.stack(outputs)  # (clients, samples, classes)
    mixture = torch.einsum("c,cnk->nk", shares * ones, stacked)
    F.cross_entropy(mixture, y).backward()
    return (-ones.grad).cpu().numpy()


class FedTune(Tuner):
    def __init__(
        self,
        candidates: Sequence[ClientConfig],
        values: Sequence[Mapping[str, object]],
        clients: int,
        spec: ModelSpec,
        server_val: tuple[torch.Tensor, torch.Tensor],
        seed: int,
        eta: float = 1.0,
    ):
        """`candidates[k]` is configuration h^k; `values[k]` its search-space values (for `chosen`)."""
        self.candidates, self.values = list(candidates), list(values)
        self.spec, self.server_val, self.seed, self.eta = spec, server_val, seed, eta
        self.logits = np.zeros((clients, len(self.candidates)))
        self.buffer: dict[tuple, torch.Tensor] = {}
        self.draws: dict[int, int] = {}
        self.credits: dict[int, float] = {}

    @property
    def pi(self) -> np.ndarray:
        return softmax(self.logits)

    def configure(self, round, clients):
        rng = seeding.numpy_rng(self.seed, FEDTUNE, round)
        pi = self.pi
        self.draws = {c: int(rng.choice(len(self.candidates), p=pi[c])) for c in clients}
        return {c: self.candidates[k] for c, k in self.draws.items()}

    def key(self) -> tuple:
        return tuple(sorted(self.draws.items()))

    def global_weights(self, configs, weights):
        return self.buffer.get(self.key(), weights)

    def update(self, credits: Mapping[int, float]) -> None:
        """Eq. 11 on the logits: a_i += eta R_i (onehot(Z_i) - pi_i)."""
        pi = self.pi
        for client, credit in credits.items():
            direction = -pi[client]
            direction[self.draws[client]] += 1.0
            self.logits[client] += self.eta * credit * direction

    def observe(self, report):
        self.buffer[self.key()] = report.weights_after
        if report.diverged:
            self.credits = {}
            return
        uploads = [(u.weights, u.num_samples) for u in report.updates]
        credits = mixture_credits(self.spec, uploads, *self.server_val)
        self.credits = {u.client: float(r) for u, r in zip(report.updates, credits, strict=True)}
        self.update(self.credits)

    def state(self):
        """Summaries over clients: mean entropy of pi_i, mean max_k pi_i^k, mean credit of the round."""
        pi = self.pi
        entropy = -(pi * np.log(np.clip(pi, 1e-300, None))).sum(axis=1)
        credit = float(np.mean(list(self.credits.values()))) if self.credits else 0.0
        return {
            "fedtune/pi_entropy": float(entropy.mean()),
            "fedtune/pi_max": float(pi.max(axis=1).mean()),
            "fedtune/credit_mean": credit,
        }

    def client_state(self):
        """The round's clients' pi_i over the candidates and credits R_i (eq. 11 moves no other pi_i,
        so a client's distribution is its latest row: the table grows with the clients per round,
        not with the federation)."""
        pi = self.pi
        return {
            c: {f"fedtune/pi/h_{k}": float(pi[c, k]) for k in range(pi.shape[1])} | {"fedtune/credit": credit}
            for c, credit in self.credits.items()
        }

    def chosen(self):
        """argmax_k pi_i^k for every client, as per-client search-space values."""
        best = self.pi.argmax(axis=1)
        return {f"{name}/client_{c}": value for c, k in enumerate(best) for name, value in self.values[k].items()}
