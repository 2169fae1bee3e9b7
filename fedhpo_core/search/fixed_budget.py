"""Methods that give each of n configurations the same share of the budget, B // n rounds: random
search, grid search and Bayesian optimization (FedTune paper, section 4.1: 30 configurations for
Random and Bayesian), and the system-aware multi-objective search.

With a budget in another unit (`--budget-unit bytes`, say) a configuration's share is B / n of it,
and it trains as many rounds as its share buys (at most `SHARE_ROUNDS_CAP` times a round of the
fixed settings would): a configuration that compresses its uploads to a quarter trains four times
the rounds."""

import contextvars
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import optuna

from fedhpo_core.registry import TRIAL, Method, Options, option, register
from fedhpo_core.reports import pareto_figure
from fedhpo_core.search.base import (
    Interrupted,
    SearchContext,
    SearchMethod,
    charged,
    planned_trials,
)
from fedhpo_core.search.space import Configuration, grid_points
from fedhpo_core.search.storage import study_lock
from fedhpo_core.settings import SettingsError

SHARE_ROUNDS_CAP = 64  # a share in another unit than rounds buys at most this many times its reference rounds
POLL_S = 0.2  # how often the search looks for a stop request while trials train
# The system costs a multi-objective study can minimize (`trial.system_objectives`), and its defaults.
COSTS = ("bytes_sent", "client_compute_samples", "unfairness", "sim_time_s", "time_to_target_s", "epsilon")
DEFAULT_COSTS = ("bytes_sent", "client_compute_samples", "unfairness")


class FixedBudgetSearch(SearchMethod):
    """n configurations, B // n rounds each, up to `context.workers` of them training at once.

    Trials are asked and told in this thread and trained in worker threads (each with the caller's
    context, so their Prefect task runs belong to the flow run). Processes may share the study
    (`join`): a trial is created only once it fits, with every trial running or finished (failed
    ones aside), into the budget and the configuration count, the check and the creation one
    critical section of the study (`admit`), so no process overspends and none creates a trial
    it cannot run.
    Asked to stop (`context.stop`), it starts no trial more; those in training end at their
    round's end (`Interrupted`). An interrupt raised in this thread stops them the same way.
    """

    parallel = True

    def search(self, context: SearchContext) -> None:
        rounds = context.budget.total // context.n_configs
        with ThreadPoolExecutor(context.workers) as pool:
            running = set()
            try:
                while True:
                    while (
                        not context.stop.is_set()
                        and len(running) < context.workers
                        and (trial := self.admit(context, rounds))
                    ):
                        running.add(pool.submit(contextvars.copy_context().run, self.train, context, trial, rounds))
                    if not running:
                        if context.stop.is_set():
                            raise Interrupted
                        return
                    done, running = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
                    for future in done:
                        self.end(context, *future.result())
            except BaseException:
                context.stop.set()
                raise

    def train(self, context: SearchContext, trial: optuna.trial.Trial, rounds: int):
        configuration = Configuration(trial.params)
        if context.budget.unit == "rounds":
            return trial, context.train(trial, configuration, rounds)
        share = self.share(context)
        return trial, context.train(trial, configuration, rounds * SHARE_ROUNDS_CAP, allowance=share)

    def share(self, context: SearchContext) -> float:
        """A configuration's share of the budget, in its unit: B // n rounds, or B / n of another unit."""
        if context.budget.unit == "rounds":
            return context.budget.total // context.n_configs
        return context.budget.limit / context.n_configs

    def end(self, context: SearchContext, trial: optuna.trial.Trial, result) -> None:
        """How a trained trial ends, in the search's thread. Default: told its values."""
        context.complete(trial, result)

    def admit(self, context: SearchContext, rounds: int) -> optuna.trial.Trial | None:
        """The next trial if it fits the study's plan, else None (the search is done here).

        The check and the trial's creation with its parameters are one critical section of the
        study (`study_lock`): a process admits only once every admission before it has committed
        its trial and point, whatever order the storage's ids come in (PostgreSQL's sequence hands
        them out before their transactions commit). Admissions committed in id order also keep
        Optuna's cache whole: it reads only trials past the last finished id it has seen. Sampling
        runs inside it: processes wait for each other's asks (a GP fit: a fraction of a second),
        never for a training."""
        with study_lock(context.study):
            if not self.fits(context, planned_trials(context.study), rounds):
                return None
            return self.ask(context)

    def fits(self, context: SearchContext, trials: list[optuna.trial.FrozenTrial], rounds: int) -> bool:
        """Room for one more trial's share after `trials` (running ones counted in full)."""
        share, unit = self.share(context), context.budget.unit
        planned = sum(charged(t, unit) or share for t in trials)
        return len(trials) < self.trial_limit(context) and planned + share <= context.budget.limit * (1 + 1e-9)

    def ask(self, context: SearchContext) -> optuna.trial.Trial:
        return context.study.ask(dict(context.parameters))

    def trial_limit(self, context: SearchContext) -> int:
        return context.n_configs


class RandomSearch(FixedBudgetSearch):
    def sampler(self, parameters, seed):
        return optuna.samplers.RandomSampler(seed=seed)


