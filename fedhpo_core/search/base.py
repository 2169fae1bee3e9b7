"""The contract between a search method, the Optuna study that records it, and whoever trains.

A study's cost is counted in communication rounds, every round of every trial (FedTune paper,
section 4.1): the budget is spent as rounds run and never exceeded.
"""

import math
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Protocol

import optuna

from fedhpo_core.cost import Cost
from fedhpo_core.federation import FULL, FederatedData, FederationState, Fidelity
from fedhpo_core.search.space import Configuration
from fedhpo_core.settings import SettingsError, TrainSettings
from fedhpo_core.task import ACCURACY, Metric
from fedhpo_core.tuners.base import Tuner

if TYPE_CHECKING:
    import pandas as pd

# System objectives a training adds to those before it (the others, like simulated time or epsilon,
# are already counted from the run's start): a promoted trial's are the sums over its rungs.
ADDITIVE_COSTS = ("bytes_sent", "client_compute_samples")
COST_ATTR = "cost_used"  # in a trial's recorded result: what its trainings cost in all (`cost.Cost`)
ROUNDS_ATTR = "rounds_used"  # Optuna user attribute: rounds a trial spent, charged to the budget
TRAINED_ATTR = "rounds_trained"  # Optuna user attribute: rounds a trial's trainings ran, as the trainer counts
CHOSEN_ATTR = "chosen"  # Optuna user attribute: the client configuration a round-level tuner settled on
RESULT_ATTR = "result"  # Optuna user attribute: a trial's result, written the moment its training ends
CHECKPOINT_ATTR = "checkpoint"  # Optuna user attribute: where the state a trial reached is stored
RUN_ATTR = "mlflow_run_id"  # Optuna user attribute: the trial's (and the study's) MLflow run
DIVERGED_ATTR = "diverged"  # Optuna user attribute: whether a trial's training diverged
BRACKET_ATTR = "bracket"  # Optuna user attribute: a successive-halving trial's bracket
GRANTED_ATTR = "rounds_granted"  # Optuna user attribute: what an asynchronous trial may spend, in the budget's unit
LINEAGE = ("member", "generation", "parent_trial")  # Optuna user attributes of a PBT trial


