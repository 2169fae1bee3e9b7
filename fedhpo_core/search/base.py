"""The contract between a search method, the Optuna study that records it, and whoever trains.

A study's cost is counted in communication rounds, every round of every trial (FedTune paper,
section 4.1): the budget is spent as rounds run and never exceeded.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import optuna

from fedhpo_core.federation import FederatedData, FederationState
from fedhpo_core.settings import SettingsError, TrainSettings
from fedhpo_core.tuners.base import Tuner

ROUNDS_ATTR = "rounds_used"  # Optuna user attribute: rounds a trial spent, for the budget on resume
CHOSEN_ATTR = "chosen"  # Optuna user attribute: the client configuration a round-level tuner settled on


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


# (trial number, configuration, rounds to train, state to continue from or None[, tuner]) -> result;
# with a tuner, the tuner chooses client configurations and `configuration` only fixes the rest.
Evaluate = Callable[..., TrialResult]


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


class SearchMethod(ABC):
    """A trial-level search method.

    Lifecycle: the driver validates the budget with ``check_budget`` before any work, creates or
    loads the Optuna study with ``directions`` and the sampler from ``sampler``, marks trials a
    killed process left RUNNING as failed, charges the rounds of finished trials to the budget, and
    calls ``search`` once. ``search`` asks the study for trials, has them trained through
    ``context.evaluate`` (which spends no budget itself), spends their rounds and tells the study
    their scores, until it is done or the budget is spent. Everything a method needs to continue an
    interrupted study is in the study, so ``--resume`` just calls ``search`` again. Then the best
    trial's configuration is retrained from scratch, driven by ``final_tuner`` if it gives one.
    """

    directions: tuple[str, ...] = ("maximize",)
    objectives: tuple[str, ...] = ()  # names of the objectives after accuracy, if several
    parallel = False  # whether trials may train at once and processes may share the study

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


def fail_interrupted_trials(study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING by a killed process as FAIL; they are asked again, not counted."""
    interrupted = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for trial in interrupted:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return [t.number for t in interrupted]


def score_of(result: TrialResult) -> float:
    """The value told to Optuna: a diverged or unscored trial counts as accuracy 0."""
    return result.score if math.isfinite(result.score) and not result.diverged else 0.0


def configuration_of(trial: optuna.trial.FrozenTrial) -> dict:
    """A trial's whole configuration: its sampled parameters and what its tuner chose, if any."""
    return dict(trial.params) | dict(trial.user_attrs.get(CHOSEN_ATTR, {}))
