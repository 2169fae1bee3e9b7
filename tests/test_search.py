"""Search methods against a fake trainer whose score is a known function of the configuration."""

import math
from dataclasses import replace

import numpy as np
import optuna
import pytest
import torch

from fedhpo_core.cost import Cost
from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, FederationState, partition_of
from fedhpo_core.registry import method as method_named
from fedhpo_core.registry import methods
from fedhpo_core.reports import study_table
from fedhpo_core.search import base as base_module
from fedhpo_core.search import study as study_module
from fedhpo_core.search.base import RESULT_ATTR, ROUNDS_ATTR, SearchContext, TrialResult, rounds_spent
from fedhpo_core.search.halving import Hyperband, plan_cost, plan_rungs
from fedhpo_core.search.online import candidate_values
from fedhpo_core.search.pbt import POPULATION, READY_ROUNDS, exploit, explore
from fedhpo_core.search.space import Configuration, SearchSpace
from fedhpo_core.search.study import TuneSettings, best_trial, open_study, run_search
from fedhpo_core.settings import SettingsError, TrainSettings

SPACE = SearchSpace.load(None)  # the FedTune paper's lr x weight decay grid


class FakeTrainer:
    """Scores a configuration by how close lr is to 0.05 (a little better with every round); reports
    every round and keeps its checkpoints in `store`, like the real trainer; records every call."""

    def __init__(self, interrupt_at: int | None = None, store: dict | None = None):
        self.calls: list[tuple[int, int, int]] = []  # (trial, rounds trained, round started from)
        self.interrupt_at, self.store = interrupt_at, {} if store is None else store  # the call to interrupt
        self.interrupted: int | None = None  # the trial it interrupted

    def load(self, checkpoint):
        return self.store[checkpoint]

    def score(self, configuration, round):
        lr = configuration.values.get("lr", 0.05)  # a round-level method's tuner chooses it
        return 1 - abs(math.log10(lr) - math.log10(0.05)) / 3 + 0.001 * round

    def __call__(self, trial, configuration, rounds, start, tuner=None, keep_going=None, **_):  # the rest unused
        if len(self.calls) == self.interrupt_at:
            self.interrupted = trial.number
            raise KeyboardInterrupt  # Ctrl-C in the middle of a trial's training
        begun = start.round if start else 0
        trained = 0
        while trained < rounds:
            trained += 1
            if len(trial.study.directions) == 1:
                trial.report(self.score(configuration, begun + trained), begun + trained)
            if keep_going and not keep_going(begun + trained):
                break
        self.calls.append((trial.number, trained, begun))
        lr = configuration.values.get("lr", 0.05)
        objectives = {"bytes_sent": 1e3 * lr, "client_compute_samples": 1.0 / lr, "unfairness": lr}
        state = self.state(trial, begun + trained)
        checkpoint = f"fake/{trial.number}/{state.round}"
        self.store[checkpoint] = state
        score = self.score(configuration, begun + trained)
        cost = Cost(rounds=trained)
        return TrialResult(score, trained, state, objectives=objectives, checkpoint=checkpoint, cost=cost)

    def state(self, trial, round):
        return FederationState(round, torch.zeros(1))


def search(method, budget=30, n_configs=30, trainer=None, storage=None, name="s", resume=False, **options):
    trainer = trainer or FakeTrainer()
    study = open_study(method_named(method).build(), storage or optuna.storages.InMemoryStorage(), name, resume)
    spent = run_search(
        method_named(method).build(), study, SPACE, "global", 4, trainer, budget, n_configs, seed=0, **options
    )
    return study, spent, trainer


@pytest.fixture(scope="module")
def digits():
    """What round-level methods build their tuners from: fixed settings and real digits clients."""
    fixed = TrainSettings(clients=4)
    return fixed, FederatedData.build(load_dataset("digits", fixed.data_root), partition_of(fixed.data), fixed.model)


@pytest.mark.parametrize("method", sorted(methods()))
@pytest.mark.parametrize("budget", [30, 60, 100])
def test_every_method_spends_through_the_driver_within_budget_and_counts_every_round(method, budget, digits):
    fixed, data = digits
    study, spent, trainer = search(method, budget, fixed=fixed, data=data)
    used = sum(rounds for _, rounds, _ in trainer.calls)
    assert spent.spent == used == rounds_spent(study) <= budget
    assert used >= budget * 0.8  # the budget is put to use, not left idle
    trials = {number for number, _, _ in trainer.calls}
    assert all(t.state.is_finished() for t in study.trials if t.number in trials)  # every trial ended
    assert sum(t.user_attrs[ROUNDS_ATTR] for t in study.trials if t.number in trials) == used


