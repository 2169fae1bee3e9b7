"""One configuration trained and scored, Prefect-free: the trial trainer a search method's driver
calls (`search.base.Trainer`), the final retraining of the best configuration, and the MLflow runs
they write. How a round's steps execute (`RoundSteps`) and what happens after each round
(`on_round`: progress) are given by the caller."""

import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import optuna
import pandas as pd
import torch

from fedhpo_core.cost import Cost
from fedhpo_core.evaluation import NoisyEvaluation
from fedhpo_core.federation import (
    FULL,
    TRAIN_CLIENTS,
    FederatedData,
    Federation,
    FederationResult,
    FederationState,
    Fidelity,
    RoundReport,
    RoundSteps,
)
from fedhpo_core.models import load_flat_weights
from fedhpo_core.personalization import OBJECTIVES as PERSONAL_OBJECTIVES
from fedhpo_core.personalization import objective_key, personalize
from fedhpo_core.reports import ConfigTrajectory, round_metrics, trajectory_figure
from fedhpo_core.search.base import (
    RUN_ATTR,
    TRAINED_ATTR,
    TrialResult,
    recorded_result,
    rounds_used,
    score_of,
)
from fedhpo_core.search.space import Configuration
from fedhpo_core.settings import ClientConfig, TrainSettings
from fedhpo_core.task import ACCURACY, Metric
from fedhpo_core.tracking import ROLE_TAG, STUDY_TAG, TRIAL_START_TAG, TRIAL_TAG, Tracker, load_state
from fedhpo_core.tuners import PerClientConfig, Tuner

FROZEN_TAG = "fedhpo.frozen"  # on a training or final run: true when no round changed its global model


def system_objectives(
    reports: list[RoundReport], target_acc: float = 0.0, metric: Metric = ACCURACY
) -> dict[str, float]:
    """What a run cost the system: bytes sent (the model down to every participant, up from every
    upload), client compute (training samples processed), unfairness (spread of the clients' last
    reported validation accuracies), simulated time (`sim_time_s`), and where they apply the
    privacy spent (`epsilon`) and the simulated time at which the server's validation score first
    reached `target_acc` (at or above it, or at or below for a score to minimize; `time_to_target_s`,
    inf if it did not)."""
    last = [u.val_score for u in reports[-1].aggregated if math.isfinite(u.val_score)] if reports else []
    costs = {
        "bytes_sent": float(sum(r.bytes_sent for r in reports)),
        "client_compute_samples": float(sum(r.cost.samples for r in reports)),
        "unfairness": float(np.std(last)) if len(last) > 1 else 0.0,
        "sim_time_s": reports[-1].sim_time_s if reports else 0.0,
    }
    if reports and reports[-1].epsilon is not None:
        costs["epsilon"] = reports[-1].epsilon
    if target_acc:
        reached = [r.sim_time_s for r in reports if not metric.better(target_acc, r.val_score)]
        costs["time_to_target_s"] = reached[0] if reached else math.inf
    return costs


class RunRecord:
    """What a training tracks besides the federation's state: its tuner, the tuner's trajectory and
    the clients' configurations round by round (logged when the training ends), and the rounds the
    trial's trainings have run. Stored with a round-level run's checkpoints (`saved`) and restored
    from one, so that a run continued from a checkpoint goes on, and logs its history, exactly as
    the uninterrupted run."""

    def __init__(self, tuner: Tuner, trained: int = 0, saved: bytes | None = None):
        self.tuner, self.trained = tuner, trained
        self.trajectory: list[dict] = []
        self.configs = ConfigTrajectory()
        if saved is not None:  # pickled by `saved` into this study's own store
            kept = pickle.loads(saved)
            tuner.load_state_dict(kept["tuner"])
            self.trajectory, self.configs, self.trained = kept["trajectory"], kept["configs"], kept["trained"]

    def saved(self) -> bytes:
        kept = {"tuner": self.tuner.state_dict(), "trajectory": self.trajectory, "configs": self.configs}
        return pickle.dumps(kept | {"trained": self.trained})

    def observe(self, report: RoundReport) -> dict[str, float]:
        """Record a round; the tuner's state as named numbers (logged as metrics every round)."""
        self.trained += 1
        self.configs.record(report)
        state = self.tuner.state()
        self.trajectory.extend({"round": report.round, "name": k, "value": v} for k, v in state.items())
        self.trajectory.extend(
            {"round": report.round, "client": client, "name": k, "value": v}
            for client, values in self.tuner.client_state().items()
            for k, v in values.items()
        )
        return state


