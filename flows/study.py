"""The `hpo-study` flow: search hyperparameters under a round budget, retrain the best, report."""

import math
import re
import threading
import time
from dataclasses import asdict, fields

import numpy as np
import optuna
import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from fedhpo_core.federation import FederatedData, Federation, FederationResult, RoundReport, RoundSteps
from fedhpo_core.models import load_flat_weights
from fedhpo_core.reports import (
    ConfigTrajectory,
    lineage_figure,
    markdown_table,
    round_metrics,
    study_figures,
    study_table,
    trajectory_figure,
)
from fedhpo_core.search.base import (
    RESULT_ATTR,
    TrialResult,
    configuration_of,
    finished_trials,
    record_result,
    rounds_spent,
    score_of,
)
from fedhpo_core.search.space import Configuration
from fedhpo_core.search.study import (
    METHODS,
    TuneSettings,
    best_trial,
    default_storage,
    open_study,
    run_search,
    study_definition,
)
from fedhpo_core.settings import ExecutionSettings, TrainSettings
from fedhpo_core.tracking import Tracker, tracking_uri
from fedhpo_core.tuners import PerClientConfig, Tuner
from flows.interrupts import StopRequest, cooperative_interrupts
from tasks.training import load_data, partition_data, round_steps

FLOAT_BYTES = 4


def system_objectives(reports: list[RoundReport], model_size: int) -> dict[str, float]:
    """What a run cost the system: bytes sent (the model down and up for every sampled client and
    round), client compute (training samples processed), and unfairness (spread of the clients'
    last reported validation accuracies)."""
    uploads = [u for r in reports for u in r.updates]
    last = [u.val_acc for u in reports[-1].updates if math.isfinite(u.val_acc)] if reports else []
    return {
        "bytes_sent": float(2 * len(uploads) * model_size * FLOAT_BYTES),
        "client_compute_samples": float(
            sum(u.num_samples * r.configs[u.client].local_epochs for r in reports for u in r.updates)
        ),
        "unfairness": float(np.std(last)) if len(last) > 1 else 0.0,
    }


def train_configuration(
    data: FederatedData,
    fixed: TrainSettings,
    configuration: Configuration,
    rounds: int,
    tracker: Tracker,
    steps: RoundSteps,
    start=None,
    tuner: Tuner | None = None,
    on_round=None,
) -> tuple[FederationResult, list[RoundReport], list[dict]]:
    """`rounds` rounds of the configuration (from `start` if given), or of `tuner`'s choices with
    the configuration's other settings; each round's metrics and tuner state tracked."""
    settings = configuration.settings(fixed)
    federation = Federation(data, settings.server, settings.participation, settings.seed)
    tuner = tuner or PerClientConfig(configuration.client_configs(fixed))
    reports: list[RoundReport] = []
    trajectory: list[dict] = []
    configs = ConfigTrajectory()

    def observe(report, evaluation):
        reports.append(report)
        configs.record(report)
        state = tuner.state()
        trajectory.extend({"round": report.round, "name": k, "value": v} for k, v in state.items())
        trajectory.extend(
            {"round": report.round, "client": client, "name": k, "value": v}
            for client, values in tuner.client_state().items()
            for k, v in values.items()
        )
        tracker.log_metrics(round_metrics(report, evaluation) | state, report.round)
        if on_round:
            on_round()

    result = federation.run(tuner, rounds, steps, start=start, observe=observe)
    tracker.log_client_configs(configs)
    return result, reports, trajectory


class StudyProgress:
    """Counters of a study in progress: trials finished and rounds spent against the budget, in the
    log (the terminal) and in a Prefect progress artifact (the UI), updated at most once a second
    (an API call each). Thread-safe: parallel trials share one."""

    UPDATE_INTERVAL_S = 1.0

    def __init__(self, study: optuna.Study, budget: int):
        self.trials, self.rounds, self.budget = len(finished_trials(study)), rounds_spent(study), budget
        self.lock = threading.Lock()
        self.artifact = create_progress_artifact(self.percent, description=f"rounds spent of {budget}")
        self.updated = time.monotonic()

    @property
    def percent(self) -> float:
        return min(100.0, 100.0 * self.rounds / self.budget)

    def round(self) -> None:
        with self.lock:
            self.rounds += 1
            if time.monotonic() - self.updated >= self.UPDATE_INTERVAL_S:
                update_progress_artifact(self.artifact, self.percent)
                self.updated = time.monotonic()

    def finish(self, spent: int) -> None:
        """The study's rounds spent, by every process that shared it."""
        with self.lock:
            self.rounds = spent
            update_progress_artifact(self.artifact, self.percent)

    def trial(self) -> str:
        with self.lock:
            self.trials += 1
            return f"[{self.trials} trials, {self.rounds}/{self.budget} rounds]"


