"""Successive halving, Hyperband and BOHB with a fidelity vector (rounds and the fraction of clients
sampled), against hand-computed plans and fake trainers with a planted answer: a planted best
configuration behind noise that shrinks with more clients, a fidelity that ranks configurations in
reverse, an accurate configuration over the study's limit, a budget in client updates."""

import math

import numpy as np
import optuna
import pytest
import torch

from fedhpo_core.cost import Cost
from fedhpo_core.federation import FULL, FederationState, Fidelity
from fedhpo_core.registry import method as method_named
from fedhpo_core.search.base import GRANTED_ATTR, RESULT_ATTR, TrialResult, recorded_result, rounds_used, spent
from fedhpo_core.search.halving import (
    AGREEMENT_ATTR,
    BRACKET_ATTR,
    RUNG_SCORES_ATTR,
    Ladder,
    Rung,
    nondominated_fronts,
    plan_cost,
    plan_rungs,
)
from fedhpo_core.search.space import SearchSpace
from fedhpo_core.search.study import best_trial, open_study, run_search

CLIENTS = 10  # the fake federation's clients: a round at full fidelity costs 10 client updates
LRS = [10 ** (-3 + i / 13) for i in range(27)]  # 1e-3 .. 1e-1, 1/13 decade apart
BEST_LR = LRS[13]  # 0.01: the planted best
GRID = SearchSpace.from_dict({"lr": {"type": "categorical", "choices": LRS}})
CONTINUOUS = SearchSpace.from_dict({"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}})
COMPLETE, PRUNED, RUNNING = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.RUNNING,
)


def closeness(lr: float) -> float:
    """The planted true quality: 0.9 at BEST_LR, 0.05 less per grid step (1/13 decade) away: grid
    neighbours 0.85, 0.8, ..., 0.25 at the ends; continuous in lr."""
    return 0.9 - 0.65 * abs(math.log10(lr) - math.log10(BEST_LR))


class PlantedTrainer:
    """A federation of 10 clients whose score is a planted function of the configuration, the client
    fraction and the round (`score`). Like the real trainer it samples max(1, round(10 f)) clients a
    round at client fidelity f, asks the budget to `afford` each round before training it (stopping
    when refused), reports the score every round, stores its checkpoints, and returns what the
    rounds cost. It records every training: (trial, rounds, clients a round, cost)."""

    def __init__(self, seed: int = 0, sigma: float = 0.0, bytes_per_round=None):
        self.seed, self.sigma = seed, sigma
        self.bytes_per_round = bytes_per_round  # lr -> bytes sent a round (a system objective), if any
        self.store: dict[str, FederationState] = {}
        self.trainings: list[tuple[int, int, int, Cost]] = []
        self.refused = 0  # rounds the budget refused

    def load(self, checkpoint):
        return self.store[checkpoint]

    def quality(self, lr: float, fidelity: Fidelity) -> float:
        return closeness(lr)

    def score(self, number: int, lr: float, fidelity: Fidelity, t: int) -> float:
        """Unbiased, noisier with fewer clients (std sigma / sqrt(clients)), a little better every
        round; the noise is drawn from (seed, trial, round)."""
        clients = max(1, round(CLIENTS * fidelity.clients))
        noise = np.random.default_rng([self.seed, number, t]).standard_normal() * self.sigma / math.sqrt(clients)
        return self.quality(lr, fidelity) + noise + 1e-5 * t

    def __call__(
        self,
        trial,
        configuration,
        rounds,
        start,
        tuner=None,
        keep_going=None,
        fidelity=None,
        afford=None,
        progress=None,
    ):
        fidelity = fidelity or FULL
        lr = configuration.values["lr"]
        clients = max(1, round(CLIENTS * fidelity.clients))
        begun = start.round if start else 0
        score = float(start.weights[0]) if start else math.nan  # nothing trained: what it had
        trained, cost = 0, Cost()
        while trained < rounds:
            one = Cost(rounds=1, client_updates=clients)
            if afford is not None and not afford(one):
                self.refused += 1
                break
            trained += 1
            cost += one
            score = self.score(trial.number, lr, fidelity, begun + trained)
            trial.report(score, begun + trained)
            if keep_going and not keep_going(begun + trained):
                break
        state = FederationState(begun + trained, torch.tensor([score]))
        checkpoint = f"planted/{trial.number}/{state.round}"
        self.store[checkpoint] = state
        self.trainings.append((trial.number, trained, clients, cost))
        objectives = {"bytes_sent": self.bytes_per_round(lr) * trained} if self.bytes_per_round else {}
        return TrialResult(score, trained, state, objectives=objectives, checkpoint=checkpoint, cost=cost)


def study_of(
    method_name: str,
    trainer,
    budget: float,
    n_configs: int,
    seed: int = 0,
    space=GRID,
    limits=None,
    unit="client-updates",
    round_cost=float(CLIENTS),
    **options,
):
    method = method_named(method_name).build(options)
    if limits:
        method.limits = limits
    study = open_study(method, optuna.storages.InMemoryStorage(), "fidelity", False)
    used = run_search(
        method, study, space, "global", CLIENTS, trainer, budget, n_configs, seed=seed, unit=unit, round_cost=round_cost
    )
    return study, used


class ReversedTrainer(PlantedTrainer):
    """A planted misleading fidelity: below 30% of the clients, the score ranks configurations in
    reverse (1 - quality); from 30% on, truly."""

    def quality(self, lr, fidelity):
        return 1 - closeness(lr) if fidelity.clients < 0.3 else closeness(lr)


def by_rounds(study) -> dict[int, int]:
    return {t.number: rounds_used(t) for t in study.trials}


# 1. The plan, by hand.


def test_plan_rungs_with_a_client_ladder_matches_the_hand_computed_plan():
    """n=9, eta=3, clients from 20%: rungs of 9, 3, 1 configurations at fidelities 0.2, sqrt(0.2),
    1. Cost per unit of r_0 in client updates: 9*1*0.2 + 3*(3-1)*sqrt(0.2) + 1*(9-3)*1 = 10.4833;
    in rounds (every round costs 1): 9 + 6 + 6 = 21."""
    ladder = Ladder(clients=True, lowest=0.2, unit="client-updates")
    unit = 9 * 1 * 0.2 + 3 * 2 * math.sqrt(0.2) + 1 * 6 * 1.0
    assert unit == pytest.approx(10.48328, abs=1e-5)
    rungs = plan_rungs(9, 100, 3, ladder)
    assert math.floor(100 / unit) == 9
    assert [(r.configs, r.rounds) for r in rungs] == [(9, 9), (3, 27), (1, 81)]
    assert [r.clients for r in rungs] == pytest.approx([0.2, math.sqrt(0.2), 1.0])
    assert all(r.steps == 1.0 for r in rungs) and rungs[1].fidelity == Fidelity(rungs[1].clients, 1.0)
    # 9*9*0.2 + 3*18*sqrt(0.2) + 1*54*1 = 16.2 + 24.15 + 54
    assert plan_cost(rungs, ladder) == pytest.approx(16.2 + 54 * math.sqrt(0.2) + 54)
    assert plan_cost(rungs, ladder) <= 100
    # The same budget in rounds: a round on a fifth of the clients costs a whole one, so r_0 = 100 // 21.
    in_rounds = Ladder(clients=True, lowest=0.2, unit="rounds")
    rounds = plan_rungs(9, 100, 3, in_rounds)
    assert [(r.configs, r.rounds) for r in rounds] == [(9, 4), (3, 12), (1, 36)]
    assert [r.clients for r in rounds] == pytest.approx([0.2, math.sqrt(0.2), 1.0])  # the ladder still grows
    assert plan_cost(rounds, in_rounds) == 9 * 4 + 3 * 8 + 1 * 24 == 84 <= 100
    assert plan_rungs(9, 100, 3) == [Rung(9, 4), Rung(3, 12), Rung(1, 36)]  # rounds only: full fidelity
    # Bytes count like client updates; simulated seconds (the slowest client's) like rounds.
    assert plan_rungs(9, 100, 3, Ladder(True, False, 0.2, "bytes")) == rungs
    assert plan_rungs(9, 100, 3, Ladder(True, False, 0.2, "sim-seconds"))[0].rounds == 4


def test_plan_rungs_drops_the_top_rung_when_even_one_round_does_not_fit():
    """Budget 10 < 10.48: without the top rung, two rungs at fidelities 0.2 and 1 cost
    9*1*0.2 + 3*2*1 = 7.8 per r_0, so r_0 = 1; a budget of 1 buys 9*0.2 = 1.8 > 1: nothing."""
    ladder = Ladder(clients=True, lowest=0.2, unit="client-updates")
    rungs = plan_rungs(9, 10, 3, ladder)
    assert [(r.configs, r.rounds, r.clients) for r in rungs] == [(9, 1, 0.2), (3, 3, 1.0)]
    assert plan_cost(rungs, ladder) == pytest.approx(7.8)
    assert len(plan_rungs(9, 10.49, 3, ladder)) == 3  # 10.49 >= 10.4833: the top rung fits again
    assert plan_rungs(9, 1, 3, ladder) == []
    steps = Ladder(steps=True, lowest=0.25, unit="client-updates")  # fewer steps: as many updates
    assert [(r.clients, r.steps) for r in plan_rungs(9, 100, 3, steps)] == [(1.0, 0.25), (1.0, 0.5), (1.0, 1.0)]
    assert plan_rungs(9, 100, 3, steps)[0].rounds == 100 // 21


# 2. A planted best behind noise that falls with the clients sampled.

SIGMA = 0.05
SEEDS = range(10)


def test_two_dimensional_hyperband_finds_the_planted_best_at_a_fraction_of_the_full_fidelity_cost():
    """Hyperband over rounds and clients (`rounds+clients`, clients from 5%: one of 10) with 81
    configurations (5 brackets, 143 trials) and 6000 client updates (600 rounds of all 10 clients)
    on 27 learning rates, the planted best 0.01 scoring 0.9 and each grid step away 0.05 less.

    Noise: std 0.05 / sqrt(clients sampled), so 0.05 at 1 client (the first rungs: a neighbour
    outscores the best there 24% of the time, 0.05 / (0.05 sqrt 2) = 0.71 sd) and 0.016 at all 10
    (the top rungs: 2.2 sd of the difference), plus 1e-5 a round. The first rung's ranking is
    visibly noisy (Kendall's tau with the next rung 0.4-0.7, asserted < 0.8 on average) yet
    promotion keeps the best: found in 10 of 10 seeds (asserted: at least 9; with noise 0.08 it is
    found in 9, with 0.12 in 8; promoting at random instead finds it in 3). Spent: 39.4% of the
    client updates the same trials' rounds would cost at full client fraction (asserted <= 40%;
    with clients from 10% it is 44%, from 20% more: the top rungs, and Hyperband's last bracket,
    run on all clients whatever the ladder)."""
    found, taus = 0, []
    for seed in SEEDS:
        trainer = PlantedTrainer(seed, SIGMA)
        study, used = study_of("hyperband", trainer, 6000, 81, seed, fidelity="rounds+clients", min_fidelity=0.05)
        found += best_trial(study).params["lr"] == BEST_LR
        updates = spent(study, "client-updates")
        at_full_fraction = CLIENTS * sum(rounds_used(t) for t in study.trials)
        assert used.spent == updates <= 6000
        assert updates >= 0.95 * 6000  # the budget went to longer rungs, not left idle
        assert updates <= 0.40 * at_full_fraction
        assert {clients for _, _, clients, _ in trainer.trainings} >= {1, 10}  # rungs from 1 client to all
        assert len(study.trials) == 81 + 34 + 15 + 8 + 5
        taus += [r["kendall_tau"] for r in study.user_attrs[AGREEMENT_ATTR] if (r["bracket"], r["rung"]) == (0, 0)]
    assert found >= 9
    assert len(taus) == len(SEEDS) and np.mean(taus) < 0.8  # the cheap rung does mis-rank: rank noise exists


# 3. A fidelity that ranks configurations in reverse.


def sha_reversed(budget=2000, **options):
    trainer = ReversedTrainer()
    study, used = study_of("sha", trainer, budget, 27, space=CONTINUOUS, fidelity="rounds+clients", **options)
    return study, used, [Rung(*r) for r in study.user_attrs[f"{BRACKET_ATTR}_0"]]


def test_a_reversed_low_fidelity_gives_negative_rank_agreement_and_the_threshold_stops_promotion():
    """SHA over 27 configurations, clients 20% -> 34% -> 58% -> 100%: the first rung (20% < 30%)
    ranks in reverse, so rung 1's nine trials are the truly worst nine and their scores at rungs 0
    and 1 are exactly opposed (tau = -1); from rung 1 on the ranking is true (tau = +1)."""
    study, used, rungs = sha_reversed()
    assert [(r.configs, round(r.clients, 3)) for r in rungs] == [(27, 0.2), (9, 0.342), (3, 0.585), (1, 1.0)]
    taus = {r["rung"]: r["kendall_tau"] for r in study.user_attrs[AGREEMENT_ATTR]}
    assert taus[0] == pytest.approx(-1.0) and taus[1] == pytest.approx(1.0)
    # Without a threshold (-1), the bracket goes on to the top rung.
    assert max(by_rounds(study).values()) == rungs[-1].rounds
    assert [t.state for t in study.trials].count(COMPLETE) == 1
    # The rung scores the trials record agree with the planted reversal.
    trial = next(t for t in study.trials if t.state == COMPLETE)
    scores = trial.user_attrs[RUNG_SCORES_ATTR]
    q = closeness(trial.params["lr"])
    assert scores["0"] == pytest.approx(1 - q + 1e-5 * rungs[0].rounds)
    assert scores["1"] == pytest.approx(q + 1e-5 * rungs[1].rounds)

    stopped, stopped_used, same = sha_reversed(min_rank_agreement=0.0)
    assert same == rungs
    assert [r["kendall_tau"] for r in stopped.user_attrs[AGREEMENT_ATTR]] == pytest.approx([-1.0])
    reached = by_rounds(stopped)
    assert max(reached.values()) == rungs[1].rounds < rungs[2].rounds  # nobody reached rung 2
    states = {t.number: t.state for t in stopped.trials}
    assert not any(s == RUNNING for s in states.values())
    second = [n for n, r in reached.items() if r == rungs[1].rounds]
    assert len(second) == 9 and all(states[n] == COMPLETE for n in second)  # rung 1 completes where it stands
    assert list(states.values()).count(PRUNED) == 18
    # The nine it kept were the truly worst (the reversed rung promoted them).
    quality = {t.number: closeness(t.params["lr"]) for t in stopped.trials}
    assert max(quality[n] for n in second) < min(q for n, q in quality.items() if n not in second)
    assert stopped_used.spent < used.spent  # the stopped bracket leaves its upper rungs' budget unspent


def test_hyperband_gives_a_stopped_brackets_budget_to_the_brackets_after_it():
    """Hyperband with the reversed fidelity: with min_rank_agreement 0 the first bracket (27
    configurations) stops after rung 1, so the second bracket, planned from what is left, gets a
    longer r_0 than when the first bracket runs to its top rung."""

    def run(**options):
        study, used = study_of(
            "hyperband", ReversedTrainer(), 4000, 27, space=CONTINUOUS, fidelity="rounds+clients", **options
        )
        return study, used, [Rung(*r) for r in study.user_attrs[f"{BRACKET_ATTR}_1"]]

    going, going_used, going_second = run()
    stopped, stopped_used, stopped_second = run(min_rank_agreement=0.0)
    assert any(r["kendall_tau"] < 0 for r in stopped.user_attrs[AGREEMENT_ATTR] if r["bracket"] == 0)
    assert stopped_second[0].rounds > going_second[0].rounds
    assert stopped_used.spent <= 4000 and going_used.spent <= 4000


def test_hyperband_bracket_s_has_s_plus_one_rungs_and_the_last_starts_at_full_fidelity():
    """Li et al. (JMLR 2018), Algorithm 1: bracket s of s_max = 3 has s + 1 rungs, n_i = n_s eta^-i
    configurations: 27/9/3/1, 12/4/1, 6/2 and 4 trained to R once, without halving. With the client
    ladder, a one-rung bracket's rung is the top one: all clients. It is Hyperband's hedge against a
    misleading low fidelity, as the reversed one here."""
    study, _ = study_of("hyperband", ReversedTrainer(), 4000, 27, space=CONTINUOUS, fidelity="rounds+clients")
    plans = [[Rung(*r) for r in study.user_attrs[f"{BRACKET_ATTR}_{i}"]] for i in range(4)]
    assert [[r.configs for r in plan] for plan in plans][:3] == [[27, 9, 3, 1], [12, 4, 1], [6, 2]]
    assert [r.configs for r in plans[3]] == [4] and plans[3][0].clients == 1.0


# 4. Feasible first.

LIMIT = 1e5  # bytes sent over all of a trial's rungs


def over_the_limit(lr: float) -> bool:
    """The planted infeasible configurations: the most accurate ones, within 0.15 decade of the
    best learning rate (closeness > 0.8), send 1e6 bytes a round; the others 1."""
    return closeness(lr) > 0.8


def test_successive_halving_promotes_feasible_trials_first_and_completes_a_feasible_best():
    """SHA over 27 continuous learning rates, noiseless: the top scorers are over the bytes limit.
    With the limit, every trial promoted past rung 0 is within it (there are at least 9 such), and
    the trial completing the top rung is the most accurate feasible configuration. Without the
    limit the same study completes an infeasible one: the limit is what decided."""
    bytes_per_round = lambda lr: 1e6 if over_the_limit(lr) else 1.0  # noqa: E731

    def run(limits):
        trainer = PlantedTrainer(bytes_per_round=bytes_per_round)
        return study_of("sha", trainer, 2000, 27, space=CONTINUOUS, limits=limits, fidelity="rounds+clients")[0]

    study = run({"bytes_sent": LIMIT})
    rungs = [Rung(*r) for r in study.user_attrs[f"{BRACKET_ATTR}_0"]]
    feasible = {t.number: not over_the_limit(t.params["lr"]) for t in study.trials}
    quality = {t.number: closeness(t.params["lr"]) for t in study.trials}
    assert 9 <= sum(feasible.values()) < 27
    top9 = sorted(quality, key=quality.get, reverse=True)[:9]
    assert not all(feasible[n] for n in top9)  # by score alone, infeasible trials would go on
    promoted = [n for n, r in by_rounds(study).items() if r > rungs[0].rounds]
    assert len(promoted) == 9 and all(feasible[n] for n in promoted)
    (winner,) = [t for t in study.trials if t.state == COMPLETE]
    assert rounds_used(winner) == rungs[-1].rounds
    assert feasible[winner.number] and recorded_result(winner).objectives["bytes_sent"] == rungs[-1].rounds <= LIMIT
    assert quality[winner.number] == max(q for n, q in quality.items() if feasible[n])
    assert best_trial(study).number == winner.number

    unlimited = run(None)
    (winner,) = [t for t in unlimited.trials if t.state == COMPLETE]
    assert over_the_limit(winner.params["lr"])


def result(score, bytes_sent, epsilon=0.0):
    return TrialResult(score, 1, None, objectives={"bytes_sent": bytes_sent, "epsilon": epsilon})


def test_ranked_puts_feasible_trials_first_then_fronts_then_score():
    """Limit bytes_sent <= 10. Score only: feasible by score (1 .8, 5 .75, 2 .7, 3 .6), then the
    infeasible by score (4 .95, 0 .9). With bytes as an objective, 1 (.8, 5) and 2 (.7, 2) are
    non-dominated, 5 (.75, 9) and 3 (.6, 8) on the next front."""
    results = {
        0: result(0.9, 50),
        1: result(0.8, 5),
        2: result(0.7, 2),
        3: result(0.6, 8),
        4: result(0.95, 100),
        5: result(0.75, 9),
    }
    scored = method_named("sha").build()
    scored.limits = {"bytes_sent": 10}
    assert scored.ranked(results) == [1, 5, 2, 3, 4, 0]
    fronts = method_named("sha").build({"objectives": "bytes_sent"})
    fronts.limits = {"bytes_sent": 10}
    assert fronts.ranked(results) == [1, 2, 5, 3, 4, 0]
    assert method_named("sha").build().ranked(results) == [4, 0, 1, 5, 2, 3]  # no limits: by score


def test_an_infeasible_trial_does_not_push_a_feasible_one_off_the_front():
    """Objective bytes_sent, limit epsilon <= 1. Among the feasible trials 0 (.8, 5 bytes), 2 (.7,
    3) and 1 (.6, 1) none dominates another, so the most accurate goes first; trial 3 (.9, 4
    bytes) is over the epsilon limit and dominates trial 0. Under constrained domination (Deb et
    al. 2002, NSGA-II) an infeasible trial dominates no feasible one: [0, 2, 1, 3]."""
    method = method_named("sha").build({"objectives": "bytes_sent"})
    method.limits = {"epsilon": 1.0}
    results = {0: result(0.8, 5, 0.5), 1: result(0.6, 1, 0.5), 2: result(0.7, 3, 0.5), 3: result(0.9, 4, 5.0)}
    assert method.ranked(results) == [0, 2, 1, 3]


# 5. Non-dominated sorting, by hand.


def test_nondominated_fronts_by_hand():
    """Minimizing both: (1,1), (0,3), (3,0) are non-dominated; (2,2) twice is dominated by (1,1)
    only (equal points do not dominate each other); (3,3) by both (2,2)s."""
    points = {0: (1, 1), 1: (2, 2), 2: (0, 3), 3: (3, 0), 4: (2, 2)}
    assert nondominated_fronts(points) == {0: 0, 1: 1, 2: 0, 3: 0, 4: 1}
    assert nondominated_fronts(points | {5: (3, 3)})[5] == 2
    assert nondominated_fronts({0: (1.0,), 1: (0.5,), 2: (2.0,)}) == {1: 0, 0: 1, 2: 2}  # one objective: by value
    assert nondominated_fronts({}) == {}


# 6. The budget in client updates.


@pytest.mark.parametrize("method", ["sha", "hyperband", "bohb"])
@pytest.mark.parametrize("budget", [300, 1234, 5000])
def test_the_client_update_budget_is_never_exceeded_and_is_the_sum_of_recorded_costs(method, budget):
    """Clients from 15%: the first rung samples round(1.5) = 2 clients where the plan counts 1.5
    updates a round, so trainings can run dearer than planned (the driver refuses a round that
    would not fit). The budget still holds, a round is refused only when it would not fit
    (less than a full round, 10 updates, is left), and what the study reports spent is exactly the
    recorded trainings' costs, and what the trainer charged."""
    trainer = PlantedTrainer(sigma=SIGMA)
    study, used = study_of(method, trainer, budget, 27, fidelity="rounds+clients", min_fidelity=0.15)
    recorded = sum(
        t.user_attrs[RESULT_ATTR]["cost_used"]["client_updates"] for t in study.trials if RESULT_ATTR in t.user_attrs
    )
    charged = sum(cost.client_updates for _, _, _, cost in trainer.trainings)
    assert spent(study, "client-updates") == used.spent == recorded == charged <= budget
    assert sum(
        t.user_attrs[RESULT_ATTR]["cost_used"]["rounds"] for t in study.trials if RESULT_ATTR in t.user_attrs
    ) == sum(r for _, r, _, _ in trainer.trainings)
    assert used.spent >= 0.8 * budget
    if trainer.refused:
        assert budget - used.spent < CLIENTS
    assert not any(t.state == RUNNING for t in study.trials)


def test_asha_trains_each_stretch_between_rungs_at_its_rungs_fidelity(tmp_path):
    """ASHA with `rounds+clients`: a trial trains towards R a stretch at a time, each on more of the
    clients (2, 4 and 10 of 10 with rungs 1 -> 3 -> 9 and clients from 20%), and the study's charge
    in client updates is the stretches' sum, within the budget and nearly all of it."""
    trainer = PlantedTrainer(sigma=SIGMA)
    method = method_named("asha").build({"fidelity": "rounds+clients", "min_fidelity": 0.2})
    study = open_study(method, f"sqlite:///{tmp_path / 'asha.db'}", "asha", False)
    used = run_search(
        method, study, GRID, "global", CLIENTS, trainer, 300, 9, seed=0, unit="client-updates", round_cost=10.0
    )
    stretches: dict[int, list[tuple[int, int]]] = {}
    for number, rounds, clients, _ in trainer.trainings:
        stretches.setdefault(number, []).append((rounds, clients))
    assert {s[0] for s in stretches.values()} == {(1, 2)}  # every trial starts with a round on 2 clients
    promoted = [s for s in stretches.values() if len(s) > 1]
    assert promoted and all(s[1] == (2, 4) for s in promoted)  # to rung 3 on 4 clients
    assert all(s[2][1] == 10 for s in promoted if len(s) > 2)  # to R on all of them
    charged = sum(cost.client_updates for _, _, _, cost in trainer.trainings)
    assert used.spent == spent(study, "client-updates") == charged <= 300
    # Rounds are granted at their fidelity's cost (a round on 2 clients, 2 updates), so the budget
    # funds more trials: granted as whole rounds, it spent 216 on 6 trials.
    assert used.spent >= 0.9 * 300 and sum(t.user_attrs[GRANTED_ATTR] for t in study.trials) <= 300
