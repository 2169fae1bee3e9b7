"""Asynchronous successive halving (ASHA: Li et al., "A System for Massively Parallel
Hyperparameter Tuning", MLSys 2020, Algorithm 2) and asynchronous Hyperband, on Optuna's pruners
with communication rounds as the step.

Each configuration is one trial trained towards R rounds. It reports its validation score every
round, and Optuna's pruner stops it at a rung r_0 eta^k where it is not in the top 1/eta of the
trials that reached that rung so far (`SuccessiveHalvingPruner`; `HyperbandPruner` runs several
such brackets, each trial in one). No trial waits for a rung to fill, so workers never idle, and
the pruner keeps its rungs in the storage, so `--workers` threads and `--join` processes share one
study. r_0 and R are the rungs successive halving plans for `n_configs` configurations within the
budget (`halving.plan_rungs`), so `asha` and `sha` compare at equal rungs; configurations are drawn
until the budget is spent.

With `--fidelity rounds+clients` (or `+steps`), a trial trains each stretch between rungs at the
rung's fidelity (`halving.Ladder`: from `--min-fidelity` of the clients or local steps up to all at
R), as a training of its own continued from its checkpoint. A trial over one of the study's limits
(`--max-bytes`, `--max-epsilon`) at a rung is pruned there: its costs only grow. (Its score still
counts in the rung's statistics, which Optuna's pruner keeps.)

The budget stays exact across processes by grants: a trial trains a round only once the study
granted it (`RoundGrants`, under a lock on the storage), at what the round costs in the budget's
unit at its fidelity, and the driver never lets the study's charges pass the budget.
"""

import math
from collections.abc import Callable

import optuna

from fedhpo_core.federation import Fidelity
from fedhpo_core.registry import TRIAL, Method, register
from fedhpo_core.search.base import GRANTED_ATTR, Budget, SearchContext, charged
from fedhpo_core.search.fixed_budget import RandomSearch
from fedhpo_core.search.halving import ETA, FidelityOptions, plan_rungs
from fedhpo_core.search.space import Configuration
from fedhpo_core.search.storage import study_lock


class RoundGrants:
    """What the study allows its trials to spend, in the budget's unit, counted in the storage: a
    finished trial holds what it was charged, a running one the larger of that and what it was
    granted. A round is granted at its planned cost (`Ladder.round_cost`): in client updates, a
    round on a fifth of the clients is a fifth of a full round."""

    def __init__(self, study: optuna.Study, budget: Budget):
        self.study, self.budget = study, budget

    def committed(self) -> float:
        running, unit = optuna.trial.TrialState.RUNNING, self.budget.unit
        return sum(
            max(t.user_attrs.get(GRANTED_ATTR, 0), charged(t, unit)) if t.state == running else charged(t, unit)
            for t in self.study.get_trials(deepcopy=False)
        )

    def fits(self, amount: float) -> bool:
        return self.committed() + amount <= self.budget.limit

    def grant(self, trial: optuna.trial.Trial, amount: float) -> bool:
        """Whether `trial` may spend `amount` more within the budget (recorded if so)."""
        with study_lock(self.study):
            if not self.fits(amount):
                return False
            trial.set_user_attr(GRANTED_ATTR, trial.user_attrs.get(GRANTED_ATTR, 0) + amount)
            return True