class TrialTrainer:
    """Trains configurations for a search method: each trial an MLflow run nested under the study's,
    its clients Prefect task runs; a continued trial (successive halving) reopens its own run.
    Asked to stop, a trial in training ends at the end of its round (`Interrupted`)."""

    def __init__(
        self,
        data: FederatedData,
        fixed: TrainSettings,
        tune: TuneSettings,
        study_run: Tracker,
        name: str,
        steps: RoundSteps,
        progress: StudyProgress,
        stop: StopRequest,
    ):
        self.data, self.fixed, self.tune, self.study_run, self.name = data, fixed, tune, study_run, name
        self.steps, self.progress, self.stop = steps, progress, stop
        self.runs: dict[int, str] = {}
        self.trained: dict[int, int] = {}  # rounds each trial's run trained
        self.logger = get_run_logger()

    def round(self) -> None:
        self.progress.round()
        self.stop.check()

    def __call__(self, trial, configuration: Configuration, rounds: int, start, tuner=None) -> TrialResult:
        self.stop.check()
        number = trial.number
        if number in self.runs:
            tracker = Tracker(self.fixed.experiment, run_id=self.runs[number])
        else:
            tags = {"fedhpo.role": "trial", "fedhpo.trial": str(number), "fedhpo.study": self.name}
            tracker = Tracker(self.fixed.experiment, f"trial-{number}", tags, parent=self.study_run)
            tracker.log_params({"trial": number, **configuration.values})
            self.runs[number] = tracker.run_id
        with tracker:
            outcome, reports, trajectory = train_configuration(
                self.data, self.fixed, configuration, rounds, tracker, self.steps, start, tuner, self.round
            )
            last = reports[-1]
            result = TrialResult(
                score=last.val_acc if self.tune.objective == "server" else last.client_val_acc,
                rounds=len(outcome.evaluations),
                state=outcome.state,
                diverged=outcome.diverged,
                objectives=system_objectives(reports, self.data.spec.size),
                chosen=tuner.chosen() if tuner else {},
            )
            record_result(trial, result)
            self.trained[number] = self.trained.get(number, 0) + result.rounds  # over a promoted trial's rungs
            tracker.log_metrics(trial_metrics(result, self.trained[number]))
            if trajectory:
                table = pd.DataFrame(trajectory)
                tracker.log_table(table, "trajectory/tuner_state.csv")
                tracker.log_figure(trajectory_figure(table, type(tuner).__name__), "trajectory/tuner_state.png")
            tracker.log_weights(outcome.state.weights, "checkpoint/weights.pt")
        ending = f"diverged at round {outcome.diverged_round}" if outcome.diverged else f"{outcome.state.round} rounds"
        self.logger.info(
            "trial %d: %s -> val score %.4f %s %s",
            number,
            ending,
            score_of(result),
            configuration.values,
            self.progress.trial(),
        )
        return result


def trial_metrics(result: TrialResult, rounds_used: int) -> dict[str, float]:
    """A trial run's summary metrics: `score` is the value the study is told (0 for a diverged
    trial), `rounds_used` the rounds the run trained (a promoted trial's over all its rungs)."""
    objectives = {f"objective/{k}": v for k, v in result.objectives.items()}
    return {"score": score_of(result), "rounds_used": rounds_used, "diverged": float(result.diverged)} | objectives


def align_trial_runs(tracker: Tracker, study: optuna.Study, name: str) -> None:
    """Trial runs end as their trials did: FINISHED for a told trial (a trial told from its recorded
    result after an interrupt gets its summary metrics here if its run had not logged them),
    KILLED for a failed one (interrupted, or left by a killed process). Trials still RUNNING (in
    another process sharing the study) are left alone."""
    states = {t.number: t for t in study.get_trials(deepcopy=False)}
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`fedhpo.study` = '{name}'")
    for run in runs:
        trial = states.get(int(run.data.tags.get("fedhpo.trial", -1)))
        if trial is None or trial.state == optuna.trial.TrialState.RUNNING:
            continue
        if trial.state == optuna.trial.TrialState.FAIL:
            if run.info.status != "KILLED":
                tracker.client.set_terminated(run.info.run_id, "KILLED")
        elif run.info.status != "FINISHED":
            recorded = trial.user_attrs.get(RESULT_ATTR)
            with Tracker(name, run_id=run.info.run_id) as reopened:  # ends FINISHED
                if recorded and "score" not in run.data.metrics:
                    result = TrialResult(state=None, **recorded)
                    reopened.log_metrics(trial_metrics(result, result.rounds))