@pytest.mark.parametrize("method", ["random", "grid", "tpe", "gp", "multiobjective"])
def test_fixed_budget_methods_give_each_configuration_budget_over_n_rounds(method):
    _, _, trainer = search(method, budget=60, n_configs=20)
    assert [rounds for _, rounds, _ in trainer.calls] == [3] * 20


def test_grid_visits_distinct_grid_points():
    study, _, _ = search("grid", budget=30, n_configs=30)
    points = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(points) == 30


def test_successive_halving_continues_promoted_configurations_from_their_checkpoints():
    rungs = plan_rungs(27, 300)
    assert [r.configs for r in rungs] == [27, 9, 3, 1] and plan_cost(rungs) <= 300
    study, _, trainer = search("sha", budget=300, n_configs=27)
    by_trial: dict[int, list[tuple[int, int]]] = {}
    for number, rounds, begun in trainer.calls:
        by_trial.setdefault(number, []).append((begun, rounds))
    winner = best_trial(study).number
    # Each continuation starts where the trial stopped: no configuration starts over.
    for calls in by_trial.values():
        assert [begun for begun, _ in calls] == [0] + [sum(r for _, r in calls[:i]) for i in range(1, len(calls))]
    assert sum(r for _, r in by_trial[winner]) == rungs[-1].rounds
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 1
    assert states.count(optuna.trial.TrialState.PRUNED) == 26
    # Promotion keeps the best: every trial of rung 2 scored above every trial stopped in rung 1.
    promoted = [n for n, calls in by_trial.items() if len(calls) >= 2]
    stopped = [n for n, calls in by_trial.items() if len(calls) == 1]
    first = {t.number: t.intermediate_values[rungs[0].rounds] for t in study.trials}
    assert min(first[n] for n in promoted) >= max(first[n] for n in stopped)


def test_hyperband_brackets_fit_small_budgets():
    brackets = Hyperband().brackets(30, 30)
    assert brackets and sum(plan_cost(plan_rungs(n, share, most=most)) for n, share, most in brackets) <= 30
    # s_max = floor(log3 30) = 3 when its bracket of 27 fits its four rungs: 27 + 9 x 2 + 3 x 6 + 18 = 81 a share
    assert len(Hyperband().brackets(30, 4 * 81)) == 4 and len(Hyperband().brackets(30, 4 * 80)) == 3
    assert all(len(plan_rungs(n, share, most=most)) == most for n, share, most in Hyperband().brackets(30, 90))


def test_multiobjective_pareto_front_is_the_non_dominated_set():
    study, _, _ = search("multiobjective", budget=30, n_configs=30)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    signs = [-1, 1, 1, 1]  # maximize accuracy, minimize the rest

    def dominates(a, b):
        a, b = (
            [s * v for s, v in zip(signs, a.values, strict=True)],
            [s * v for s, v in zip(signs, b.values, strict=True)],
        )
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    by_hand = {t.number for t in complete if not any(dominates(o, t) for o in complete)}
    assert {t.number for t in study.best_trials} == by_hand
    assert len(study.directions) == 4
    method = method_named("multiobjective").build()
    reports = method.reports(study, study_table(study, method.objectives))
    assert set(reports["pareto_front.csv"].number) == by_hand
    assert {name for name in reports if name.endswith(".png")} == {f"pareto_front_{c}.png" for c in method.objectives}


class PrivateFakeTrainer(FakeTrainer):
    """Also spends privacy: epsilon 0.1 / lr, so the most accurate learning rates (near 0.05) spend
    more than a budget of 1 allows and only lr >= 0.1 stays within it."""

    def __call__(self, trial, configuration, rounds, start, tuner=None, keep_going=None, **_):  # the rest unused
        result = super().__call__(trial, configuration, rounds, start, tuner, keep_going)
        epsilon = 0.1 / configuration.values["lr"]
        return replace(result, objectives={**result.objectives, "epsilon": epsilon, "sim_time_s": 1.0})