class GridPointSampler(optuna.samplers.BaseSampler):
    """Gives each new trial the first point of `order` that no finished or running trial holds;
    asked under the study's lock (`FixedBudgetSearch.admit`), so no other trial is being given a
    point meanwhile. (Optuna's GridSampler stops the study from inside `tell` once the grid is
    exhausted, which only works inside `study.optimize`; enqueued trials, popped by several
    processes from SQLite, which cannot lock rows, could go to two of them.)"""

    def __init__(self, order: list[dict]):
        self.order, self.points = order, {}

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def before_trial(self, study, trial):
        taken = [t.params for t in planned_trials(study)]
        self.points[trial._trial_id] = next((p for p in self.order if p not in taken), self.order[0])

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.points[trial._trial_id][param_name]

    def after_trial(self, study, trial, state, values):
        self.points.pop(trial._trial_id, None)


class GridSearch(FixedBudgetSearch):
    """The grid of categorical settings in a seeded order, at most n points, each given to one
    trial of the study whatever the processes sharing it."""

    def sampler(self, parameters, seed):
        points = grid_points(parameters)
        self.order = [points[i] for i in np.random.default_rng(seed).permutation(len(points))]
        return GridPointSampler(self.order)

    def trial_limit(self, context):
        return min(context.n_configs, len(self.order))


class TPESearch(FixedBudgetSearch):
    """Bayesian optimization with a tree-structured Parzen estimator (Bergstra et al. 2011).
    Settings passed explicitly (Optuna 5 changed its defaults): multivariate, with the constant liar,
    so proposals made while other trials run (parallel workers, other processes) avoid them; with
    one trial at a time nothing is running and the liar changes nothing."""

    def sampler(self, parameters, seed):
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


class GPSearch(FixedBudgetSearch):
    """Federated Bayesian optimization with a Gaussian-process surrogate (Optuna's GPSampler). It has
    no constant liar: trials running in parallel are not seen by the surrogate."""

    def sampler(self, parameters, seed):
        return optuna.samplers.GPSampler(seed=seed)


class MultiObjectiveSearch(FixedBudgetSearch):
    """System-aware search: maximize validation accuracy while minimizing system costs, by default
    communicated bytes, client compute and unfairness (the spread of per-client validation
    accuracy); any of `COSTS` can be chosen. Optuna keeps the Pareto front (`study.best_trials`);
    TPE handles several objectives."""

    def __init__(self, options: "MultiObjectiveOptions | None" = None):
        super().__init__(options or MultiObjectiveOptions())
        self.objectives = tuple(self.options.objectives.split(","))

    def reports(self, study, table):
        """The Pareto front's trials, and accuracy against each cost with the front marked."""
        front = [t.number for t in study.best_trials]
        if not front:
            return {}
        figures = {f"pareto_front_{cost}.png": pareto_figure(table, front, cost) for cost in self.objectives}
        return {"pareto_front.csv": table[table.number.isin(front)]} | figures

    def sampler(self, parameters, seed):
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


@dataclass(frozen=True)
class MultiObjectiveOptions(Options):
    objectives: str = option(
        ",".join(DEFAULT_COSTS), "multiobjective's costs to minimize beside accuracy, any of: " + ", ".join(COSTS)
    )

    def __post_init__(self):
        super().__post_init__()
        check_objectives(self.objectives)


def check_objectives(objectives: str) -> None:
    """Comma-separated names of `COSTS`, none twice, else a one-line SettingsError."""
    costs = objectives.split(",")
    if unknown := [name for name in costs if name not in COSTS]:
        raise SettingsError(f"unknown objective {unknown[0]!r}; choose from {', '.join(COSTS)}, comma-separated")
    if len(set(costs)) < len(costs):
        raise SettingsError(f"objectives repeat a name: {objectives}")


FEDTUNE_BASELINES = "the FedTune paper's baselines (section 4.1)"
register(
    Method(
        "random",
        TRIAL,
        f"Bergstra & Bengio, JMLR 2012; {FEDTUNE_BASELINES}",
        "n configurations drawn at random, budget // n rounds each",
        RandomSearch,
    )
)
register(
    Method("grid", TRIAL, "ours", "the points of a categorical space in order, budget // n rounds each", GridSearch)
)
register(
    Method(
        "tpe",
        TRIAL,
        f"Bergstra et al., NeurIPS 2011 (Optuna's TPESampler); {FEDTUNE_BASELINES}",
        "Bayesian optimization with a tree-structured Parzen estimator, budget // n rounds per configuration",
        TPESearch,
    )
)
register(
    Method(
        "gp",
        TRIAL,
        "Snoek et al., NeurIPS 2012 (Optuna's GPSampler)",
        "Bayesian optimization with a Gaussian-process surrogate, budget // n rounds per configuration",
        GPSearch,
    )
)
register(
    Method(
        "multiobjective",
        TRIAL,
        "ours (Optuna's multi-objective TPE)",
        "maximize validation accuracy and minimize system costs; the Pareto front is reported",
        MultiObjectiveSearch,
        MultiObjectiveOptions,
        reports=("pareto_front.csv", "pareto_front_<cost>.png"),
    )
)
