"""The cohort engine: a round's clients trained as one computation.

Every model parameter is stacked along a leading client axis, (k, *shape). A step runs every
active client's mini-batch through one batched forward and backward and applies each client's own
SGD settings as per-client columns. It is the sequential engine's algorithm
(`fedhpo_core.client.train_locally`), step for step:

- the same seeded shuffles: each client draws one `randperm` per epoch from its job's generator,
  so it sees the same batches in the same order;
- the same loss: each client's batch mean (a partial last batch is padded with weight-0 samples);
- torch.optim.SGD's update with FedProx's term (Li et al. 2020, eq. 2) and SCAFFOLD's correction
  c - c_i (Karimireddy et al. 2020, Algorithm 1, line 10; zero without SCAFFOLD):
  g = grad + mu (w - w_global) + (c - c_i) + wd w,  b = momentum b + g (b = g without momentum),
  w -= lr b;
- each client's `LocalSchedule` (a tuner's learning rate per local step), run for all clients
  whose schedules share a class at once.

Clients whose datasets, local epochs or step fractions (a fidelity's cap on local steps:
`fedhpo_core.client.local_steps`) differ take different numbers of steps: the cohort is
ordered by steps, so the clients still training are always a prefix of the stack and a finished
client costs nothing. Clients of different batch sizes train in separate cohorts (padding every
batch to the largest would cost its size for all), and a cohort holds at most as many clients as
`COHORT_BYTES` allows. Results agree with the sequential engine up to float rounding (the order of
sums inside batched kernels, the update's arithmetic): `tests/test_cohort.py` bounds the
difference. They are the same bit for bit for the same cohorts and threads; with several threads
MKL splits a small batch of matrix products differently from a large one, so a client's weights
depend in their last bits on how many clients share its cohort (a Dask share, a memory split).
A client whose loss turns non-finite trains to the end of its schedule (the sequential engine
stops at the end of that epoch); either way its loss marks the round diverged.

Kernels (measured with `bench/bench_cohort.py`; `kernel_name` picks the fastest that runs a model):
- `vmap`, the general path: torch.func's vmap of the module's functional call, autograd backward;
- `batched`, our own forward for chains of Linear, Conv2d, ReLU, MaxPool2d and Flatten
  (grouped convolutions, batched matrix products), autograd backward: a Sequential of them, or
  any module whose forward torch.fx finds to be such a chain (`as_chain`);
- `linear`, our own forward and backward for Flatten/Linear/ReLU stacks (the MLP): each weight
  gradient is a batched product that plain SGD accumulates straight into the weights (one
  `baddbmm_`), never materialized.
"""

import bisect
import functools
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedhpo_core.client import (
    STEPS_BETWEEN_CHECKS,
    ClientData,
    ClientJob,
    ClientUpdate,
    RunningSchedules,
    between_steps,
    local_steps,
    reported,
    train_sequentially,
)
from fedhpo_core.models import ModelSpec
from fedhpo_core.statistics import VAL_LOSS_BEFORE, data_statistics
from fedhpo_core.task import default_loss

COHORT_BYTES = 2 * 2**30  # memory one cohort may take (parameters, optimizer state, activations)
EVAL_ROWS = 4096  # samples per batched forward in local validation


def column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-client values shaped to broadcast over a (k, ...) tensor."""
    return values.view(-1, *[1] * (like.ndim - 1))


def gather(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """pool[rows] for a (k, b) index, through index_select (several times faster than indexing)."""
    return pool.flatten(1).index_select(0, rows.flatten()).view(*rows.shape, *pool.shape[1:])


def per_parameter(flat: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
    """Flat vectors stacked, (k, P), as views of each parameter's stack, (k, *shape)."""
    shapes = parameter_shapes(spec)
    parts = flat.split([shape.numel() for shape in shapes], dim=1)
    return [part.view(len(flat), *shape) for part, shape in zip(parts, shapes, strict=True)]


@functools.lru_cache(maxsize=16)
def parameter_shapes(spec: ModelSpec) -> tuple[torch.Size, ...]:
    return tuple(p.shape for p in spec.build().parameters())


