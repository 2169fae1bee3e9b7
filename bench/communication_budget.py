"""Communication budgets, paired by seed on MNIST: what compression and a client fidelity buy a
study, and what 16-bit uploads cost a training.

(a) One byte budget (`--budget-unit bytes`: what `--a-budget-rounds` uncompressed rounds of the fixed
    settings cost), random search (`random`) with `--a-n-configs` configurations, over a continuous
    space lr loguniform [1e-3, 0.3] x weight_decay loguniform [1e-6, 1e-2] (`PLAIN_YAML`), against
    the same space plus compression {none, qsgd, cast} x compression_bits {4, 8, 16}
    (`COMPRESSION_YAML`). A fixed-budget method gives each configuration B / n bytes and it trains
    the rounds that buys, so a compressed configuration trains more rounds (uncompressed downloads
    cap that at 2x). The best configuration, its compression included, is retrained
    `--final-rounds` rounds from scratch.
(b) Hyperband, rounds-only against rounds+clients rungs (`--min-fidelity 0.2`), both at the same
    budget in client updates (`--budget-unit client-updates`: what `--b-budget-rounds` full rounds
    cost), `--b-n-configs` configurations, over (a)'s plain space. The study's Kendall tau rows
    (`study.user_attrs["rank_agreement"]`) are reported for both arms.
(c) `fedhpo train`'s settings, `--train-rounds` rounds with 16-bit cast uploads against 32-bit.

Studies run in this process through the library's study driver (`run_search`, each method as its
registry builds it, the budget from `TuneSettings.budget_of`), with an in-memory Optuna study and a
trainer that is `TrialTrainer` without MLflow (`train_configuration` with a tracker that keeps
nothing); the final training is `retrain`'s (`train_configuration` of the best configuration from
scratch), scored on the test set. Both spaces are YAML files read by `SearchSpace.load`, as
`--search-space` reads them. The report is rewritten after every seed (and the raw rows saved as
JSON beside it), so a run cut short still leaves the seeds it finished.

    OMP_NUM_THREADS=1 python bench/communication_budget.py --data-root ../shared/data
"""

import argparse
import json
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
from fedhpo_core.search.base import BRACKET_ATTR, TrialResult, configuration_of, recorded_result, rounds_used
from fedhpo_core.search.halving import AGREEMENT_ATTR
from fedhpo_core.search.space import Configuration, SearchSpace
from fedhpo_core.search.study import TuneSettings, best_trial, run_search
from fedhpo_core.settings import TrainSettings
from fedhpo_core.trial import system_objectives, train_configuration
from fedhpo_core.tuners import FixedConfig

optuna.logging.set_verbosity(optuna.logging.ERROR)
PLAIN_YAML = """\
lr: {type: float, low: 1.0e-3, high: 0.3, log: true}
weight_decay: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}
"""
COMPRESSION_YAML = (
    PLAIN_YAML
    + """\
compression: {type: categorical, choices: [none, qsgd, cast]}
compression_bits: {type: categorical, choices: [4, 8, 16]}
"""
)