class Budget:
    """What a study may spend: `limit` in its unit (`cost.UNITS`), of which `spent` is charged.

    Methods plan in reference rounds (`total`, `remaining`): a round of the study's fixed settings
    at full fidelity costs `round_cost` in the unit (1 for rounds). The driver reserves each round
    before it is trained (`reserve`: refused when it would pass the limit) and charges each
    training's exact cost once when it ends (`settle`), so the sum never passes the limit, whatever
    a round costs (compressed, on fewer clients, on slower devices)."""

    def __init__(self, limit: float, unit: str = "rounds", round_cost: float = 1.0, spent: float = 0.0):
        self.limit, self.unit, self.round_cost, self.spent, self.reserved = limit, unit, round_cost, spent, 0.0

    @property
    def total(self) -> int:
        return int(self.limit // self.round_cost)

    @property
    def remaining(self) -> int:
        return int(max(0.0, self.limit - self.spent) // self.round_cost)

    def reserve(self, cost: Cost) -> bool:
        """Whether a round of this cost fits beside what is spent and reserved (reserved if so)."""
        amount = cost.in_unit(self.unit)
        if self.spent + self.reserved + amount > self.limit:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, cost: Cost) -> None:
        """A training ended: what it reserved is released and its cost charged."""
        self.reserved -= reserved
        self.spent += cost.in_unit(self.unit)
        if self.spent > self.limit:
            raise RuntimeError(f"charging {cost} passed the budget ({self.limit:g} {self.unit})")


@dataclass(frozen=True)
class TrialResult:
    """What training a configuration for some rounds gave; `score` is the validation accuracy a
    federated server sees (never a test metric)."""

    score: float
    rounds: int  # rounds this training ran (a continued trial's earlier ones not included)
    state: FederationState | None  # None for a result read back from the study
    diverged: bool = False
    objectives: Mapping[str, float] = field(default_factory=dict)  # system metrics (multi-objective)
    chosen: Mapping[str, object] = field(default_factory=dict)  # what a round-level tuner settled on
    checkpoint: str | None = None  # where `state` is stored, for any process of the study to continue from
    cost: Cost = Cost()  # what this training cost (`fedhpo_core.cost`), charged to the budget


class Trainer(Protocol):
    """Trains one configuration for a search method; only the driver (`SearchContext.train`) calls it."""

    def __call__(
        self,
        trial: optuna.trial.Trial,
        configuration: Configuration,
        rounds: int,
        start: FederationState | None,
        tuner: Tuner | None,
        keep_going: Callable[[int], bool] | None,
        fidelity: Fidelity = FULL,
        afford: Callable[[Cost], bool] | None = None,
        progress: Callable[[TrialResult], None] | None = None,
    ) -> TrialResult:
        """Train `rounds` rounds from `start` (what `load` returned; None: from scratch) at
        `fidelity`; with `tuner`, the tuner chooses the client configurations and `configuration`
        fixes the rest, and the result's `chosen` is `tuner.chosen()`; a start stored by such a run
        restores the tuner's state (`Tuner.load_state_dict`). Report the validation score to the
        trial every round (step: the round number), stop after a round where `keep_going(round)`
        is false and before one that `afford(its cost)` refuses, store the state reached (the
        result's `checkpoint`), and raise `Interrupted` at a round's end when asked to stop. The
        result's `cost` is what the rounds trained cost. A run with a tuner is also stored between
        rounds, each time told to `progress` as the result so far, so that a killed run continues
        from there."""

    def load(self, checkpoint: str):
        """The start a result's `checkpoint` names (the federation's state, and a tuner's if stored)."""


class Interrupted(KeyboardInterrupt):
    """The work was asked to stop (by the signal `number`: Ctrl-C's SIGINT, SIGTERM, SIGHUP) and
    left from a safe point: the end of a round, or between trials."""

    def __init__(self, number: int = signal.SIGINT):
        super().__init__(signal.Signals(number).name)
        self.number = number


@dataclass
class SearchContext:
    """What a method searches with, and the driver that owns the budget: `train` charges the rounds
    a trial trained and records its result on the trial, `complete` and `prune` tell the study.
    A method decides what to train, for how long, and how each trial ends; nothing more."""

    study: optuna.Study
    method: "SearchMethod"
    parameters: Mapping[str, optuna.distributions.BaseDistribution]
    trainer: Trainer
    budget: Budget
    n_configs: int
    seed: int
    fixed: TrainSettings | None = None  # round-level methods build their tuners from these two
    data: FederatedData | None = None
    workers: int = 1  # trials trained at once (methods with `parallel`)
    stop: threading.Event = field(default_factory=threading.Event)  # set: trials stop after their round
    started: set[int] = field(default_factory=set)  # trials this process trained
    lock: threading.Lock = field(default_factory=threading.Lock)

    def train(
        self,
        trial: optuna.trial.Trial,
        configuration: Configuration,
        rounds: int,
        tuner: Tuner | None = None,
        start_from: optuna.trial.BaseTrial | None = None,
        keep_going: Callable[[int], bool] | None = None,
        fidelity: Fidelity = FULL,
        allowance: float | None = None,
    ) -> TrialResult:
        """Train the trial for `rounds` rounds at `fidelity` (continuing from the state `start_from`
        reached: the trial itself when promoted, a parent for PBT), each round only once the budget
        affords it, charge what the training cost and record the result on the trial
        (`record_result`) before anything else happens to it. With an `allowance` (in the budget's
        unit) the training also ends before a round that would take it past the allowance: as many
        rounds as it buys, at most `rounds`. Safe in worker threads.

        Asked to stop (`stop`), the training ends at its round's end and what it reached is
        recorded and charged like any result before the interrupt goes on: the trial is told that
        result, or continued from it by a method that pauses trials, so every round trained is
        charged once and none is trained again."""
        if self.stop.is_set():  # asked to stop: no trial starts
            raise self.interrupt()
        with self.lock:
            self.started.add(trial.number)
        start = self.trainer.load(recorded_result(start_from).checkpoint) if start_from is not None else None

        def going(round: int) -> bool:
            return not self.stop.is_set() and (keep_going is None or keep_going(round))

        reserved: list[float] = []

        def afford(cost: Cost) -> bool:
            if allowance is not None and sum(reserved) + cost.in_unit(self.budget.unit) > allowance:
                return False
            with self.lock:
                if not self.budget.reserve(cost):
                    return False
            reserved.append(cost.in_unit(self.budget.unit))
            return True

        before = recorded_result(trial) if start_from is trial else None  # a continued trial's so far
        used, cost = rounds_used(trial), cost_used(trial)

        def record(result: TrialResult, shown: bool = True) -> TrialResult:
            if before is not None:
                added = {k: before.objectives[k] + v for k, v in result.objectives.items() if k in ADDITIVE_COSTS}
                result = replace(result, objectives=dict(result.objectives) | added)
            record_result(trial, result, used + result.rounds, cost + result.cost, shown)
            return result

        def progress(result: TrialResult) -> None:  # one storage write a checkpoint
            record(result, shown=False)

        result = self.trainer(
            trial, configuration, rounds, start, tuner, going, fidelity=fidelity, afford=afford, progress=progress
        )
        with self.lock:
            self.budget.settle(sum(reserved), result.cost)
        result = record(result)
        if self.stop.is_set():
            raise self.interrupt()
        return result

    def interrupt(self) -> "Interrupted":
        return Interrupted(getattr(self.stop, "number", signal.SIGINT))

    def complete(self, trial: optuna.trial.Trial, result: TrialResult) -> None:
        """Tell the study a trained trial's values."""
        show_recorded(trial)
        finish_trial(self.study, trial, result, self.method)

    def prune(self, trial: optuna.trial.Trial) -> None:
        """Tell the study the trial stopped early (its rounds stay charged)."""
        show_recorded(trial)
        self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)


