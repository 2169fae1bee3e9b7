"""Leases (`fedhpo_core.search.leases`): a process holds the trials it trains by renewing a lease on
each; a process sharing the study settles a trial whose lease expired as `--resume` does, and the
study goes on within its budget. The rule on planted trials with a clock of the test's, a joined
search taking over a dead trial's room, and two real `fedhpo tune --join` processes, one SIGKILLed
mid-trial, on SQLite and PostgreSQL."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_scale_out import fake_training

from fedhpo_core.cost import Cost
from fedhpo_core.registry import method as method_named
from fedhpo_core.search import leases as leases_module
from fedhpo_core.search.base import GRANTED_ATTR, RESULT_ATTR, TrialResult, record_result, rounds_spent, rounds_used
from fedhpo_core.search.fixed_budget import RandomSearch
from fedhpo_core.search.leases import LEASE_ATTR, Leases, LeaseTerms
from fedhpo_core.search.space import SearchSpace
from fedhpo_core.search.storage import open_storage
from fedhpo_core.search.study import TuneSettings, open_study, run_search
from fedhpo_core.settings import SettingsError

RUNNING, COMPLETE, FAIL = TrialState.RUNNING, TrialState.COMPLETE, TrialState.FAIL
TERMS = LeaseTerms(period_s=1.0, grace_s=5.0)
LOST = {"holder": "gone:1:0", "renewal": 3, "grace_s": TERMS.grace_s}  # the last renewal of a killed process


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def study_at(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="leased")


def planted(study: optuna.Study, lease: dict | None = None, score: float | None = None) -> optuna.trial.Trial:
    """A RUNNING trial with this lease, and with a recorded result of 2 rounds if `score` is given."""
    trial = study.ask()
    if lease is not None:
        study._storage.set_trial_system_attr(trial._trial_id, LEASE_ATTR, lease)
    if score is not None:
        record_result(trial, TrialResult(score, 2, None, cost=Cost(rounds=2)), 2, Cost(rounds=2))
    return trial


def watcher(study, held=(), clock=None, watch=True) -> Leases:
    return Leases(study, RandomSearch(), lambda: set(held), TERMS, watch=watch, clock=clock or Clock())


def state(study: optuna.Study, trial: optuna.trial.Trial) -> TrialState:
    return study._storage.get_trial(trial._trial_id).state


def test_an_expired_lease_is_settled_and_a_fresh_one_a_live_ones_and_this_processes_are_not(tmp_path):
    study = study_at(tmp_path)
    finished = planted(study, LOST, score=0.75)  # killed after its training was recorded
    unfinished = planted(study, LOST)  # killed mid-training
    never = planted(study)  # killed before its first renewal
    alive = planted(study)  # another process's, renewed by it
    mine = planted(study)  # this process's
    clock = Clock()
    this, other = watcher(study, {mine.number}, clock), watcher(study, {alive.number}, watch=False)
    for second in range(5):  # for the grace, less a tick: everything is fresh
        clock.now = float(second)
        other.tick()
        this.tick()
    assert {state(study, t) for t in (finished, unfinished, never, alive, mine)} == {RUNNING}
    fresh = planted(study)  # just created; its lease not yet written
    clock.now = 5.0
    other.tick()
    this.tick()
    assert state(study, finished) == COMPLETE and study.trials[finished.number].value == 0.75
    assert rounds_used(study.trials[finished.number]) == 2  # charged for what it trained
    assert state(study, unfinished) == FAIL and state(study, never) == FAIL  # not charged: asked again
    assert state(study, alive) == RUNNING and state(study, mine) == RUNNING and state(study, fresh) == RUNNING
    assert study.trials[mine.number].system_attrs[LEASE_ATTR]["holder"] == this.holder  # renewed by this process
    assert this.changed.is_set() and this.expired == {finished.number, unfinished.number, never.number}
    for second in range(6, 10):
        clock.now = float(second)
        other.tick()
        this.tick()
    assert state(study, fresh) == RUNNING  # timed from when it was first seen, at 5 s
    clock.now = 10.0
    this.tick()
    assert state(study, fresh) == FAIL and state(study, alive) == RUNNING and state(study, mine) == RUNNING


def test_a_watcher_that_could_not_look_times_every_lease_again(tmp_path):
    """The database away (or this process stalled) for longer than the grace: no lease expires for
    time the watcher did not watch, whoever could not renew meanwhile."""
    study = study_at(tmp_path)
    unrenewed = planted(study, LOST)
    clock = Clock()
    this = watcher(study, clock=clock)
    this.tick()
    clock.now = 100.0  # the first look after the outage
    this.tick()
    assert state(study, unrenewed) == RUNNING
    clock.now = 104.0
    this.tick()  # 2 s late: > 2 periods, timed again
    assert state(study, unrenewed) == RUNNING
    for second in range(105, 110):
        clock.now = float(second)
        this.tick()
    assert state(study, unrenewed) == FAIL


def test_a_dead_trial_is_settled_once_by_watchers_that_find_it_expired_at_once(tmp_path, monkeypatch):
    study = study_at(tmp_path)
    dead = planted(study, LOST, score=0.5)
    clocks = [Clock(), Clock()]
    first, second = (watcher(study, clock=clock) for clock in clocks)
    for now in range(5):
        for watching, clock in zip((first, second), clocks, strict=True):
            clock.now = float(now)
            watching.tick()
    for clock in clocks:
        clock.now = TERMS.grace_s
    running = study.get_trials(states=(RUNNING,))
    found = [first.expire(running), second.expire(running)]  # both find it expired
    assert [[t.number for t in expired] for expired in found] == [[dead.number]] * 2
    first.settle(found[0][0])
    second.settle(found[1][0])  # finds it finished under the lock: leaves it
    assert state(study, dead) == COMPLETE and second.expired == set() and not second.changed.is_set()

    # A settler without the lock (a storage without one, or the holder back after a stall telling
    # it at the same moment): the second tell finds the trial finished, and that is no error.
    again = planted(study, LOST)

    def told_meanwhile(study, method, numbers):
        study.tell(again.number, state=FAIL)  # the other's tell, between our read and ours
        study.tell(again.number, state=FAIL)  # ours: raises, the trial is finished

    monkeypatch.setattr(leases_module, "settle_interrupted_trials", told_meanwhile)
    seen = next(t for t in study.get_trials(states=(RUNNING,)) if t.number == again.number)
    second.settle(seen)
    assert state(study, again) == FAIL and again.number not in second.expired


def test_lease_settings_are_checked():
    assert TuneSettings().lease == LeaseTerms(10.0, 60.0)
    for period, grace, message in [
        (0.0, 60.0, "lease_s must be"),
        (10.0, float("nan"), "lease_grace_s must be"),
        (10.0, 15.0, "at least twice"),
    ]:
        with pytest.raises(SettingsError, match=message):
            TuneSettings(lease_s=period, lease_grace_s=grace)


FAST = LeaseTerms(period_s=0.1, grace_s=0.5)
LOST_FAST = LOST | {"grace_s": FAST.grace_s}


def test_a_joined_search_settles_a_dead_processes_trials_and_uses_their_room(tmp_path):
    """Two trials of a killed process hold 2 of 5 slots: one recorded its result, one did not. The
    joined search fills the other three, stays while the dead ones are RUNNING, settles them once
    their leases expire, and asks again for the failed one's slot: 5 configurations, the budget."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = open_study(RandomSearch(), storage, "shared", resume=False, join=True)
    recorded, lost = planted(study, LOST_FAST, score=0.5), planted(study, LOST_FAST)
    started = time.monotonic()
    spent = run_search(
        RandomSearch(), study, SearchSpace.load(None), "global", 4, fake_training(0.01), 10, 5, 0, join=True, lease=FAST
    )
    assert time.monotonic() - started < 30
    assert not study.get_trials(states=(RUNNING,))
    assert state(study, recorded) == COMPLETE and state(study, lost) == FAIL
    assert len(study.get_trials(states=(COMPLETE,))) == 5 and spent.spent == rounds_spent(study) == 10