@dataclass(frozen=True)
class Checkpoint:
    """A stored training: the federation's state, and for a round-level run its `RunRecord.saved`."""

    state: FederationState
    record: bytes | None = None


def train_configuration(
    data: FederatedData,
    fixed: TrainSettings,
    configuration: Configuration,
    rounds: int,
    tracker: Tracker,
    steps: RoundSteps,
    start: FederationState | None = None,
    tuner: Tuner | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    keep_going: Callable[[int], bool] | None = None,
    round_extras: Callable[[RoundReport], dict[str, float]] | None = None,
    fidelity: Fidelity = FULL,
    afford: Callable[[Cost], bool] | None = None,
    record: RunRecord | None = None,
    after_round: Callable[[FederationState], None] | None = None,
) -> tuple[FederationResult, list[RoundReport], RunRecord]:
    """`rounds` rounds of the configuration (from `start` if given) at `fidelity`, or of `tuner`'s
    choices with the configuration's other settings (or `record`'s tuner, restored), ending early
    after a round where `keep_going(round)` is false or before one whose cost `afford` refuses;
    each round's metrics, `round_extras` (say, personalized scores) and tuner state tracked, and
    `after_round(state)` called with the state each round reached (say, to checkpoint it)."""
    settings = configuration.settings(fixed)
    federation = Federation.of(data, settings)
    record = record or RunRecord(tuner or PerClientConfig(configuration.client_configs(fixed)))
    reports: list[RoundReport] = []

    def observe(report, evaluation):
        reports.append(report)
        state = record.observe(report)
        extras = round_extras(report) if round_extras else {}
        tracker.log_metrics(round_metrics(report, evaluation, data.spec.score.name) | state | extras, report.round)
        if on_round:
            on_round(report)

    if keep_going is None and after_round is None:
        result = federation.run(record.tuner, rounds, steps, start, observe, afford, fidelity)
    else:  # a round at a time, asking after each
        result = FederationResult(start or federation.initial_state(), [], None)
        for _ in range(rounds):
            step = federation.run(record.tuner, 1, steps, result.state, observe, afford, fidelity)
            frozen = (step.frozen and (result.frozen or not result.evaluations)) if step.evaluations else result.frozen
            result = FederationResult(step.state, result.evaluations + step.evaluations, step.diverged_round, frozen)
            if not step.evaluations or result.diverged:
                break
            if after_round:
                after_round(result.state)
            if keep_going is not None and not keep_going(result.state.round):
                break
    tracker.log_client_configs(record.configs)
    return result, reports, record


def personal_metrics(
    data: FederatedData,
    weights,
    configs: Mapping[int, ClientConfig],
    seed: int,
    round: int,
    steps: RoundSteps,
) -> dict[str, float]:
    """The mean and worst-tenth personalized scores of `weights` (`fedhpo_core.personalization`),
    every client fine-tuned by the steps' engine in this process."""
    return personalize(data.spec, weights, data.clients, configs, seed, round, TRAIN_CLIENTS[steps.engine]).metrics()


def round_configs(report: RoundReport, configs: Sequence[ClientConfig]) -> dict[int, ClientConfig]:
    """Every client's configuration in the round: what it was given if sampled, else its own."""
    return {c: report.configs.get(c, config) for c, config in enumerate(configs)}


def trial_metrics(result: TrialResult, rounds: int, trained: int, metric: Metric = ACCURACY) -> dict[str, float]:
    """A trial run's summary metrics: `score` is the value the study is told (the worst for a
    diverged trial), `rounds_used` the rounds charged to the budget for the trial (a promoted trial's over
    all its rungs), `rounds_trained` the rounds its trainings ran, as the trainer counted them."""
    objectives = {f"objective/{k}": v for k, v in result.objectives.items()}
    summary = {"score": score_of(result, metric), "rounds_used": rounds, "rounds_trained": trained}
    return summary | {"diverged": float(result.diverged)} | objectives


