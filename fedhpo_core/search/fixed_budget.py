"""Methods that give each of n configurations the same share of the budget, B // n rounds: random
search, grid search and Bayesian optimization (FedTune paper, section 4.1: 30 configurations for
Random and Bayesian), and the system-aware multi-objective search."""

import numpy as np
import optuna

from fedhpo_core.search.base import (
    ROUNDS_ATTR,
    SearchContext,
    SearchMethod,
    TrialResult,
    finished_trials,
    score_of,
)
from fedhpo_core.search.space import Configuration, grid_points


class FixedBudgetSearch(SearchMethod):
    def search(self, context: SearchContext) -> None:
        rounds = context.budget.total // context.n_configs
        while len(finished_trials(context.study)) < self.trial_limit(context) and context.budget.remaining >= rounds:
            trial = self.ask(context)
            result = context.evaluate(trial.number, Configuration(trial.params), rounds, None)
            context.budget.spend(result.rounds)
            trial.set_user_attr(ROUNDS_ATTR, result.rounds)
            trial.set_user_attr("diverged", result.diverged)
            context.study.tell(trial, self.values(result))

    def ask(self, context: SearchContext) -> optuna.trial.Trial:
        return context.study.ask(dict(context.parameters))

    def trial_limit(self, context: SearchContext) -> int:
        return context.n_configs

    def values(self, result: TrialResult):
        return score_of(result)


class RandomSearch(FixedBudgetSearch):
    def sampler(self, parameters, seed):
        return optuna.samplers.RandomSampler(seed=seed)


class GridSearch(FixedBudgetSearch):
    """The grid of categorical settings in a seeded order, at most n points. Each point is enqueued
    before it is asked for: Optuna's GridSampler stops the study from inside `tell` once the grid is
    exhausted, which only works inside `study.optimize`, not with ask-and-tell."""

    def sampler(self, parameters, seed):
        points = grid_points(parameters)
        self.order = [points[i] for i in np.random.default_rng(seed).permutation(len(points))]
        return optuna.samplers.RandomSampler(seed=seed)

    def ask(self, context):
        tried = [t.params for t in finished_trials(context.study)]
        context.study.enqueue_trial(next(p for p in self.order if p not in tried))
        return super().ask(context)

    def trial_limit(self, context):
        return min(context.n_configs, len(self.order))


class TPESearch(FixedBudgetSearch):
    """Bayesian optimization with a tree-structured Parzen estimator (Bergstra et al. 2011).
    Settings passed explicitly (Optuna 5 changed its defaults): multivariate, and no constant liar,
    since trials here run one at a time."""

    def sampler(self, parameters, seed):
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=False)


class GPSearch(FixedBudgetSearch):
    """Federated Bayesian optimization with a Gaussian-process surrogate (Optuna's GPSampler)."""

    def sampler(self, parameters, seed):
        return optuna.samplers.GPSampler(seed=seed)


class MultiObjectiveSearch(FixedBudgetSearch):
    """System-aware search: maximize validation accuracy while minimizing communicated bytes,
    client compute and unfairness (the spread of per-client validation accuracy). Optuna keeps
    the Pareto front (`study.best_trials`); TPE handles several objectives."""

    objectives = ("bytes_sent", "client_compute_samples", "unfairness")
    directions = ("maximize", "minimize", "minimize", "minimize")

    def sampler(self, parameters, seed):
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=False)

    def values(self, result):
        return [score_of(result), *(result.objectives[name] for name in self.objectives)]