class SearchMethod(ABC):
    """A trial-level search method.

    Declared in the registry (`fedhpo_core.registry.Method`), built once per study from its options.
    Lifecycle: the driver validates the budget with ``check_budget`` before any work, creates or
    loads the Optuna study with ``directions``, the sampler from ``sampler`` and the pruner from
    ``pruner``, settles the trials an interrupted or killed process left RUNNING
    (``settle_interrupted_trials``), charges the rounds of recorded trials to the budget, and calls
    ``search`` once. ``search`` asks the study for trials and has them trained through
    ``context.train`` (which charges the rounds and records the result), then ends each with
    ``context.complete`` or ``context.prune``, until it is done or the budget is spent. Everything
    a method needs to continue an interrupted study is in the study (trial attributes, checkpoints
    in the store), so ``--resume`` just calls ``search`` again. A trial the method left RUNNING is
    settled when ``search`` returns. Then the best trial's configuration is retrained from
    scratch, driven by ``final_tuner`` if it gives one; ``reports`` adds the method's own tables
    and figures to the study's run.
    """

    score: Metric = ACCURACY  # the task's scoring metric: the driver sets it before the study opens
    objectives: tuple[str, ...] = ()  # names of the objectives after the score (costs to minimize), if several
    parallel = False  # whether trials may train at once and processes may share the study
    # Whether a trial spans several trainings (successive halving's rungs): one left RUNNING with a
    # recorded result is paused, and the method continues it; otherwise it is told that result.
    pauses_trials = False
    # Whether a trial asked for and not yet trained when its process stopped (no recorded result,
    # its whole configuration set) is the method's to train on resume (a bracket's or a
    # generation's draws), rather than FAIL and asked again.
    keeps_asked_trials = False
    # Upper limits on system objectives (`TrialResult.objectives`), e.g. {"epsilon": 8.0}: a trial
    # over one is infeasible (Optuna's constraints), never the study's best.
    limits: Mapping[str, float] = {}

    def __init__(self, options=None):
        """`options`: the method's `registry.Options` (its declaration makes them)."""
        self.options = options

    def use_score(self, metric: Metric) -> None:
        """Score trials by the task's metric; the driver calls this before the study opens. A method
        that cannot work with the metric raises a one-line SettingsError."""
        self.score = metric

    @property
    def directions(self) -> tuple[str, ...]:
        """The study's: the score's direction, then every system objective minimized."""
        return (self.score.direction, *["minimize"] * len(self.objectives))

    @abstractmethod
    def sampler(self, parameters, seed: int) -> optuna.samplers.BaseSampler:
        """The Optuna sampler, seeded from the run's seed (and the study's length on resume)."""

    def pruner(self, context: "SearchContext") -> optuna.pruners.BasePruner:
        """The Optuna pruner trials consult after each round. Default: none prunes."""
        return optuna.pruners.NopPruner()

    @abstractmethod
    def search(self, context: SearchContext) -> None:
        """Run trials until done or out of budget."""

    def final_tuner(self, fixed: TrainSettings) -> Tuner | None:
        """The tuner of the final retraining, for methods that schedule during training itself.
        Default: none, the best configuration is retrained as it is."""
        return None

    def reports(self, study: optuna.Study, table: "pd.DataFrame") -> dict[str, object]:
        """The method's own tables (DataFrames) and figures by artifact name, beside the study's
        table (`reports.study_table`). Default: none."""
        return {}

    def within_limits(self, result: TrialResult) -> bool:
        """Whether a result is within every limit of the study (its costs never fall as a trial goes on)."""
        return all(result.objectives.get(name, 0.0) <= limit for name, limit in self.limits.items())

    def values(self, result: TrialResult):
        """What the study is told: the score (a diverged trial's is the worst), then any system objectives."""
        score = score_of(result, self.score)
        return [score, *(result.objectives[name] for name in self.objectives)] if self.objectives else score

    def check_budget(self, budget: int, n_configs: int) -> None:
        """Raise a one-line SettingsError when the budget cannot fund the method's plan."""
        if budget < n_configs:
            raise SettingsError(f"budget {budget} is smaller than one round per configuration ({n_configs})")


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that ran to the end (complete or stopped early)."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False) if t.state in done]


