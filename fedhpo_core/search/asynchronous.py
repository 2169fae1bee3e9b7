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
granted it (`RoundGrants`, under a lock on the storage; a round at a lower fidelity is granted as a
whole one), and the driver never lets the study's charges pass the budget in its unit.
"""

import math

import optuna

from fedhpo_core.registry import TRIAL, Method, register
from fedhpo_core.search.base import GRANTED_ATTR, SearchContext, rounds_used
from fedhpo_core.search.fixed_budget import RandomSearch
from fedhpo_core.search.halving import ETA, FidelityOptions, plan_rungs
from fedhpo_core.search.space import Configuration
from fedhpo_core.search.storage import study_lock


class RoundGrants:
    """Rounds the study allows its trials, counted in the storage: a finished trial holds the rounds
    it used, a running one those it was granted."""

    def __init__(self, study: optuna.Study, total: int):
        self.study, self.total = study, total

    def committed(self) -> int:
        running = optuna.trial.TrialState.RUNNING
        return sum(
            max(t.user_attrs.get(GRANTED_ATTR, 0), rounds_used(t)) if t.state == running else rounds_used(t)
            for t in self.study.get_trials(deepcopy=False)
        )

    def grant(self, trial: optuna.trial.Trial, rounds: int = 1) -> bool:
        """Whether `trial` may train `rounds` more rounds within the budget (recorded if so)."""
        with study_lock(self.study):
            if self.committed() + rounds > self.total:
                return False
            trial.set_user_attr(GRANTED_ATTR, trial.user_attrs.get(GRANTED_ATTR, 0) + rounds)
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
        self.grants, self.pruned = RoundGrants(context.study, context.budget.total), set()
        super().search(context)

    def admit(self, context, rounds):
        """A new trial granted its first round; None when the budget is spent. Asked and granted in
        one critical section of the study (`study_lock`), so no trial exists without its grant."""
        with study_lock(context.study):
            if self.grants.committed() >= context.budget.total:
                return None
            trial = self.ask(context)
            trial.set_user_attr(GRANTED_ATTR, 1)
            return trial

    def train(self, context, trial, rounds):
        """Towards R in one training, or with a fidelity ladder a stretch at a time between rungs
        r_0 eta^k, each at its rung's fidelity; it ends early where the trial is pruned, diverges,
        goes over a limit, or is granted no more rounds."""
        first, longest = self.rungs(context)
        ladder = self.options.ladder(context.budget.unit)
        ends = [longest]
        if ladder.clients or ladder.steps:
            ends = [first * ETA**k for k in range(int(math.log(longest / first, ETA) + 1e-9) + 1)]
        stopped = False

        def keep_going(round: int) -> bool:
            nonlocal stopped
            if round >= longest:
                going = False
            elif trial.should_prune():
                self.pruned.add(trial.number)
                going = False
            else:
                going = self.grants.grant(trial)
            stopped = not going
            return going

        configuration, reached = Configuration(trial.params), 0
        for end, fidelity in zip(ends, ladder.fidelities(len(ends)), strict=True):
            start_from = trial if reached else None
            result = context.train(
                trial, configuration, end - reached, start_from=start_from, keep_going=keep_going, fidelity=fidelity
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
