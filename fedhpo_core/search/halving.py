"""Successive halving (Jamieson & Talwalkar 2016), Hyperband (Li et al. 2018) and BOHB (Falkner et
al. 2018) with communication rounds as the resource.

A promoted configuration continues from its checkpoint (the `FederationState` it reached), so a
rung costs only the rounds it adds: sum_k n_k (r_k - r_{k-1}) for n_k configurations trained to
r_k = r_0 eta^k rounds. The minimum resource r_0 is the largest that keeps that sum within the
bracket's budget. Each configuration is one Optuna trial: it reports its score at every rung it
reaches and ends COMPLETE in the last rung, PRUNED where it was stopped.

Everything a bracket needs is in the study, so any process can continue it: its plan (a study user
attribute, written when it starts), each trial's bracket, the rounds it trained and its result
(recorded by the driver), and the state it reached (a checkpoint in the store). Between rungs a
trial stays RUNNING, paused; an interrupted or killed bracket resumes where it stood: finished
rungs are not trained again, the surviving configurations continue from their checkpoints, and a
trial cut off in its first rung is replaced by a fresh configuration.
"""

import math
from dataclasses import dataclass

import optuna

from fedhpo_core.registry import TRIAL, Method, register
from fedhpo_core.search.base import (
    BRACKET_ATTR,
    SearchContext,
    SearchMethod,
    recorded_result,
    rounds_used,
    score_of,
)
from fedhpo_core.search.space import Configuration

ETA = 3


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

    pauses_trials = True

    def sampler(self, parameters, seed):
        return optuna.samplers.RandomSampler(seed=seed)

    def brackets(self, n_configs: int, budget: int) -> list[tuple[int, int]]:
        """(configurations, budget) per bracket."""
        return [(n_configs, budget)]

    def search(self, context: SearchContext) -> None:
        """Brackets not yet complete, each with an equal part of what is left (rounds a bracket's
        integer rungs leave unused go to the next), or with its recorded plan if it had begun."""
        trials = context.study.get_trials(deepcopy=False)
        complete = {t.user_attrs.get(BRACKET_ATTR) for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
        running = {t.user_attrs.get(BRACKET_ATTR) for t in trials if t.state == optuna.trial.TrialState.RUNNING}
        done = complete - running
        pending = [
            (i, n) for i, (n, _) in enumerate(self.brackets(context.n_configs, context.budget.total)) if i not in done
        ]
        for left, (index, n) in zip(range(len(pending), 0, -1), pending, strict=True):
            rungs = self.plan(context.study, index, n, context.budget.remaining // left)
            if rungs:
                self.run_bracket(context, index, rungs)

    def plan(self, study: optuna.Study, index: int, n: int, budget: int) -> list[Rung]:
        """The bracket's rungs: as recorded when it began, else planned now and recorded."""
        key = f"{BRACKET_ATTR}_{index}"
        if key in study.user_attrs:
            return [Rung(*rung) for rung in study.user_attrs[key]]
        rungs = plan_rungs(n, budget)
        if rungs:
            study.set_user_attr(key, [[r.configs, r.rounds] for r in rungs])
        return rungs

    def run_bracket(self, context: SearchContext, index: int, rungs: list[Rung]) -> None:
        """Every rung in turn: its members not yet trained to it are (from their checkpoints), then
        the best `configs` of the next rung go on and the others are pruned. Members already past a
        rung (a resumed bracket) are exactly its survivors, so nothing is decided twice."""
        study = context.study
        members = {t.number: t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(BRACKET_ATTR) == index}
        alive = [t for t in members.values() if t.state == optuna.trial.TrialState.RUNNING]
        if not any(t.state == optuna.trial.TrialState.PRUNED for t in members.values()):
            for _ in range(rungs[0].configs - len(alive)):
                trial = study.ask(dict(context.parameters))
                trial.set_user_attr(BRACKET_ATTR, index)
                alive.append(trial)
        trials = {t.number: optuna.trial.Trial(study, t._trial_id) for t in alive}
        for k, rung in enumerate(rungs):
            for trial in trials.values():
                recorded = recorded_result(trial)
                reached = rounds_used(trial)
                if reached < rung.rounds and not (recorded and recorded.diverged):
                    start_from = trial if reached else None
                    context.train(trial, Configuration(trial.params), rung.rounds - reached, start_from=start_from)
            sign = self.score.sign()
            scores = {n: score_of(recorded_result(t), self.score) for n, t in trials.items()}
            ranked = sorted(trials, key=lambda n: -sign * scores[n])
            if k + 1 == len(rungs):
                for number in ranked:
                    context.complete(trials[number], recorded_result(trials[number]))
                return
            for number in ranked[rungs[k + 1].configs :]:
                context.prune(trials.pop(number))


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


register(
    Method(
        "sha",
        TRIAL,
        "Jamieson & Talwalkar, AISTATS 2016",
        "successive halving: one bracket of n configurations, the best 1/3 continued from their checkpoints",
        SuccessiveHalving,
        attributes=(BRACKET_ATTR,),
    )
)
register(
    Method(
        "hyperband",
        TRIAL,
        "Li et al., JMLR 2018; the FedTune paper's baselines (section 4.1)",
        "brackets of successive halving trading many short trials against few long ones",
        Hyperband,
        attributes=(BRACKET_ATTR,),
    )
)
register(
    Method(
        "bohb",
        TRIAL,
        "Falkner et al., ICML 2018",
        "Hyperband whose configurations come from TPE fitted to the trials so far",
        BOHB,
        attributes=(BRACKET_ATTR,),
    )
)