def planned_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Finished and running trials: those that spent, or will spend, the budget."""
    planned = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    return [t for t in study.get_trials(deepcopy=False) if t.state in planned]


def recorded_result(trial: optuna.trial.BaseTrial) -> TrialResult | None:
    """The result `record_result` wrote on the trial, if any."""
    recorded = trial.user_attrs.get(RESULT_ATTR)
    if not recorded:
        return None
    values = {k: v for k, v in recorded.items() if k not in (ROUNDS_ATTR, COST_ATTR)}
    return TrialResult(state=None, **values | {"cost": Cost.of(values.get("cost"))})


def rounds_used(trial: optuna.trial.BaseTrial) -> int:
    """Rounds a trial trained and was charged for, over all its trainings."""
    recorded = trial.user_attrs.get(RESULT_ATTR) or {}
    return int(recorded.get(ROUNDS_ATTR, trial.user_attrs.get(ROUNDS_ATTR, 0)))


def cost_used(trial: optuna.trial.BaseTrial) -> Cost:
    """What a trial's trainings cost in all, as recorded."""
    return Cost.of((trial.user_attrs.get(RESULT_ATTR) or {}).get(COST_ATTR))


def charged(trial: optuna.trial.BaseTrial, unit: str) -> float:
    """What a trial was charged in a budget unit."""
    return rounds_used(trial) if unit == "rounds" else cost_used(trial).in_unit(unit)


def rounds_spent(study: optuna.Study) -> int:
    """The study's charge in rounds: every recorded round of trials finished, running or paused (a
    failed trial's training was interrupted before it was recorded, and is not charged)."""
    return sum(rounds_used(t) for t in planned_trials(study))