def retrain(
    data: FederatedData,
    fixed: TrainSettings,
    configuration: Configuration,
    rounds: int,
    parent: Tracker,
    steps: RoundSteps,
    tuner=None,
    on_round=None,
):
    """The best configuration from scratch for `rounds` rounds (driven by `tuner` if given), scored
    on the test set."""
    with Tracker(fixed.experiment, "final", {"fedhpo.role": "final"}, parent=parent) as tracker:
        tracker.log_params(configuration.values | ({"scheduled_by": type(tuner).__name__} if tuner else {}))
        result, _, _ = train_configuration(
            data, fixed, configuration, rounds, tracker, steps, tuner=tuner, on_round=on_round
        )
        if not result.diverged:
            model = load_flat_weights(data.spec.build(), result.state.weights)
            tracker.log_model(model, input_example=data.test[0][:8].cpu().numpy().astype(np.float32))
    return result


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
        f"| best validation score | {summary['best_val_score']:.4f} |",
        f"| rounds used | {summary['rounds_used']} of {tune.budget} |",
        f"| trials finished | {len(table)} |",
    ]
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
    method = METHODS[tune.method]()
    space = tune.space()
    space.check(fixed)
    storage = tune.storage or default_storage(tracking_uri())
    name = tune.name_for(fixed)
    study = open_study(method, storage, name, tune.resume, tune.join, study_definition(tune, fixed))
    dataset, partition = load_data(fixed.dataset, fixed.data_root), partition_data(fixed.data)
    data = FederatedData.build(dataset, partition, fixed.model, execution.resolved_device)

    tags = {"fedhpo.role": "study", "fedhpo.study": name, "prefect.flow_run_id": str(flow_run.id)}
    # Processes joining a shared study each keep their own study run; a resumed study reopens its run.
    parent_id = None if tune.join else study.user_attrs.get("mlflow_run_id")
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with (
        cooperative_interrupts() as stop,
        Tracker(fixed.experiment, name, tags, run_id=parent_id) as tracker,
        round_steps(execution, fixed.data) as steps,
    ):
        if parent_id is None:
            if "mlflow_run_id" not in study.user_attrs:
                study.set_user_attr("mlflow_run_id", tracker.run_id)
            tracker.log_params(
                {**asdict(tune), **{f"fixed.{k}": v for k, v in asdict(fixed).items()}, "storage": storage}
                | {"study_name": name, "seed": fixed.seed}
                | {f"execution.{k}": v for k, v in asdict(execution).items()}
            )
        progress = StudyProgress(study, tune.budget)
        trainer = TrialTrainer(data, fixed, tune, tracker, name, steps, progress, stop)
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
        if "parent_trial" in table:
            tracker.log_figure(lineage_figure(table), "study/pbt_lineage.png")
        if len(study.directions) > 1:
            pareto = table[table.number.isin([t.number for t in study.best_trials])]
            tracker.log_table(pareto, "study/pareto_front.csv")

        best = best_trial(study)
        configuration = Configuration(configuration_of(best))
        tracker.log_params({f"best.{k}": v for k, v in configuration.values.items()} | {"best.trial": best.number})
        summary = {
            "study_name": name,
            "best_trial": best.number,
            "best_val_score": best.values[0],
            **configuration.values,
        }
        if tune.final_rounds:
            final = retrain(
                data, fixed, configuration, tune.final_rounds, tracker, steps, method.final_tuner(fixed), stop.check
            )
            summary["final_test_acc"] = final.evaluations[-1].test_acc
        summary |= {"rounds_used": budget.spent, "wall_time_s": time.perf_counter() - started}
        tracker.log_metrics({k: summary[k] for k in ("final_test_acc", "rounds_used", "wall_time_s") if k in summary})
        summary |= {"run_id": tracker.run_id, "experiment_id": tracker.experiment_id, "storage": storage}
        create_markdown_artifact(
            study_markdown(summary, table, tune), key=artifact_key(f"study-{name}"), description=f"Study {name}"
        )
        logger.info(
            "study %s: best trial %d %s; %d of %d rounds used",
            name,
            best.number,
            best.params,
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
    storage: str | None = None,
    study_name: str | None = None,
    resume: bool = False,
    workers: int = 1,
    join: bool = False,
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
        method: random, grid, tpe, gp, sha, hyperband, bohb, multiobjective, fedtune, fedex, pbt,
            stepwise, fedhyper, fedhyper-global, fedhyper-local or fedhyper-client.
        budget: Communication rounds the search may spend, every round of every trial.
        n_configs: Configurations to try (successive halving: its first rung).
        final_rounds: Rounds to retrain the best configuration from scratch and test it.
        scope: global (one configuration for all clients) or personalized (one per client).
        search_space: Path of a YAML search space; default: the FedTune paper's.
        objective: Score trials on the server's validation split (server) or clients' reports (clients).
        storage: Optuna storage URL (sqlite:///..., postgresql://...); default: optuna.db beside the MLflow store.
        study_name: Optuna study name; default: derived from the settings.
        resume: Continue the interrupted study of that name.
        workers: Trials trained at once (random, grid, tpe, gp, multiobjective).
        join: Share the study with other processes using the same storage (created if missing).
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