class CohortSGD:
    """torch.optim.SGD with FedProx's proximal term and SCAFFOLD's correction over a cohort's
    stacked parameters, each client with its own lr, momentum, weight decay, mu and correction.

    Call `begin(k, lrs)` before each step of the first k clients (with their learning rates for
    the step), then `update` or `update_product` once for every parameter; `changes` then holds the
    step's change of each parameter (by index) where local schedules need them."""

    def __init__(
        self,
        jobs: Sequence[ClientJob],
        anchors: list[torch.Tensor],
        keep_changes: bool,
        corrections: list[torch.Tensor] | None = None,
    ):
        device = anchors[0].device

        def setting(name):
            return torch.tensor([float(getattr(job.config, name)) for job in jobs], device=device)

        self.momentum, self.weight_decay, self.mu = setting("momentum"), setting("weight_decay"), setting("mu")
        self.anchors, self.keep_changes, self.corrections = anchors, keep_changes, corrections
        self.with_momentum = bool((self.momentum > 0).any())
        self.with_decay, self.with_prox = bool((self.weight_decay > 0).any()), bool((self.mu > 0).any())
        shapes = [a.shape[1:] for a in anchors] if self.with_momentum else []
        self.buffers = [torch.zeros(len(jobs), *shape, device=device) for shape in shapes]

    def begin(self, k: int, lrs: torch.Tensor) -> None:
        self.k, self.lr, self.changes = k, lrs, {}

    def update(self, i: int, w: torch.Tensor, grad: torch.Tensor) -> None:
        """w -= lr b for parameter i's gradient."""
        k, g = self.k, grad
        if self.with_prox:
            g = g + column(self.mu[:k], w) * (w - self.anchors[i])
        if self.corrections:
            g = g + self.corrections[i][:k]
        if self.with_decay:
            g = g + column(self.weight_decay[:k], w) * w
        if self.with_momentum:
            g = self.buffers[i][:k].mul_(column(self.momentum[:k], w)).add_(g)
        if self.keep_changes:
            self.changes[i] = column(-self.lr, g) * g
        w.addcmul_(column(-self.lr, w), g)

    def update_product(self, i: int, w: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        """The same for a weight whose gradient is left^T right ((k, b, out), (k, b, in)): without
        momentum or kept changes, w (1 - lr (wd + mu)) + lr mu w_global - lr (c - c_i) is accumulated
        with -lr left^T right in one batched product."""
        if self.with_momentum or self.keep_changes:
            return self.update(i, w, torch.bmm(left.transpose(1, 2), right))
        k = self.k
        if self.with_decay or self.with_prox:
            w.mul_(column(1 - self.lr * (self.weight_decay[:k] + self.mu[:k]), w))
        if self.with_prox:
            w.addcmul_(column(self.lr * self.mu[:k], w), self.anchors[i])
        if self.corrections:
            w.addcmul_(column(-self.lr, w), self.corrections[i][:k])
        w.baddbmm_(left.transpose(1, 2), right * column(-self.lr, right))


class Kernel(ABC):
    """A model's batched forward (`forward`) and training step (`step`: default, autograd through
    the forward). Parameters are (k, *shape); inputs (k, b, *input_shape); logits (k, b, classes)."""

    def __init__(self, module: nn.Module, loss=default_loss):
        self.module, self.loss = module, loss

    @abstractmethod
    def forward(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Every client's logits for its inputs."""

    def step(self, params, x, y, sample_weights, sgd: CohortSGD) -> torch.Tensor:
        """One SGD step of every client on its batch; returns each client's batch mean loss."""
        w = [p.detach().requires_grad_() for p in params]
        logits = self.forward(w, x)
        losses = self.loss(logits.flatten(0, 1), y.flatten(0, 1)).view(y.shape[:2])
        loss = (losses * sample_weights).sum(1)
        grads = torch.autograd.grad(loss.sum(), w)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                sgd.update(i, p, g)
        return loss.detach()


class VmapKernel(Kernel):
    """The general path: vmap over the client axis of the module's functional call."""

    def __init__(self, module: nn.Module, loss=default_loss):
        super().__init__(module, loss)
        names = [name for name, _ in module.named_parameters()]

        def one_client(params, x):
            return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (x,))

        self.batched = torch.func.vmap(one_client)

    def forward(self, params, x):
        return self.batched(params, x)


BATCHED_LAYERS = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten)