def spent(study: optuna.Study, unit: str) -> float:
    """The study's charge in a budget unit (`cost.UNITS`), counted as `rounds_spent` counts rounds."""
    return sum(charged(t, unit) for t in planned_trials(study))


def record_result(
    trial: optuna.trial.Trial, result: TrialResult, used: int, cost: Cost = Cost(), shown: bool = True
) -> None:
    """Write the result and the trial's rounds and cost so far (`used`, `cost`) in one storage
    write, then (if `shown`) as attributes of their own: a trial interrupted after this point
    (Ctrl-C while its run logs artifacts, SIGKILL before it is told) is told with it, or continued
    from it, never retrained."""
    recorded = {f.name: getattr(result, f.name) for f in fields(TrialResult) if f.name not in ("state", "cost")}
    recorded |= {"objectives": dict(result.objectives), "chosen": dict(result.chosen), ROUNDS_ATTR: used}
    recorded |= {"cost": result.cost.as_dict(), COST_ATTR: cost.as_dict()}
    trial.set_user_attr(RESULT_ATTR, recorded)
    if shown:
        show_result(trial, result, used)


def show_result(trial: optuna.trial.Trial, result: TrialResult, used: int) -> None:
    """The recorded result's parts as attributes of their own, where users and reports read them
    (a kill may come between these writes: the method reads the recorded result, never these)."""
    trial.set_user_attr(ROUNDS_ATTR, used)
    trial.set_user_attr(DIVERGED_ATTR, result.diverged)
    if result.checkpoint:
        trial.set_user_attr(CHECKPOINT_ATTR, result.checkpoint)


def show_recorded(trial: optuna.trial.Trial) -> None:
    """The recorded result's attributes shown again where they lag behind it: a kill between
    `record_result`'s writes leaves the trial's last training recorded but not shown, and a
    resumed method tells such a trial without training it again."""
    result = recorded_result(trial)
    if result is not None and trial.user_attrs.get(ROUNDS_ATTR) != rounds_used(trial):
        show_result(trial, result, rounds_used(trial))


def finish_trial(study: optuna.Study, trial: optuna.trial.Trial, result: TrialResult, method: SearchMethod) -> None:
    """Tell the study a trained trial's values, with what its tuner chose, if anything, and how far
    it is within the method's limits (Optuna's constraints: feasible where every value is <= 0)."""
    if result.chosen:
        trial.set_user_attr(CHOSEN_ATTR, dict(result.chosen))
    for name, limit in method.limits.items():
        trial.set_constraint(name, result.objectives[name] - limit)
    study.tell(trial, method.values(result))


def settle_interrupted_trials(study: optuna.Study, method: SearchMethod, numbers: set[int] | None = None) -> None:
    """Trials left RUNNING by an interrupted or killed process (only `numbers`, if given): those
    with a recorded result are told it (or, for a method that pauses trials, left to it to
    continue), the others marked FAIL (asked again, not charged), unless the method keeps the
    trials it asked for (`keeps_asked_trials`): it trains them with the configurations they hold."""
    keeps_asked = method.keeps_asked_trials
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if numbers is not None and frozen.number not in numbers:
            continue
        result = recorded_result(frozen)
        if result is None:
            if not keeps_asked:
                study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
        elif not method.pauses_trials:
            trial = optuna.trial.Trial(study, frozen._trial_id)
            show_result(trial, result, rounds_used(frozen))  # a kill may have come before them
            finish_trial(study, trial, result, method)


def score_of(result: TrialResult, metric: Metric = ACCURACY) -> float:
    """The value told to Optuna: a diverged or unscored trial counts as the metric's worst (accuracy 0,
    an error of inf)."""
    return result.score if math.isfinite(result.score) and not result.diverged else metric.worst()


def configuration_of(trial: optuna.trial.FrozenTrial) -> dict:
    """A trial's whole configuration: its sampled parameters and what its tuner chose, if any."""
    return dict(trial.params) | dict(trial.user_attrs.get(CHOSEN_ATTR, {}))
