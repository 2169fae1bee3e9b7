"""The `method-comparison` flow: several search methods over several seeds and budgets, paired."""

from collections.abc import Mapping
from dataclasses import asdict, fields, replace

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.utilities.names import generate_slug

from cli.interrupts import cooperative_interrupts
from cli.progress import bar
from fedhpo_core import registry
from fedhpo_core.reports import (
    comparison_figure,
    comparison_table,
    comparison_winner,
    markdown_table,
    paired_differences,
    personal_columns,
)
from fedhpo_core.search.study import TuneSettings
from fedhpo_core.settings import ExecutionSettings, SettingsError, TrainSettings
from fedhpo_core.stores import masked, with_password
from fedhpo_core.task import ACCURACY, Metric, TaskRef, prepared, scoring_metric
from fedhpo_core.tracking import ROLE_TAG, Tracker, run_url, set_model_alias, ui_base
from flows.study import FINAL_COSTS, artifact_key, hpo_study
from flows.training import run_parameters
from tasks.training import dask_scheduler

CHAMPION = "champion"  # the registered model's alias for the comparison winner's model


def study_settings(tune: TuneSettings, method: str, budget: int, options: dict | None = None) -> dict:
    """One study's settings: parallel trials only for the methods that run them, and of `options`
    those the method declares."""
    declared = registry.methods().get(method)
    workers = tune.workers if declared and declared.parallel else 1
    own = {k: v for k, v in (options or {}).items() if declared and k in {f.name for f in fields(declared.options)}}
    return asdict(tune) | {"method": method, "budget": budget, "workers": workers, "options": own}


def check_comparison(
    methods: list[str],
    seeds: list[int],
    budgets: list[int],
    tune: TuneSettings,
    fixed: TrainSettings,
    reference: str | None = None,
    options: dict | None = None,
) -> None:
    """Every study of the comparison is valid, before any of them runs (each method works with the
    task's score: `fixed` is prepared); every option is one of a compared method's."""
    for name, values in (("methods", methods), ("seeds", seeds), ("budgets", budgets)):
        if not values:
            raise SettingsError(f"{name} need at least one value")
        if len(set(values)) < len(values):
            raise SettingsError(f"{name} repeat a value: {','.join(map(str, values))}")
    if tune.final_rounds < 1:
        raise SettingsError("a comparison needs final_rounds >= 1: methods are compared on their best's test accuracy")
    if reference is not None and reference not in methods:
        raise SettingsError(f"reference must be one of the compared methods ({', '.join(methods)}), got {reference!r}")
    for seed in seeds:
        replace(fixed, seed=seed)
    for name in options or {}:
        if not set(owners := registry.declared_by(name)) & set(methods):
            owners = ", ".join(owners) or "no method"
            raise SettingsError(f"--{registry.flag(name)} is an option of {owners}, none of the compared methods")
    metric = scoring_metric(fixed)
    for method in methods:
        for budget in budgets:
            study = TuneSettings(**study_settings(tune, method, budget, options))
            study.check_with(fixed)
            study.search_method().use_score(metric)


def comparison_run_name() -> str:
    """A comparison's flow run is named for its methods and dataset, and a random slug: its studies
    are named after it, so two comparisons of the same methods never share a study."""
    parameters = run_parameters(method_comparison.fn)
    train = parameters["train"] or {}
    label = TaskRef(train.get("task") or train.get("dataset", TrainSettings.dataset)).label
    return f"{'-'.join(parameters['methods'])}-{label}-{generate_slug(2)}"


def comparison_markdown(
    name: str,
    table: pd.DataFrame,
    rows: list[dict],
    reference: str,
    seeds: list[int],
    outcome: dict,
    tracker: Tracker,
    base: str = "",
    metric: Metric = ACCURACY,
    personal: Mapping[str, pd.DataFrame] = {},  # noqa: B006 - read only
) -> str:
    """The comparison table, the personalized scores' tables, its winner and a link to each study
    run in the MLflow UI at `base` ('' within the MLflow UI): the run's description and the flow
    run's Markdown artifact."""
    test = f"final_test_{metric.name}"
    studies = "\n".join(
        f"- [{row['method']}, budget {row['budget']}, seed {row['seed']}]"
        f"({run_url(base, tracker.experiment_id, row['run_id'])}): {test} {row[test]:.4f}"
        for row in rows
    )
    run = run_url(base, tracker.experiment_id, tracker.run_id)
    winner = f"Winner: {outcome['champion']}" if "champion" in outcome else "No study was retrained."
    if "champion_version" in outcome:
        winner += f"; its model is version {outcome['champion_version']}, alias `{CHAMPION}`"
    return (
        f"### Method comparison `{name}`\n\nTest {metric.name} ({metric.direction}) of each study's retrained "
        "best configuration, "
        f"mean ± std over seeds {seeds}, and each method's difference from {reference} on the same seeds "
        f"(mean, 95% t-interval; `tie`: the interval holds 0); [MLflow run]({run}).\n\n"
        f"{markdown_table(table)}\n{personal_markdown(personal, metric)}{winner}.\n\nStudies:\n\n{studies}\n"
    )


