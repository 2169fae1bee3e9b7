"""Population-based training across federated runs (Jaderberg et al. 2017; FedPop, Chen et al. 2023).

A population of P federated runs trains in generations of k rounds. After each generation the
worst quarter exploit the best quarter, copying a better member's weights (its `FederationState`)
and configuration, then explore by perturbing that configuration: numbers scaled by 0.8 or 1.2
and clipped to their range, categorical choices moved to a neighbouring choice. A round of the
population counts as P rounds of budget.

Each member's generation is one Optuna trial (told with its score), with user attributes for its
member, generation and parent trial: the lineage. Everything else is in the study too: each
trial's state is a checkpoint in the store, and a generation's configurations and parents follow
from the one before and the seed. So an interrupted population resumes mid-generation: members
told are kept, the others train from their parents' checkpoints, and a member asked for but not
yet trained (or cut off in its training) trains with the configuration it was given. The first
generation's configurations are drawn once each and differ from one another (`DistinctDraws`).
"""

import math

import numpy as np
import optuna

from fedhpo_core import seeding
from fedhpo_core.registry import TRIAL, Method, register
from fedhpo_core.reports import lineage_figure
from fedhpo_core.search.base import LINEAGE, ROUNDS_ATTR, SearchContext, SearchMethod
from fedhpo_core.search.halving import DistinctDraws, ask_member, members
from fedhpo_core.search.space import Configuration

POPULATION = 4
READY_ROUNDS = 2  # k: rounds per generation
MEMBER, GENERATION, PARENT = LINEAGE


def exploit(scores: dict[int, float], rng: np.random.Generator, fraction: float = 0.25) -> dict[int, int]:
    """{loser: winner}: each member of the bottom fraction copies a random member of the top one
    (`scores`: larger is better)."""
    ranked = sorted(scores, key=lambda m: -scores[m])
    cut = max(1, math.ceil(fraction * len(ranked))) if len(ranked) > 1 else 0
    top, bottom = ranked[:cut], ranked[len(ranked) - cut :]
    return {loser: top[int(rng.integers(len(top)))] for loser in bottom}


def explore(values: dict, parameters: dict, rng: np.random.Generator) -> dict:
    """Perturb every value within its distribution."""
    perturbed = {}
    for name, value in values.items():
        distribution = parameters[name]
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            index = distribution.choices.index(value) + int(rng.choice([-1, 1]))
            perturbed[name] = distribution.choices[min(len(distribution.choices) - 1, max(0, index))]
        else:
            scaled = min(distribution.high, max(distribution.low, value * float(rng.choice([0.8, 1.2]))))
            is_int = isinstance(distribution, optuna.distributions.IntDistribution)
            perturbed[name] = int(round(scaled)) if is_int else scaled
    return perturbed


class PopulationBasedTraining(SearchMethod):
    keeps_asked_trials = True  # a member's trial, once asked for, is trained on resume

    def sampler(self, parameters, seed):
        return DistinctDraws(optuna.samplers.RandomSampler(seed=seed), parameters, GENERATION, seed)

    def check_budget(self, budget, n_configs):
        super().check_budget(budget, POPULATION)

    def reports(self, study, table):
        return {"pbt_lineage.png": lineage_figure(table)} if not table.empty else {}

    def search(self, context: SearchContext) -> None:
        study, parameters = context.study, dict(context.parameters)
        generations = {}
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            generations.setdefault(trial.user_attrs[GENERATION], {})[trial.user_attrs[MEMBER]] = trial
        generation = max(generations, default=0)
        while True:
            done = generations.get(generation, {})
            plan = self.offspring(context, generations[generation - 1], generation) if generation else {}
            trained = [t.user_attrs[ROUNDS_ATTR] for t in done.values()]  # a resumed generation's rounds
            rounds = max(trained) if trained else min(READY_ROUNDS, context.budget.remaining // POPULATION)
            missing = [m for m in range(POPULATION) if m not in done]
            if missing and context.budget.remaining < len(missing) * max(rounds, 1):
                return
            given = members(study, parameters, {GENERATION: generation})
            asked = {t.user_attrs[MEMBER]: t for t in given if t.state == optuna.trial.TrialState.RUNNING}
            for member in missing:
                values, parent = plan.get(member, (None, None))
                if member in asked:  # asked for by a process that stopped before training it
                    trial = optuna.trial.Trial(study, asked[member]._trial_id)
                else:
                    trial = self.ask(study, parameters, values, member, generation, parent)
                result = context.train(trial, Configuration(trial.params), rounds, start_from=parent)
                context.complete(trial, result)
                done[member] = trial
            told = {t.number: t for t in study.get_trials(deepcopy=False)}
            generations[generation] = {m: told[t.number] for m, t in done.items()}
            if context.budget.remaining < POPULATION:
                return
            generation += 1

    def offspring(self, context: SearchContext, previous: dict, generation: int) -> dict:
        """{member: (configuration, parent trial)} of a generation from the one before: the worst
        quarter exploit the best and explore; the rest continue their own run as they were."""
        rng = seeding.numpy_rng(context.seed, seeding.PBT, generation)
        copies = exploit({m: self.score.sign() * t.value for m, t in previous.items()}, rng)
        plan = {m: (dict(t.params), t) for m, t in previous.items()}
        for loser, winner in copies.items():
            plan[loser] = (explore(previous[winner].params, dict(context.parameters), rng), previous[winner])
        return plan

    def ask(self, study, parameters, values, member: int, generation: int, parent) -> optuna.trial.Trial:
        """The member's trial of this generation, created with its lineage (`ask_member`): with
        `values`, else drawn by the sampler, a configuration no other member of the generation holds."""
        lineage = {MEMBER: member, GENERATION: generation} | ({PARENT: parent.number} if parent is not None else {})
        return ask_member(study, parameters, lineage, values)


register(
    Method(
        "pbt",
        TRIAL,
        "Jaderberg et al., arXiv 1711.09846 (2017); FedPop, Chen et al. 2023",
        f"a population of {POPULATION} runs in generations of {READY_ROUNDS} rounds; the worst copy the best, explore",
        PopulationBasedTraining,
        reports=("pbt_lineage.png",),
        attributes=LINEAGE,
    )
)
