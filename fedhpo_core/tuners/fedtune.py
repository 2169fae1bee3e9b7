"""FedTune: differentiable personalized HPO (`../shared/papers/fedtune-differentiable-personalized-hpo.md`,
Algorithm 1, eqs. 3, 5 and 10-12).

Each client i has a categorical distribution pi_i over the H candidate configurations. Each round
(Algorithm 1):
- lines 3-4: draw a one-hot Z_i ~ p(pi_i) and give client i the configuration h_i = Z_i^T H (eq. 3);
- line 6: start from the global model buffer G[h] for the joint configuration h = (h_1 .. h_N);
- lines 9-13: train, aggregate, and store the aggregate in G[h];
- lines 14-16: a credit R_i = -dL/d1_i for a dummy one 1_i on client i's contribution (eq. 12);
- line 18: the policy-gradient step of eq. 11, pi_i <- pi_i - eta grad_pi_i log p(Z_i) dL/d1_i.

pi_i is kept as logits (pi_i = softmax(a_i)), so every step leaves a valid distribution; then
grad_a log p(Z_i = k) = onehot(k) - pi_i and eq. 11 reads a_i <- a_i + eta A_i (onehot(k) - pi_i),
with A_i = R_i in the paper. G[h] is keyed by the joint configuration of the round's clients; a
configuration not yet in the buffer starts from the latest aggregate. D_i / D uses the round's
sampled clients, whose models the server holds.

What the paper leaves open, and the choices here (`FedTune.PAPER` is the faithful reading; the
defaults are what worked on digits and MNIST, docs/methods.md "Round-level methods", and on the planted
problems of `tests/test_planted.py`):
- `credit`: "mixture" (eq. 12 as written: the dummy one scales client i's outputs in the
  sample-weighted mixture of the clients' outputs, L = CE(sum_i D_i/D 1_i theta_i(x), y)),
  "update" (the dummy one scales client i's update in the FedAvg aggregate at the round's start
  model: R_i = -D_i/D <grad L(theta_0), theta_i - theta_0>) or "local" (R_i = -log(after / before)
  of the client's own validation loss around local training, what FedEx's clients report). Measured
  on MNIST (10 Dirichlet-0.1 clients after 5 rounds, each client trained with 15 configurations,
  ranked against the true change of the aggregate's validation loss, mean Spearman over clients):
  mixture 0.45, preferring lr 0.005-0.01 (a non-IID client trained hard is confidently wrong on the
  other clients' classes); update 0.82, but its sign follows whether a client's data agrees with
  the server's validation set, so over rounds it averages out to no preference, and 30-round runs
  ended with clients on lr 0.001; local 0.85, preferring lr 0.1 as the truth does.
- `advantage`: "credit" (A_i = R_i: the paper) or "fitted" (R_i less the baseline of
  `policy.FittedBaseline`, the round's mean plus the client's own and the other settings' running
  effects, in units of the residuals' running RMS, so one step size serves every task and credit).
  Without a baseline every draw whose credit is positive is reinforced, the first draws most.
- `shared`: the clients' logits a_i = b + c_i, a part b shared by all clients and a personal part
  c_i, both moved by eq. 11 (b by the mean over the round's clients, c_i by 1/n of its step). With
  30 rounds and 30 candidates a client draws each candidate about once: alone it cannot learn
  which is better, while b learns from every client's draws. `False` is the paper's per-client pi_i.
- `factorized`: one categorical per setting (the paper allows a fully factorized p(Z_i)) when the
  candidates are a grid: 5 + 6 logits for the paper's 5 x 6 grid instead of 30.
- `eta` 0.5 (1.0 in the paper reading, on raw credits): on the planted problem 1.0 commits some
  runs to the second-best learning rate within 10 rounds; 0.5 puts every client's pi_i on the best.
- The configuration settled on per client: the most likely under its logits (paper), or, with
  "fitted", per setting the most likely value where pi_i has settled on one (0.5 or more), else
  the best by the fitted effects, shared plus the client's own shrunk by 20 pseudo-draws, leaving
  the study's fixed value of a setting only on evidence (`FittedBaseline.best`).
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from fedhpo_core import seeding
from fedhpo_core.models import ModelSpec, load_flat_weights
from fedhpo_core.search.space import client_key
from fedhpo_core.settings import ClientConfig
from fedhpo_core.statistics import VAL_LOSS_AFTER, VAL_LOSS_BEFORE
from fedhpo_core.tuners.base import Tuner
from fedhpo_core.tuners.policy import Factors, FittedBaseline, entropy, softmax

VAL_BATCH = 4096
CREDITS, ADVANTAGES = ("mixture", "update", "local"), ("credit", "fitted")
RMS_DECAY = 0.9  # of the running mean square of the residuals (the fitted advantage's unit)


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


def update_credits(
    spec: ModelSpec, start: torch.Tensor, uploads: Sequence[tuple[torch.Tensor, int]], x: torch.Tensor, y: torch.Tensor
) -> np.ndarray:
    """R_i = -dL/d1_i at 1 = 0 for L = CE(theta_0 + sum_i (D_i/D) 1_i (theta_i - theta_0))(x), y):
    -(D_i/D) <grad L(theta_0), theta_i - theta_0>."""
    model = load_flat_weights(spec.build().to(x.device), start)
    model.eval()
    model.zero_grad()
    for s in range(0, len(y), VAL_BATCH):
        (F.cross_entropy(model(x[s : s + VAL_BATCH]), y[s : s + VAL_BATCH], reduction="sum") / len(y)).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    shares = torch.tensor([n for _, n in uploads], dtype=torch.float64)
    shares = shares / shares.sum()
    alignments = torch.stack([gradient @ (w - start) for w, _ in uploads]).double().cpu()
    return (-shares * alignments).numpy()


class FedTune(Tuner):
    PAPER = {"credit": "mixture", "advantage": "credit", "shared": False, "factorized": False, "eta": 1.0}
    statistics = (VAL_LOSS_BEFORE, VAL_LOSS_AFTER)
    given = ("spec", "server_val")

    def __init__(
        self,
        candidates: Sequence[ClientConfig],
        values: Sequence[Mapping[str, object]],
        clients: int,
        spec: ModelSpec,
        server_val: tuple[torch.Tensor, torch.Tensor],
        seed: int,
        credit: str = "local",
        advantage: str = "fitted",
        shared: bool = True,
        factorized: bool = True,
        eta: float = 0.5,
        fixed: Mapping[str, object] | None = None,
    ):
        """`candidates[k]` is configuration h^k; `values[k]` its search-space values (for `chosen`);
        `fixed` the study's fixed values of the tuned settings (where `chosen` stays without evidence)."""
        assert credit in CREDITS and advantage in ADVANTAGES
        self.candidates, self.values = list(candidates), list(values)
        self.spec, self.server_val, self.seed, self.eta = spec, server_val, seed, eta
        self.credit, self.advantage, self.shared = credit, advantage, shared
        self.factors = Factors(self.values, factorized)
        self.fixed = self.factors.draw_of_values(fixed or {})
        self.common = [np.zeros(size) for size in self.factors.sizes]  # b
        self.personal = [np.zeros((clients, size)) for size in self.factors.sizes]  # c_i
        self.clients = clients
        self.fitted = FittedBaseline(self.factors.sizes)
        self.mean_square = 0.0  # running mean square of the residuals: the advantages' unit
        self.buffer: dict[tuple, torch.Tensor] = {}
        self.draws: dict[int, tuple[int, ...]] = {}
        self.credits: dict[int, float] = {}

    def factor_pi(self, client: int) -> list[np.ndarray]:
        return [softmax(b + c[client]) for b, c in zip(self.common, self.personal, strict=True)]

    @property
    def pi(self) -> np.ndarray:
        """(clients, H): every client's probability of every candidate."""
        return np.stack([self.factors.probabilities(self.factor_pi(i)) for i in range(self.clients)])

    def configure(self, round, clients):
        rng = seeding.numpy_rng(self.seed, seeding.FEDTUNE, round)
        self.draws = {c: tuple(int(rng.choice(len(p), p=p)) for p in self.factor_pi(c)) for c in clients}
        return {c: self.candidates[self.factors.candidate(d)] for c, d in self.draws.items()}

    def key(self) -> tuple:
        return tuple(sorted(self.draws.items()))

    def global_weights(self, configs, weights):
        return self.buffer.get(self.key(), weights)

    def advantages(self, credits: Mapping[int, float]) -> dict[int, list[float]]:
        """Each client's advantage for each setting's step: its credit (the paper), or its credit less
        the fitted baseline, in units of the running RMS of those residuals."""
        if self.advantage == "credit":
            return {client: [credit] * len(self.factors.sizes) for client, credit in credits.items()}
        residuals = self.fitted.residuals(credits, {c: self.draws[c] for c in credits})
        squares = [r**2 for values in residuals.values() for r in values]
        self.mean_square = (
            RMS_DECAY * self.mean_square + (1 - RMS_DECAY) * float(np.mean(squares))
            if self.mean_square
            else float(np.mean(squares))
        )
        scale = math.sqrt(self.mean_square) or 1.0
        return {client: [r / scale for r in values] for client, values in residuals.items()}

    def update(self, advantages: Mapping[int, Sequence[float]]) -> None:
        """Eq. 11 on the logits, a step eta A_i (onehot(Z_i) - pi_i) per client: to c_i alone in the
        paper; shared, to b by the mean over the round's clients and to c_i by 1/n of it."""
        personal_rate = 1 / len(advantages) if self.shared else 1.0
        for f, (common, personal) in enumerate(zip(self.common, self.personal, strict=True)):
            steps = []
            for client, advantage in advantages.items():
                direction = -softmax(common + personal[client])
                direction[self.draws[client][f]] += 1.0
                steps.append(self.eta * advantage[f] * direction)
                personal[client] += personal_rate * steps[-1]
            if self.shared:
                common += np.mean(steps, axis=0)

    def observe(self, report):
        self.buffer[self.key()] = report.weights_after
        if report.diverged:
            self.credits = {}
            return
        self.credits = self.credits_of(report.updates, report.weights_before)
        self.update(self.advantages(self.credits))

    def credits_of(self, updates, start: torch.Tensor) -> dict[int, float]:
        """R_i of each client of the round (only those that report a local validation loss for "local")."""
        if self.credit == "local":
            before = {u.client: u.statistics[VAL_LOSS_BEFORE.name] for u in updates}
            return {
                u.client: -math.log(max(u.val_loss, 1e-12) / before[u.client])
                for u in updates
                if math.isfinite(u.val_loss) and math.isfinite(before[u.client]) and before[u.client] > 0
            }
        uploads = [(u.weights, u.num_samples) for u in updates]
        if self.credit == "mixture":
            credits = mixture_credits(self.spec, uploads, *self.server_val)
        else:
            credits = update_credits(self.spec, start, uploads, *self.server_val)
        return {u.client: float(r) for u, r in zip(updates, credits, strict=True)}

    def state(self):
        """Summaries over clients: mean entropy of pi_i, mean max_k pi_i^k, mean credit of the round."""
        pi = self.pi
        credit = float(np.mean(list(self.credits.values()))) if self.credits else 0.0
        return {
            "fedtune/pi_entropy": float(np.mean([entropy(p) for p in pi])),
            "fedtune/pi_max": float(pi.max(axis=1).mean()),
            "fedtune/credit_mean": credit,
        }

    def client_state(self):
        """The round's clients' pi_i over the candidates and credits R_i (the table grows with the
        clients per round, not with the federation)."""
        return {
            c: {f"fedtune/pi/h_{k}": float(p) for k, p in enumerate(self.factors.probabilities(self.factor_pi(c)))}
            | {"fedtune/credit": credit}
            for c, credit in self.credits.items()
        }

    def chosen(self):
        """Every client's configuration, as per-client values: the most likely under its logits (the
        paper), or, with the fitted advantage, the best by the fitted effects (shared plus the
        client's own, shrunk): what the rounds measured, not where a policy that may have committed
        early ended up."""
        if self.advantage == "fitted":
            best = {
                c: self.factors.candidate(self.fitted.best(c, fixed=self.fixed, distributions=self.factor_pi(c)))
                for c in range(self.clients)
            }
        else:
            best = {
                c: self.factors.candidate(tuple(int(np.argmax(p)) for p in self.factor_pi(c)))
                for c in range(self.clients)
            }
        return {client_key(name, c): value for c, k in best.items() for name, value in self.values[k].items()}