@pytest.mark.parametrize("method", ["random", "tpe", "multiobjective"])
def test_a_study_with_an_epsilon_limit_never_reports_an_infeasible_best(method):
    costs = {"objectives": "epsilon,sim_time_s"} if method == "multiobjective" else {}
    tune = TuneSettings(method=method, budget=60, n_configs=12, max_epsilon=1.0, options=costs)
    study = open_study(tune.search_method(), optuna.storages.InMemoryStorage(), "private", False)
    run_search(tune.search_method(), study, SPACE, "global", 4, PrivateFakeTrainer(), 60, 12, seed=0)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    feasible = [t for t in complete if 0.1 / t.params["lr"] <= 1.0]
    assert feasible and len(feasible) < len(complete)  # the limit bites
    best = best_trial(study)
    assert 0.1 / best.params["lr"] <= 1.0 and best.values[0] == max(t.values[0] for t in feasible)
    assert max(t.values[0] for t in complete) > best.values[0]  # a more accurate trial spent too much
    if method == "multiobjective":
        assert len(study.directions) == 3 and all(0.1 / t.params["lr"] <= 1.0 for t in study.best_trials)


def test_a_study_with_no_trial_within_its_limit_has_no_best():
    tune = TuneSettings(method="random", budget=20, n_configs=10, max_epsilon=0.01)
    study = open_study(tune.search_method(), optuna.storages.InMemoryStorage(), "private", False)
    run_search(tune.search_method(), study, SPACE, "global", 4, PrivateFakeTrainer(), 20, 10, seed=0)
    assert best_trial(study) is None


def test_objectives_and_limits_are_checked_against_the_fixed_settings():
    with pytest.raises(SettingsError, match="unknown objective 'latency'"):
        TuneSettings(method="multiobjective", options={"objectives": "latency"})
    declared = "multiobjective, sha, hyperband, bohb"
    with pytest.raises(SettingsError, match=f"--objectives is an option of {declared}, not of tpe"):
        TuneSettings(method="tpe", options={"objectives": "epsilon"})
    with pytest.raises(SettingsError, match="needs DP-FedAvg"):
        TuneSettings(max_epsilon=8.0).check_with(TrainSettings())
    with pytest.raises(SettingsError, match="needs DP-FedAvg"):
        TuneSettings(method="multiobjective", options={"objectives": "epsilon"}).check_with(TrainSettings(dp_clip=1.0))
    with pytest.raises(SettingsError, match="time_to_target_s needs --target-acc"):
        TuneSettings(method="multiobjective", options={"objectives": "time_to_target_s"}).check_with(TrainSettings())
    TuneSettings(max_epsilon=8.0).check_with(TrainSettings(dp_clip=1.0, dp_noise=1.0))  # fine


INTERRUPTED_CALL = {"random": 4, "tpe": 4, "grid": 4, "sha": 11, "hyperband": 3, "pbt": 12, "asha": 2}


@pytest.mark.parametrize("method", INTERRUPTED_CALL)
def test_an_interrupted_study_resumes_without_losing_or_repeating_a_trial(method, tmp_path):
    storage, store = f"sqlite:///{tmp_path / 'optuna.db'}", {}
    interrupted = FakeTrainer(interrupt_at=INTERRUPTED_CALL[method], store=store)
    with pytest.raises(KeyboardInterrupt):
        search(method, budget=60, n_configs=10, trainer=interrupted, storage=storage)
    before = optuna.load_study(study_name="s", storage=storage)
    finished_before = {t.number: (t.params, t.state) for t in before.trials if t.state.is_finished()}
    assert rounds_spent(before) == sum(r for _, r, _ in interrupted.calls)

    resumed = FakeTrainer(store=store)
    study, spent, _ = search(method, budget=60, n_configs=10, storage=storage, resume=True, trainer=resumed)
    cut = study.trials[interrupted.interrupted]
    if method_named(method).search.pauses_trials:  # paused at its last rung, then continued from its checkpoint
        assert cut.state.is_finished() and min(b for n, _, b in resumed.calls if n == cut.number) > 0
    elif getattr(method_named(method).search, "keeps_asked_trials", False):  # trained with its configuration
        assert cut.state == optuna.trial.TrialState.COMPLETE and cut.number in {n for n, _, _ in resumed.calls}
    else:
        assert cut.state == optuna.trial.TrialState.FAIL
    for number, (params, state) in finished_before.items():  # nothing finished was lost or rerun
        assert study.trials[number].params == params and study.trials[number].state == state
        assert number not in {n for n, _, _ in resumed.calls}
    # Every round trained is charged, once.
    assert spent.spent == rounds_spent(study) == sum(r for _, r, _ in interrupted.calls + resumed.calls) <= 60
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)
    if method in ("random", "tpe", "grid"):
        assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 10


