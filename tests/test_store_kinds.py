"""Each store checks that what it opens is its own kind before creating anything in it, and the
stores' limits (a name MLflow takes, a URI that is a store) are checked up front: the real
commands refuse in one line, exit 2, and leave the other store's database as it was."""

import sqlite3
from pathlib import Path

import mlflow
import optuna
import pytest
import sqlalchemy
from test_faults import one_line_exit

from fedhpo_core.errors import SettingsError
from fedhpo_core.stores import check_database
from fedhpo_core.tracking import check_tracking_store

SMALL = ["--clients", "3", "--final-rounds", "0"]


def sqlite_tables(path: Path) -> list[str]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return sorted(name for (name,) in db.execute("select name from sqlite_master where type = 'table'"))


def refusal(capsys, command: list[str]) -> str:
    """The one line a command refused with (exit status 2)."""
    capsys.readouterr()  # what making the stores printed
    return one_line_exit(capsys, command)


def mlflow_database(path: Path) -> Path:
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").create_experiment("theirs")
    return path


def optuna_database(path: Path) -> Path:
    optuna.create_study(storage=f"sqlite:///{path}", study_name="theirs")
    return path


def test_an_optuna_storage_naming_an_mlflow_database_is_refused_and_creates_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    victim = mlflow_database(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'tracking.db'}")
    before = sqlite_tables(victim)
    error = refusal(capsys, ["tune", "--storage", f"sqlite:///{victim}", *SMALL])
    assert f"Optuna storage: sqlite:///{victim} holds MLflow's tables (experiments, runs)" in error
    assert "studies" not in before and sqlite_tables(victim) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_a_tracking_uri_naming_an_optuna_database_is_refused_and_creates_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    victim = optuna_database(tmp_path / "optuna.db")
    before = sqlite_tables(victim)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{victim}")
    for command in (["train", "--clients", "3"], ["tune", *SMALL]):
        error = refusal(capsys, command)
        assert "MLflow tracking store: sqlite:///" in error
        assert "holds Optuna's tables (studies, trials, version_info)" in error
        assert "experiments" not in before and sqlite_tables(victim) == before


def test_a_database_of_neither_store_is_refused_by_both(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    theirs = tmp_path / "shop.db"
    with sqlite3.connect(theirs) as db:
        for table in ("customers", "orders", "invoices", "items", "prices", "stock"):
            db.execute(f"create table {table} (id integer)")
    before = sqlite_tables(theirs)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'tracking.db'}")
    error = refusal(capsys, ["tune", "--storage", f"sqlite:///{theirs}", *SMALL])
    assert "holds tables of neither MLflow nor Optuna (customers, invoices, items, orders, prices, ...)" in error
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{theirs}")
    assert "holds tables of neither MLflow nor Optuna" in refusal(capsys, ["train", "--clients", "3"])
    assert sqlite_tables(theirs) == before


def test_an_empty_database_and_a_store_of_its_own_kind_are_taken(tmp_path):
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    for kind in ("MLflow", "Optuna"):
        check_database(f"sqlite:///{empty}", "store", kind)
        check_database(f"sqlite:///{tmp_path / 'new.db'}", "store", kind)
    check_database(f"sqlite:///{mlflow_database(tmp_path / 'mlflow.db')}", "MLflow tracking store", "MLflow")
    check_database(f"sqlite:///{optuna_database(tmp_path / 'optuna.db')}", "Optuna storage", "Optuna")
    assert not (tmp_path / "new.db").exists()


def test_a_postgres_database_holding_an_optuna_study_is_refused_as_the_tracking_store(
    postgres_url, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    optuna.create_study(storage=postgres_url, study_name="theirs")
    engine = sqlalchemy.create_engine(postgres_url)
    before = sorted(sqlalchemy.inspect(engine).get_table_names())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_url)
    error = refusal(capsys, ["train", "--clients", "3"])
    assert f"MLflow tracking store: {postgres_url} holds Optuna's tables (studies, trials, version_info)" in error
    assert sorted(sqlalchemy.inspect(engine).get_table_names()) == before and "experiments" not in before
    engine.dispose()


# The stores' limits, checked before any flow run starts.


def test_an_experiment_name_longer_than_mlflow_takes_is_refused_up_front(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for command in ("train", "tune"):
        error = refusal(capsys, [command, "--clients", "3", "--experiment", "x" * 501])
        assert "--experiment: a name of 501 characters; MLflow takes at most 500" in error
    check_tracking_store("x" * 500)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "uri, message",
    [
        ("ftp://x", "unknown scheme 'ftp'"),
        ("notascheme:abc", "unknown scheme 'notascheme'"),
        ("http://127.0.0.1:notaport", "the tracking server does not answer (nonnumeric port"),
        ("http:///nohost", "the tracking server does not answer"),
        ("file:///{tmp}/store", "MLflow refuses a folder store unless MLFLOW_ALLOW_FILE_STORE=true"),
        ("{tmp}/store", "MLflow refuses a folder store unless MLFLOW_ALLOW_FILE_STORE=true"),
        ("file://elsewhere/{tmp}/store", "a folder store is on this machine (file:///path), not on 'elsewhere'"),
    ],
)
def test_a_tracking_uri_that_is_no_store_mlflow_takes_is_one_line(uri, message, capsys, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    assert message in refusal(capsys, ["train", "--clients", "3"])
    assert list(tmp_path.iterdir()) == [work] and list(work.iterdir()) == []


def test_a_folder_store_is_taken_where_mlflow_is_told_to_allow_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/store")
    check_tracking_store("fine")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://elsewhere{tmp_path}/store")
    with pytest.raises(SettingsError, match="not on 'elsewhere'"):
        check_tracking_store("fine")
