"""A study's PostgreSQL database restarting mid-study costs a reconnect, not the study: the storage
wrapper that retries calls that lose their connection, and a real `fedhpo tune` whose real
PostgreSQL server is stopped and started again while trials train."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import servers
import sqlalchemy
from optuna.exceptions import StorageInternalError
from optuna.storages import InMemoryStorage

from fedhpo_core.search import storage as study_database
from fedhpo_core.search.storage import ReconnectingStorage
from fedhpo_core.stores import waits_interrupted_by

FEDHPO = str(Path(sys.executable).with_name("fedhpo"))
BUDGET = 40
CONFIGS = {"random": 4, "asha": 9}  # random: 10 rounds per trial; asha: rungs at 1, 3 and 9 rounds
OUTAGE_S = 10
WAIT_S = 300  # a bound on hanging, not a speed measurement
UNREACHABLE, REACHABLE = "study database unreachable", "study database reachable again"


def connection_error(cause: Exception) -> StorageInternalError:
    """What Optuna's RDB storage raises when a call's SQL fails: its error, caused by SQLAlchemy's."""
    error = StorageInternalError("An exception is raised during the commit.")
    error.__cause__ = cause
    return error


def lose_connection(storage: InMemoryStorage, method: str, times: int, committed: bool = False, cause=None) -> None:
    """Have the storage's `method` lose its connection `times` times, after its work where `committed`."""
    real, left = getattr(storage, method), [times]
    cause = cause or sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the connection"))

    def call(*args, **kwargs):
        if not left[0]:
            return real(*args, **kwargs)
        left[0] -= 1
        if committed:
            real(*args, **kwargs)
        raise connection_error(cause)

    setattr(storage, method, call)


@pytest.fixture
def study(monkeypatch) -> optuna.Study:
    monkeypatch.setattr(study_database, "FIRST_BACKOFF_S", 0.01)
    return optuna.create_study(storage=ReconnectingStorage(InMemoryStorage()))


def database_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedhpo.study_database"]


def outage_lines(lines: list[str]) -> list[str]:
    """Each line's kind (UNREACHABLE or REACHABLE), without its reason and duration."""
    return [line.split(" (")[0].split(" after")[0] for line in lines]


def test_calls_that_lose_the_connection_are_tried_again_with_one_line_each_way(study, caplog):
    trial = study.ask()
    backend = study._storage._backend
    lose_connection(backend, "set_trial_user_attr", 3)
    lose_connection(backend, "set_trial_intermediate_value", 2)
    trial.set_user_attr("rounds_used", 1)
    trial.report(0.5, 1)
    assert study.trials[0].user_attrs == {"rounds_used": 1} and study.trials[0].intermediate_values == {1: 0.5}
    lines = database_lines(caplog)  # a line when each call lost the database, one when it found it again
    assert lines[0] == f"{UNREACHABLE} (server closed the connection); retrying for up to 300 s", lines
    assert outage_lines(lines) == [UNREACHABLE, REACHABLE] * 2, lines


def test_a_state_set_whose_lost_attempt_committed_is_done_once(study):
    trial = study.ask()
    lose_connection(study._storage._backend, "set_trial_state_values", 1, committed=True)
    study.tell(trial, 0.75)
    assert [(t.state, t.value) for t in study.trials] == [(optuna.trial.TrialState.COMPLETE, 0.75)]


def test_a_trial_whose_lost_creation_committed_is_created_once(study):
    lose_connection(study._storage._backend, "create_new_trial", 1, committed=True)
    trial = study.ask()
    assert [t.number for t in study.trials] == [trial.number] == [0]
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING


def test_other_storage_errors_are_raised_at_once(study):
    trial = study.ask()
    lose_connection(study._storage._backend, "set_trial_user_attr", 1, cause=sqlalchemy.exc.DataError("", {}, None))
    with pytest.raises(StorageInternalError):
        trial.set_user_attr("long", "x")


def test_an_outage_longer_than_the_window_fails_the_call_in_one_line(study, monkeypatch):
    monkeypatch.setattr(study_database, "RECONNECT_WINDOW_S", 0)
    trial = study.ask()
    lose_connection(study._storage._backend, "set_trial_user_attr", 1000)
    with pytest.raises(StorageInternalError, match="^study database unreachable for 0 s"):
        trial.set_user_attr("rounds_used", 1)


