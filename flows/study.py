"""The `hpo-study` flow: search hyperparameters under a round budget, retrain the best, report."""

import re
import time
from dataclasses import asdict, fields

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from cli.interrupts import cooperative_interrupts
from cli.progress import StudyProgress
from fedhpo_core.federation import FederatedData, Federation
from fedhpo_core.reports import importance_figure, importance_table, markdown_table, study_figures, study_table
from fedhpo_core.search.base import RUN_ATTR, configuration_of, rounds_spent, spent
from fedhpo_core.search.space import Configuration
from fedhpo_core.search.study import (
    FINAL_ATTR,
    TuneSettings,
    best_trial,
    default_storage,
    limits_text,
    open_study,
    run_search,
    study_definition,
)
from fedhpo_core.settings import ExecutionSettings, TrainSettings
from fedhpo_core.stores import masked, with_password
from fedhpo_core.task import ACCURACY, Metric, TaskRef, prepared
from fedhpo_core.tracking import (
    ROLE_TAG,
    STUDY_TAG,
    Tracker,
    compare_url,
    run_url,
    tracking_uri,
    ui_base,
    view_url,
)
from fedhpo_core.trial import TrialTrainer, align_trial_runs, retrain
from flows.training import run_parameters
from tasks.training import announce_engine, load_data, partition_data, round_steps, task_params