def test_a_bracket_interrupted_mid_way_ends_as_if_it_had_not_been():
    storage = optuna.storages.InMemoryStorage()
    whole, _, _ = search("sha", budget=60, n_configs=9)
    store = {}
    interrupted = FakeTrainer(interrupt_at=10, store=store)  # the second training of the second rung
    with pytest.raises(KeyboardInterrupt):
        search("sha", budget=60, n_configs=9, trainer=interrupted, storage=storage)
    resumed = FakeTrainer(store=store)
    study, spent, _ = search("sha", budget=60, n_configs=9, storage=storage, resume=True, trainer=resumed)
    rungs = plan_rungs(9, 60)
    # The survivors continue from their rung-1 checkpoints; no configuration starts over, none is added.
    assert [(r, b) for _, r, b in resumed.calls] == [(4, 2), (4, 2), (12, 6)]
    assert spent.spent == plan_cost(rungs) == rounds_spent(whole)
    summary = [(t.params, t.state, t.values, t.user_attrs[ROUNDS_ATTR]) for t in study.trials]
    assert summary == [(t.params, t.state, t.values, t.user_attrs[ROUNDS_ATTR]) for t in whole.trials]


@pytest.mark.parametrize("rung", [1, 2])
def test_a_promoted_trial_killed_inside_its_record_continues_from_the_state_it_recorded(rung, tmp_path, monkeypatch):
    """Killed inside the record of its training to `rung`: the middle one (it trains on), the
    last (it is told, and shows the rounds it recorded)."""
    whole, _, _ = search("sha", budget=60, n_configs=9)
    winner = max(whole.trials, key=lambda t: t.values[0]).number
    storage, store = f"sqlite:///{tmp_path / 'optuna.db'}", {}
    shown = base_module.show_result
    rungs = plan_rungs(9, 60)

    def die_after_the_winners_promotion(trial, result, used):
        if trial.number == winner and used == rungs[rung].rounds:
            raise SystemExit(-9)  # its result is written; its separate attributes still name the rung before
        shown(trial, result, used)

    with monkeypatch.context() as patch:
        patch.setattr(base_module, "show_result", die_after_the_winners_promotion)
        patch.setattr(study_module, "settle_interrupted_trials", lambda *arguments: None)
        with pytest.raises(SystemExit):
            search("sha", budget=60, n_configs=9, trainer=FakeTrainer(store=store), storage=storage)
    resumed = FakeTrainer(store=store)
    study, spent, _ = search("sha", budget=60, n_configs=9, storage=storage, resume=True, trainer=resumed)
    if rung + 1 < len(rungs):  # from the state it recorded (round 6), not the rung before's (round 2)
        assert resumed.calls[-1] == (winner, rungs[rung + 1].rounds - rungs[rung].rounds, rungs[rung].rounds)
    else:
        assert winner not in {number for number, _, _ in resumed.calls}
    assert spent.spent == plan_cost(plan_rungs(9, 60))
    summary = [(t.params, t.state, t.values, t.user_attrs[ROUNDS_ATTR]) for t in study.trials]
    assert summary == [(t.params, t.state, t.values, t.user_attrs[ROUNDS_ATTR]) for t in whole.trials]


