"""What compressing the uploads adds to a round: the time of one round at 100 clients on the cohort
engine without compression and with each scheme (`fedhpo_core.compression`), and the bytes each
round sends up.

MNIST, MLP, 100 IID clients, all of them every round, 1 local epoch, batch 32, lr 0.05, in this
process. Every scheme continues its own run (`Federation.run(FixedConfig(config), 1, start=state)`,
so top-k's error feedback carries its residuals); after one untimed warm-up round each, the
schemes alternate round by round (`--repeats` rounds each, the order rotated every repetition), so
drift in the machine's load hits all alike. Each round is also split into its client training,
its aggregation (the postprocessor chain, where `Compress` runs) and its evaluation, and the
compressor's own work on the round's 100 updates is timed apart, and pieces of it beside the
operations it avoids.

    OMP_NUM_THREADS=1 python bench/compression_round.py --data-root ../shared/data
"""

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedhpo_core import seeding
from fedhpo_core.compression import TopK, compressor_of
from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, Federation, RoundSteps, partition_of
from fedhpo_core.settings import TrainSettings
from fedhpo_core.tuners import FixedConfig

SCHEMES = {
    "none": {},
    "qsgd 4-bit": {"compression": "qsgd", "compression_bits": 4},
    "qsgd 8-bit": {"compression": "qsgd", "compression_bits": 8},
    "topk 0.01": {"compression": "topk", "topk_fraction": 0.01},
    "cast 16-bit": {"compression": "cast", "compression_bits": 16},
    "cast 8-bit": {"compression": "cast", "compression_bits": 8},
}
TARGET = 1.10


class TimedSteps(RoundSteps):
    """Each step's seconds in the last round."""

    def __init__(self):
        super().__init__("cohort")
        self.seconds: dict[str, float] = {}

    def timed(self, name, call, *args):
        started = time.perf_counter()
        value = call(*args)
        self.seconds[name] = time.perf_counter() - started
        return value

    def train_clients(self, *args):
        return self.timed("train", super().train_clients, *args)

    def aggregate(self, *args):
        return self.timed("aggregate", super().aggregate, *args)

    def evaluate(self, *args):
        return self.timed("evaluate", super().evaluate, *args)


