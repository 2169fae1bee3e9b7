"""Checks that a store (MLflow's tracking store, an Optuna storage) can be used, made in seconds
before any work: a malformed URL, a folder that is missing or read-only, a file that is not a
database, a database holding another kind of store's tables, or a server that does not answer
each give one line (`SettingsError`), not a traceback after start-up or minutes of retries, nor
one store's tables created in the other's database.

Secrets: a URL is shown, logged and tracked only `masked`; a flow is given a storage URL
`without_password` and reopens the real one `with_password` (registered by this process, else the
password comes from the environment of the process that runs the flow, e.g. PGPASSWORD)."""

import re
import sqlite3
import tempfile
from pathlib import Path

import sqlalchemy

from fedhpo_core.errors import SettingsError, one_line
from fedhpo_core.stopping import StopChecks

CONNECT_TIMEOUT_S = 5
# Tables only one kind of store has (both have alembic_version): a database holding them is that store.
STORE_TABLES = {
    "MLflow": frozenset({"experiments", "runs"}),
    "Optuna": frozenset({"studies", "trials", "version_info"}),
}
TABLES_SHOWN = 5
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
MASK = "***"
# A database URL's password as SQLAlchemy reads it (up to the first @, / included), any other URL's
# as HTTP clients do (up to the authority's last @); and a password given as a query parameter.
_DATABASE_PASSWORD = re.compile(r"^([\w+]+://[^:/]*:)[^@]*@")
_URL_PASSWORD = re.compile(r"^([A-Za-z][\w+.-]*://[^/?#:]*:)[^/?#]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
_with_passwords: dict[str, str] = {}  # a URL `without_password` -> the URL it was made from


def is_database_url(url: str) -> bool:
    return url.split("://", 1)[0].split("+")[0].lower() in DATABASE_SCHEMES


def masked(url: str | None) -> str | None:
    """`url` as fedhpo prints, logs and tracks it: any password in it shown as ***."""
    if url is None:
        return None
    userinfo = _DATABASE_PASSWORD if is_database_url(url) else _URL_PASSWORD
    return _QUERY_PASSWORD.sub(rf"\g<1>{MASK}", userinfo.sub(rf"\g<1>{MASK}@", url))


def without_password(url: str | None) -> str | None:
    """A database URL with no password, to hand a flow (Prefect keeps its parameters); this
    process remembers the URL with it (`with_password`)."""
    if url is None or masked(url) == url:
        return url
    parsed = sqlalchemy.engine.make_url(url)
    plain = parsed._replace(password=None).difference_update_query(["password"]).render_as_string(hide_password=False)
    _with_passwords[plain] = url
    return plain


def with_password(url: str | None) -> str | None:
    """The URL `without_password` made `url` from in this process; else `url` itself (a flow run
    elsewhere, by a worker, takes the password from its environment, e.g. PGPASSWORD)."""
    return _with_passwords.get(url, url) if url is not None else None


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


def check_sqlite(path: Path, what: str) -> list[str]:
    """An SQLite database file that exists and reads, or one that can be created (SQLite creates
    the file, not the folders above it); its tables. A hot journal (a writer killed mid-transaction)
    is rolled back on the way, as the store's next writer would: a read-only look would refuse it."""
    check_folder(path.parent, what)
    if not path.parent.is_dir():
        raise SettingsError(f"{what}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise SettingsError(f"{what}: {path} is a folder, not a database file")
    if not path.exists():
        return []
    try:  # read-write, never creating: a process killed mid-write leaves a journal that reading rolls back
        with sqlite3.connect(f"file:{path}?mode=rw", uri=True) as db:
            rows = db.execute("select name from sqlite_master where type = 'table'").fetchall()
    except sqlite3.Error as error:
        raise SettingsError(f"{what}: {path} is not a readable SQLite database ({one_line(error)})") from error
    return [name for (name,) in rows if not name.startswith("sqlite_")]


def check_kind(tables: list[str], kind: str, what: str, shown: str) -> None:
    """A database for `kind`'s store (a key of `STORE_TABLES`) is empty or holds that store: never
    another store's tables, nor only tables of neither (which creating `kind`'s would mix into)."""
    if not tables:
        return
    others = [other for other, own in STORE_TABLES.items() if other != kind and own & set(tables)]
    if others:
        held = f"{others[0]}'s tables ({', '.join(sorted(STORE_TABLES[others[0]] & set(tables)))})"
    elif not STORE_TABLES[kind] <= set(tables):
        names = sorted(tables)[:TABLES_SHOWN] + ["..."] * (len(tables) > TABLES_SHOWN)
        held = f"tables of neither MLflow nor Optuna ({', '.join(names)})"
    else:
        return
    raise SettingsError(f"{what}: {shown} holds {held}; {kind} needs an empty database or its own")


def check_database(url: str, what: str, kind: str) -> None:
    """A SQLAlchemy database URL for `kind`'s store (`check_kind`): SQLite checked on disk, any
    other database connected to; nothing is created in it."""
    shown = masked(url)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as error:
        raise SettingsError(f"{what}: {shown!r} is not a database URL (sqlite:///path or postgresql://...)") from error
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise SettingsError(f"{what}: an in-memory SQLite database would be lost with the process; name a file")
        check_kind(check_sqlite(Path(parsed.database).expanduser().absolute(), what), kind, what, shown)
        return
    timeout = {"postgresql": {"connect_timeout": CONNECT_TIMEOUT_S}, "mysql": {"connect_timeout": CONNECT_TIMEOUT_S}}
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=timeout.get(parsed.get_backend_name(), {}))
        with engine.connect() as connection:
            tables = sqlalchemy.inspect(connection).get_table_names()
        engine.dispose()
    except Exception as error:  # a missing driver, an unknown dialect, a refused connection, bad credentials
        raise SettingsError(f"{what}: cannot use {shown} ({type(error).__name__}: {one_line(error)})") from error
    check_kind(tables, kind, what, shown)


# Called between attempts while a store's server is away (MLflow's, the study database): the
# innermost check given to `waits_interrupted_by` may end the wait by raising.
while_waiting = StopChecks()
waits_interrupted_by = while_waiting.during
