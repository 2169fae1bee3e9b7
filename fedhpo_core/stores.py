"""Checks that a store (MLflow's tracking store, an Optuna storage) can be used, made in seconds
before any work: a malformed URL, a folder that is missing or read-only, a file that is not a
database, or a server that does not answer each give one line (`SettingsError`), not a
traceback after start-up or minutes of retries."""

import contextlib
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlalchemy

from fedhpo_core.errors import SettingsError, one_line

CONNECT_TIMEOUT_S = 5
_wait_checks: list[Callable[[], None]] = []  # innermost last (`waits_interrupted_by`)


def check_folder(folder: Path, what: str) -> None:
    """`folder` (or the nearest part of it that exists) is a folder we can create files in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SettingsError(f"{what}: {existing} is not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # created and removed: writing works there
    except OSError as error:
        raise SettingsError(f"{what}: cannot write in {existing} ({error.strerror})") from error


def check_sqlite(path: Path, what: str) -> None:
    """An SQLite database file that exists and reads, or one that can be created (SQLite creates
    the file, not the folders above it). A hot journal (a writer killed mid-transaction) is rolled
    back on the way, as the store's next writer would: a read-only look would refuse it."""
    check_folder(path.parent, what)
    if not path.parent.is_dir():
        raise SettingsError(f"{what}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise SettingsError(f"{what}: {path} is a folder, not a database file")
    if not path.exists():
        return
    try:  # read-write, never creating: a process killed mid-write leaves a journal that reading rolls back
        with sqlite3.connect(f"file:{path}?mode=rw", uri=True) as db:
            db.execute("select count(*) from sqlite_master").fetchone()
    except sqlite3.Error as error:
        raise SettingsError(f"{what}: {path} is not a readable SQLite database ({one_line(error)})") from error


def check_database(url: str, what: str) -> None:
    """A SQLAlchemy database URL: SQLite checked on disk, any other database connected to."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as error:
        raise SettingsError(f"{what}: {url!r} is not a database URL (sqlite:///path or postgresql://...)") from error
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise SettingsError(f"{what}: an in-memory SQLite database would be lost with the process; name a file")
        check_sqlite(Path(parsed.database).expanduser().absolute(), what)
        return
    shown = parsed.render_as_string(hide_password=True)
    timeout = {"postgresql": {"connect_timeout": CONNECT_TIMEOUT_S}, "mysql": {"connect_timeout": CONNECT_TIMEOUT_S}}
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=timeout.get(parsed.get_backend_name(), {}))
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("select 1"))
        engine.dispose()
    except Exception as error:  # a missing driver, an unknown dialect, a refused connection, bad credentials
        raise SettingsError(f"{what}: cannot use {shown} ({type(error).__name__}: {one_line(error)})") from error


def while_waiting() -> None:
    """Called between attempts while a store's server is away (MLflow's, the study database): the
    innermost check given to `waits_interrupted_by` may end the wait by raising."""
    if _wait_checks:
        _wait_checks[-1]()


@contextlib.contextmanager
def waits_interrupted_by(check: Callable[[], None]) -> Iterator[None]:
    """While the block runs, waiting out a store server's absence calls `check` (a stop request), which may raise."""
    _wait_checks.append(check)
    try:
        yield
    finally:
        _wait_checks.remove(check)