class TrialTrainer:
    """Trains configurations for a search method's driver (`search.base.Trainer`): each trial an
    MLflow run nested under the study's (a continued trial reopens its own: `RUN_ATTR` on the
    trial), its validation score reported to the trial every round (what pruners and
    optuna-dashboard read), the state it reaches stored as an artifact of its run; a round-level
    run's state, with its tuner's (`RunRecord`), every `checkpoint_every` rounds besides."""

    def __init__(
        self,
        data: FederatedData,
        fixed: TrainSettings,
        objective: str,
        study_run: Tracker,
        study_name: str,
        steps: RoundSteps,
        on_round: Callable[[Cost], None] | None = None,
        log: Callable[[str], None] | None = None,
        evaluation: NoisyEvaluation = NoisyEvaluation(),
        checkpoint_every: int = 1,
    ):
        self.data, self.fixed, self.objective, self.study_run, self.study_name = (
            data,
            fixed,
            objective,
            study_run,
            study_name,
        )
        self.steps, self.on_round, self.log, self.evaluation = steps, on_round, log, evaluation
        self.checkpoint_every = checkpoint_every  # rounds between a round-level run's checkpoints

    def round_score(self, report: RoundReport, trial: int, personal: Mapping[str, float]) -> float:
        """What the study is told of a trial's round, every round and as the trial's result: the
        validation score of the objective (the server's split, the clients' sample-weighted
        reports, or the clients' personalized scores), or its noisy evaluation (`evaluation`, Kuo
        et al. 2023)."""
        if self.objective in PERSONAL_OBJECTIVES:
            exact = personal[objective_key(self.objective, self.data.spec.score)]
        else:
            exact = report.val_score if self.objective == "server" else report.client_val_score
        return self.evaluation.score(self.data, report.weights_after, exact, self.fixed.seed, trial, report.round)

    def personal(self, configs: Sequence[ClientConfig]) -> Callable[[RoundReport], dict[str, float]] | None:
        """Each round's personalized scores, when the objective is personalized (else None)."""
        if self.objective not in PERSONAL_OBJECTIVES:
            return None

        def scores(report: RoundReport) -> dict[str, float]:
            configs_now = round_configs(report, configs)
            return personal_metrics(
                self.data, report.weights_after, configs_now, self.fixed.seed, report.round, self.steps
            )

        return scores

    def load(self, checkpoint: str) -> Checkpoint:
        stored = load_state(checkpoint, self.data.device)
        record = stored.pop("record", None)
        return Checkpoint(FederationState(**stored), None if record is None else record.numpy().tobytes())

    def store(self, tracker: Tracker, state: FederationState, record: RunRecord | None, name: str) -> str:
        """The state (and a round-level run's record, pickled into a byte tensor) as a run artifact."""
        stored = {f.name: getattr(state, f.name) for f in fields(state)}
        if record is not None:
            stored["record"] = torch.frombuffer(bytearray(record.saved()), dtype=torch.uint8)
        return tracker.log_state(stored, name)

    def run_of(self, trial: optuna.trial.Trial, configuration: Configuration) -> Tracker:
        """The trial's MLflow run: reopened if it has one, else a new one named on the trial. A
        trial kept for its configuration after a kill (`SearchMethod.keeps_asked_trials`) may have
        a run its killed attempt made before naming it on the trial: that one is reopened."""
        if run_id := trial.user_attrs.get(RUN_ATTR):
            return Tracker(self.fixed.experiment, run_id=run_id)
        tags = {ROLE_TAG: "trial", TRIAL_TAG: str(trial.number), STUDY_TAG: self.study_name}
        tags[TRIAL_START_TAG] = trial.datetime_start.isoformat()
        if earlier := self.study_run.search_runs(" and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())):
            tracker = Tracker(self.fixed.experiment, run_id=earlier[0].info.run_id)
            tracker.log_params(configuration.values)  # the attempt may have been killed before it did
            trial.set_user_attr(RUN_ATTR, tracker.run_id)
            return tracker
        tracker = Tracker(self.fixed.experiment, f"trial-{trial.number}", tags, parent=self.study_run)
        tracker.log_params(configuration.values)  # only what differs between trials: the compare view plots them
        trial.set_user_attr(RUN_ATTR, tracker.run_id)
        return tracker

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
        progress=None,
    ) -> TrialResult:
        tracker = self.run_of(trial, configuration)
        reporting = len(trial.study.directions) == 1  # Optuna keeps intermediate values for one objective
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        reported = set(frozen.intermediate_values)  # steps a killed attempt of this training reported
        used, trained = rounds_used(trial), trial.user_attrs.get(TRAINED_ATTR, 0)  # before this training
        followed = tuner or PerClientConfig(configuration.client_configs(self.fixed))
        record = RunRecord(followed, trained, start.record if start else None)  # a tuner's, if it stored one

        scores: dict[int, float] = {}  # by round: a noisy score is drawn once
        personal_of_round = self.personal(configuration.client_configs(self.fixed))
        personal: dict[int, dict[str, float]] = {}  # by round, when the objective is personalized
        reports: list[RoundReport] = []

        def extras(report: RoundReport) -> dict[str, float]:
            personal[report.round] = personal_of_round(report)
            return personal[report.round]

        def on_round(report: RoundReport) -> None:
            reports.append(report)
            score = scores[report.round] = self.round_score(report, trial.number, personal.get(report.round, {}))
            if reporting and report.round not in reported:
                trial.report(score if math.isfinite(score) else self.data.spec.score.worst(), report.round)
            if self.on_round:
                self.on_round(report.cost)

        def result_at(state: FederationState, checkpoint: str, diverged: bool = False) -> TrialResult:
            return TrialResult(
                score=scores[reports[-1].round],
                rounds=len(reports),
                state=state,
                diverged=diverged,
                objectives=system_objectives(reports, self.fixed.target_acc, self.data.spec.score),
                chosen=tuner.chosen() if tuner else {},
                checkpoint=checkpoint,
                cost=sum((r.cost for r in reports), Cost()),
            )

        def checkpointed(state: FederationState) -> None:
            """A round-level run's progress, every `checkpoint_every` rounds: the state and record
            stored in two alternating artifacts (a kill while one is written leaves the other whole),
            then told to the driver, which records it on the trial."""
            if state.round % self.checkpoint_every == 0:
                name = f"checkpoint/progress-{state.round // self.checkpoint_every % 2}.pt"
                progress(result_at(state, self.store(tracker, state, record, name)))

        with tracker:
            outcome, _, _ = train_configuration(
                self.data,
                self.fixed,
                configuration,
                rounds,
                tracker,
                self.steps,
                start.state if start else None,
                tuner,
                on_round,
                keep_going,
                extras if personal_of_round else None,
                fidelity,
                afford,
                record,
                checkpointed if tuner and progress else None,
            )
            state = outcome.state
            if not reports:  # the budget could not pay for a round: the trial stands where it was
                before = recorded_result(trial) or TrialResult(self.data.spec.score.worst(), 0, None)
                return replace(before, rounds=0, state=state, cost=Cost())
            stored = self.store(tracker, state, record if tuner else None, f"checkpoint/state-round{state.round}.pt")
            result = result_at(state, stored, outcome.diverged)
            trial.set_user_attr(TRAINED_ATTR, record.trained)
            metrics = trial_metrics(result, used + result.rounds, record.trained, self.data.spec.score)
            tracker.log_metrics(metrics)
            if record.trajectory:
                table = pd.DataFrame(record.trajectory)
                tracker.log_table(table, "trajectory/tuner_state.csv")
                tracker.log_figure(trajectory_figure(table, type(tuner).__name__), "trajectory/tuner_state.png")
        if self.log:
            ending = f"diverged at round {outcome.diverged_round}" if outcome.diverged else f"{state.round} rounds"
            values = configuration.values
            score = score_of(result, self.data.spec.score)
            self.log(f"trial {trial.number}: {ending} -> val score {score:.4f} {values}")
        return result


