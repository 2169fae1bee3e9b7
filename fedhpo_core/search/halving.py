"""Successive halving (Jamieson & Talwalkar 2016), Hyperband (Li et al. 2018) and BOHB (Falkner et
al. 2018) with communication rounds as the resource.

A promoted configuration continues from its checkpoint (the `FederationState` it reached), so a
rung costs only the rounds it adds: sum_k n_k (r_k - r_{k-1}) for n_k configurations trained to
r_k = r_0 eta^k rounds. The minimum resource r_0 is the largest that keeps that sum within the
bracket's budget. Each configuration is one Optuna trial: it reports its score at every rung it
reaches and ends COMPLETE in the last rung, PRUNED where it was stopped.

Resume: finished trials (complete or pruned) are kept and counted; a bracket interrupted mid-way
is planned again with the budget left, from fresh configurations, since checkpoints live in memory.
Brackets are planned with (total budget) // (brackets) and run with what is actually left.
"""

import math
from dataclasses import dataclass

import optuna

from fedhpo_core.search.base import ROUNDS_ATTR, SearchContext, SearchMethod, finished_trials, score_of
from fedhpo_core.search.space import Configuration

ETA = 3
BRACKET_ATTR = "bracket"


@dataclass(frozen=True)
class Rung:
    configs: int  # configurations trained in this rung
    rounds: int  # rounds each has had in all at the end of it


def plan_rungs(n: int, budget: int, eta: int = ETA) -> list[Rung]:
    """Rungs n_k = n // eta^k (while >= 1) at r_k = r_0 eta^k, with the largest r_0 whose total
    cost fits `budget`; fewer rungs when even r_0 = 1 does not fit. Empty if nothing fits."""
    counts = []
    while n // eta ** len(counts) >= 1:
        counts.append(n // eta ** len(counts))
    while counts:
        # Cost per unit of r_0: n_0 * 1 + sum_{k>=1} n_k (eta^k - eta^(k-1)).
        unit = counts[0] + sum(c * (eta**k - eta ** (k - 1)) for k, c in enumerate(counts) if k)
        r0 = budget // unit
        if r0 >= 1:
            return [Rung(c, r0 * eta**k) for k, c in enumerate(counts)]
        counts.pop()
    return []


def plan_cost(rungs: list[Rung]) -> int:
    previous, total = 0, 0
    for rung in rungs:
        total += rung.configs * (rung.rounds - previous)
        previous = rung.rounds
    return total


class SuccessiveHalving(SearchMethod):
    """One bracket: n configurations, the best 1/eta promoted at every rung."""

    settles_recorded_trials = False  # a trial spans rungs: its last recorded rung is not its end

    def sampler(self, parameters, seed):
        return optuna.samplers.RandomSampler(seed=seed)

    def brackets(self, n_configs: int, budget: int) -> list[tuple[int, int]]:
        """(configurations, budget) per bracket."""
        return [(n_configs, budget)]

    def search(self, context: SearchContext) -> None:
        """Brackets not yet complete, each with an equal part of what is left (rounds a bracket's
        integer rungs leave unused go to the next)."""
        complete = optuna.trial.TrialState.COMPLETE
        done = {t.user_attrs.get(BRACKET_ATTR) for t in finished_trials(context.study) if t.state == complete}
        pending = [
            (i, n) for i, (n, _) in enumerate(self.brackets(context.n_configs, context.budget.total)) if i not in done
        ]
        for left, (index, n) in zip(range(len(pending), 0, -1), pending, strict=True):
            rungs = plan_rungs(n, context.budget.remaining // left)
            if rungs:
                self.run_bracket(context, index, rungs)

    def run_bracket(self, context: SearchContext, index: int, rungs: list[Rung]) -> None:
        trials = [context.study.ask(dict(context.parameters)) for _ in range(rungs[0].configs)]
        for trial in trials:
            trial.set_user_attr(BRACKET_ATTR, index)
        states, rounds, scores = {}, dict.fromkeys((t.number for t in trials), 0), {}
        alive = trials
        for k, rung in enumerate(rungs):
            for trial in alive:
                result = context.evaluate(
                    trial,
                    Configuration(trial.params),
                    rung.rounds - rounds[trial.number],
                    states.get(trial.number),
                )
                context.budget.spend(result.rounds)
                rounds[trial.number] += result.rounds
                states[trial.number], scores[trial.number] = result.state, score_of(result)
                trial.report(scores[trial.number], step=rounds[trial.number])
                trial.set_user_attr(ROUNDS_ATTR, rounds[trial.number])
            ranked = sorted(alive, key=lambda t: -scores[t.number])
            keep = rungs[k + 1].configs if k + 1 < len(rungs) else len(ranked)
            for trial in ranked[keep:]:
                context.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            alive = ranked[:keep]
        for trial in alive:
            context.study.tell(trial, scores[trial.number])


class Hyperband(SuccessiveHalving):
    """Brackets s = s_max .. 0 with n_s = ceil((s_max + 1) / (s + 1) * eta^s) configurations, trading
    many short trials against few long ones; the budget is split equally between brackets.

    s_max is floor(log_eta n) as in Li et al., lowered until every bracket can give each of its
    configurations at least one round: a small budget gets fewer, smaller brackets."""

    def brackets(self, n_configs, budget):
        for s_max in range(int(math.log(n_configs, ETA) + 1e-9), -1, -1):
            share = budget // (s_max + 1)
            plan = [(math.ceil((s_max + 1) / (s + 1) * ETA**s), share) for s in range(s_max, -1, -1)]
            if all(plan_rungs(n, share) for n, share in plan):
                return plan
        return []


class BOHB(Hyperband):
    """Hyperband whose configurations come from TPE fitted to the trials so far (Falkner et al.)."""

    def sampler(self, parameters, seed):
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=False)
