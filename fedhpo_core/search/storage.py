"""A study's Optuna storage, and riding out a restart of a database server.

A server database (PostgreSQL) that restarts mid-study costs a reconnect, not the study: pooled
connections are checked before use (`pool_pre_ping`), and a storage call that loses its connection
is tried again, with backoff, for up to RECONNECT_WINDOW_S (`ReconnectingStorage`), as is taking
the study's advisory lock (`advisory_lock`). The study's trials pause at their next storage call
and go on once the database answers.
"""

import contextlib
import copy
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import sqlalchemy
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState

from fedhpo_core.locking import file_lock
from fedhpo_core.stores import one_line, while_waiting

RECONNECT_WINDOW_S = 300  # how long storage calls are tried again while the database is unreachable
CONNECT_TIMEOUT_S = 10  # a connection attempt to a host that does not answer fails in this time
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 2.0  # at most 2 s between the database's return and its use
REQUEST_ATTR = "fedhpo:request"  # Optuna system attribute: the create_new_trial call that made the trial

logger = logging.getLogger("fedhpo.study_database")
_local_lock = threading.Lock()  # `study_lock` for storages that live in this process (tests' in-memory ones)


def open_storage(url: str | BaseStorage) -> BaseStorage:
    """The Optuna storage at `url` (a storage as it is); a server database's reconnects (`ReconnectingStorage`)."""
    if isinstance(url, BaseStorage):
        return url
    if url.startswith("sqlite"):  # a file: nothing to reconnect to
        return RDBStorage(url)
    engine_kwargs = {}
    if url.startswith("postgresql"):  # Optuna checks pooled connections itself only for MySQL
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
        logging.getLogger("optuna.storages._rdb.storage").addFilter(quiet_fallback_on_lost_connection)
    return ReconnectingStorage(optuna.storages.get_storage(RDBStorage(url, engine_kwargs=engine_kwargs)))


def innermost(storage: BaseStorage) -> BaseStorage:
    """The storage under its wrappers (`ReconnectingStorage`, Optuna's cache around an RDB storage)."""
    while hasattr(storage, "_backend"):
        storage = storage._backend
    return storage


# PendingRollbackError: a thread's session whose connection was lost inside a query that Optuna
# caught (its "falling back to a slower alternative") refuses work until it is reset.
DISCONNECTS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.PendingRollbackError)


def lost_connection(error: Exception) -> bool:
    """Whether a storage call failed for want of the database: SQLAlchemy's OperationalError
    (connection refused, closed, server shutting down or starting up), InterfaceError (a
    connection already closed), PendingRollbackError (a session left by a lost connection), or an
    error on a connection SQLAlchemy found gone; Optuna wraps most as StorageInternalError."""
    cause = error.__cause__ if isinstance(error, StorageInternalError) else error
    return isinstance(cause, DISCONNECTS) or getattr(cause, "connection_invalidated", False)


# How psycopg2 says a connection was lost or refused (PostgreSQL shutting down, restarting, gone).
LOST_CONNECTION_TEXTS = ("server closed the connection", "terminating connection", "connection to server")


def quiet_fallback_on_lost_connection(record: logging.LogRecord) -> bool:
    """Drop Optuna's warning that a trials query failed and it falls back to another (meant for
    too many query variables) where the failure was the database going away: a multi-line error
    and its SQL, while the outage gets its own line from `ReconnectingStorage`."""
    message = record.getMessage()
    fallback = message.startswith("Caught an error from sqlalchemy")
    return not (fallback and any(text in message for text in LOST_CONNECTION_TEXTS))


def _retried(name: str) -> Callable:
    """A storage method that calls the backend's, tried again while the connection is lost."""

    def call(self: "ReconnectingStorage", *args, **kwargs):
        return self._retry(lambda: getattr(self._backend, name)(*args, **kwargs))

    call.__name__ = call.__qualname__ = name
    return call


