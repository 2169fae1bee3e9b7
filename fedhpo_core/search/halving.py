"""Successive halving (Jamieson & Talwalkar 2016), Hyperband (Li et al. 2018) and BOHB (Falkner et
al. 2018) with communication rounds as the resource, and optionally the fraction of clients sampled
and of local steps taken (`Ladder`: a fidelity vector, FedHPO-Bench's client sample rate).

A promoted configuration continues from its checkpoint (the `FederationState` it reached), so a
rung costs only the rounds it adds: sum_k n_k (r_k - r_{k-1}) for n_k configurations trained to
r_k = r_0 eta^k rounds. The minimum resource r_0 is the largest that keeps that sum within the
bracket's budget. Each configuration is one Optuna trial: it reports its score at every rung it
reaches and ends COMPLETE in the last rung, PRUNED where it was stopped.

With `--fidelity rounds+clients` (or `+steps`), rung k of K also samples a fraction
f_k = f_0^((K-1-k)/(K-1)) of the clients (or takes that fraction of each client's local steps),
from `--min-fidelity` f_0 at the first rung to 1 at the top: rounds 3 -> 9 -> 27 with clients
20% -> 45% -> 100%. A rung's rounds cost what its fidelity costs in the budget's unit (a round on
20% of the clients is a fifth of one on all of them in client updates and bytes, a whole one in
rounds), so the same budget buys longer rungs.

After each rung, the bracket measures Kendall's tau between its survivors' scores at the rung
before and at this one (`RUNG_SCORES_ATTR`, the study's `rank_agreement.csv`): how far the cheaper
evaluation ranked them as the dearer one did. Below `--min-rank-agreement`, the bracket stops
promoting (its survivors complete where they stand) and its budget goes to the brackets after it,
which have fewer rungs (Hyperband's last starts at full fidelity). The top rung holds one
configuration, so agreement is measured between consecutive rungs rather than against the top one.

Promotion ranks trials within the study's limits (`--max-bytes`, `--max-epsilon`) before those
over one, so a bracket ends with a feasible best whenever one of its trials was; with system
objectives (`--objectives`), by non-dominated sorting (multi-objective successive halving,
Schmucker et al. 2021), the score breaking ties within a front.

Everything a bracket needs is in the study, so any process can continue it: its plan (a study user
attribute, written when it starts), each trial's bracket, the rounds it trained and its result
(recorded by the driver), and the state it reached (a checkpoint in the store). Between rungs a
trial stays RUNNING, paused; an interrupted or killed bracket resumes where it stood: finished
rungs are not trained again, the surviving configurations continue from their checkpoints, and a
trial asked for but not yet trained (or cut off in its first rung) is trained with the
configuration it was given (`members`, `ask_member`): a bracket ends with as many configurations
as it planned, none drawn twice (`DistinctDraws`), wherever the kill came.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import optuna
import pandas as pd
from scipy.stats import kendalltau

from fedhpo_core import seeding
from fedhpo_core.federation import Fidelity
from fedhpo_core.registry import TRIAL, Method, Options, option, register
from fedhpo_core.search.base import (
    BRACKET_ATTR,
    SearchContext,
    SearchMethod,
    TrialResult,
    recorded_result,
    rounds_used,
    score_of,
)
from fedhpo_core.search.fixed_budget import check_objectives
from fedhpo_core.search.space import Configuration
from fedhpo_core.settings import SettingsError

ETA = 3
FIDELITIES = ("rounds", "rounds+clients", "rounds+steps", "rounds+clients+steps")
RUNG_SCORES_ATTR = "rung_scores"  # Optuna user attribute: a halving trial's score at each rung it finished
AGREEMENT_ATTR = "rank_agreement"  # Optuna study user attribute: Kendall's tau per bracket and rung


@dataclass(frozen=True)
class Ladder:
    """What rungs grow besides rounds, from `lowest` at the first rung to 1 at the top, and what a
    round at a rung's fidelity costs in the budget's unit, relative to one at full fidelity."""

    clients: bool = False
    steps: bool = False
    lowest: float = 1.0
    unit: str = "rounds"

    def fidelities(self, count: int) -> list[Fidelity]:
        """Rung k of `count`: f_k = lowest^((count-1-k)/(count-1)) for what grows, 1 otherwise."""
        fractions = [self.lowest ** ((count - 1 - k) / (count - 1)) if count > 1 else 1.0 for k in range(count)]
        return [Fidelity(f if self.clients else 1.0, f if self.steps else 1.0) for f in fractions]

    def round_cost(self, fidelity: Fidelity) -> float:
        """Fewer clients send fewer updates and bytes; rounds and simulated seconds (the slowest
        client's) are not counted cheaper."""
        return fidelity.clients if self.unit in ("client-updates", "bytes") else 1.0


ROUNDS_ONLY = Ladder()


@dataclass(frozen=True)
class Rung:
    configs: int  # configurations trained in this rung
    rounds: int  # rounds each has had in all at the end of it
    clients: float = 1.0  # the fraction of clients sampled in its rounds
    steps: float = 1.0  # the fraction of local steps its clients take

    @property
    def fidelity(self) -> Fidelity:
        return Fidelity(self.clients, self.steps)


def plan_rungs(
    n: int, budget: float, eta: int = ETA, ladder: Ladder = ROUNDS_ONLY, most: int | None = None
) -> list[Rung]:
    """Rungs n_k = n // eta^k (while >= 1, at most `most` of them) at r_k = r_0 eta^k and the
    ladder's fidelities, with the largest r_0 whose total cost fits `budget` (in full-fidelity
    rounds); fewer rungs when even r_0 = 1 does not fit. Empty if nothing fits."""
    counts = []
    while n // eta ** len(counts) >= 1 and (most is None or len(counts) < most):
        counts.append(n // eta ** len(counts))
    while counts:
        fidelities = ladder.fidelities(len(counts))
        # Cost per unit of r_0: sum_k n_k (eta^k - eta^(k-1)) c_k, eta^(-1) counted as 0.
        unit = sum(
            c * (eta**k - (eta ** (k - 1) if k else 0)) * ladder.round_cost(f)
            for k, (c, f) in enumerate(zip(counts, fidelities, strict=True))
        )
        r0 = int(budget / unit + 1e-9)
        if r0 >= 1:
            return [
                Rung(c, r0 * eta**k, f.clients, f.steps)
                for k, (c, f) in enumerate(zip(counts, fidelities, strict=True))
            ]
        counts.pop()
    return []


def plan_cost(rungs: list[Rung], ladder: Ladder = ROUNDS_ONLY) -> float:
    """What the rungs cost in full-fidelity rounds."""
    previous, total = 0, 0.0
    for rung in rungs:
        total += rung.configs * (rung.rounds - previous) * ladder.round_cost(rung.fidelity)
        previous = rung.rounds
    return total


def rank_agreement(before: list[float], after: list[float]) -> float:
    """Kendall's tau between two fidelities' scores of the same configurations (nan for fewer than
    two, or where either ranks them all equal)."""
    if len(before) < 2:
        return math.nan
    return float(kendalltau(before, after).statistic)


def size_of(parameters: Mapping[str, optuna.distributions.BaseDistribution]) -> float:
    """How many configurations the distributions hold (inf with a continuous one)."""
    size = 1.0
    for distribution in parameters.values():
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            size *= len(distribution.choices)
        elif distribution.step is None:
            return math.inf
        else:  # an integer or a stepped float
            size *= round((distribution.high - distribution.low) / distribution.step) + 1
    return size


class DistinctDraws(optuna.samplers.BaseSampler):
    """Draws a trial's whole configuration with `base`, and where a member of its group holds that
    one already (a trial whose user attribute `key` is the trial's: its bracket, its generation),
    draws uniformly at random until none does, unless the space has no other. So no configuration
    is drawn twice in a group, and none is refused once a trial holds it."""

    def __init__(self, base: optuna.samplers.BaseSampler, parameters: Mapping, key: str, seed: int):
        self.base, self.parameters, self.key = base, dict(parameters), key
        # A stream of its own, derived from the sampler's seed.
        self.uniform = optuna.samplers.RandomSampler(seed=int(seeding.numpy_rng(seed, seeding.SEARCH).integers(2**31)))

    def infer_relative_search_space(self, study, trial):
        return self.parameters

    def sample_relative(self, study, trial, search_space):
        live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
        group = trial.user_attrs.get(self.key)
        others = [t for t in study.get_trials(deepcopy=False, states=live) if t.number != trial.number]
        held = {frozenset(t.params.items()) for t in others if t.user_attrs.get(self.key) == group}
        values = self.draw(self.base, study, trial)
        while frozenset(values.items()) in held and len(held) < size_of(self.parameters):
            values = self.draw(self.uniform, study, trial)
        return values

    def draw(self, sampler: optuna.samplers.BaseSampler, study, trial) -> dict:
        """A whole configuration from `sampler`, as `study.ask` would have it draw one."""
        relative = sampler.sample_relative(study, trial, sampler.infer_relative_search_space(study, trial))
        return {
            name: relative[name] if name in relative else sampler.sample_independent(study, trial, name, distribution)
            for name, distribution in self.parameters.items()
        }

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self.base.reseed_rng()
        self.uniform.reseed_rng()


def members(study: optuna.Study, parameters: Mapping, group: Mapping) -> list[optuna.trial.FrozenTrial]:
    """The trials of a group (a bracket, a generation: those whose user attributes include `group`)
    that hold a configuration, in the order they were asked: told, paused, or asked for and not
    yet trained. One that an interrupted or killed process left RUNNING with only some of
    `parameters` (killed inside `study.ask`) is marked FAIL: it never held a configuration."""
    kept = []
    live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    for trial in study.get_trials(deepcopy=False, states=live):
        if any(trial.user_attrs.get(key) != value for key, value in group.items()):
            continue
        if trial.state == optuna.trial.TrialState.RUNNING and trial.params.keys() != parameters.keys():
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        else:
            kept.append(trial)
    return kept


def ask_member(
    study: optuna.Study, parameters: Mapping, attributes: Mapping, values: Mapping | None = None
) -> optuna.trial.Trial:
    """A new trial with the user `attributes` and the configuration `values` (else the sampler's),
    enqueued with them so that it is created with them: a kill cannot leave a trial outside its
    group. One that a killed process enqueued and never asked is asked instead."""
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    if not any(t.user_attrs == dict(attributes) for t in waiting):
        study.enqueue_trial(dict(values or {}), user_attrs=dict(attributes))
    return study.ask(dict(parameters))


def nondominated_fronts(points: dict[int, tuple[float, ...]]) -> dict[int, int]:
    """Each point's front under minimization of every coordinate (0: the Pareto front; NSGA-II's
    non-dominated sorting)."""
    fronts, left, level = {}, dict(points), 0
    while left:
        front = [
            n
            for n, p in left.items()
            if not any(all(a <= b for a, b in zip(q, p, strict=True)) and q != p for q in left.values())
        ]
        fronts |= dict.fromkeys(front, level)
        left = {n: p for n, p in left.items() if n not in front}
        level += 1
    return fronts


@dataclass(frozen=True)
class FidelityOptions(Options):
    fidelity: str = option("rounds", "what rungs grow: " + ", ".join(FIDELITIES), FIDELITIES)
    min_fidelity: float = option(
        0.2, "the first rung's fraction of clients or local steps (1 at the top rung)", low=0.0
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.min_fidelity <= 1:
            raise SettingsError(f"option min_fidelity must be in (0, 1], got {self.min_fidelity}")

    def ladder(self, unit: str) -> Ladder:
        """The rung ladder these options describe, its costs in the budget's `unit`."""
        grows = self.fidelity.split("+")
        return Ladder("clients" in grows, "steps" in grows, self.min_fidelity, unit)


@dataclass(frozen=True)
class HalvingOptions(FidelityOptions):
    min_rank_agreement: float = option(
        -1.0,
        "sha, hyperband, bohb: stop promoting in a bracket when Kendall's tau between a rung's and the next "
        "rung's scores falls below this (-1: never)",
        low=-1.0,
    )
    objectives: str = option(
        "", "costs to minimize beside the score, comma-separated (sha, hyperband, bohb: none, the default)"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.objectives:
            check_objectives(self.objectives)


class SuccessiveHalving(SearchMethod):
    """One bracket: n configurations, the best 1/eta promoted at every rung."""

    pauses_trials = True
    keeps_asked_trials = True  # a bracket's configurations are its own: one asked for is trained on resume

    def __init__(self, options: HalvingOptions | None = None):
        super().__init__(options or HalvingOptions())
        self.objectives = tuple(self.options.objectives.split(",")) if self.options.objectives else ()
        self.ladder = ROUNDS_ONLY

    def sampler(self, parameters, seed):
        return DistinctDraws(optuna.samplers.RandomSampler(seed=seed), parameters, BRACKET_ATTR, seed)

    def brackets(self, n_configs: int, budget: int) -> list[tuple[int, int, int | None]]:
        """(configurations, budget, most rungs) per bracket."""
        return [(n_configs, budget, None)]

    def search(self, context: SearchContext) -> None:
        """Brackets not yet complete, each with an equal part of what is left (rounds a bracket's
        integer rungs leave unused go to the next), or with its recorded plan if it had begun."""
        self.ladder = self.options.ladder(context.budget.unit)
        trials = context.study.get_trials(deepcopy=False)
        complete = {t.user_attrs.get(BRACKET_ATTR) for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
        running = {t.user_attrs.get(BRACKET_ATTR) for t in trials if t.state == optuna.trial.TrialState.RUNNING}
        done = complete - running
        brackets = self.brackets(context.n_configs, context.budget.total)
        pending = [(i, n, most) for i, (n, _, most) in enumerate(brackets) if i not in done]
        for left, (index, n, most) in zip(range(len(pending), 0, -1), pending, strict=True):
            rungs = self.plan(context.study, index, n, context.budget.remaining // left, most)
            if rungs:
                self.run_bracket(context, index, rungs)

    def plan(self, study: optuna.Study, index: int, n: int, budget: int, most: int | None = None) -> list[Rung]:
        """The bracket's rungs: as recorded when it began, else planned now and recorded."""
        key = f"{BRACKET_ATTR}_{index}"
        if key in study.user_attrs:
            return [Rung(*rung) for rung in study.user_attrs[key]]
        rungs = plan_rungs(n, budget, ladder=self.ladder, most=most)
        if rungs:
            study.set_user_attr(key, [[r.configs, r.rounds, r.clients, r.steps] for r in rungs])
        return rungs

    def run_bracket(self, context: SearchContext, index: int, rungs: list[Rung]) -> None:
        """Every rung in turn: its members not yet trained to it are (from their checkpoints), then
        the best `configs` of the next rung go on and the others are pruned. Members already past a
        rung (a resumed bracket) are exactly its survivors, so nothing is decided twice; before the
        first rung ends, the bracket's configurations are those it was given, then new ones
        (`members`, `ask_member`), `configs` of them, none twice."""
        study, group = context.study, {BRACKET_ATTR: index}
        given = members(study, context.parameters, group)
        if not any(t.state == optuna.trial.TrialState.PRUNED for t in given):
            for _ in range(rungs[0].configs - len(given)):
                ask_member(study, context.parameters, group)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        alive = [t for t in running if t.user_attrs.get(BRACKET_ATTR) == index]
        trials = {t.number: optuna.trial.Trial(study, t._trial_id) for t in alive}
        for k, rung in enumerate(rungs):
            for trial in trials.values():
                recorded = recorded_result(trial)
                reached = rounds_used(trial)
                if reached < rung.rounds and not (recorded and recorded.diverged):
                    start_from = trial if reached else None
                    configuration = Configuration(trial.params)
                    context.train(
                        trial, configuration, rung.rounds - reached, start_from=start_from, fidelity=rung.fidelity
                    )
            results = {n: recorded_result(t) for n, t in trials.items()}
            for number, trial in trials.items():
                scores = trial.user_attrs.get(RUNG_SCORES_ATTR, {})
                if str(k) not in scores:  # the rung's score, before a later rung's result replaces it
                    trial.set_user_attr(RUNG_SCORES_ATTR, scores | {str(k): score_of(results[number], self.score)})
            ranked = self.ranked(results)
            refused = k > 0 and self.agreement(study, index, k, trials) < self.options.min_rank_agreement
            if k + 1 == len(rungs) or refused:
                for number in ranked:
                    context.complete(trials[number], results[number])
                return
            for number in ranked[rungs[k + 1].configs :]:
                context.prune(trials.pop(number))

    def ranked(self, results: dict[int, TrialResult]) -> list[int]:
        """Best first: trials within the study's limits before the others, then by non-dominated
        front with system objectives (fronts of the feasible and of the others apart, as Deb's
        constrained domination has it), then by score."""
        sign = self.score.sign()
        scores = {n: score_of(r, self.score) for n, r in results.items()}
        feasible = {n: self.within_limits(r) for n, r in results.items()}
        fronts = dict.fromkeys(results, 0)
        for group in (True, False) if self.objectives else ():
            points = {
                n: (-sign * scores[n], *(r.objectives[o] for o in self.objectives))
                for n, r in results.items()
                if feasible[n] == group
            }
            fronts |= nondominated_fronts(points)
        return sorted(results, key=lambda n: (not feasible[n], fronts[n], -sign * scores[n]))

    def agreement(self, study: optuna.Study, index: int, k: int, trials: dict[int, optuna.trial.Trial]) -> float:
        """Kendall's tau between rung k-1's and rung k's scores of rung k's trials, recorded on the
        study where there are two or more (`AGREEMENT_ATTR`: bracket, rung, configurations, tau)."""
        scores = [trial.user_attrs[RUNG_SCORES_ATTR] for trial in trials.values()]
        if len(scores) < 2:  # one configuration ranks nothing
            return 1.0
        tau = rank_agreement([s[str(k - 1)] for s in scores], [s[str(k)] for s in scores])
        rows = [r for r in study.user_attrs.get(AGREEMENT_ATTR, []) if (r["bracket"], r["rung"]) != (index, k - 1)]
        row = {"bracket": index, "rung": k - 1, "configurations": len(scores), "kendall_tau": tau}
        study.set_user_attr(AGREEMENT_ATTR, [*rows, row])
        return tau if math.isfinite(tau) else 1.0

    def reports(self, study, table):
        """How far each rung's ranking agreed with the next one's (Kendall's tau), if measured."""
        rows = study.user_attrs.get(AGREEMENT_ATTR, [])
        return {"rank_agreement.csv": pd.DataFrame(rows)} if rows else {}


class Hyperband(SuccessiveHalving):
    """Brackets s = s_max .. 0 with n_s = ceil((s_max + 1) / (s + 1) * eta^s) configurations and s + 1
    rungs, trading many short trials against few long ones; the budget is split equally between
    brackets. The last bracket trains its configurations at full fidelity from the start.

    s_max is floor(log_eta n) as in Li et al., lowered until every bracket can give each of its
    configurations at least one round in all of its s + 1 rungs: a small budget gets fewer,
    smaller brackets."""

    def brackets(self, n_configs, budget):
        for s_max in range(int(math.log(n_configs, ETA) + 1e-9), -1, -1):
            share = budget // (s_max + 1)
            plan = [(math.ceil((s_max + 1) / (s + 1) * ETA**s), share, s + 1) for s in range(s_max, -1, -1)]
            if all(len(plan_rungs(n, share, ladder=self.ladder, most=most)) == most for n, share, most in plan):
                return plan
        return []


class BOHB(Hyperband):
    """Hyperband whose configurations come from TPE fitted to the trials so far (Falkner et al.)."""

    def sampler(self, parameters, seed):
        tpe = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=False)
        return DistinctDraws(tpe, parameters, BRACKET_ATTR, seed)


register(
    Method(
        "sha",
        TRIAL,
        "Jamieson & Talwalkar, AISTATS 2016",
        "successive halving: one bracket of n configurations, the best 1/3 continued from their checkpoints",
        SuccessiveHalving,
        HalvingOptions,
        attributes=(BRACKET_ATTR, RUNG_SCORES_ATTR),
        reports=("rank_agreement.csv",),
    )
)
register(
    Method(
        "hyperband",
        TRIAL,
        "Li et al., JMLR 2018; the FedTune paper's baselines (section 4.1)",
        "brackets of successive halving trading many short trials against few long ones",
        Hyperband,
        HalvingOptions,
        attributes=(BRACKET_ATTR, RUNG_SCORES_ATTR),
        reports=("rank_agreement.csv",),
    )
)
register(
    Method(
        "bohb",
        TRIAL,
        "Falkner et al., ICML 2018",
        "Hyperband whose configurations come from TPE fitted to the trials so far",
        BOHB,
        HalvingOptions,
        attributes=(BRACKET_ATTR, RUNG_SCORES_ATTR),
        reports=("rank_agreement.csv",),
    )
)
