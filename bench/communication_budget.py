"""Communication budgets, paired by seed on MNIST: what compression and a client fidelity buy a
study, and what 16-bit uploads cost a training.

(a) One byte budget (`--budget-unit bytes`: what `--budget-rounds` uncompressed rounds cost), TPE
    with `--n-configs` configurations: lr x weight_decay without compression, against the same
    space plus compression in {none, qsgd, cast} and compression_bits in {8, 16}. A fixed-budget
    method gives each configuration B / n bytes and it trains the rounds that buys, so a compressed
    configuration trains more rounds. The best configuration is retrained `--final-rounds` rounds.
(b) Hyperband, rounds-only against rounds+clients rungs (min fidelity 0.2), both at the same
    budget in client updates (`--budget-unit client-updates`), 9 configurations.
(c) `fedhpo train`'s settings, `--train-rounds` rounds with 16-bit cast uploads against 32-bit.

Studies run in this process through the library's study driver (`run_search`, each method as its
registry builds it, the budget from `TuneSettings.budget_of`), with an in-memory Optuna study and a
trainer that is `TrialTrainer` without MLflow (`train_configuration` with a tracker that keeps
nothing); the final training is `retrain`'s (`train_configuration` of the best configuration from
scratch), scored on the test set.

(a)'s compression space is the YAML file `COMPRESSION_YAML` (written to a temporary file and read
by `SearchSpace.load`, as `--search-space` reads it): compression_bits {4, 8, 16}, where cast
takes bits <= 8 as its 8-bit and more as 16-bit (`compressor_of`). `--space direct` instead builds
the space from Optuna distributions with bits {8, 16}: what an earlier library needed, whose YAML
loader turned every categorical choice into a number (`float('none')` failed) and whose cast
refused 4 bits.

    OMP_NUM_THREADS=1 python bench/communication_budget.py --data-root ../shared/data
"""

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna

from fedhpo_core.cost import Cost
from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FULL, FederatedData, Federation, RoundSteps, partition_of
from fedhpo_core.search.base import TrialResult, configuration_of, recorded_result
from fedhpo_core.search.space import FEDTUNE_SPACE, Configuration, SearchSpace
from fedhpo_core.search.study import TuneSettings, best_trial, run_search
from fedhpo_core.settings import TrainSettings
from fedhpo_core.trial import system_objectives, train_configuration
from fedhpo_core.tuners import FixedConfig

optuna.logging.set_verbosity(optuna.logging.ERROR)
LR_WD = {k: optuna.distributions.CategoricalDistribution(tuple(v["choices"])) for k, v in FEDTUNE_SPACE.items()}
COMPRESSION_YAML = """\
lr: {type: categorical, choices: [0.1, 0.05, 0.01, 0.005, 0.001]}
weight_decay: {type: categorical, choices: [0.0, 0.1, 0.01, 0.001, 1.0e-4, 1.0e-5]}
compression: {type: categorical, choices: [none, qsgd, cast]}
compression_bits: {type: categorical, choices: [4, 8, 16]}
"""
WITH_COMPRESSION = LR_WD | {
    "compression": optuna.distributions.CategoricalDistribution(("none", "qsgd", "cast")),
    "compression_bits": optuna.distributions.CategoricalDistribution((8, 16)),
}


class NullTracker:
    """What `train_configuration` logs to, kept nowhere."""

    def log_metrics(self, *args, **kwargs):
        pass

    def log_client_configs(self, *args, **kwargs):
        pass