def load_space(text: str) -> SearchSpace:
    """The space as `--search-space` reads it: a YAML file through `SearchSpace.load`."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        file.write(text)
    try:
        return SearchSpace.load(file.name)
    finally:
        Path(file.name).unlink()


def short(values: dict) -> str:
    """A configuration as a reader wants it: floats to 3 significant digits."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


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
        self,
        trial,
        configuration,
        rounds,
        start=None,
        tuner=None,
        keep_going=None,
        fidelity=FULL,
        afford=None,
        progress=None,  # told only for a run with a tuner, which this benchmark's methods never have
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
    row = {
        "best": short(configuration.values),
        "best_val": best.values[0],
        "best_rounds": rounds_used(best),
        "final_test_acc": test,
        "final_val_acc": val,
        "final_bytes": cost.bytes,
        "spent": spent.spent,
        "limit": budget.limit,
        "search_rounds": trainer.rounds,
        "trials": len(trials),
        "trial_rows": [
            {
                "number": t.number,
                "params": t.params,
                "bracket": t.user_attrs.get(BRACKET_ATTR),
                "rounds": rounds_used(t),
                "score": recorded_result(t).score,
                "state": t.state.name,
            }
            for t in trials
        ],
        "plans": {k: v for k, v in optuna_study.user_attrs.items() if k.startswith(f"{BRACKET_ATTR}_")},
        "agreement": optuna_study.user_attrs.get(AGREEMENT_ATTR, []),
        "seconds": time.perf_counter() - started,
    }
    if configuration.values.get("compression", "none") != "none":
        # A diagnostic beside the study: the same pick's final training without compression, so a
        # difference in final accuracy splits into the pick and the compression of its training.
        plain = Configuration(dict(configuration.values) | {"compression": "none"})
        row["uncompressed_test_acc"], _, plain_cost = final_training(data, fixed, plain, tune.final_rounds)
        row["uncompressed_bytes"] = plain_cost.bytes
    return row


def mean_std(values: list[float], decimals: int = 2) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{decimals}f} ± {std:.{decimals}f}"


# (key, label, scale, decimals): accuracies in points, bytes in MB
METRICS = (
    ("final_test_acc", "final test acc (%)", 100, 2),
    ("best_val", "best val acc in the search (%)", 100, 2),
    ("best_rounds", "rounds the best trial trained", 1, 1),
    ("search_rounds", "search rounds trained", 1, 1),
    ("trials", "configurations tried", 1, 1),
    ("final_bytes", "final training bytes (MB)", 1e-6, 1),
    ("seconds", "study + final training (s)", 1, 0),
)


def summary(rows: dict[int, dict], a: str, b: str) -> list[str]:
    """Per metric: each arm's mean ± std over seeds, and the paired difference b - a (mean ± std, then per seed)."""
    seeds = list(rows)
    lines = [
        f"| metric | {a} | {b} | {b} − {a} | per seed ({', '.join(map(str, seeds))}) |",
        "|---|---|---|---|---|",
    ]
    for key, label, scale, decimals in METRICS:
        xa = [scale * rows[s][a][key] for s in seeds]
        xb = [scale * rows[s][b][key] for s in seeds]
        diffs = [y - x for x, y in zip(xa, xb, strict=True)]
        lines.append(
            f"| {label} | {mean_std(xa, decimals)} | {mean_std(xb, decimals)} | {mean_std(diffs, decimals)} | "
            f"{', '.join(f'{d:+.{decimals}f}' for d in diffs)} |"
        )
    return lines