class BatchedKernel(Kernel):
    """Our own forward for a Sequential of Linear, Conv2d, ReLU, MaxPool2d and Flatten: convolutions
    as one grouped convolution (groups = k) on a (b, k * channels, H, W) layout, linear layers as one
    batched matrix product over (k, b, features)."""

    layers_known = BATCHED_LAYERS

    def __init__(self, module: nn.Module, loss=default_loss):
        super().__init__(module, loss)
        unknown = {type(layer).__name__ for layer in module if not isinstance(layer, self.layers_known)}
        if unknown:
            raise ValueError(f"{type(self).__name__} cannot run {', '.join(sorted(unknown))}")

    def forward(self, params, x):
        k, b = x.shape[:2]
        h, grouped = x, False  # grouped: h is (b, k * channels, H, W)
        weights = iter(params)
        for layer in self.module:
            if isinstance(layer, nn.Conv2d):
                if not grouped:  # channels-last: mkldnn's grouped convolutions run ~1.5x faster on it
                    h = h.transpose(0, 1).reshape(b, k * h.shape[2], *h.shape[3:])
                    h, grouped = h.contiguous(memory_format=torch.channels_last), True
                w, bias = next(weights), next(weights)
                h = F.conv2d(
                    h, w.reshape(-1, *w.shape[2:]), bias.reshape(-1), layer.stride, layer.padding, layer.dilation, k
                )
            elif isinstance(layer, nn.MaxPool2d):
                h = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode)
            elif isinstance(layer, nn.ReLU):
                h = F.relu(h)
            elif isinstance(layer, nn.Flatten):
                h, grouped = (h.reshape(b, k, -1).transpose(0, 1) if grouped else h.flatten(2)), False
            else:
                w, bias = next(weights), next(weights)
                h = torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2))
        return h


class LinearKernel(BatchedKernel):
    """Flatten/Linear/ReLU stacks with our own backward: the loss gradient at the logits is
    (softmax - onehot) x sample weight; each Linear's weight gradient d^T h_in goes to
    `CohortSGD.update_product`, its input gradient d W (before W moves) continues backwards."""

    layers_known = (nn.Linear, nn.ReLU, nn.Flatten)

    def step(self, params, x, y, sample_weights, sgd):
        h = x.flatten(2)
        saved = []  # ("linear", input, parameter index) or ("relu", output)
        weights = 0
        with torch.no_grad():
            for layer in self.module:
                if isinstance(layer, nn.Linear):
                    saved.append(("linear", h, weights))
                    h = torch.baddbmm(params[weights + 1].unsqueeze(1), h, params[weights].transpose(1, 2))
                    weights += 2
                elif isinstance(layer, nn.ReLU):
                    h = F.relu(h)
                    saved.append(("relu", h, None))
            log_p = F.log_softmax(h, dim=-1)
            losses = -log_p.gather(2, y.unsqueeze(2)).squeeze(2)
            d = log_p.exp_()
            d.scatter_add_(2, y.unsqueeze(2), torch.full_like(d[..., :1], -1.0)).mul_(sample_weights.unsqueeze(2))
            for kind, tensor, index in reversed(saved):
                if kind == "relu":
                    d = d * (tensor > 0)
                    continue
                below = torch.bmm(d, params[index]) if index else None
                sgd.update_product(index, params[index], d, tensor)
                sgd.update(index + 1, params[index + 1], d.sum(1))
                d = below
        return (losses * sample_weights).sum(1)


KERNEL_CLASSES = {"vmap": VmapKernel, "batched": BatchedKernel, "linear": LinearKernel}
KERNELS: dict[str, str] = {}  # a kernel forced for a model name (benchmarks and tests compare them)