class AsynchronousHalving(RandomSearch):
    """ASHA: random configurations, each trained towards R rounds and pruned at its rungs by
    Optuna's `SuccessiveHalvingPruner`; trials train in parallel and processes may share the study."""

    def __init__(self, options: FidelityOptions | None = None):
        super().__init__(options or FidelityOptions())

    def rungs(self, context: SearchContext) -> tuple[int, int]:
        """(r_0, R): the first and last rung successive halving plans for n_configs configurations."""
        rungs = plan_rungs(context.n_configs, context.budget.total)
        return rungs[0].rounds, rungs[-1].rounds

    def pruner(self, context):
        minimum, _ = self.rungs(context)
        return optuna.pruners.SuccessiveHalvingPruner(minimum, ETA, min_early_stopping_rate=0)

    def search(self, context):
        self.grants, self.pruned = RoundGrants(context.study, context.budget), set()
        super().search(context)

    def stretches(self, context) -> list[tuple[int, Fidelity, float]]:
        """(the round a training ends at, its fidelity, what each of its rounds costs in the
        budget's unit): one training towards R, or with a fidelity ladder one per rung r_0 eta^k."""
        first, longest = self.rungs(context)
        ladder = self.options.ladder(context.budget.unit)
        ends = [longest]
        if ladder.clients or ladder.steps:
            ends = [first * ETA**k for k in range(int(math.log(longest / first, ETA) + 1e-9) + 1)]
        pairs = zip(ends, ladder.fidelities(len(ends)), strict=True)
        return [(end, f, ladder.round_cost(f) * context.budget.round_cost) for end, f in pairs]

    def admit(self, context, rounds):
        """A new trial granted its first round; None when the budget cannot fund it. Asked and
        granted in one critical section of the study (`study_lock`), so no trial exists without
        its grant."""
        _, _, first_cost = self.stretches(context)[0]
        with study_lock(context.study):
            if not self.grants.fits(first_cost):
                return None
            trial = self.ask(context)
            trial.set_user_attr(GRANTED_ATTR, first_cost)
            return trial

    def train(self, context, trial, rounds):
        """Towards R in one training, or with a fidelity ladder a stretch at a time between rungs
        r_0 eta^k, each at its rung's fidelity; it ends early where the trial is pruned, diverges,
        goes over a limit, or is granted no more rounds (each at its stretch's cost)."""
        _, longest = self.rungs(context)
        stopped = False

        def keep_going_at(cost: float) -> Callable[[int], bool]:
            def keep_going(round: int) -> bool:
                nonlocal stopped
                if round >= longest:
                    going = False
                elif trial.should_prune():
                    self.pruned.add(trial.number)
                    going = False
                else:
                    going = self.grants.grant(trial, cost)
                stopped = not going
                return going

            return keep_going

        configuration, reached = Configuration(trial.params), 0
        for end, fidelity, cost in self.stretches(context):
            start_from = trial if reached else None
            result = context.train(
                trial,
                configuration,
                end - reached,
                start_from=start_from,
                keep_going=keep_going_at(cost),
                fidelity=fidelity,
            )
            reached += result.rounds
            if not self.within_limits(result):
                self.pruned.add(trial.number)
            if stopped or reached < end or result.diverged or trial.number in self.pruned:
                break
        return trial, result

    def end(self, context, trial, result):
        if trial.number in self.pruned:
            context.prune(trial)
        else:  # trained to R, diverged, or stopped where the budget ran out
            context.complete(trial, result)


class AsynchronousHyperband(AsynchronousHalving):
    """Asynchronous Hyperband: Optuna's `HyperbandPruner` puts each trial in one of several ASHA
    brackets of different first rungs between r_0 and R."""

    def pruner(self, context):
        minimum, longest = self.rungs(context)
        return optuna.pruners.HyperbandPruner(minimum, longest, ETA)


register(
    Method(
        "asha",
        TRIAL,
        "Li et al., MLSys 2020 (Optuna's SuccessiveHalvingPruner)",
        "asynchronous successive halving: parallel trials pruned at their rungs, no waiting for a rung to fill",
        AsynchronousHalving,
        FidelityOptions,
        attributes=(GRANTED_ATTR,),
    )
)
register(
    Method(
        "async-hyperband",
        TRIAL,
        "Li et al., MLSys 2020 (Optuna's HyperbandPruner)",
        "asynchronous Hyperband: several ASHA brackets of different first rungs",
        AsynchronousHyperband,
        FidelityOptions,
        attributes=(GRANTED_ATTR,),
    )
)