def test_a_joined_asha_search_takes_back_the_rounds_granted_to_a_dead_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = open_study(method_named("asha").build(), storage, "shared", resume=False, join=True)
    dead = planted(study, LOST_FAST)
    dead.set_user_attr(GRANTED_ATTR, 20)  # a third of the budget, granted to a trial whose process died
    space = SearchSpace.from_dict({"lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True}})
    trainer = fake_training(0.002, worse_each_trial=True)
    run_search(method_named("asha").build(), study, space, "global", 4, trainer, 60, 9, 0, join=True, lease=FAST)
    assert not study.get_trials(states=(RUNNING,)) and state(study, dead) == FAIL
    assert 40 < rounds_spent(study) <= 60  # the dead trial's 20 granted rounds trained by others


# Two real `fedhpo tune --join` processes, one SIGKILLed mid-trial.

FEDHPO = str(Path(sys.executable).with_name("fedhpo"))
BUDGET, CONFIGS = 160, 4  # 40 rounds a trial: seconds, so the victim is caught holding one
WORK = ["--clients", "3", "--local-epochs", "2", "--final-rounds", "0"]
GRACE_S = 5
PROCESS_TERMS = ["--lease-s", "1", "--lease-grace-s", str(GRACE_S)]
ENDS_WITHIN_S = 240  # a bound on hanging, not a speed measurement


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    return request.getfixturevalue("postgres_url")


def holders_in(study: optuna.Study, folder: Path) -> dict[int, int]:
    """RUNNING trials whose lease a live process of this machine working in `folder` holds: {trial: pid}.
    (A command runs in the warm runner's fork, or in the `fedhpo` process itself: either takes the
    client's working directory.)"""
    held = {}
    for trial in study.get_trials(deepcopy=False, states=(RUNNING,)):
        host, pid, _ = trial.system_attrs.get(LEASE_ATTR, {}).get("holder", "::").split(":")
        with contextlib.suppress(OSError, ValueError):
            if host == socket.gethostname() and Path(f"/proc/{pid}/cwd").resolve() == folder:
                held[trial.number] = int(pid)
    return held


def test_a_process_killed_mid_trial_is_settled_by_the_other_which_ends_the_study_within_budget(storage, tmp_path):
    command = [FEDHPO, "tune", "--method", "random", "--join", "--budget", str(BUDGET), "--n-configs", str(CONFIGS)]
    command += ["--storage", storage, "--study-name", "leased", "--experiment", "leased", *WORK, *PROCESS_TERMS]
    processes, folders = [], [tmp_path / "survivor", tmp_path / "victim"]
    for folder in folders:
        folder.mkdir()
        # Each its own MLflow store: two processes creating one SQLite store's experiment at once
        # race on its tags (an MlflowException in one); the study is what they share.
        env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
        with open(folder / "log.txt", "w") as log:
            processes.append(
                subprocess.Popen(
                    command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    survivor, victim = processes
    try:
        deadline = time.monotonic() + ENDS_WITHIN_S
        study, held = None, {}
        while not held:
            assert time.monotonic() < deadline and victim.poll() is None, (folders[1] / "log.txt").read_text()[-3000:]
            time.sleep(0.1)
            with contextlib.suppress(KeyError):  # the study not created yet
                study = study or optuna.load_study(study_name="leased", storage=open_storage(storage))
            held = holders_in(study, folders[1]) if study else {}
        (dying, pid), *_ = held.items()
        for group in (victim.pid, pid):  # the client, and the warm runner's fork that runs the command
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        killed = time.monotonic()
        victim.wait()
        settled_after = None
        while survivor.poll() is None:
            if settled_after is None and study._storage.get_trial(study.trials[dying]._trial_id).state != RUNNING:
                settled_after = time.monotonic() - killed
            assert time.monotonic() < deadline, (folders[0] / "log.txt").read_text()[-3000:]
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    text = (folders[0] / "log.txt").read_text()
    assert survivor.returncode == 0, text[-3000:]
    # Within the grace, two looks (a lease first seen just after its last renewal) and the settling.
    assert settled_after is not None and settled_after < GRACE_S + 3, (settled_after, text[-3000:])
    assert f"trial {dying}: its lease expired" in text

    study = optuna.load_study(study_name="leased", storage=open_storage(storage))
    assert not study.get_trials(states=(RUNNING,))
    dead = study.trials[dying]
    if RESULT_ATTR in dead.user_attrs:  # killed after its training was recorded: told that result
        assert dead.state == COMPLETE and dead.value == dead.user_attrs[RESULT_ATTR]["score"]
    else:  # killed mid-training: not charged, its slot asked again
        assert dead.state == FAIL and "rounds_used" not in dead.user_attrs
    assert len(study.get_trials(states=(COMPLETE,))) == CONFIGS and rounds_spent(study) == BUDGET  # every slot used


def test_a_lease_is_renewed_while_the_thread_that_trains_is_busy(tmp_path):
    """The renewer is a thread of its own: a round that holds its thread for 10 periods (here, a
    sleep) does not let its trial's lease expire."""
    study = study_at(tmp_path)
    trial = planted(study)
    with Leases(study, RandomSearch(), lambda: {trial.number}, FAST):
        time.sleep(10 * FAST.period_s)  # a long round
        lease = study._storage.get_trial(trial._trial_id).system_attrs[LEASE_ATTR]
    assert lease["renewal"] >= 5 and lease["grace_s"] == FAST.grace_s