def personal_markdown(personal: Mapping[str, pd.DataFrame], metric: Metric) -> str:
    """Each personalized score's table, titled."""
    titles = {False: "mean over clients", True: "mean of the worst tenth of clients"}
    return "".join(
        f"\nPersonalized {metric.name} on the clients' validation splits "
        f"({titles[column.endswith('worst10')]}):\n\n{markdown_table(table)}"
        for column, table in personal.items()
    ) + ("\n" if personal else "")


@flow(name="method-comparison", flow_run_name=comparison_run_name)
def method_comparison(
    methods: list[str] = ["random", "hyperband", "tpe"],  # noqa: B006 - Prefect shows the default
    seeds: list[int] = [0, 1, 2],  # noqa: B006
    budgets: list[int] = [30, 60],  # noqa: B006
    budget_unit: str = "rounds",
    n_configs: int = 30,
    final_rounds: int = 20,
    scope: str = "global",
    search_space: str | None = None,
    objective: str = "server",
    eval_clients: int = 0,
    eval_noise: float = 0.0,
    storage: str | None = None,
    workers: int = 1,
    max_epsilon: float = 0.0,
    max_bytes: float = 0.0,
    register_model: str | None = None,
    train: dict | None = None,
    task_runner: str = "thread",
    dask_address: str | None = None,
    dask_workers: int = 2,
    engine: str = "cohort",
    device: str = "auto",
    reference: str | None = None,
    options: dict | None = None,
) -> dict:
    """Run every method with every seed and budget on the same partitions, and tabulate the test
    accuracy of each retrained best configuration.

    Args:
        methods: Search methods to compare.
        seeds: Seeds; one study per method, budget and seed, the same partition for every method.
        budgets: Search budgets, in budget_unit.
        budget_unit: rounds, client-updates, bytes or sim-seconds (`fedhpo tune --help`).
        n_configs: Configurations per study.
        final_rounds: Rounds to retrain each study's best configuration from scratch.
        scope: global or personalized.
        search_space: Path of a YAML search space; default: the FedTune paper's.
        objective: Score trials on the server's validation split (server) or clients' reports (clients).
        eval_clients: Noisy evaluation (Kuo et al. 2023): score each round on this many random clients'
            validation data instead (0: off); the same comparison without it shows how methods degrade.
        eval_noise: Noisy evaluation: Laplace scale of the noise added to each round's score (0: off).
        storage: Optuna storage URL; default: optuna.db beside the MLflow store. Give it without its
            password (PostgreSQL: PGPASSWORD in the environment of the process that runs the flow).
        workers: Trials trained at once in each study (random, grid, tpe, gp, multiobjective, asha, async-hyperband).
        max_epsilon: Privacy budget of every study: a trial that spent more epsilon is never the best (0: none).
        max_bytes: Communication limit of every study: a trial that sent more bytes is never the best (0: none).
        register_model: Register every study's retrained best model as a version of this name in
            MLflow's Model Registry; the winner's (`comparison_winner`) gets the alias `champion`.
        train: Fixed training settings (any parameter of federated-training).
        task_runner: thread (the round's clients in the flow's process) or dask (shares on a cluster).
        dask_address: Scheduler address of a running Dask cluster; default: start one local cluster
            that every study of the comparison uses.
        dask_workers: Worker processes of that local Dask cluster.
        engine: cohort (a round's clients train as one batched computation) or sequential.
        device: cpu, cuda, or auto (cuda when available).
        reference: The method every other is compared with, seed by seed; default: the first.
        options: Method options by name, each given to the compared methods that declare it
            (`fedhpo methods`), e.g. {"baseline": "round"} for fedex and stepwise.
    """
    logger = get_run_logger()
    tune = TuneSettings(
        n_configs=n_configs,
        final_rounds=final_rounds,
        scope=scope,
        search_space=search_space,
        objective=objective,
        eval_clients=eval_clients,
        eval_noise=eval_noise,
        storage=storage,
        workers=workers,
        max_epsilon=max_epsilon,
        max_bytes=max_bytes,
        budget_unit=budget_unit,
        register_model=register_model,
    )
    execution = ExecutionSettings(task_runner, dask_address, dask_workers, engine, device)
    fixed = prepared(TrainSettings(**(train or {})))
    check_comparison(methods, seeds, budgets, tune, fixed, reference, options)
    metric = scoring_metric(fixed)
    reference = reference or methods[0]
    tags = {ROLE_TAG: "comparison", "prefect.flow_run_id": str(flow_run.id)}
    rows = []
    test, val = f"final_test_{metric.name}", f"final_val_{metric.name}"
    studies = len(seeds) * len(budgets) * len(methods)
    bar().plan(len(seeds) * len(methods) * sum(budgets), trials=0, studies=studies, unit=tune.budget_unit)
    with (
        cooperative_interrupts() as stop,
        Tracker(fixed.experiment, f"comparison-{flow_run.name}", tags) as tracker,
        dask_scheduler(execution) as address,
    ):
        tracker.log_params(
            {
                "methods": ",".join(methods),
                "seeds": ",".join(map(str, seeds)),
                "budgets": ",".join(map(str, budgets)),
                "reference": reference,
                "task": fixed.task_ref.label,
                "score": metric.name,
                "score_direction": metric.direction,
                **asdict(tune),
                "storage": masked(with_password(tune.storage)),
            }
        )
        for seed in seeds:  # paired: every method sees this seed's partition and initial model
            for budget in budgets:
                for method in methods:
                    stop.check()
                    name = f"{flow_run.name}-{method}-b{budget}-s{seed}"
                    summary = hpo_study(
                        **(study_settings(tune, method, budget, options) | {"study_name": name}),
                        train=asdict(fixed) | {"seed": seed},
                        parent_run_id=tracker.run_id,
                        **asdict(replace(execution, dask_address=address)),
                    )
                    bar().advance(studies=1)
                    rows.append(
                        {
                            "method": method,
                            "budget": budget,
                            "seed": seed,
                            test: summary.get(test, float("nan")),
                            val: summary.get(val, float("nan")),
                            "rounds_used": summary["rounds_used"],
                            "wall_time_s": summary["wall_time_s"],
                            "run_id": summary["run_id"],
                            "model_version": summary.get("model_version"),
                        }
                        | {k: v for k, v in summary.items() if k in FINAL_COSTS or k.startswith("final_personal_")}
                    )
                    logger.info(
                        "%s budget %d seed %d: %s %.4f [%d/%d studies]",
                        method,
                        budget,
                        seed,
                        test,
                        rows[-1][test],
                        len(rows),
                        studies,
                    )
        results = pd.DataFrame(rows)
        table = comparison_table(results, reference, metric)
        tracker.log_table(results, "comparison/results.csv")
        tracker.log_table(paired_differences(results, reference, metric=metric), "comparison/paired.csv")
        tracker.log_table(table.reset_index(), "comparison/table.csv")
        tracker.log_text(markdown_table(table), "comparison/table.md")
        figure = "accuracy" if metric.name == "acc" else metric.name
        tracker.log_figure(comparison_figure(results, metric), f"comparison/{figure}_vs_budget.png")
        personal = {}  # the same tables on each personalized score, the objective's first
        for column in personal_columns(results, objective, metric):
            personal[column] = comparison_table(results, reference, metric, column)
            name = column.removeprefix("final_")
            tracker.log_table(personal[column].reset_index(), f"comparison/{name}_table.csv")
            tracker.log_figure(comparison_figure(results, metric, column), f"comparison/{name}_vs_budget.png")
            means = results.groupby(["method", "budget"], sort=False)[column].mean()
            for (method, budget), mean in means.items():
                tracker.log_metrics({f"mean_{column}/{method}": mean}, step=int(budget))
        means = results.groupby(["method", "budget"], sort=False)[test].mean()
        for (method, budget), mean in means.items():  # a chart per method: the score against budget
            tracker.log_metrics({f"mean_{test}/{method}": mean}, step=int(budget))
        outcome = {}
        if (winner := comparison_winner(results, metric)) is not None:
            tracker.log_params({"winner": winner.method})
            outcome["champion"] = f"{winner.method}, budget {winner.budget}, seed {winner.seed}"
            if register_model and winner.model_version:
                set_model_alias(register_model, CHAMPION, winner.model_version)
                outcome["champion_version"] = winner.model_version
        tracker.describe(
            comparison_markdown(flow_run.name, table, rows, reference, seeds, outcome, tracker, "", metric, personal)
        )
        create_markdown_artifact(
            comparison_markdown(
                flow_run.name, table, rows, reference, seeds, outcome, tracker, ui_base(), metric, personal
            ),
            key=artifact_key(f"comparison-{flow_run.name}"),
            description="Method comparison",
        )
    return {
        "table": markdown_table(table),
        "personalized_tables": {k: markdown_table(t) for k, t in personal.items()},
        "score": metric.name,
        "direction": metric.direction,
        "results": rows,
        "run_id": tracker.run_id,
        "experiment_id": tracker.experiment_id,
    } | outcome