class InProcessTrainer:
    """`TrialTrainer` less MLflow: states kept in memory, the server's validation score reported."""

    def __init__(self, data: FederatedData, fixed: TrainSettings):
        self.data, self.fixed, self.states, self.rounds = data, fixed, {}, 0

    def __call__(
        self, trial, configuration, rounds, start=None, tuner=None, keep_going=None, fidelity=FULL, afford=None
    ):
        worst = self.data.spec.score.worst()

        def on_round(report):
            score = report.val_score if math.isfinite(report.val_score) else worst
            if report.round not in trial.study.trials[trial.number].intermediate_values:
                trial.report(score, report.round)

        outcome, reports, _ = train_configuration(
            self.data,
            self.fixed,
            configuration,
            rounds,
            NullTracker(),
            RoundSteps("cohort"),
            start,
            tuner,
            on_round,
            keep_going,
            None,
            fidelity,
            afford,
        )
        self.rounds += len(reports)
        state = outcome.state
        if not reports:
            before = recorded_result(trial) or TrialResult(worst, 0, None)
            return replace(before, rounds=0, state=state, cost=Cost())
        key = f"{trial.number}/{len(self.states)}"
        self.states[key] = state
        return TrialResult(
            score=reports[-1].val_score if math.isfinite(reports[-1].val_score) else worst,
            rounds=len(outcome.evaluations),
            state=state,
            diverged=outcome.diverged,
            objectives=system_objectives(reports, self.fixed.target_acc, self.data.spec.score),
            chosen=tuner.chosen() if tuner else {},
            checkpoint=key,
            cost=sum((r.cost for r in reports), Cost()),
        )

    def load(self, checkpoint):
        return self.states[checkpoint]


def final_training(data, fixed, configuration: Configuration, rounds: int) -> tuple[float, float, Cost]:
    """`retrain`'s training: the configuration from scratch, its test accuracy, bytes and cost."""
    outcome, reports, _ = train_configuration(data, fixed, configuration, rounds, NullTracker(), RoundSteps("cohort"))
    if outcome.diverged:
        return float("nan"), float("nan"), sum((r.cost for r in reports), Cost())
    last = outcome.evaluations[-1]
    return last.test_score, last.val_score, sum((r.cost for r in reports), Cost())


def study(data, fixed, tune: TuneSettings, space: SearchSpace) -> dict:
    """One study in this process, as `run_study` runs it less tracking; what it found and its final test score."""
    started = time.perf_counter()
    method = tune.search_method()
    method.use_score(data.spec.score)
    space.check(fixed)
    budget = tune.budget_of(Federation.of(data, fixed), fixed)
    optuna_study = optuna.create_study(directions=list(method.directions))
    trainer = InProcessTrainer(data, fixed)
    spent = run_search(
        method,
        optuna_study,
        space,
        "global",
        fixed.clients,
        trainer,
        budget.limit,
        tune.n_configs,
        fixed.seed,
        fixed,
        data,
        unit=budget.unit,
        round_cost=budget.round_cost,
    )
    best = best_trial(optuna_study)
    configuration = Configuration(configuration_of(best))
    test, val, cost = final_training(data, fixed, configuration, tune.final_rounds)
    trials = [t for t in optuna_study.trials if recorded_result(t)]
    return {
        "best": configuration.text(),
        "best_val": best.values[0],
        "final_test_acc": test,
        "final_val_acc": val,
        "final_bytes": cost.bytes,
        "spent": spent.spent,
        "limit": budget.limit,
        "search_rounds": trainer.rounds,
        "trials": len(trials),
        "seconds": time.perf_counter() - started,
    }


def paired(rows: dict[int, dict], a: str, b: str, key: str = "final_test_acc") -> list[str]:
    """Per seed, then mean ± std of each arm and of the paired difference b - a (in points)."""
    lines = []
    diffs = []
    for seed, row in rows.items():
        d = 100 * (row[b][key] - row[a][key])
        diffs.append(d)
        lines.append(f"| {seed} | {100 * row[a][key]:.2f} | {100 * row[b][key]:.2f} | {d:+.2f} |")
    mean = lambda arm: statistics.mean(100 * r[arm][key] for r in rows.values())  # noqa: E731
    std = lambda arm: statistics.stdev([100 * r[arm][key] for r in rows.values()]) if len(rows) > 1 else 0.0  # noqa: E731
    dstd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    lines.append(
        f"| mean ± std | {mean(a):.2f} ± {std(a):.2f} | {mean(b):.2f} ± {std(b):.2f} | "
        f"{statistics.mean(diffs):+.2f} ± {dstd:.2f} |"
    )
    return lines