def align_trial_runs(tracker: Tracker, study: optuna.Study, name: str, metric: Metric = ACCURACY) -> None:
    """Trial runs end as their trials did: FINISHED for a told trial (a trial told from its recorded
    result after an interrupt gets its summary metrics here if its run had not logged them),
    KILLED for a failed one (interrupted, or left by a killed process). Trials still RUNNING (in
    another process sharing the study, or paused between rungs) are left alone."""
    states = {t.number: t for t in study.get_trials(deepcopy=False)}
    runs = tracker.search_runs(f"tags.`{STUDY_TAG}` = '{name}'")
    for run in runs:
        trial = states.get(int(run.data.tags.get(TRIAL_TAG, -1)))
        if trial is None or trial.state == optuna.trial.TrialState.RUNNING:
            continue
        if trial.state == optuna.trial.TrialState.FAIL:
            if run.info.status != "KILLED":
                tracker.finish("KILLED", run.info.run_id)
        elif run.info.status != "FINISHED":
            with Tracker(name, run_id=run.info.run_id) as reopened:  # ends FINISHED
                if (result := recorded_result(trial)) and "score" not in run.data.metrics:
                    trained = trial.user_attrs.get(TRAINED_ATTR, rounds_used(trial))
                    reopened.log_metrics(trial_metrics(result, rounds_used(trial), trained, metric))


