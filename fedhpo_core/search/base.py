"""The contract between a search method, the Optuna study that records it, and whoever trains.

A study's cost is counted in communication rounds, every round of every trial (FedTune paper,
section 4.1): the budget is spent as rounds run and never exceeded.
"""

import math
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import optuna

from fedhpo_core.federation import FederatedData, FederationState
from fedhpo_core.settings import SettingsError, TrainSettings
from fedhpo_core.tuners.base import Tuner

ROUNDS_ATTR = "rounds_used"  # Optuna user attribute: rounds a trial spent, for the budget on resume
CHOSEN_ATTR = "chosen"  # Optuna user attribute: the client configuration a round-level tuner settled on
RESULT_ATTR = "result"  # Optuna user attribute: a trial's result, written the moment its training ends


class RoundBudget:
    """Communication rounds a study may spend."""

    def __init__(self, total: int, spent: int = 0):
        self.total, self.spent = total, spent

    @property
    def remaining(self) -> int:
        return self.total - self.spent

    def spend(self, rounds: int) -> None:
        if rounds > self.remaining:
            raise RuntimeError(f"spending {rounds} rounds would exceed the budget ({self.remaining} left)")
        self.spent += rounds


@dataclass(frozen=True)
class TrialResult:
    """What training a configuration for some rounds gave; `score` is the validation accuracy a
    federated server sees (never a test metric)."""

    score: float
    rounds: int
    state: FederationState
    diverged: bool = False
    objectives: Mapping[str, float] = field(default_factory=dict)  # system metrics (multi-objective)
    chosen: Mapping[str, object] = field(default_factory=dict)  # what a round-level tuner settled on


# (trial, configuration, rounds to train, state to continue from or None[, tuner]) -> result; with a
# tuner, the tuner chooses client configurations, `configuration` only fixes the rest, and the
# result's `chosen` is `tuner.chosen()`. It records the result on the trial (`record_result`) as
# soon as training ends, and stops at the end of a round once `SearchContext.stop` is set.
Evaluate = Callable[..., TrialResult]


class Interrupted(KeyboardInterrupt):
    """The work was asked to stop (by the signal `number`: Ctrl-C's SIGINT, SIGTERM, SIGHUP) and
    left from a safe point: the end of a round, or between trials."""

    def __init__(self, number: int = signal.SIGINT):
        super().__init__(signal.Signals(number).name)
        self.number = number


@dataclass
class SearchContext:
    study: optuna.Study
    parameters: Mapping[str, optuna.distributions.BaseDistribution]
    evaluate: Evaluate
    budget: RoundBudget
    n_configs: int
    seed: int
    fixed: TrainSettings | None = None  # round-level methods build their tuners from these two
    data: FederatedData | None = None
    workers: int = 1  # trials trained at once (methods with `parallel`)
    stop: threading.Event = field(default_factory=threading.Event)  # set: trials stop after their round


class SearchMethod(ABC):
    """A trial-level search method.

    Lifecycle: the driver validates the budget with ``check_budget`` before any work, creates or
    loads the Optuna study with ``directions`` and the sampler from ``sampler``, settles the trials
    an interrupted or killed process left RUNNING (``settle_interrupted_trials``), charges the
    rounds of finished trials to the budget, and calls ``search`` once. ``search`` asks the study
    for trials, has them trained through ``context.evaluate`` (which spends no budget itself) and
    ends each with ``finish_trial`` (spend its rounds, tell its values), until it is done or the
    budget is spent. Everything a method needs to continue an interrupted study is in the study, so
    ``--resume`` just calls ``search`` again. Then the best trial's configuration is retrained from
    scratch, driven by ``final_tuner`` if it gives one.
    """

    directions: tuple[str, ...] = ("maximize",)
    objectives: tuple[str, ...] = ()  # names of the objectives after accuracy, if several
    parallel = False  # whether trials may train at once and processes may share the study
    # Whether a trial is one training (trained, then told): an interrupted one whose training had
    # finished is told with its recorded result. Successive halving's trials span several.
    settles_recorded_trials = True

    @abstractmethod
    def sampler(self, parameters, seed: int) -> optuna.samplers.BaseSampler:
        """The Optuna sampler, seeded from the run's seed (and the study's length on resume)."""

    @abstractmethod
    def search(self, context: SearchContext) -> None:
        """Run trials until done or out of budget."""

    def final_tuner(self, fixed: TrainSettings) -> Tuner | None:
        """The tuner of the final retraining, for methods that schedule during training itself.
        Default: none, the best configuration is retrained as it is."""
        return None

    def values(self, result: TrialResult):
        """What the study is told: the score (a diverged trial's is 0), then any system objectives."""
        score = score_of(result)
        return [score, *(result.objectives[name] for name in self.objectives)] if self.objectives else score

    def check_budget(self, budget: int, n_configs: int) -> None:
        """Raise a one-line SettingsError when the budget cannot fund the method's plan."""
        if budget < n_configs:
            raise SettingsError(f"budget {budget} is smaller than one round per configuration ({n_configs})")


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that ran to the end (complete or stopped early), whose rounds count against the budget."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False) if t.state in done]


def planned_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Finished and running trials: those that spent, or will spend, the budget."""
    planned = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    return [t for t in study.get_trials(deepcopy=False) if t.state in planned]


def rounds_spent(study: optuna.Study) -> int:
    return sum(int(t.user_attrs.get(ROUNDS_ATTR, 0)) for t in finished_trials(study))


def record_result(trial: optuna.trial.Trial, result: TrialResult) -> None:
    """Write the result on the trial before anything else happens to it: a trial interrupted after
    this point (Ctrl-C while its run logs artifacts, SIGKILL before it is told) is told with it
    rather than trained again."""
    recorded = {"score": result.score, "rounds": result.rounds, "diverged": result.diverged}
    trial.set_user_attr(RESULT_ATTR, recorded | {"objectives": dict(result.objectives), "chosen": dict(result.chosen)})


def finish_trial(study: optuna.Study, trial: optuna.trial.Trial, result: TrialResult, method: SearchMethod) -> None:
    """Tell the study a trained trial's values, with its rounds, divergence and what its tuner
    chose, if anything."""
    trial.set_user_attr(ROUNDS_ATTR, result.rounds)
    trial.set_user_attr("diverged", result.diverged)
    if result.chosen:
        trial.set_user_attr(CHOSEN_ATTR, dict(result.chosen))
    study.tell(trial, method.values(result))


def settle_interrupted_trials(study: optuna.Study, method: SearchMethod, numbers: set[int] | None = None) -> None:
    """Trials left RUNNING by an interrupted or killed process (only `numbers`, if given): those
    whose training had finished are told with their recorded result, the others marked FAIL (asked
    again, not charged)."""
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if numbers is not None and frozen.number not in numbers:
            continue
        recorded = frozen.user_attrs.get(RESULT_ATTR)
        if recorded and method.settles_recorded_trials:
            result = TrialResult(state=None, **recorded)
            finish_trial(study, optuna.trial.Trial(study, frozen._trial_id), result, method)
        else:
            study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)


def score_of(result: TrialResult) -> float:
    """The value told to Optuna: a diverged or unscored trial counts as accuracy 0."""
    return result.score if math.isfinite(result.score) and not result.diverged else 0.0


def configuration_of(trial: optuna.trial.FrozenTrial) -> dict:
    """A trial's whole configuration: its sampled parameters and what its tuner chose, if any."""
    return dict(trial.params) | dict(trial.user_attrs.get(CHOSEN_ATTR, {}))