def artifact_key(name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from a study or run name."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def study_markdown(
    summary: dict, table: pd.DataFrame, tune: TuneSettings, base: str = "", top: int = 10, metric: Metric = ACCURACY
) -> str:
    """The study's summary and its best trials, with links to its MLflow runs in the UI at `base`
    ('' within the MLflow UI): the run's description and the flow run's Markdown artifact."""

    def link(text: str, run_id: str) -> str:
        return f"[{text}]({run_url(base, summary['experiment_id'], run_id)})"

    trials = compare_url(base, summary["experiment_id"], summary["trial_run_ids"])
    rows = {
        "study": link(summary["study_name"], summary["run_id"]),
        "method": tune.method,
        "rounds used": f"{summary['rounds_used']}"
        + (
            f" of {tune.budget}"
            if tune.budget_unit == "rounds"
            else f" ({summary['budget_spent']:g} of {tune.budget} {tune.budget_unit})"
        ),
        "trials finished": f"{len(table)} ([compared]({trials}): hyperparameters against score)",
    }
    if summary["best_trial"] is None:
        rows["best validation score"] = f"none within {limits_text(tune.search_method().limits)}"
    else:
        rows["best trial"] = link(f"trial {summary['best_trial']}", summary["best_trial_run_id"])
        rows["best configuration"] = summary["best_configuration"]
        rows[f"best validation score ({metric.name})"] = f"{summary['best_val_score']:.4f}"
    test = f"final_test_{metric.name}"
    if test in summary:
        retrained = link(f"best retrained {tune.final_rounds} rounds", summary["final_run_id"])
        rows[f"test {'accuracy' if metric.name == 'acc' else metric.name}, {retrained}"] = f"{summary[test]:.4f}"
        for key in (f"final_personal_{metric.name}", f"final_personal_{metric.name}_worst10"):
            if key in summary:
                worst = " (worst tenth of clients)" if key.endswith("worst10") else " (mean of clients)"
                rows[f"personalized {metric.name}{worst}, clients' validation"] = f"{summary[key]:.4f}"
    if "model_version" in summary:
        rows["registered model"] = f"`models:/{tune.register_model}/{summary['model_version']}`"
    lines = [f"### Study: {tune.method}, budget {tune.budget} {tune.budget_unit}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    studies = view_url(base, summary["experiment_id"], STUDIES_VIEW)
    lines += ["", f"[All studies of the experiment]({studies}), grouped by method, the best test score first."]
    lines += ["", f"Best {min(top, len(table))} trials:", ""]
    columns = ["value", "rounds_used", *(c for c in table.columns if c.startswith("params_"))]
    best = table.sort_values("value", ascending=not metric.maximize).head(top)[columns]
    best = best.round({"value": 4}).astype({"rounds_used": int}).rename(columns={"value": "validation score"})
    return "\n".join(lines) + "\n" + markdown_table(best.rename(columns=lambda c: c.removeprefix("params_")))


# What a final run cost besides rounds, as the study run's metrics `final_<cost>` where it has them
# (and a comparison's columns).
SHOWN_COSTS = ("sim_time_s", "time_to_target_s", "epsilon")
FINAL_COSTS = tuple(f"final_{k}" for k in SHOWN_COSTS)
# The task a study tunes for, as params of its run (the runs table groups and filters on them); the
# other fixed settings are params `fixed.<name>`.
TASK_PARAMS = ("dataset", "task", "model", "partition", "alpha", "clients", "seed")
# The experiment's runs table as a comparison of its studies: grouped by method, the most accurate first.
STUDIES_VIEW = "fedhpo-studies"


def studies_view(metric: Metric = ACCURACY) -> dict:
    """The shared view `STUDIES_VIEW` (`Tracker.share_view`): study runs, their method, budget,
    seed and dataset beside what they found (a screen wide; the other task params filter), the
    best test score first."""
    columns = [f"params.`{name}`" for name in ("method", "budget", "seed", "dataset")]
    columns += [f"metrics.`{name}`" for name in (f"final_test_{metric.name}", "best_val_score", "rounds_used")]
    return {
        "searchFilter": f"tags.`{ROLE_TAG}` = 'study'",
        "selectedColumns": columns,
        "orderByKey": f"metrics.`final_test_{metric.name}`",
        "orderByAsc": not metric.maximize,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": "method"}]},
    }


def run_study(
    tune: TuneSettings,
    fixed: TrainSettings,
    execution: ExecutionSettings = ExecutionSettings(),
    parent_run_id: str | None = None,
) -> dict:
    logger = get_run_logger()
    started = time.perf_counter()
    fixed = prepared(fixed)
    method = tune.search_method()
    tune.check_with(fixed)
    space = tune.space()
    dataset, partition = load_data(fixed.task_ref, fixed.data_root), partition_data(fixed.data)
    data = FederatedData.build(dataset, partition, fixed.model, execution.resolved_device, fixed.task_ref)
    metric = data.spec.score
    method.use_score(metric)
    announce_engine(data.spec, execution, logger)
    storage = with_password(tune.storage) or default_storage(tracking_uri())
    name = tune.name_for(fixed)
    budget = tune.budget_of(Federation.of(data, fixed), fixed)
    study = open_study(method, storage, name, tune.resume, tune.join, study_definition(tune, fixed))

    tags = {ROLE_TAG: "study", STUDY_TAG: name, "prefect.flow_run_id": str(flow_run.id)}
    # Processes joining a shared study each keep their own study run; a resumed study reopens its run.
    parent_id = None if tune.join else study.user_attrs.get(RUN_ATTR)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with (
        cooperative_interrupts() as stop,
        Tracker(fixed.experiment, name, tags, run_id=parent_id) as tracker,
        round_steps(execution, fixed.data) as steps,
    ):
        if parent_id is None:
            if RUN_ATTR not in study.user_attrs:
                study.set_user_attr(RUN_ATTR, tracker.run_id)
            tracker.share_view(STUDIES_VIEW, studies_view(metric))
            fixed_values = asdict(fixed)
            options = asdict(tune.method_options)
            tracker.log_params(
                {k: v for k, v in asdict(tune).items() if k != "options"}
                | {f"option.{k}": v for k, v in options.items()}
                | {k: fixed_values[k] for k in TASK_PARAMS}
                | task_params(fixed, data.spec)
                | {f"fixed.{k}": v for k, v in fixed_values.items() if k not in TASK_PARAMS}
                | {"storage": masked(storage), "study_name": name}
                | {f"execution.{k}": v for k, v in asdict(execution).items()}
            )
        progress = StudyProgress(study, budget)

        trainer = TrialTrainer(
            data,
            fixed,
            tune.objective,
            tracker,
            name,
            steps,
            on_round=progress.round,  # a stop request ends a trial at its round's end (`SearchContext.train`)
            log=lambda line: logger.info("%s %s", line, progress.trial()),
            evaluation=tune.evaluation(),
            checkpoint_every=tune.checkpoint_every,
        )
        try:
            budget = run_search(
                method,
                study,
                space,
                tune.scope,
                fixed.clients,
                trainer,
                budget.limit,
                tune.n_configs,
                fixed.seed,
                fixed,
                data,
                tune.workers,
                tune.join,
                stop,
                budget.unit,
                budget.round_cost,
                tune.lease,
            )
        finally:
            align_trial_runs(tracker, study, name, metric)
        progress.finish(spent(study, budget.unit))

        table = study_table(study, method.objectives if len(study.directions) > 1 else ())
        tracker.log_table(table, "study/trials.csv")
        parameters = space.parameters(tune.scope, fixed.clients)
        for artifact, figure in study_figures(table, parameters, maximize=metric.maximize).items():
            tracker.log_figure(figure, f"study/{artifact}")
        importances = importance_table(study, fixed.seed)
        tracker.log_table(importances, "study/param_importances.csv")
        tracker.log_figure(
            importance_figure(importances, f"{name}: parameter importances"), "study/param_importances.png"
        )
        for artifact, report in method.reports(study, table).items():
            if isinstance(report, pd.DataFrame):
                tracker.log_table(report, f"study/{artifact}")
            else:
                tracker.log_figure(report, f"study/{artifact}")

        best = best_trial(study)
        summary = {"study_name": name, "best_trial": None}
        if best is None:  # every complete trial is over a limit: nothing to retrain
            logger.warning("study %s: no trial within %s", name, limits_text(method.limits))
        else:
            configuration = Configuration(configuration_of(best))
            tracker.log_params({f"best.{k}": v for k, v in configuration.values.items()} | {"best.trial": best.number})
            summary |= {"best_trial": best.number, "best_val_score": best.values[0], **configuration.values}
            summary["best_configuration"] = configuration.text()
            summary["best_trial_run_id"] = best.user_attrs.get(RUN_ATTR)
        if best is not None and tune.final_rounds:
            final = retrain(
                data,
                fixed,
                configuration,
                tune.final_rounds,
                tracker,
                steps,
                method.final_tuner(fixed),
                lambda _: stop.check(),
                about={"method": tune.method, "study": name},
                register_as=tune.register_model,
            )
            last = final.result.evaluations[-1]
            summary |= {f"final_test_{metric.name}": last.test_score, f"final_val_{metric.name}": last.val_score}
            summary |= {f"final_{k}": v for k, v in (last.others | final.personal).items()}
            summary["final_run_id"] = final.run_id
            summary["final_frozen"] = final.result.frozen
            summary |= {f"final_{k}": final.costs[k] for k in SHOWN_COSTS if k in final.costs}
            if final.model_version:
                summary["model_version"] = final.model_version
        study.set_user_attr(FINAL_ATTR, summary.get("final_run_id"))  # ended: `--resume` starts nothing
        summary |= {"rounds_used": rounds_spent(study), "budget_spent": budget.spent, "trials_finished": len(table)}
        ran = [t for t in study.trials if t.number in table.index and RUN_ATTR in t.user_attrs]
        summary["trial_run_ids"] = [t.user_attrs[RUN_ATTR] for t in ran]
        summary["wall_time_s"] = time.perf_counter() - started
        # The run's metrics are what the study found (the best first, alphabetically), never the last trial's.
        found = ("best_val_score", f"final_test_{metric.name}", f"final_val_{metric.name}", "rounds_used")
        found += ("trials_finished", "wall_time_s") + (("budget_spent",) if tune.budget_unit != "rounds" else ())
        others = [
            k for k in summary if k.startswith(("final_val_", "final_test_", "final_personal_")) and k not in found
        ]
        tracker.log_metrics({k: summary[k] for k in (*found, *others, *FINAL_COSTS) if k in summary})
        summary |= {"run_id": tracker.run_id, "experiment_id": tracker.experiment_id, "storage": masked(storage)}
        summary |= {"score": metric.name, "direction": metric.direction}
        tracker.describe(study_markdown(summary, table, tune, metric=metric))  # the run's Overview: what it found
        create_markdown_artifact(
            study_markdown(summary, table, tune, ui_base(), metric=metric),
            key=artifact_key(f"study-{name}"),
            description=f"Study {name}",
        )
        logger.info(
            "study %s: best trial %s %s; %g of %d %s used",
            name,
            summary["best_trial"],
            best.params if best else {},
            budget.spent,
            tune.budget,
            tune.budget_unit,
        )
    return summary


def study_run_name() -> str:
    """A study's flow run is named for what it tunes (method, dataset, budget, seed): a week of
    scheduled runs reads apart in the Prefect UI."""
    parameters = run_parameters(hpo_study.fn)
    train = parameters["train"] or {}
    label = TaskRef(train.get("task") or train.get("dataset", TrainSettings.dataset)).label
    return f"{parameters['method']}-{label}-b{parameters['budget']}-s{train.get('seed', TrainSettings.seed)}"


@flow(name="hpo-study", flow_run_name=study_run_name)
def hpo_study(
    method: str = "tpe",
    budget: int = 30,
    budget_unit: str = "rounds",
    n_configs: int = 30,
    final_rounds: int = 20,
    scope: str = "global",
    search_space: str | None = None,
    objective: str = "server",
    eval_clients: int = 0,
    eval_noise: float = 0.0,
    storage: str | None = None,
    study_name: str | None = None,
    resume: bool = False,
    workers: int = 1,
    join: bool = False,
    checkpoint_every: int = 1,
    lease_s: float = 10.0,
    lease_grace_s: float = 60.0,
    max_epsilon: float = 0.0,
    max_bytes: float = 0.0,
    register_model: str | None = None,
    options: dict | None = None,
    train: dict | None = None,
    task_runner: str = "thread",
    dask_address: str | None = None,
    dask_workers: int = 2,
    engine: str = "cohort",
    device: str = "auto",
    parent_run_id: str | None = None,
) -> dict:
    """Search a federated run's hyperparameters under a budget (communication rounds by default).

    Args:
        method: A declared search method (`fedhpo methods`): random, grid, tpe, gp, multiobjective,
            sha, hyperband, bohb, asha, async-hyperband, pbt, fedtune, fedex, stepwise, fedhyper, autofedrl...
        budget: What the search may spend, every round of every trial, in budget_unit.
        budget_unit: rounds, client-updates (sampled clients x rounds), bytes (up and down) or
            sim-seconds (the devices' simulated time).
        n_configs: Configurations to try (successive halving: its first rung).
        final_rounds: Rounds to retrain the best configuration from scratch and test it.
        scope: global (one configuration for all clients) or personalized (one per client).
        search_space: Path of a YAML search space; default: the FedTune paper's.
        objective: Score trials on the server's validation split (server) or clients' reports (clients).
        eval_clients: Noisy evaluation (Kuo et al. 2023): score each round on this many random clients'
            validation data instead (0: off).
        eval_noise: Noisy evaluation: Laplace scale of the noise added to each round's score (0: off).
        storage: Optuna storage URL (sqlite:///..., postgresql://...); default: optuna.db beside the MLflow store.
            Give it without its password (PostgreSQL: PGPASSWORD in the environment of the process that runs the flow).
        study_name: Optuna study name; default: derived from the settings.
        resume: Continue the interrupted study of that name.
        workers: Trials trained at once (random, grid, tpe, gp, multiobjective, asha, async-hyperband).
        join: Share the study with other processes using the same storage (created if missing).
        checkpoint_every: Round-level methods: rounds between checkpoints of a run and its tuner
            (a kill loses at most these).
        lease_s: Seconds between renewals of the lease a process holds on each trial it trains.
        lease_grace_s: With join: a trial whose lease went this many seconds unrenewed (its process
            killed) is settled by another process as resume would, and its room used.
        max_epsilon: Privacy budget: a trial that spent more epsilon is never the best (0: none).
        max_bytes: Communication limit: a trial that sent more bytes is never the best (0: none).
        register_model: Register the retrained best model as a version of this name in MLflow's
            Model Registry (tagged with the method, study, seed and test accuracy).
        options: The method's options by name, e.g. {"signal": "after"} for fedex or {"schedulers": "global"}
            for fedhyper (`fedhpo methods` lists each method's, with their defaults).
        train: Fixed training settings (any parameter of federated-training).
        task_runner: thread (the round's clients in the flow's process) or dask (shares on a cluster).
        dask_address: Scheduler address of a running Dask cluster; default: start a local one.
        dask_workers: Worker processes of that local Dask cluster.
        engine: cohort (a round's clients train as one batched computation) or sequential.
        device: cpu, cuda, or auto (cuda when available).
        parent_run_id: MLflow run to nest the study's run under (a comparison's).
    """
    arguments = dict(locals())
    arguments["options"] = options or {}
    tune = TuneSettings(**{f.name: arguments[f.name] for f in fields(TuneSettings)})
    execution = ExecutionSettings(**{f.name: arguments[f.name] for f in fields(ExecutionSettings)})
    return run_study(tune, TrainSettings(**(train or {})), execution, parent_run_id)