def wait_for(condition, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def trial_lines(log: Path) -> int:
    return sum(" - trial " in line and "rounds ->" in line for line in log.read_text(errors="replace").splitlines())


@pytest.mark.parametrize("method", CONFIGS)  # asha: a round granted per round, under an advisory lock
def test_a_study_survives_a_restart_of_its_postgres_database_and_charges_every_round_once(method, tmp_path):
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    log = tmp_path / "log.txt"
    with servers.PostgresCluster(tmp_path / "postgres") as database, open(log, "w") as output:
        command = [FEDHPO, "tune", "--method", method, "--workers", "2", "--budget", str(BUDGET)]
        command += ["--n-configs", str(CONFIGS[method]), "--clients", "3", "--final-rounds", "0"]
        command += ["--storage", database.url, "--study-name", "restart", "--experiment", "restart"]
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_for(lambda: trial_lines(log) >= 1 or process.poll() is not None)
            database.stop()  # two trials in training
            time.sleep(OUTAGE_S)
            database.start()
            assert process.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        trials = optuna.load_study(study_name="restart", storage=database.url).trials

    text = log.read_text()
    assert text.count(UNREACHABLE) == text.count(REACHABLE) == 1 and "Traceback" not in text, text[-3000:]
    assert "Falling back to a slower alternative" not in text  # Optuna's warning when a query lost it
    if method == "random":
        assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * CONFIGS[method]  # none RUNNING
    else:  # trained until pruned at a rung, or ran out of budget where it stood; none admitted past it
        trained_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        assert all(t.state in trained_states for t in trials)
    charged = {t.number: t.user_attrs["rounds_used"] for t in trials}
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("restart").experiment_id
    runs = client.search_runs([experiment], "tags.`fedhpo.role` = 'trial'")
    recorded = {int(r.data.tags["fedhpo.trial"]): int(r.data.metrics["rounds_used"]) for r in runs}
    trained = {
        int(r.data.tags["fedhpo.trial"]): [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
        for r in runs
    }
    assert len(runs) == len(trials) and charged == recorded and sum(charged.values()) == BUDGET
    assert all(sorted(steps) == list(range(1, charged[number] + 1)) for number, steps in trained.items()), trained


def test_a_stop_request_ends_the_wait_for_the_database(study):
    trial = study.ask()
    lose_connection(study._storage._backend, "set_trial_user_attr", 10**6)

    def stop_requested():
        raise KeyboardInterrupt

    started = time.monotonic()
    with waits_interrupted_by(stop_requested), pytest.raises(KeyboardInterrupt):
        trial.set_user_attr("rounds_used", 1)
    assert time.monotonic() - started < 5


def test_a_session_left_by_a_lost_connection_is_retried_like_one(study):
    """Optuna catches a lost connection in a query and falls back to another, whose session then
    refuses work (PendingRollbackError) until it is reset: the database's outage, not an error."""
    trial = study.ask()
    pending = sqlalchemy.exc.PendingRollbackError("Can't reconnect until invalid transaction is rolled back")
    lose_connection(study._storage._backend, "get_all_trials", 2, cause=pending)
    assert [t.number for t in study.get_trials()] == [trial.number]


def test_optunas_fallback_warning_is_dropped_only_when_the_database_went_away():
    def warning(error: str) -> logging.LogRecord:
        message = f"Caught an error from sqlalchemy: {error}. Falling back to a slower alternative."
        return logging.LogRecord("optuna.storages._rdb.storage", logging.WARNING, __file__, 1, message, None, None)

    lost = "(psycopg2.OperationalError) server closed the connection unexpectedly\n\tThis probably means ..."
    refused = '(psycopg2.OperationalError) connection to server at "127.0.0.1", port 5432 failed: Connection refused'
    shutdown = "(psycopg2.OperationalError) terminating connection due to administrator command"
    too_many = "(sqlite3.OperationalError) too many SQL variables"
    kept = [study_database.quiet_fallback_on_lost_connection(warning(e)) for e in (lost, refused, shutdown, too_many)]
    assert kept == [False, False, False, True]


def test_the_study_lock_rides_out_a_restart_held_and_while_being_taken(tmp_path, caplog):
    """The asynchronous methods' round grants run under a PostgreSQL advisory lock on the study."""
    with servers.PostgresCluster(tmp_path / "postgres") as database:
        storage = study_database.open_storage(database.url)
        key = optuna.create_study(storage=storage, study_name="locked")._study_id
        other = sqlalchemy.create_engine(database.url, poolclass=sqlalchemy.pool.NullPool)

        def taken_elsewhere() -> bool:
            with other.connect() as connection:
                query = sqlalchemy.text("SELECT pg_try_advisory_lock(:key)")
                return not connection.execute(query, {"key": key}).scalar()  # released with its session

        with study_database.advisory_lock(storage, key):
            assert taken_elsewhere()
            database.stop()  # the lock goes with its connection
            database.start()
        assert not taken_elsewhere()  # released without an error

        database.stop()
        restart = threading.Timer(3, database.start)
        restart.start()
        try:
            with study_database.advisory_lock(storage, key):  # taken once the database is back
                assert taken_elsewhere()
        finally:
            restart.join()
        other.dispose()
    lines = database_lines(caplog)  # the lock taken while the database was away; none for its release
    assert outage_lines(lines) == [UNREACHABLE, REACHABLE], lines