def test_pbt_interrupted_mid_generation_continues_each_member_from_its_parent():
    storage, store = optuna.storages.InMemoryStorage(), {}
    interrupted = MarkingTrainer(interrupt_at=POPULATION + 2, store=store)  # generation 1, member 2
    with pytest.raises(KeyboardInterrupt):
        search("pbt", budget=30, trainer=interrupted, storage=storage)
    resumed = MarkingTrainer(store=store)
    study, spent, _ = search("pbt", budget=30, trainer=resumed, storage=storage, resume=True)
    trials = {t.number: t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    generation_1 = [t for t in trials.values() if t.user_attrs["generation"] == 1]
    assert sorted(t.user_attrs["member"] for t in generation_1) == list(range(POPULATION))
    for trial in generation_1:  # the members trained after the interrupt too start from their parents
        starts = {**getattr(interrupted, "starts", {}), **resumed.starts}
        assert starts[trial.number] == trial.user_attrs["parent_trial"]
    assert spent.spent == sum(r for _, r, _ in interrupted.calls + resumed.calls) <= 30


@pytest.mark.parametrize("method", ["random", "grid", "multiobjective", "pbt", "sha"])
def test_a_trial_killed_between_its_record_and_its_tell_is_told_not_trained_again(method, tmp_path, monkeypatch):
    storage, store = f"sqlite:///{tmp_path / 'optuna.db'}", {}
    killed = FakeTrainer(store=store)

    def die(context, trial, result):
        raise SystemExit(-9)

    with monkeypatch.context() as patch:  # the process dies right after a record: nothing settles
        patch.setattr(SearchContext, "complete", die)
        patch.setattr(study_module, "settle_interrupted_trials", lambda *arguments: None)
        with pytest.raises(SystemExit):
            search(method, budget=30, n_configs=10, trainer=killed, storage=storage)
    left = [t for t in optuna.load_study(study_name="s", storage=storage).trials if t.state.name == "RUNNING"]
    assert len(left) == 1 and left[0].user_attrs[RESULT_ATTR]

    resumed = FakeTrainer(store=store)
    study, spent, _ = search(method, budget=30, n_configs=10, storage=storage, resume=True, trainer=resumed)
    told = study.trials[left[0].number]
    assert told.state == optuna.trial.TrialState.COMPLETE and told.values[0] == left[0].user_attrs[RESULT_ATTR]["score"]
    assert left[0].number not in {n for n, _, _ in resumed.calls}
    assert spent.spent == sum(r for _, r, _ in killed.calls + resumed.calls) <= 30


def test_resume_without_a_study_and_a_second_study_of_the_same_name_are_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(SettingsError, match="no study named"):
        open_study(method_named("tpe").build(), storage, "missing", resume=True)
    open_study(method_named("tpe").build(), storage, "taken", resume=False)
    with pytest.raises(SettingsError, match="exists"):
        open_study(method_named("tpe").build(), storage, "taken", resume=False)


def test_search_space_from_yaml_reads_numbers_and_personalizes(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {type: categorical, choices: [1e-1, 1e-2]}\nlocal_epochs: {type: int, low: 1, high: 3}\n")
    space = SearchSpace.load(str(path))
    assert space.distributions["lr"].choices == (0.1, 0.01)  # YAML reads 1e-1 as a string
    names = space.parameters("personalized", 3)
    assert set(names) == {f"{p}/client_{c}" for p in ("lr", "local_epochs") for c in range(3)}
    values = {f"lr/client_{c}": 0.1 / (c + 1) for c in range(3)} | {f"local_epochs/client_{c}": 2 for c in range(3)}
    configs = Configuration(values).client_configs(TrainSettings(clients=3))
    assert [c.lr for c in configs] == pytest.approx([0.1, 0.05, 0.1 / 3]) and {c.local_epochs for c in configs} == {2}


@pytest.mark.parametrize(
    "declared, message",
    [
        ({}, "empty"),
        ({"lr": {"type": "float", "low": 1.0, "high": 0.1}}, "low <= high"),
        ({"lr": {"type": "normal"}}, "unknown type"),
        ({"depth": {"type": "int", "low": 1, "high": 3}}, "unknown settings"),
        ({"lr": {"type": "categorical", "choices": []}}, "no choices"),
        ({"lr": [0.1, 0.01]}, "needs a mapping"),
    ],
)
def test_malformed_search_spaces_are_refused(declared, message):
    with pytest.raises(SettingsError, match=message):
        SearchSpace.from_dict(declared)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "annealing"}, "unknown method"),
        ({"budget": 10, "n_configs": 30}, "smaller than one round per configuration"),
        ({"method": "hyperband", "budget": 1}, "smaller than one round"),
        ({"final_rounds": -1}, "final_rounds must be >= 0"),
        ({"scope": "federated"}, "unknown scope"),
    ],
)
def test_bad_tune_settings_are_refused(settings, message):
    with pytest.raises(SettingsError, match=message):
        TuneSettings(**settings)