def kernel_name(spec: ModelSpec) -> str:
    """The fastest kernel that runs the spec's model: `linear` for Flatten/Linear/ReLU chains
    trained on the default loss with class labels (its backward is softmax cross-entropy's),
    `batched` for chains of the layers it knows (a Sequential, or any module whose forward is such
    a chain: `as_chain`), `vmap` for any other module."""
    return KERNELS.get(spec.name) or _fastest_kernel(spec)


@functools.lru_cache(maxsize=16)
def _fastest_kernel(spec: ModelSpec) -> str:
    chain = as_chain(spec.build())
    if chain is None:
        return "vmap"
    if spec.classification and spec.default_loss and all(isinstance(m, LinearKernel.layers_known) for m in chain):
        return "linear"
    return "batched"


def as_chain(module: nn.Module) -> nn.Sequential | None:
    """The module as a Sequential of the layers our kernels run, when its forward is a chain of
    them (each step taking only the step before's output, found by torch.fx) and its parameters
    are registered in the chain's order, so that its flat weights mean the same to the Sequential;
    else None. Layers: Linear and Conv2d with biases (Conv2d ungrouped), ReLU, MaxPool2d, and
    Flatten from dimension 1 (modules, or F.relu, F.max_pool2d, torch.flatten, .relu(), .flatten(1))."""
    if isinstance(module, nn.Sequential):
        return module if all(_known(m) for m in module) else None
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # fx cannot trace it (control flow on the data, say): not a chain we know
        return None
    layers: list[nn.Module] = []
    previous = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                return None
            previous = node
            continue
        if node.op == "output":
            return _same_parameters(nn.Sequential(*layers), module) if node.args[0] is previous else None
        others = [*node.args[1:], *node.kwargs.values()]
        if node.args[:1] != (previous,) or any(isinstance(a, torch.fx.Node) for a in others):
            return None
        layer = _layer_of(module, node)
        if layer is None or layer in layers:  # a module called twice would take its weights twice
            return None
        layers.append(layer)
        previous = node
    return None


def _known(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear | nn.Conv2d):
        return layer.bias is not None and getattr(layer, "groups", 1) == 1
    if isinstance(layer, nn.Flatten):
        return layer.start_dim == 1 and layer.end_dim == -1
    if isinstance(layer, nn.MaxPool2d):
        return not layer.return_indices
    return isinstance(layer, nn.ReLU)


def _layer_of(module: nn.Module, node) -> nn.Module | None:
    """The layer a traced step is, if our kernels know it."""
    args, kwargs = node.args[1:], node.kwargs
    if node.op == "call_module":
        layer = module.get_submodule(node.target)
    elif node.target in (F.relu, torch.relu, "relu") and not args and not kwargs.get("inplace"):
        layer = nn.ReLU()
    elif node.target in (torch.flatten, "flatten"):
        start = args[0] if args else kwargs.get("start_dim", 0)
        layer = nn.Flatten(start, args[1] if len(args) > 1 else kwargs.get("end_dim", -1))
    elif node.target is F.max_pool2d:
        layer = nn.MaxPool2d(*args, **kwargs)
    else:
        return None
    return layer if _known(layer) else None


def _same_parameters(chain: nn.Sequential, module: nn.Module) -> nn.Sequential | None:
    same = [id(p) for p in chain.parameters()] == [id(p) for p in module.parameters()]
    return chain if same else None


_kernels = threading.local()


def kernel_for(spec: ModelSpec) -> Kernel:
    """The spec's kernel (`kernel_name`), built once per thread: torch.func's functional call swaps
    a module's parameters while it runs, so threads must not share one."""
    built = _kernels.__dict__.setdefault("built", {})
    key = (spec, kernel_name(spec))
    if key not in built:
        module = spec.build()
        built[key] = KERNEL_CLASSES[key[1]](module if key[1] == "vmap" else as_chain(module), spec.loss)
    return built[key]