def compressor_work(settings: TrainSettings, deltas: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of the compressor alone on the round's updates (k, P), in place on a copy of
    them (the copy not timed): its clients' generators seeded, and the whole `compress_` (top-k:
    `with_feedback_` with nothing held back)."""
    compressor = compressor_of(settings.client_config)
    k = deltas.shape[0]
    seeding_s, whole_s = [], []
    for r in range(repeats):
        started = time.perf_counter()
        generators = [seeding.numpy_rng(settings.seed, seeding.COMPRESSION, 1000 + r, c) for c in range(k)]
        seeding_s.append(time.perf_counter() - started)
        x = deltas.clone()
        started = time.perf_counter()
        if compressor.error_feedback:
            compressor.with_feedback_(x, [None] * k)
        else:
            compressor.compress_(x, generators)
        whole_s.append(time.perf_counter() - started)
    return {"seed": statistics.median(seeding_s), "whole": statistics.median(whole_s)}


def breakdown(deltas: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of pieces of the compressors on the round's updates (k, P), with the
    operations they avoid beside them for reference."""
    k, size = deltas.shape
    generators = [np.random.default_rng(c) for c in range(k)]
    u = torch.empty(size)
    topk = TopK(0.01)
    work = deltas.clone()

    def per_row_draws():
        for row, generator in zip(work, generators, strict=True):
            generator.random(out=u.numpy(), dtype=np.float32)
            row.add_(u)

    pieces = {
        "qsgd: 100 per-client PCG64 draws added in place": per_row_draws,
        "qsgd: (avoided) torch's uniform_ into a new batch": lambda: torch.empty_like(deltas).uniform_(),
        "in-place pass over the batch (mul_)": lambda: work.mul_(1.0),
        "(avoided) a new batch (abs)": lambda: deltas.abs(),
        "topk 1%: grouped selection (`TopK.largest`)": lambda: topk.largest(deltas),
        "topk 1%: (avoided) torch.topk over all magnitudes": lambda: deltas.abs().topk(
            topk.count(size), dim=1, sorted=False
        ),
        "cast 16-bit: copy_ of a float16 round trip": lambda: work.copy_(work.to(torch.float16)),
        "(every scheme, none too) torch.stack of 100 updates": lambda: torch.stack(list(deltas)),
    }
    out = {}
    for name, call in pieces.items():
        call()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per scheme")
    parser.add_argument("--out", default="bench/results/compression_round.md")
    args = parser.parse_args()
    base = TrainSettings(
        dataset="mnist",
        data_root=args.data_root,
        model="mlp",
        clients=args.clients,
        participation=1.0,
        local_epochs=1,
        batch_size=32,
        lr=0.05,
    )
    dataset = load_dataset(base.dataset, base.data_root)
    data = FederatedData.build(dataset, partition_of(base.data), base.model)
    federation = Federation.of(data, base)  # downloads uncompressed: the schemes differ in their configs only
    settings = {name: replace(base, **changes) for name, changes in SCHEMES.items()}
    states = dict.fromkeys(SCHEMES, None)
    times = {name: [] for name in SCHEMES}
    steps_s = {name: {"train": [], "aggregate": [], "evaluate": []} for name in SCHEMES}
    bytes_up = {}
    last_deltas = None

    def one_round(name: str) -> float:
        nonlocal last_deltas
        steps = TimedSteps()
        reports = []
        started = time.perf_counter()
        result = federation.run(
            FixedConfig(settings[name].client_config),
            1,
            steps,
            start=states[name],
            observe=lambda report, _: reports.append(report),
        )
        seconds = time.perf_counter() - started
        states[name] = result.state
        bytes_up[name] = reports[-1].cost.bytes_up
        if name == "none":
            last_deltas = torch.stack([u.weights for u in reports[-1].updates]) - reports[-1].weights_before
        for step, s in steps.seconds.items():
            steps_s[name][step].append(s)
        return seconds

    threads = torch.get_num_threads()
    print(
        f"MNIST, mlp ({data.spec.size} parameters), {args.clients} clients, participation 1.0, 1 epoch, "
        f"batch 32, cohort engine, {threads} threads; warm-up round, then {args.repeats} interleaved rounds each",
        flush=True,
    )
    started_all = time.perf_counter()
    for name in SCHEMES:
        one_round(name)  # warm-up
    names = list(SCHEMES)
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(one_round(name))
        print(f"repetition {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    work = {name: compressor_work(settings[name], last_deltas, args.repeats) for name in SCHEMES if name != "none"}
    pieces = breakdown(last_deltas, max(args.repeats, 5))
    wall = time.perf_counter() - started_all

    reference = statistics.median(times["none"])
    median_of = {n: {s: statistics.median(v) for s, v in steps_s[n].items()} for n in names}
    lines = [
        "# Round time with compressed uploads",
        "",
        f"`python bench/compression_round.py --data-root {args.data_root} --repeats {args.repeats}` "
        f"(OMP_NUM_THREADS=1, {threads} torch thread(s), CPU, 2-core machine shared with other jobs).",
        "",
        f"MNIST, mlp ({data.spec.size} parameters), {args.clients} IID clients, participation 1.0, local_epochs 1, "
        "batch 32, lr 0.05, cohort engine, uncompressed downloads. Each scheme continues its own run "
        "(`Federation.run(FixedConfig(config), 1, start=state)`); one untimed warm-up round each, then "
        f"{args.repeats} rounds each, the schemes interleaved round by round (order rotated each repetition). "
        f"Median seconds of a whole round (train + aggregate + evaluate); target ratio <= {TARGET:.2f}.",
        "",
        "| scheme | median s/round | ratio to none | bytes up per round | train s | aggregate s | evaluate s | "
        "compressor alone s | within target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        median = statistics.median(times[name])
        m = median_of[name]
        alone = f"{work[name]['whole']:.3f}" if name in work else ""
        ok = "yes" if median / reference <= TARGET else "**no**"
        lines.append(
            f"| {name} | {median:.3f} | {median / reference:.3f} | {bytes_up[name]:,} | {m['train']:.3f} | "
            f"{m['aggregate']:.3f} | {m['evaluate']:.3f} | {alone} | {ok} |"
        )
    lines += [
        "",
        "Compressor alone: median seconds of `compress_` (top-k: `with_feedback_`) in place on a copy of one "
        f"round's 100 uncompressed updates ({last_deltas.shape[0]} x {last_deltas.shape[1]}).",
        "",
        "| scheme | seeding 100 generators s | whole compress s |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {w['seed']:.4f} | {w['whole']:.4f} |" for n, w in work.items()]
    lines += ["", "Pieces of the compressors on the same batch (median s):", "", "| piece | s |", "|---|---|"]
    lines += [f"| {n} | {s:.4f} |" for n, s in pieces.items()]
    lines += [
        "",
        "All rounds per scheme (s): " + "; ".join(f"{n}: " + ", ".join(f"{t:.2f}" for t in times[n]) for n in names),
        "",
        f"Wall time {wall:.0f} s.",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
