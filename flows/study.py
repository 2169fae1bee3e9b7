"""The `hpo-study` flow: search hyperparameters under a round budget, retrain the best, report."""

import re
import time
from dataclasses import asdict, fields

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from fedhpo_core.federation import FederatedData
from fedhpo_core.reports import importance_figure, importance_table, markdown_table, study_figures, study_table
from fedhpo_core.search.base import RUN_ATTR, configuration_of
from fedhpo_core.search.space import Configuration
from fedhpo_core.search.study import (
    TuneSettings,
    best_trial,
    default_storage,
    limits_text,
    open_study,
    run_search,
    study_definition,
)
from fedhpo_core.settings import ExecutionSettings, TrainSettings
from fedhpo_core.tracking import ROLE_TAG, STUDY_TAG, Tracker, tracking_uri
from fedhpo_core.trial import TrialTrainer, align_trial_runs, retrain
from flows.interrupts import cooperative_interrupts
from flows.progress import StudyProgress
from tasks.training import load_data, partition_data, round_steps


def artifact_key(name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from a study or run name."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def study_markdown(summary: dict, table: pd.DataFrame, tune: TuneSettings, top: int = 10) -> str:
    """The study's summary and its best trials, for a Prefect Markdown artifact."""
    lines = [
        f"### Study `{summary['study_name']}`: {tune.method}, budget {tune.budget} rounds",
        "",
        "| | |",
        "|---|---|",
        f"| best trial | {summary['best_trial']} |",
        f"| best configuration | {summary.get('best_configuration', '-')} |",
        f"| rounds used | {summary['rounds_used']} of {tune.budget} |",
        f"| trials finished | {len(table)} |",
    ]
    if "best_val_score" in summary:
        lines.insert(6, f"| best validation score | {summary['best_val_score']:.4f} |")
    else:
        lines.insert(6, f"| best validation score | none within {limits_text(tune.search_method().limits)} |")
    if "final_test_acc" in summary:
        lines.append(f"| test accuracy, best retrained {tune.final_rounds} rounds | {summary['final_test_acc']:.4f} |")
    lines += [f"| MLflow run | `{summary['run_id']}` |", "", f"Best {min(top, len(table))} trials:", ""]
    columns = ["value", "rounds_used", *(c for c in table.columns if c.startswith("params_"))]
    best = table.sort_values("value", ascending=False).head(top)[columns]
    return "\n".join(lines) + "\n" + markdown_table(best.rename(columns=lambda c: c.removeprefix("params_")))


def run_study(
    tune: TuneSettings,
    fixed: TrainSettings,
    execution: ExecutionSettings = ExecutionSettings(),
    parent_run_id: str | None = None,
) -> dict:
    logger = get_run_logger()
    started = time.perf_counter()
    method = tune.search_method()
    tune.check_with(fixed)
    space = tune.space()
    storage = tune.storage or default_storage(tracking_uri())
    name = tune.name_for(fixed)
    study = open_study(method, storage, name, tune.resume, tune.join, study_definition(tune, fixed))
    dataset, partition = load_data(fixed.dataset, fixed.data_root), partition_data(fixed.data)
    data = FederatedData.build(dataset, partition, fixed.model, execution.resolved_device)

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
            tracker.log_params(
                {**asdict(tune), **{f"fixed.{k}": v for k, v in asdict(fixed).items()}, "storage": storage}
                | {"study_name": name, "seed": fixed.seed}
                | {f"execution.{k}": v for k, v in asdict(execution).items()}
            )
        progress = StudyProgress(study, tune.budget)

        def after_round() -> None:
            progress.round()
            stop.check()

        trainer = TrialTrainer(
            data,
            fixed,
            tune.objective,
            tracker,
            name,
            steps,
            on_round=after_round,
            log=lambda line: logger.info("%s %s", line, progress.trial()),
            evaluation=tune.evaluation(),
        )
        try:
            budget = run_search(
                method,
                study,
                space,
                tune.scope,
                fixed.clients,
                trainer,
                tune.budget,
                tune.n_configs,
                fixed.seed,
                fixed,
                data,
                tune.workers,
                tune.join,
                stop,
            )
        finally:
            align_trial_runs(tracker, study, name)
        progress.finish(budget.spent)

        table = study_table(study, method.objectives if len(study.directions) > 1 else ())
        tracker.log_table(table, "study/trials.csv")
        for number, row in table.iterrows():
            values = {f"config/{k.removeprefix('params_')}": v for k, v in row.items() if k.startswith("params_")}
            tracker.log_metrics({**values, "trial_score": row["value"]}, step=int(number))
        for artifact, figure in study_figures(table, space.parameters(tune.scope, fixed.clients)).items():
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
            summary["best_configuration"] = ", ".join(f"{k} {v}" for k, v in configuration.values.items())
        if best is not None and tune.final_rounds:
            final, costs = retrain(
                data,
                fixed,
                configuration,
                tune.final_rounds,
                tracker,
                steps,
                method.final_tuner(fixed),
                lambda _: stop.check(),
            )
            summary["final_test_acc"] = final.evaluations[-1].test_acc
            shown = ("sim_time_s", "time_to_target_s", "epsilon")  # what a comparison shows beside accuracy
            summary |= {f"final_{k}": costs[k] for k in shown if k in costs}
        summary |= {"rounds_used": budget.spent, "wall_time_s": time.perf_counter() - started}
        tracker.log_metrics({k: summary[k] for k in ("final_test_acc", "rounds_used", "wall_time_s") if k in summary})
        summary |= {"run_id": tracker.run_id, "experiment_id": tracker.experiment_id, "storage": storage}
        description = study_markdown(summary, table, tune)
        tracker.describe(description)  # the run's Overview says what the study found
        create_markdown_artifact(description, key=artifact_key(f"study-{name}"), description=f"Study {name}")
        logger.info(
            "study %s: best trial %s %s; %d of %d rounds used",
            name,
            summary["best_trial"],
            best.params if best else {},
            budget.spent,
            tune.budget,
        )
    return summary


@flow(name="hpo-study")
def hpo_study(
    method: str = "tpe",
    budget: int = 30,
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
    schedulers: str = "global,server_local,client_local",
    objectives: str = "bytes_sent,client_compute_samples,unfairness",
    max_epsilon: float = 0.0,
    train: dict | None = None,
    task_runner: str = "thread",
    dask_address: str | None = None,
    dask_workers: int = 2,
    engine: str = "cohort",
    device: str = "auto",
    parent_run_id: str | None = None,
) -> dict:
    """Search a federated run's hyperparameters under a budget of communication rounds.

    Args:
        method: random, grid, tpe, gp, sha, hyperband, bohb, asha, async-hyperband, multiobjective,
            fedtune, fedtune-paper, fedex, fedex-paper, pbt, stepwise, stepwise-paper or fedhyper.
        budget: Communication rounds the search may spend, every round of every trial.
        n_configs: Configurations to try (successive halving: its first rung).
        final_rounds: Rounds to retrain the best configuration from scratch and test it.
        scope: global (one configuration for all clients) or personalized (one per client).
        search_space: Path of a YAML search space; default: the FedTune paper's.
        objective: Score trials on the server's validation split (server) or clients' reports (clients).
        eval_clients: Noisy evaluation (Kuo et al. 2023): score each round on this many random clients'
            validation data instead (0: off).
        eval_noise: Noisy evaluation: Laplace scale of the noise added to each round's score (0: off).
        storage: Optuna storage URL (sqlite:///..., postgresql://...); default: optuna.db beside the MLflow store.
        study_name: Optuna study name; default: derived from the settings.
        resume: Continue the interrupted study of that name.
        workers: Trials trained at once (random, grid, tpe, gp, multiobjective, asha, async-hyperband).
        join: Share the study with other processes using the same storage (created if missing).
        schedulers: FedHyper's schedulers (method fedhyper), comma-separated: global, server_local, client_local.
        objectives: The multiobjective method's costs to minimize beside accuracy, comma-separated: bytes_sent,
            client_compute_samples, unfairness, sim_time_s, time_to_target_s, epsilon.
        max_epsilon: Privacy budget: a trial that spent more epsilon is never the best (0: none).
        train: Fixed training settings (any parameter of federated-training).
        task_runner: thread (the round's clients in the flow's process) or dask (shares on a cluster).
        dask_address: Scheduler address of a running Dask cluster; default: start a local one.
        dask_workers: Worker processes of that local Dask cluster.
        engine: cohort (a round's clients train as one batched computation) or sequential.
        device: cpu, cuda, or auto (cuda when available).
        parent_run_id: MLflow run to nest the study's run under (a comparison's).
    """
    arguments = dict(locals())
    tune = TuneSettings(**{f.name: arguments[f.name] for f in fields(TuneSettings)})
    execution = ExecutionSettings(**{f.name: arguments[f.name] for f in fields(ExecutionSettings)})
    return run_study(tune, TrainSettings(**(train or {})), execution, parent_run_id)