def details(rows: dict[int, dict], arms: list[str], unit: str) -> list[str]:
    lines = [
        f"| seed | arm | best configuration | best val acc | {unit} spent / limit | search rounds | trials | "
        "final bytes | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, row in rows.items():
        for arm in arms:
            r = row[arm]
            lines.append(
                f"| {seed} | {arm} | {r['best']} | {r['best_val']:.4f} | {r['spent']:,.0f} / {r['limit']:,.0f} | "
                f"{r['search_rounds']} | {r['trials']} | {r['final_bytes']:,} | {r['seconds']:.0f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--participation", type=float, default=0.5)
    parser.add_argument("--budget-rounds", type=int, default=60, help="(a)'s and (b)'s budgets, in uncompressed rounds")
    parser.add_argument("--n-configs", type=int, default=6, help="(a)")
    parser.add_argument("--final-rounds", type=int, default=30)
    parser.add_argument("--train-rounds", type=int, default=30, help="(c)")
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--space", default="yaml", choices=("yaml", "direct"), help="(a)'s compression space")
    parser.add_argument("--out", default="bench/results/communication_budget.md")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.parts.split(",")
    common = {
        "dataset": "mnist",
        "data_root": args.data_root,
        "model": "mlp",
        "clients": args.clients,
        "participation": args.participation,
        "local_epochs": 1,
        "batch_size": 32,
    }
    base = TrainSettings(**common)
    dataset = load_dataset("mnist", args.data_root)
    data = FederatedData.build(dataset, partition_of(base.data), base.model)  # the partition's seed is fixed
    per_round = max(1, round(args.participation * args.clients))
    byte_budget = data.spec.size * 4 * per_round * 2 * args.budget_rounds
    updates_budget = per_round * args.budget_rounds
    if args.space == "yaml":
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
            file.write(COMPRESSION_YAML)
        compression_space = SearchSpace.load(file.name)
        space_text = "compression {none, qsgd, cast} x compression_bits {4, 8, 16}, from this YAML (`SearchSpace.load`)"
    else:
        compression_space = SearchSpace(WITH_COMPRESSION)
        space_text = "compression {none, qsgd, cast} x compression_bits {8, 16}, built from Optuna distributions"
    wall_started = time.perf_counter()
    a_rows, b_rows, c_rows = {}, {}, {}
    for seed in seeds:
        fixed = TrainSettings(**common, seed=seed)
        if "a" in parts:
            tune = TuneSettings(
                method="tpe",
                budget=byte_budget,
                budget_unit="bytes",
                n_configs=args.n_configs,
                final_rounds=args.final_rounds,
            )
            a_rows[seed] = {
                "lr x wd": study(data, fixed, tune, SearchSpace(LR_WD)),
                "+ compression": study(data, fixed, tune, compression_space),
            }
            print(f"(a) seed {seed}: {a_rows[seed]}", flush=True)
        if "b" in parts:
            arms = {}
            for arm, fidelity in (("rounds", "rounds"), ("rounds+clients", "rounds+clients")):
                tune = TuneSettings(
                    method="hyperband",
                    budget=updates_budget,
                    budget_unit="client-updates",
                    n_configs=9,
                    final_rounds=args.final_rounds,
                    options={"fidelity": fidelity, "min_fidelity": 0.2},
                )
                arms[arm] = study(data, fixed, tune, SearchSpace(LR_WD))
            b_rows[seed] = arms
            print(f"(b) seed {seed}: {b_rows[seed]}", flush=True)
        if "c" in parts:
            row = {}
            for arm, changes in (("32-bit", {}), ("16-bit cast", {"compression": "cast", "compression_bits": 16})):
                settings = replace(fixed, lr=0.05, **changes)
                started = time.perf_counter()
                reports = []
                result = Federation.of(data, settings).run(
                    FixedConfig(settings.client_config),
                    args.train_rounds,
                    RoundSteps("cohort"),
                    observe=lambda report, _, reports=reports: reports.append(report),
                )
                last = result.evaluations[-1]
                row[arm] = {
                    "final_test_acc": last.test_score,
                    "final_val_acc": last.val_score,
                    "bytes_up": sum(r.cost.bytes_up for r in reports),
                    "seconds": time.perf_counter() - started,
                }
            c_rows[seed] = row
            print(f"(c) seed {seed}: {c_rows[seed]}", flush=True)
    wall = time.perf_counter() - wall_started

    lines = [
        "# Communication budgets: compression in the search, client fidelity, 16-bit uploads",
        "",
        f"`OMP_NUM_THREADS=1 python bench/communication_budget.py --data-root {args.data_root} --seeds {args.seeds} "
        f"--clients {args.clients} --participation {args.participation} --budget-rounds {args.budget_rounds} "
        f"--n-configs {args.n_configs} --final-rounds {args.final_rounds} --train-rounds {args.train_rounds} "
        f"--parts {args.parts}` (CPU, 1 thread, a 2-core machine shared with other jobs).",
        "",
        f"Settings: MNIST, mlp ({data.spec.size} parameters), {args.clients} IID clients, participation "
        f"{args.participation} ({per_round} clients a round), local_epochs 1, batch 32, cohort engine, uncompressed "
        f"downloads; seeds {args.seeds} (the seed sets the initial weights, client sampling, the search's sampler "
        "and the training's randomness; the partition is the same for all). Studies run in-process through "
        "`run_search` (the library's driver and methods, budget from `TuneSettings.budget_of`), an in-memory Optuna "
        "study, `train_configuration` for each trial and for the final training of the best configuration from "
        f"scratch ({args.final_rounds} rounds, test accuracy). Accuracies in percent; differences are paired by seed.",
        "",
    ]
    if a_rows:
        lines += [
            f"## (a) Byte budget: lr x weight_decay vs + compression (TPE, n_configs {args.n_configs})",
            "",
            f"Budget {byte_budget:,} bytes (`--budget-unit bytes`) = {data.spec.size} parameters x 4 bytes x "
            f"{per_round} clients x 2 directions x {args.budget_rounds} rounds. Space A: the FedTune paper's lr "
            "{0.1, 0.05, 0.01, 0.005, 0.001} x weight_decay {0, 0.1, 0.01, 0.001, 1e-4, 1e-5}. Space B: A x "
            f"{space_text} (cast: bits <= 8 is its 8-bit int8, 16 its float16; qsgd: 2^bits - 1 levels).",
            "",
            *(["```yaml", COMPRESSION_YAML.rstrip(), "```", ""] if args.space == "yaml" else []),
            "| seed | final test acc, lr x wd | final test acc, + compression | difference |",
            "|---|---|---|---|",
            *paired(a_rows, "lr x wd", "+ compression"),
            "",
            *details(a_rows, ["lr x wd", "+ compression"], "bytes"),
            "",
        ]
    if b_rows:
        lines += [
            "## (b) Hyperband: rounds-only vs rounds+clients rungs, equal client updates",
            "",
            f"Budget {updates_budget} client updates (`--budget-unit client-updates`; {args.budget_rounds} full rounds "
            f"of {per_round} clients), n_configs 9, eta 3, space A; rounds+clients: `--fidelity rounds+clients "
            "--min-fidelity 0.2`.",
            "",
            "| seed | final test acc, rounds | final test acc, rounds+clients | difference |",
            "|---|---|---|---|",
            *paired(b_rows, "rounds", "rounds+clients"),
            "",
            *details(b_rows, ["rounds", "rounds+clients"], "client updates"),
            "",
        ]
    if c_rows:
        lines += [
            f"## (c) 16-bit cast uploads vs 32-bit, {args.train_rounds} rounds of training",
            "",
            f"`Federation.run(FixedConfig(config), {args.train_rounds})` with lr 0.05, weight_decay 0; "
            "16-bit: `compression cast, compression_bits 16`. Target: within 0.5 points.",
            "",
            "| seed | test acc 32-bit | test acc 16-bit | difference | bytes up 32-bit | bytes up 16-bit | s 32/16 |",
            "|---|---|---|---|---|---|---|",
        ]
        diffs = []
        for seed, row in c_rows.items():
            a, b = row["32-bit"], row["16-bit cast"]
            diffs.append(100 * (b["final_test_acc"] - a["final_test_acc"]))
            lines.append(
                f"| {seed} | {100 * a['final_test_acc']:.2f} | {100 * b['final_test_acc']:.2f} | {diffs[-1]:+.2f} | "
                f"{a['bytes_up']:,} | {b['bytes_up']:,} | {a['seconds']:.0f}/{b['seconds']:.0f} |"
            )
        summary = paired(c_rows, "32-bit", "16-bit cast")[-1].strip("| ").split(" | ")[1:]
        lines += ["", "Mean ± std: 32-bit " + summary[0] + ", 16-bit " + summary[1] + ", difference " + summary[2], ""]
        worst = max(abs(d) for d in diffs)
        lines += [f"Largest |difference| {worst:.2f} points: {'within' if worst <= 0.5 else '**outside**'} 0.5.", ""]
    lines += [f"Wall time {wall / 60:.1f} min."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