def details(rows: dict[int, dict], arms: list[str], unit: str) -> list[str]:
    lines = [
        f"| seed | arm | best configuration | best val acc | its rounds | {unit} spent / limit | search rounds | "
        "trials | final test acc | final bytes | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, row in rows.items():
        for arm in arms:
            r = row[arm]
            lines.append(
                f"| {seed} | {arm} | {r['best']} | {100 * r['best_val']:.2f} | {r['best_rounds']} | "
                f"{r['spent']:,.0f} / {r['limit']:,.0f} | {r['search_rounds']} | {r['trials']} | "
                f"{100 * r['final_test_acc']:.2f} | {r['final_bytes']:,} | {r['seconds']:.0f} |"
            )
    return lines


def shared_points(rows: dict[int, dict], a: str, b: str) -> list[str]:
    """B's trials whose lr and weight_decay are also one of A's (the same seed's sampler stream)."""
    lines = [
        f"| seed | lr, weight_decay | {a}: trial, rounds, val acc | {b}: trial, compression, rounds, val acc | "
        "val difference |",
        "|---|---|---|---|---|",
    ]
    for seed, row in rows.items():
        plain = {(t["params"]["lr"], t["params"]["weight_decay"]): t for t in row[a]["trial_rows"]}
        for t in row[b]["trial_rows"]:
            if (u := plain.get((t["params"]["lr"], t["params"]["weight_decay"]))) is None:
                continue
            p = t["params"]
            lines.append(
                f"| {seed} | {p['lr']:.3g}, {p['weight_decay']:.3g} | #{u['number']}, {u['rounds']}, "
                f"{100 * u['score']:.2f} | #{t['number']}, {p['compression']} {p['compression_bits']}, {t['rounds']}, "
                f"{100 * t['score']:.2f} | {100 * (t['score'] - u['score']):+.2f} |"
            )
    return lines


def compression_split(rows: dict[int, dict], b: str) -> list[str]:
    """B's pick retrained with and without its compression (a diagnostic beside the study)."""
    lines = [
        "| seed | B's pick | final test acc, compressed | same pick uncompressed | compression's effect | "
        "bytes compressed / uncompressed |",
        "|---|---|---|---|---|---|",
    ]
    for seed, row in rows.items():
        r = row[b]
        if "uncompressed_test_acc" not in r:
            lines.append(f"| {seed} | {r['best']} | {100 * r['final_test_acc']:.2f} | (uncompressed pick) | | |")
            continue
        lines.append(
            f"| {seed} | {r['best']} | {100 * r['final_test_acc']:.2f} | {100 * r['uncompressed_test_acc']:.2f} | "
            f"{100 * (r['final_test_acc'] - r['uncompressed_test_acc']):+.2f} | "
            f"{r['final_bytes']:,} / {r['uncompressed_bytes']:,} |"
        )
    return lines


def trial_text(t: dict) -> str:
    p = t["params"]
    compression = p.get("compression")
    kind = (
        "" if compression is None else (" none" if compression == "none" else f" {compression}{p['compression_bits']}")
    )
    return f"lr {p['lr']:.3g}{kind}: {t['rounds']}r {100 * t['score']:.1f}"


def trial_lists(rows: dict[int, dict], arms: list[str]) -> list[str]:
    """Every trial of every study: lr, compression and bits, rounds trained, validation accuracy."""
    lines = ["| seed | arm | trials (lr, compression+bits: rounds trained, val acc %) |", "|---|---|---|"]
    for seed, row in rows.items():
        for arm in arms:
            lines.append(f"| {seed} | {arm} | {'; '.join(trial_text(t) for t in row[arm]['trial_rows'])} |")
    return lines


def plan_text(rungs: list) -> str:
    return " → ".join(f"{c}@{r}r×{f:.2g}" for c, r, f, _ in rungs)


def hyperband_tables(rows: dict[int, dict], arms: list[str]) -> list[str]:
    lines = ["| seed | arm | brackets as planned (configurations@rounds×client fraction per rung) |", "|---|---|---|"]
    for seed, row in rows.items():
        for arm in arms:
            plans = row[arm]["plans"]
            text = "; ".join(f"{k.split('_')[-1]}: {plan_text(plans[k])}" for k in sorted(plans))
            lines.append(f"| {seed} | {arm} | {text} |")
    lines += [
        "",
        "| seed | arm | bracket | rung → rung+1 | configurations | Kendall tau |",
        "|---|---|---|---|---|---|",
    ]
    for seed, row in rows.items():
        for arm in arms:
            for a in row[arm]["agreement"]:
                tau = a["kendall_tau"]
                lines.append(
                    f"| {seed} | {arm} | {a['bracket']} | {a['rung']} → {a['rung'] + 1} | {a['configurations']} | "
                    f"{tau:+.3f} |"
                    if isinstance(tau, float) and math.isfinite(tau)
                    else f"| {seed} | {arm} | {a['bracket']} | {a['rung']} → {a['rung'] + 1} | "
                    f"{a['configurations']} | nan |"
                )
    return lines


def report(args, data, per_round, byte_budget, updates_budget, a_rows, b_rows, c_rows, wall) -> str:
    done = sorted(set(a_rows) | set(b_rows) | set(c_rows))
    lines = [
        "# Communication budgets: compression in the search, client fidelity, 16-bit uploads",
        "",
        f"`OMP_NUM_THREADS=1 nice python bench/communication_budget.py --data-root {args.data_root} "
        f"--seeds {args.seeds} --clients {args.clients} --participation {args.participation} "
        f"--a-budget-rounds {args.a_budget_rounds} --a-n-configs {args.a_n_configs} "
        f"--b-budget-rounds {args.b_budget_rounds} --b-n-configs {args.b_n_configs} "
        f"--min-fidelity {args.min_fidelity} --final-rounds {args.final_rounds} --train-rounds {args.train_rounds} "
        f"--parts {args.parts}` (CPU, 1 thread, a 2-core machine shared with other jobs); seeds finished: "
        f"{', '.join(map(str, done))}.",
        "",
        f"Settings: MNIST, mlp ({data.spec.size} parameters), {args.clients} IID clients, participation "
        f"{args.participation} ({per_round} clients a round), local_epochs 1, batch 32, cohort engine, uncompressed "
        "downloads; the seed sets the initial weights, client sampling, the search's sampler and the training's "
        "randomness (the partition is the same for all). Studies run in-process through `run_search` (the "
        "library's driver and methods, budget from `TuneSettings.budget_of`), an in-memory Optuna study, "
        "`train_configuration` for each trial and for the final training of the best configuration from scratch "
        f"({args.final_rounds} rounds, test accuracy; a chosen compression applies to it). Differences are "
        "paired by seed; ± is the standard deviation over seeds.",
        "",
        "Space A (`PLAIN_YAML`) and space B (`COMPRESSION_YAML` = A plus the last two lines), both read by "
        "`SearchSpace.load`:",
        "",
        "```yaml",
        COMPRESSION_YAML.rstrip(),
        "```",
        "",
        "cast: bits <= 8 is int8, more float16; qsgd: 2^bits − 1 levels; `none` ignores the bits.",
        "",
    ]
    if a_rows:
        lines += [
            f"## (a) Byte budget: space A vs space B (random search, n_configs {args.a_n_configs})",
            "",
            f"Budget {byte_budget:,} bytes (`--budget-unit bytes`) = {data.spec.size} parameters x 4 bytes x "
            f"{per_round} clients x 2 directions x {args.a_budget_rounds} rounds: each configuration's share "
            f"(B / {args.a_n_configs}) buys {args.a_budget_rounds // args.a_n_configs} rounds uncompressed, more "
            "compressed (uploads only; at most 2x).",
            "",
            *summary(a_rows, "A: lr x wd", "B: + compression"),
            "",
            *details(a_rows, ["A: lr x wd", "B: + compression"], "bytes"),
            "",
            *trial_lists(a_rows, ["A: lr x wd", "B: + compression"]),
            "",
            "Points both arms drew: one seed, one sampler stream; Optuna's `RandomSampler` draws a uniform per "
            "float and one per choice of a categorical, so a B trial takes 2 + 3 + 3 = 8 draws to A's 2 and B's "
            "trial k has the lr and weight_decay of A's trial 4k (3 of 9 points shared):",
            "",
            *shared_points(a_rows, "A: lr x wd", "B: + compression"),
            "",
            "B's pick retrained without its compression (a diagnostic outside the study, not charged to it):",
            "",
            *compression_split(a_rows, "B: + compression"),
            "",
        ]
    if b_rows:
        lines += [
            "## (b) Hyperband: rounds-only vs rounds+clients rungs, equal client updates",
            "",
            f"Budget {updates_budget} client updates (`--budget-unit client-updates`; {args.b_budget_rounds} full "
            f"rounds of {per_round} clients), n_configs {args.b_n_configs}, eta 3, space A; rounds+clients: "
            f"`--fidelity rounds+clients --min-fidelity {args.min_fidelity}`.",
            "",
            *summary(b_rows, "rounds", "rounds+clients"),
            "",
            *details(b_rows, ["rounds", "rounds+clients"], "client updates"),
            "",
            *hyperband_tables(b_rows, ["rounds", "rounds+clients"]),
            "",
            *trial_lists(b_rows, ["rounds", "rounds+clients"]),
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
        acc = {arm: [100 * r[arm]["final_test_acc"] for r in c_rows.values()] for arm in ("32-bit", "16-bit cast")}
        lines += [
            "",
            f"Mean ± std: 32-bit {mean_std(acc['32-bit'])}, 16-bit {mean_std(acc['16-bit cast'])}, "
            f"difference {mean_std(diffs)}",
            "",
        ]
        worst = max(abs(d) for d in diffs)
        lines += [f"Largest |difference| {worst:.2f} points: {'within' if worst <= 0.5 else '**outside**'} 0.5.", ""]
    lines += [f"Wall time {wall / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--participation", type=float, default=0.5)
    parser.add_argument("--a-budget-rounds", type=int, default=36, help="(a)'s byte budget, in uncompressed rounds")
    parser.add_argument("--a-n-configs", type=int, default=9)
    parser.add_argument("--b-budget-rounds", type=int, default=60, help="(b)'s client-update budget, in full rounds")
    parser.add_argument("--b-n-configs", type=int, default=27)
    parser.add_argument("--min-fidelity", type=float, default=0.2, help="(b)'s rounds+clients arm")
    parser.add_argument("--final-rounds", type=int, default=30)
    parser.add_argument("--train-rounds", type=int, default=30, help="(c)")
    parser.add_argument("--parts", default="a,b,c")
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
    byte_budget = data.spec.size * 4 * per_round * 2 * args.a_budget_rounds
    updates_budget = per_round * args.b_budget_rounds
    plain_space, compression_space = load_space(PLAIN_YAML), load_space(COMPRESSION_YAML)
    wall_started = time.perf_counter()
    a_rows, b_rows, c_rows = {}, {}, {}
    for seed in seeds:
        fixed = TrainSettings(**common, seed=seed)
        if "a" in parts:
            tune = TuneSettings(
                method="random",
                budget=byte_budget,
                budget_unit="bytes",
                n_configs=args.a_n_configs,
                final_rounds=args.final_rounds,
            )
            a_rows[seed] = {
                "A: lr x wd": study(data, fixed, tune, plain_space),
                "B: + compression": study(data, fixed, tune, compression_space),
            }
            print(f"(a) seed {seed}: {[(k, v['best'], v['final_test_acc']) for k, v in a_rows[seed].items()]}")
        if "b" in parts:
            arms = {}
            for arm in ("rounds", "rounds+clients"):
                tune = TuneSettings(
                    method="hyperband",
                    budget=updates_budget,
                    budget_unit="client-updates",
                    n_configs=args.b_n_configs,
                    final_rounds=args.final_rounds,
                    options={"fidelity": arm, "min_fidelity": args.min_fidelity},
                )
                arms[arm] = study(data, fixed, tune, plain_space)
            b_rows[seed] = arms
            print(f"(b) seed {seed}: {[(k, v['best'], v['final_test_acc']) for k, v in b_rows[seed].items()]}")
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
            print(f"(c) seed {seed}: {c_rows[seed]}")
        wall = time.perf_counter() - wall_started
        print(f"seed {seed} done, {wall / 60:.1f} min so far", flush=True)
        text = report(args, data, per_round, byte_budget, updates_budget, a_rows, b_rows, c_rows, wall)
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(
            json.dumps({"a": a_rows, "b": b_rows, "c": c_rows, "wall_s": wall}, indent=1, default=str)
        )
    print(text)


if __name__ == "__main__":
    main()