@functools.lru_cache(maxsize=16)
def cohort_refusal(spec: ModelSpec) -> str | None:
    """Why the cohort engine cannot batch the spec's model (None when it can): batch normalization
    in training mode mixes a client's samples through statistics vmap cannot keep per client, and
    vmap refuses data-dependent control flow; found by one batched step of two clients."""
    module = spec.build()
    norms = [type(m).__name__ for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        return f"{norms[0]} (batch normalization in training mode) has statistics vmap cannot keep per client"
    if kernel_name(spec) != "vmap":
        return None
    kernel = VmapKernel(module, spec.loss)
    params = [p.detach().unsqueeze(0).expand(2, *p.shape).clone() for p in module.parameters()]
    x = spec.example_input(2, 2)
    y = torch.zeros(2, 2) if not spec.classification else torch.zeros(2, 2, dtype=torch.long)
    try:
        logits = kernel.forward([p.requires_grad_() for p in params], x)
        kernel.loss(logits.flatten(0, 1), y.flatten(0, 1)).sum().backward()
    except Exception as error:  # vmap's refusals: data-dependent control flow, in-place ops on batched tensors
        return f"torch.func.vmap cannot batch {type(module).__name__}: {' '.join(str(error).split())[:200]}"
    return None


@functools.lru_cache(maxsize=8)
def activations_per_sample(spec: ModelSpec) -> int:
    """Floats one sample's forward leaves for the backward (every leaf module's output)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        total += sum(t.numel() for t in (output if isinstance(output, tuple) else (output,)) if torch.is_tensor(t))

    model = spec.build()
    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(spec.example_input(1))
    for hook in hooks:
        hook.remove()
    return total


def clients_per_cohort(spec: ModelSpec, batch_size: int) -> int:
    """How many clients fit `COHORT_BYTES`: per client, its parameters, gradients, momentum and
    a local schedule's state (4 copies) and its batch's activations with their gradients (2 copies)."""
    per_client = 4 * (4 * spec.size + 2 * batch_size * activations_per_sample(spec))
    return max(1, COHORT_BYTES // per_client)


def batches(data: ClientData, job: ClientJob) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's batches as (steps, batch_size) pool rows, and each sample's loss weight: 1 / (the
    step's sample count), 0 where a partial last batch is padded (with its first row). Its steps are
    `local_steps`': under a `step_fraction` cap, the first of the full run's, only the epochs they
    reach shuffled."""
    n, size = data.num_train, job.config.batch_size
    per_epoch = -(-n // size)
    pad = per_epoch * size - n
    total = local_steps(n, job.config)
    epochs = -(-total // per_epoch)  # local_epochs without a cap
    generator = job.generator
    orders = []
    for epoch in range(epochs):
        if epoch % STEPS_BETWEEN_CHECKS == 0:
            between_steps()
        order = torch.randperm(n, generator=generator)
        orders.append(torch.cat([order, order[:1].expand(pad)]) if pad else order)
    counts = torch.full((per_epoch, 1), float(size))
    counts[-1] = n - (per_epoch - 1) * size
    weights = torch.where(torch.arange(size) < counts, 1.0 / counts, 0.0).repeat(epochs, 1)
    rows = data.train[torch.cat(orders).to(data.train.device)].view(-1, size)
    if total < len(rows):
        rows, weights = rows[:total], weights[:total]
    return rows, weights.to(data.x.device)


def pooled(data: Sequence[ClientData]) -> list[ClientData]:
    """The clients over one pool: as they are when they share one (clients of a federation do),
    else over their pools concatenated."""
    if all(d.x is data[0].x and d.y is data[0].y for d in data):
        return list(data)
    x, y = torch.cat([d.x for d in data]), torch.cat([d.y for d in data])
    clients, offset = [], 0
    for d in data:
        clients.append(ClientData(x, y, d.train + offset, d.val + offset))
        offset += len(d.y)
    return clients


def train_cohort(
    spec: ModelSpec, global_weights: torch.Tensor, jobs: Sequence[ClientJob], data: Sequence[ClientData]
) -> list[ClientUpdate]:
    """Every job's client trained from `global_weights`, in cohorts of one batch size; updates in
    job order. A model the cohort engine cannot batch (`cohort_refusal`) trains client after client."""
    if cohort_refusal(spec):
        return train_sequentially(spec, global_weights, jobs, data)
    data = pooled(data) if data else []
    by_batch: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        by_batch.setdefault(job.config.batch_size, []).append(i)
    updates: dict[int, ClientUpdate] = {}
    for size, members in by_batch.items():
        most = clients_per_cohort(spec, size)
        for start in range(0, len(members), most):
            chunk = members[start : start + most]
            cohort = Cohort(spec, global_weights, [jobs[i] for i in chunk], [data[i] for i in chunk])
            updates.update(zip(chunk, cohort.train(), strict=True))
    return [updates[i] for i in range(len(jobs))]


class Cohort:
    """Clients of one batch size over one data pool, trained together from the same weights."""

    def __init__(self, spec: ModelSpec, start: torch.Tensor, jobs: Sequence[ClientJob], data: Sequence[ClientData]):
        plans = [batches(d, job) for d, job in zip(data, jobs, strict=True)]
        # Most steps first (stable), so the clients still training are a prefix of the stack.
        self.order = sorted(range(len(jobs)), key=lambda i: -len(plans[i][0]))
        self.jobs, self.data = [jobs[i] for i in self.order], [data[i] for i in self.order]
        self.kernel, self.spec, self.start = kernel_for(spec), spec, start
        device, k, size = start.device, len(jobs), jobs[0].config.batch_size
        self.steps = torch.tensor([len(plans[i][0]) for i in self.order])
        self.rows = torch.zeros(k, int(self.steps[0]), size, dtype=torch.long, device=device)
        self.sample_weights = torch.zeros(k, int(self.steps[0]), size, device=device)
        for slot, i in enumerate(self.order):
            rows, weights = plans[i]
            self.rows[slot, : len(rows)], self.sample_weights[slot, : len(rows)] = rows, weights

    def corrections(self) -> list[torch.Tensor] | None:
        """Each parameter's SCAFFOLD correction c - c_i stacked for the cohort, (k, *shape); None
        without SCAFFOLD."""
        if self.jobs[0].controls is None:
            return None
        return per_parameter(torch.stack([job.controls.correction for job in self.jobs]), self.spec)

    def train(self) -> list[ClientUpdate]:
        """Every client's update, with the statistics its job asks for: the start weights' validation
        loss by one batched validation (only when some job asks for it), each data statistic by one
        call for the clients asking."""
        k_all = len(self.jobs)
        anchors = per_parameter(self.start.unsqueeze(0), self.spec)  # the start weights, (1, *shape)
        params = [a.expand(k_all, *a.shape[1:]).clone() for a in anchors]
        computed = data_statistics(self.spec, self.jobs, self.data)
        if any(VAL_LOSS_BEFORE in job.statistics for job in self.jobs):
            for values, before in zip(computed, self.validate(params)[0], strict=True):
                values[VAL_LOSS_BEFORE.name] = before
        lr = torch.tensor([job.config.lr for job in self.jobs], device=self.start.device)
        rates = CohortRates(self.jobs, lr)
        sgd = CohortSGD(self.jobs, anchors, keep_changes=bool(rates.scheduled), corrections=self.corrections())
        x_pool, y_pool = self.data[0].x, self.data[0].y
        loss_sum = torch.zeros(k_all, device=self.start.device)
        lr_sum = torch.zeros(k_all, device=self.start.device, dtype=torch.float64)
        for step in range(int(self.steps[0])):
            k = int((self.steps > step).sum())
            rows = self.rows[:k, step]
            sgd.begin(k, rates.rates[:k])
            loss = self.kernel.step(
                [p[:k] for p in params], gather(x_pool, rows), y_pool[rows], self.sample_weights[:k, step], sgd
            )
            lr_sum[:k] += rates.rates[:k]
            rates.after_step(step, k, sgd.changes)
            loss_sum[:k] += loss
            if step % STEPS_BETWEEN_CHECKS == 0:
                between_steps()
        flat = torch.cat([p.reshape(k_all, -1) for p in params], dim=1)
        train_loss = (loss_sum / self.steps.to(loss_sum.device)).tolist()
        lr_sums = lr_sum.tolist()
        val_loss, val_score = self.validate(params)
        updates = {}
        for slot, (job, data) in enumerate(zip(self.jobs, self.data, strict=True)):
            finite = math.isfinite(train_loss[slot])
            loss_after = val_loss[slot] if finite else math.nan
            updates[self.order[slot]] = ClientUpdate(
                client=job.client,
                weights=flat[slot],
                num_samples=data.num_train,
                train_loss=train_loss[slot],
                val_loss=loss_after,
                val_score=val_score[slot] if finite else math.nan,
                num_val=data.num_val,
                control_delta=job.controls.delta(self.start, flat[slot], lr_sums[slot]) if job.controls else None,
                statistics=reported(job, computed[slot], loss_after),
            )
        return [updates[i] for i in range(k_all)]

    @torch.no_grad()
    def validate(self, params: list[torch.Tensor]) -> tuple[list[float], list[float]]:
        """Each client's mean loss and score on its local validation split (nan if empty)."""
        k, device = len(self.jobs), self.start.device
        sizes = torch.tensor([d.num_val for d in self.data], device=device)
        width = int(sizes.max())
        if width == 0:
            return [math.nan] * k, [math.nan] * k
        rows = torch.zeros(k, width, dtype=torch.long, device=device)
        for slot, d in enumerate(self.data):
            rows[slot, : d.num_val] = d.val
        mask = torch.arange(width, device=device) < sizes.unsqueeze(1)
        loss_sum = torch.zeros(k, device=device, dtype=torch.float64)
        score_sum = torch.zeros(k, device=device, dtype=torch.float64)
        chunk = max(1, EVAL_ROWS // k)
        x_pool, y_pool = self.data[0].x, self.data[0].y
        for start in range(0, width, chunk):
            part, keep = rows[:, start : start + chunk], mask[:, start : start + chunk]
            logits = self.kernel.forward(params, gather(x_pool, part))
            target = y_pool[part]
            flat_logits, flat_target = logits.flatten(0, 1), target.flatten(0, 1)
            losses = self.kernel.loss(flat_logits, flat_target).view(part.shape)
            loss_sum += (losses * keep).sum(1, dtype=torch.float64)
            scores = self.spec.score.per_sample(flat_logits, flat_target).view(part.shape)
            score_sum += (scores * keep).sum(1, dtype=torch.float64)
        n = sizes.double()
        return (loss_sum / n).tolist(), [self.spec.score.value(v) for v in (score_sum / n).tolist()]


class CohortRates:
    """The cohort's learning rates step by step: each client's configured rate, or its job's
    `LocalSchedule`'s, run for all the cohort's clients whose schedules share a class at once."""

    def __init__(self, jobs: Sequence[ClientJob], lr: torch.Tensor):
        self.rates = lr.clone()
        members: dict[type, list[int]] = {}
        for slot, job in enumerate(jobs):
            if job.schedule is not None:
                members.setdefault(type(job.schedule), []).append(slot)
        self.scheduled: list[tuple[list[int], torch.Tensor, RunningSchedules]] = []
        for kind, slots in members.items():
            index = torch.tensor(slots, device=lr.device)
            self.scheduled.append((slots, index, kind.start([jobs[s].schedule for s in slots], lr[index])))

    def after_step(self, step: int, k: int, changes: dict[int, torch.Tensor]) -> None:
        """The scheduled clients' next rates from the step's change of each parameter (by index) of
        the first k clients, those still training."""
        if not self.scheduled:
            return
        flat = torch.cat([changes[i].flatten(1) for i in range(len(changes))], dim=1)
        for slots, index, running in self.scheduled:
            training = index[: bisect.bisect_left(slots, k)]  # slots ascend: those below k
            if len(training):
                self.rates[training] = running.step(step, flat[training]).to(self.rates.dtype)
