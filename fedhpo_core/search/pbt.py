"""Population-based training across federated runs (Jaderberg et al. 2017; FedPop, Chen et al. 2023).

A population of P federated runs trains in generations of k rounds. After each generation the
worst quarter exploit the best quarter, copying a better member's weights (its `FederationState`)
and configuration, then explore by perturbing that configuration: numbers scaled by 0.8 or 1.2
and clipped to their range, categorical choices moved to a neighbouring choice. A round of the
population counts as P rounds of budget.

Each member's generation is one Optuna trial (told with its score), with user attributes for its
member, generation and parent trial: the lineage. Resume: finished generations are kept and
counted; an interrupted population restarts from fresh configurations with the budget left.
"""

import math

import numpy as np
import optuna

from fedhpo_core import seeding
from fedhpo_core.search.base import SearchContext, SearchMethod, finish_trial, score_of
from fedhpo_core.search.space import Configuration

POPULATION = 4
READY_ROUNDS = 2  # k: rounds per generation
PBT = 9  # seeding key of exploit and explore


def exploit(scores: dict[int, float], rng: np.random.Generator, fraction: float = 0.25) -> dict[int, int]:
    """{loser: winner}: each member of the bottom fraction copies a random member of the top one."""
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
    def sampler(self, parameters, seed):
        return optuna.samplers.RandomSampler(seed=seed)

    def check_budget(self, budget, n_configs):
        super().check_budget(budget, POPULATION)

    def search(self, context: SearchContext) -> None:
        size = min(POPULATION, context.budget.remaining)
        if size < 1:
            return
        rng = seeding.numpy_rng(context.seed, PBT, len(context.study.trials))
        parameters = dict(context.parameters)
        members = {m: context.study.ask(parameters) for m in range(size)}
        values = {m: dict(t.params) for m, t in members.items()}
        states = dict.fromkeys(members)
        generation = 0
        while context.budget.remaining >= size:
            rounds = min(READY_ROUNDS, context.budget.remaining // size)
            scores = {}
            for member, trial in members.items():
                trial.set_user_attr("member", member)
                trial.set_user_attr("generation", generation)
                result = context.evaluate(trial, Configuration(values[member]), rounds, states[member])
                context.budget.spend(result.rounds)
                states[member], scores[member] = result.state, score_of(result)
                finish_trial(context.study, trial, result, self)
            if context.budget.remaining < size:
                break
            copies = exploit(scores, rng)
            parents = {m: members[copies.get(m, m)].number for m in members}
            for loser, winner in copies.items():
                states[loser] = states[winner]
                values[loser] = explore(values[winner], parameters, rng)
            generation += 1
            members = {}
            for member in sorted(values):
                context.study.enqueue_trial(values[member])
                members[member] = context.study.ask(parameters)
                members[member].set_user_attr("parent_trial", parents[member])
