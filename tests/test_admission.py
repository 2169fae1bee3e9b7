"""Admission across processes, on SQLite and PostgreSQL alike: grid points, fixed-budget slots and
ASHA's first rounds are decided under the study's lock (`study_lock`), the decision and the trial it
admits one critical section. The searchers are forked processes, each opening the storage itself
and starting at one moment."""

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
import servers
import sqlalchemy
from test_scale_out import fake_training

from fedhpo_core.registry import method as method_named
from fedhpo_core.search.base import GRANTED_ATTR, ROUNDS_ATTR, Budget, SearchContext, rounds_spent, rounds_used
from fedhpo_core.search.fixed_budget import GridSearch
from fedhpo_core.search.space import SearchSpace, grid_points
from fedhpo_core.search.storage import open_storage, study_lock
from fedhpo_core.search.study import open_study, run_search

PROCESSES, WORKERS = 4, 2
WAIT_S = 60  # for what must happen at once; only a failing test waits this long
fork = multiprocessing.get_context("fork")  # children inherit the test's objects; each opens its own storage
GRID = SearchSpace.from_dict(
    {
        "lr": {"type": "categorical", "choices": [0.1, 0.05, 0.01]},
        "weight_decay": {"type": "categorical", "choices": [0.0, 1e-4, 1e-2, 1e-1]},
    }
)
COMPLETE = optuna.trial.TrialState.COMPLETE


@pytest.fixture(scope="module")
def postgres_database(tmp_path_factory):
    with servers.postgres(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path) -> str:
    """An SQLite file of the test's own, or the module's PostgreSQL database (its studies named by test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    return request.getfixturevalue("postgres_database")


def race(
    storage: str, name: str, method: str, space: SearchSpace, budget: int, n_configs: int, trainer
) -> optuna.Study:
    """PROCESSES searchers with WORKERS trials at once each, on one study from one moment; the study after."""
    open_study(method_named(method).build(), storage, name, resume=False, join=True)
    ready = fork.Barrier(PROCESSES)

    def searcher():
        study = open_study(method_named(method).build(), storage, name, resume=False, join=True)
        ready.wait(timeout=WAIT_S)
        searching = method_named(method).build()
        run_search(searching, study, space, "global", 4, trainer, budget, n_configs, 0, workers=WORKERS, join=True)

    processes = [fork.Process(target=searcher) for _ in range(PROCESSES)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=WAIT_S)
    assert [process.exitcode for process in processes] == [0] * PROCESSES
    return optuna.load_study(study_name=name, storage=storage)


def test_racing_processes_give_every_grid_point_to_exactly_one_trial(storage, tmp_path):
    points = grid_points(GRID.parameters("global", 4))
    study = race(storage, tmp_path.name, "grid", GRID, 2 * len(points), len(points), fake_training(0.02))
    held = [t.params for t in study.trials]
    assert [t.state for t in study.trials] == [COMPLETE] * len(points)  # none surplus, none left running
    assert sorted(map(sorted, map(dict.items, held))) == sorted(map(sorted, map(dict.items, points)))


def test_racing_processes_admit_no_more_trials_than_the_budget_has_shares_for(storage, tmp_path):
    study = race(storage, tmp_path.name, "random", SearchSpace.load(None), 20, 10, fake_training(0.02))
    assert [t.state for t in study.trials] == [COMPLETE] * 10
    assert [t.user_attrs[ROUNDS_ATTR] for t in study.trials] == [2] * 10


def test_racing_asha_processes_are_granted_no_more_rounds_than_the_budget(storage, tmp_path):
    """Scores planted to fall with each trial, so Optuna's pruner stops some at a rung whatever the order."""
    space = SearchSpace.from_dict({"lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True}})
    study = race(storage, tmp_path.name, "asha", space, 60, 9, fake_training(0.005, worse_each_trial=True))
    trials = study.trials
    assert all(t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL for t in trials)
    assert all(1 <= rounds_used(t) <= t.user_attrs[GRANTED_ATTR] for t in trials)  # each admitted with a round
    assert sum(t.user_attrs[GRANTED_ATTR] for t in trials) <= 60
    assert 60 - PROCESSES * WORKERS <= rounds_spent(study) <= 60  # trials cut at the budget's end aside
    assert study.get_trials(states=[optuna.trial.TrialState.PRUNED])


def waiting_for_the_lock(storage: str, folder: Path) -> bool:
    """Whether some process waits for a study lock, as the storage's side sees it: a blocked
    PostgreSQL advisory lock, or a blocked flock on the lock file beside the SQLite file."""
    if storage.startswith("postgresql"):
        engine = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as connection:
            query = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            return connection.execute(sqlalchemy.text(query)).scalar() > 0
    inodes = {f":{path.stat().st_ino}" for path in folder.glob("*.study-*.lock")}
    blocked = [line.split() for line in Path("/proc/locks").read_text().splitlines() if " -> " in line]
    return any(fields[-3].endswith(tuple(inodes)) for fields in blocked)


def wait_for(condition) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "not within WAIT_S"
        time.sleep(0.05)


def test_an_admission_waits_for_the_ask_in_progress_and_takes_the_next_grid_point(storage, tmp_path):
    """Planted, deterministic: this process holds the study's lock with its trial created but not
    yet given a point (the first of the order, the only one free when the other process asks);
    the other process's admission waits (seen in the storage) and then takes the second point."""
    method, parameters = GridSearch(), GRID.parameters("global", 4)
    study = optuna.create_study(storage=open_storage(storage), study_name=tmp_path.name)
    study.sampler = method.sampler(parameters, 0)

    def other_process():
        other = optuna.load_study(study_name=tmp_path.name, storage=open_storage(storage))
        other.sampler = method.sampler(parameters, 0)
        context = SearchContext(other, method, parameters, fake_training(0), Budget(24, "rounds"), 12, 0)
        assert method.admit(context, 2)

    with study_lock(study):
        asking = study.ask()
        admitting = fork.Process(target=other_process)
        admitting.start()
        wait_for(lambda: waiting_for_the_lock(storage, tmp_path))
        assert len(study.trials) == 1  # the other made no trial while it waited
        for name, value in method.order[0].items():
            internal = parameters[name].to_internal_repr(value)
            study._storage.set_trial_param(asking._trial_id, name, internal, parameters[name])
    admitting.join(timeout=WAIT_S)
    assert admitting.exitcode == 0
    assert [t.params for t in study.trials] == [method.order[0], method.order[1]]


def test_a_process_killed_holding_the_study_lock_leaves_it_to_the_others(storage, tmp_path):
    study = optuna.create_study(storage=open_storage(storage), study_name=tmp_path.name)
    held = fork.Event()

    def holder():
        with study_lock(optuna.load_study(study_name=tmp_path.name, storage=open_storage(storage))):
            held.set()
            time.sleep(WAIT_S)

    holding = fork.Process(target=holder)
    holding.start()
    assert held.wait(timeout=WAIT_S)
    os.kill(holding.pid, signal.SIGKILL)
    holding.join()
    taken = threading.Event()

    def take():
        with study_lock(study):
            taken.set()

    threading.Thread(target=take, daemon=True).start()  # a wedged lock fails the test, not the session
    assert taken.wait(timeout=WAIT_S)