@dataclass(frozen=True)
class FinalRun:
    """The best configuration retrained: its result, what it cost the system (`system_objectives`),
    its MLflow run, and its model (None when it diverged or froze) with the registered version, if any."""

    result: FederationResult
    costs: dict[str, float]
    run_id: str
    model_uri: str | None = None
    model_version: str | None = None
    personal: Mapping[str, float] = field(default_factory=dict)  # personalized scores of the final model


def final_markdown(
    about: Mapping[str, object], configuration: Configuration, final: FinalRun, registered: str, score: str = "acc"
) -> str:
    """The final run's description: what was retrained, for how long, how good it is, where its model is."""
    rows = dict(about) | {
        "configuration": configuration.text(),
        "rounds trained": len(final.result.evaluations),
    }
    if final.result.diverged:
        rows["result"] = f"diverged at round {final.result.diverged_round}: no model"
    elif final.result.frozen:
        rows["result"] = "frozen: no round changed the global model (its update underflows): no model"
    else:
        last = final.result.evaluations[-1]
        name = "accuracy" if score == "acc" else score
        rows |= {f"validation {name}": f"{last.val_score:.4f}", f"test {name}": f"{last.test_score:.4f}"}
        rows |= {f"{k.replace('_', ' ')} (clients' validation)": f"{v:.4f}" for k, v in final.personal.items()}
        rows["model"] = f"`{final.model_uri}`"
    if final.model_version:
        rows["registered"] = f"`models:/{registered}/{final.model_version}`"
    lines = ["### Final run: the best configuration retrained from scratch", "", "| | |", "|---|---|"]
    return "\n".join(lines + [f"| {k} | {v} |" for k, v in rows.items()]) + "\n"


def retrain(
    data: FederatedData,
    fixed: TrainSettings,
    configuration: Configuration,
    rounds: int,
    parent: Tracker,
    steps: RoundSteps,
    tuner: Tuner | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    about: Mapping[str, object] = {},  # noqa: B006 - read only
    register_as: str | None = None,
) -> FinalRun:
    """The best configuration from scratch for `rounds` rounds (driven by `tuner` if given), scored
    on the test set; its model logged unless it diverged or froze (tag `FROZEN_TAG`), and registered
    as a version of `register_as` if given, tagged with `about` (the method, the study), the seed and the
    accuracies. The run's description says all of it."""
    with Tracker(fixed.experiment, "final", {ROLE_TAG: "final"}, parent=parent) as tracker:
        tracker.log_params(configuration.values | ({"scheduled_by": type(tuner).__name__} if tuner else {}))
        result, reports, _ = train_configuration(
            data, fixed, configuration, rounds, tracker, steps, tuner=tuner, on_round=on_round
        )
        metric = data.spec.score
        final = FinalRun(result, system_objectives(reports, fixed.target_acc, metric), tracker.run_id)
        tracker.log_metrics({"frozen": float(result.frozen)})
        tracker.set_tags({FROZEN_TAG: str(result.frozen).lower()})
        if not (result.diverged or result.frozen):
            configs = round_configs(reports[-1], configuration.client_configs(fixed))
            personal = personal_metrics(data, result.state.weights, configs, fixed.seed, result.state.round, steps)
            tracker.log_metrics(personal, result.state.round)
            final = replace(final, personal=personal)
            model = load_flat_weights(data.spec.build(), result.state.weights)
            uri = tracker.log_model(model, input_example=data.test[0][:8].cpu().numpy())
            final = replace(final, model_uri=uri)
            if register_as:
                last = result.evaluations[-1]
                tags = dict(about) | {
                    "seed": fixed.seed,
                    f"final_test_{metric.name}": last.test_score,
                    f"final_val_{metric.name}": last.val_score,
                }
                final = replace(final, model_version=tracker.register_model(uri, register_as, tags))
        tracker.describe(final_markdown(about, configuration, final, register_as or "", metric.name))
    return final