class ReconnectingStorage(BaseStorage):
    """An Optuna storage whose calls that lose the database connection are tried again, with
    backoff, until RECONNECT_WINDOW_S after the database became unreachable; one warning when it
    does and one line when it is reachable again, whatever the number of calls waiting.

    What a study writes is set to a value, so a write tried again after its lost attempt committed
    writes the same again, except for two calls. A trial state set finds the trial finished: that
    is success where it holds the state asked for. A new trial carries a request id (system
    attribute REQUEST_ATTR): a retry returns the trial the lost attempt committed, if any, rather
    than create a second one (left RUNNING, it would hold a configuration of the study's plan).
    """

    def __init__(self, backend: BaseStorage):
        self._backend = backend  # the name Optuna's own wrapper (its cache) gives what it wraps
        self._lock = threading.Lock()
        self._unreachable_since: float | None = None

    def _retry(self, call: Callable, again: Callable | None = None):
        """`call()`, or `again()` after an attempt that lost its connection, until one returns."""
        backoff, lost = FIRST_BACKOFF_S, False
        while True:
            try:
                result = (again or call)() if lost else call()
            except (StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as error:
                if not lost_connection(error):
                    raise
                self._unreachable(error)
                with contextlib.suppress(Exception):  # a fresh session (of the RDB storage in Optuna's cache)
                    innermost(self._backend).remove_session()
                while_waiting()
                time.sleep(backoff)
                backoff, lost = min(2 * backoff, MAX_BACKOFF_S), True
                continue
            if lost:  # a call that found the database again says so (Optuna's cache answers some without it)
                self._reachable()
            return result

    def _unreachable(self, error: Exception) -> None:
        """Say so the first time; give up RECONNECT_WINDOW_S after."""
        cause = error.__cause__ if isinstance(error, StorageInternalError) else error
        reason = one_line(getattr(cause, "orig", None) or cause)
        with self._lock:
            if self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
                logger.warning("study database unreachable (%s); retrying for up to %d s", reason, RECONNECT_WINDOW_S)
            elif time.monotonic() - self._unreachable_since > RECONNECT_WINDOW_S:
                message = f"study database unreachable for {RECONNECT_WINDOW_S} s ({reason})"
                raise StorageInternalError(message) from error

    def _reachable(self) -> None:
        """Say so, once for the calls that waited."""
        with self._lock:
            if self._unreachable_since is not None:
                outage = time.monotonic() - self._unreachable_since
                self._unreachable_since = None
                logger.warning("study database reachable again after %.0f s", outage)

    def create_new_trial(self, study_id: int, template_trial: optuna.trial.FrozenTrial | None = None) -> int:
        request = uuid.uuid4().hex
        template = copy.copy(template_trial) if template_trial else optuna.trial.create_trial(state=TrialState.RUNNING)
        template.system_attrs = template.system_attrs | {REQUEST_ATTR: request}

        def create() -> int:
            return self._backend.create_new_trial(study_id, template)

        def find_or_create() -> int:
            trials = self._backend.get_all_trials(study_id, deepcopy=False)
            made = [t._trial_id for t in trials if t.system_attrs.get(REQUEST_ATTR) == request]
            return made[0] if made else create()

        return self._retry(create, find_or_create)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        def set_state() -> bool:
            return self._backend.set_trial_state_values(trial_id, state, values)

        def set_state_unless_set() -> bool:
            try:
                return set_state()
            except UpdateFinishedTrialError:
                if self._backend.get_trial(trial_id).state == state:
                    return True  # the attempt that lost its connection committed
                raise

        return self._retry(set_state, set_state_unless_set)

    create_new_study = _retried("create_new_study")
    delete_study = _retried("delete_study")
    set_study_user_attr = _retried("set_study_user_attr")
    set_study_system_attr = _retried("set_study_system_attr")
    get_study_id_from_name = _retried("get_study_id_from_name")
    get_study_name_from_id = _retried("get_study_name_from_id")
    get_study_directions = _retried("get_study_directions")
    get_study_user_attrs = _retried("get_study_user_attrs")
    get_study_system_attrs = _retried("get_study_system_attrs")
    get_all_studies = _retried("get_all_studies")
    set_trial_param = _retried("set_trial_param")
    get_trial_id_from_study_id_trial_number = _retried("get_trial_id_from_study_id_trial_number")
    set_trial_intermediate_value = _retried("set_trial_intermediate_value")
    set_trial_user_attr = _retried("set_trial_user_attr")
    set_trial_system_attr = _retried("set_trial_system_attr")
    get_trial = _retried("get_trial")
    get_all_trials = _retried("get_all_trials")
    get_best_trial = _retried("get_best_trial")
    remove_session = _retried("remove_session")


@contextlib.contextmanager
def advisory_lock(storage: BaseStorage, key: int) -> Iterator[None]:
    """PostgreSQL's session advisory lock on `key`, exclusive for every process of the study.
    Taking it is tried again while the database is unreachable, like the storage's calls. A lock
    whose connection is lost went with it (the server ends a session's locks), so releasing it then
    is done. Left open: a restart inside the locked section (a few storage calls) lets another
    process in before it ends: one trial or one round over the study's plan."""
    engine = innermost(storage).engine
    retried = storage._retry if isinstance(storage, ReconnectingStorage) else (lambda call: call())

    def lock() -> sqlalchemy.Connection:
        connection = engine.connect()
        try:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        except BaseException:
            connection.close()
            raise
        return connection

    connection = retried(lock)
    try:
        yield
    finally:
        try:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        except sqlalchemy.exc.SQLAlchemyError as error:
            if not lost_connection(error):
                raise
        finally:
            # Closing rolls back the connection's transaction: on a connection the server ended
            # (seen in CI: a restart while the lock was held), that fails too, and is done.
            with contextlib.suppress(*DISCONNECTS):
                connection.close()


@contextlib.contextmanager
def study_lock(study: optuna.Study) -> Iterator[None]:
    """Exclusive, for every thread and process of the study: a lock file beside an SQLite storage
    (`flock`: threads holding their own descriptors exclude each other too), a session advisory
    lock in PostgreSQL (`advisory_lock`); a lock of this process for a storage in memory. Nothing
    to clean up after a process killed while holding it: the kernel closes its file, the server
    ends its session, and either lock goes with it. Not reentrant: nothing inside takes it again."""
    backend = innermost(study._storage)
    url = getattr(backend, "url", None)
    if url is None:
        with _local_lock:
            yield
    elif url.startswith("sqlite:///"):
        with file_lock(Path(f"{url.removeprefix('sqlite:///')}.study-{study._study_id}.lock")):
            yield
    elif url.startswith("postgresql"):
        with advisory_lock(study._storage, study._study_id):
            yield
    else:
        scheme = url.split(":", 1)[0]
        raise NotImplementedError(f"admitting trials takes a lock on an SQLite or PostgreSQL storage, not {scheme}")