def test_online_candidates_are_the_grid_or_draws_within_the_space():
    grid = candidate_values(SPACE.parameters("global", 1), 5, seed=0)
    assert len(grid) == 30 and len({tuple(v.items()) for v in grid}) == 30
    space = SearchSpace.from_dict(
        {
            "lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
            "local_epochs": {"type": "int", "low": 1, "high": 3},
        }
    )
    drawn = candidate_values(space.parameters("global", 1), 20, seed=0)
    assert len(drawn) == 20 and all(1e-3 <= v["lr"] <= 1e-1 and v["local_epochs"] in (1, 2, 3) for v in drawn)
    assert drawn == candidate_values(space.parameters("global", 1), 20, seed=0)


def test_online_methods_tune_client_settings_only():
    space = SearchSpace.from_dict({"server_lr": {"type": "float", "low": 0.1, "high": 1.0}})
    with pytest.raises(SettingsError, match="client settings only"):
        method_named("fedtune").build().sampler(space.parameters("global", 2), 0)
    assert method_named("fedex").build().sampler(space.parameters("global", 2), 0)  # FedEx is wrapped in random search


def test_pbt_exploit_copies_the_best_quarter_into_the_worst():
    scores = {m: s for m, s in enumerate([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6])}
    copies = exploit(scores, np.random.default_rng(0))
    assert set(copies) == {1, 6}  # the two worst of eight
    assert set(copies.values()) <= {0, 5}  # copy one of the two best


def test_pbt_explore_perturbs_within_the_space():
    space = SearchSpace.from_dict(
        {
            "lr": {"type": "float", "low": 0.01, "high": 0.1},
            "local_epochs": {"type": "int", "low": 1, "high": 5},
            "weight_decay": {"type": "categorical", "choices": [0.0, 1e-4, 1e-3]},
        }
    )
    parameters = space.parameters("global", 1)
    rng = np.random.default_rng(0)
    for _ in range(50):
        values = explore({"lr": 0.05, "local_epochs": 3, "weight_decay": 1e-4}, parameters, rng)
        assert values["lr"] in (pytest.approx(0.04), pytest.approx(0.06))
        assert values["local_epochs"] in (2, 4) and values["weight_decay"] in (0.0, 1e-3)
    assert explore({"lr": 0.1, "local_epochs": 5, "weight_decay": 0.0}, parameters, rng)["lr"] <= 0.1


class MarkingTrainer(FakeTrainer):
    """Its checkpoints carry the number of the trial that produced them."""

    def __call__(self, trial, configuration, rounds, start, tuner=None, keep_going=None, **_):  # the rest unused
        self.starts = getattr(self, "starts", {})
        self.starts[trial.number] = None if start is None else int(start.weights[0])
        return super().__call__(trial, configuration, rounds, start, tuner, keep_going)

    def state(self, trial, round):
        return FederationState(round, torch.tensor([float(trial.number)]))


def test_pbt_lineage_continues_each_member_from_its_parents_checkpoint():
    trainer = MarkingTrainer()
    study, spent, _ = search("pbt", budget=30, trainer=trainer)
    trials = {t.number: t for t in study.trials}
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials.values())
    assert len([t for t in trials.values() if t.user_attrs["generation"] == 0]) == POPULATION
    later = [t for t in trials.values() if t.user_attrs["generation"] > 0]
    assert later
    for trial in later:
        parent = trials[trial.user_attrs["parent_trial"]]
        assert parent.user_attrs["generation"] == trial.user_attrs["generation"] - 1
        assert trainer.starts[trial.number] == parent.number  # started from the parent's weights
    copied = [t for t in later if trials[t.user_attrs["parent_trial"]].user_attrs["member"] != t.user_attrs["member"]]
    assert copied  # some members exploited another member
    assert spent.spent == sum(t.user_attrs["rounds_used"] for t in trials.values()) <= 30
    assert max(t.user_attrs["rounds_used"] for t in trials.values()) == READY_ROUNDS
    table = study_table(study)
    assert {"member", "generation", "parent_trial"} <= set(table.columns)
    assert table.loc[later[0].number, "parent_trial"] == later[0].user_attrs["parent_trial"]
