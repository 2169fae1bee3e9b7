"""Secrets are never printed, logged or tracked: a password in the tracking URI or the Optuna
storage URL appears in no output line, MLflow param or tag, Prefect flow-run parameter, log or
result, while the flows still open the real storage (and a worker's flow, given the URL without
its password, opens it with PGPASSWORD)."""

import os
import sqlite3
from pathlib import Path

import optuna
import pytest
import servers
import sqlalchemy

import flows.comparison  # noqa: F401 - Prefect, imported before capsys, binds its logging to the real stderr
from cli.main import main
from fedhpo_core.errors import SettingsError
from fedhpo_core.stores import check_database, masked, with_password, without_password

PASSWORD = "S3cretPW"
ROLE = "tuner"
SMALL = ["--clients", "3", "--final-rounds", "1", "--n-configs", "2"]


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://user:S3cretPW@host:5000", "http://user:***@host:5000"),
        ("https://user:S3cret@PW@host/mlflow", "https://user:***@host/mlflow"),  # HTTP clients: up to the last @
        ("postgresql://u:S3cret/PW@db/optuna", "postgresql://u:***@db/optuna"),  # SQLAlchemy: / may be in it
        (
            "postgresql+psycopg2://u@db:5432/o?password=S3cretPW&sslmode=require",
            "postgresql+psycopg2://u@db:5432/o?password=***&sslmode=require",
        ),
        ("http://host:5000/runs@latest", "http://host:5000/runs@latest"),  # an @ in the path is no password
        ("sqlite:////tmp/a:b@c.db", "sqlite:////tmp/a:b@c.db"),
        ("sqlite:///optuna.db", "sqlite:///optuna.db"),
    ],
)
def test_masked_shows_a_password_as_stars_and_nothing_else_changed(url, shown):
    assert masked(url) == shown


def test_a_storage_url_is_handed_on_without_its_password_and_reopened_with_it_here():
    url = "postgresql+psycopg2://u:S3cret/PW@db:5432/o?password=S3cretPW&sslmode=require"
    plain = without_password(url)
    assert plain == "postgresql+psycopg2://u@db:5432/o?sslmode=require" and with_password(plain) == url
    assert with_password("postgresql://u@elsewhere/o") == "postgresql://u@elsewhere/o"  # a worker's: as given
    assert without_password("sqlite:///optuna.db") == "sqlite:///optuna.db"


def closed_port() -> int:
    port = servers.free_port()
    assert not servers.port_accepts_connections(port)
    return port


@pytest.mark.parametrize(
    "command", [["train"], ["tune"], ["compare", "--seeds", "0", "--budgets", "2", "--n-configs", "2"]]
)
def test_a_password_in_the_tracking_uri_is_not_in_the_refusal(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{PASSWORD}@127.0.0.1:{closed_port()}")
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--clients", "3"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "MLflow tracking store http://user:***@127.0.0.1:" in err and "does not answer" in err
    assert PASSWORD not in out + err


@pytest.fixture
def password_postgres(tmp_path):
    """A PostgreSQL database that its role `tuner` reaches only with PASSWORD; its URL with the password."""
    with servers.PostgresCluster(tmp_path) as cluster:
        engine = sqlalchemy.create_engine(cluster.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'"))
            connection.execute(sqlalchemy.text(f"ALTER DATABASE fedhpo OWNER TO {ROLE}"))
            hba = f"local all all trust\nhost all {servers.POSTGRES_USER} 127.0.0.1/32 trust\n"
            (cluster.data / "pg_hba.conf").write_text(hba + f"host all {ROLE} 127.0.0.1/32 scram-sha-256\n")
            connection.execute(sqlalchemy.text("SELECT pg_reload_conf()"))
        engine.dispose()
        yield f"postgresql+psycopg2://{ROLE}:{PASSWORD}@127.0.0.1:{cluster.port}/fedhpo"


def test_a_worker_opens_the_storage_without_its_password_with_pgpassword(password_postgres, monkeypatch):
    plain = password_postgres.replace(f":{PASSWORD}@", "@")
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(SettingsError) as refused:
        check_database(plain, "Optuna storage", "Optuna")
    assert "password authentication failed" in str(refused.value) or "no password supplied" in str(refused.value)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # libpq reads it when the URL has no password
    check_database(plain, "Optuna storage", "Optuna")
    optuna.create_study(storage=plain, study_name="worker")
    assert [s.study_name for s in optuna.get_all_study_summaries(password_postgres)] == ["worker"]


def prefect_database() -> Path:
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    return Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])


def text_of(database: Path) -> str:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:  # an existing database, never a new one
        return "\n".join(db.iterdump())


@pytest.mark.usefixtures("prefect_server")
def test_a_storage_password_is_nowhere_in_output_params_flow_parameters_or_logs(
    password_postgres, capsys, caplog, tmp_path, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PGPASSWORD", raising=False)  # the flows open the storage with the password the CLI was given
    tracking = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracking}")
    storage = ["--storage", password_postgres, "--experiment", "secrets"]
    assert main(["tune", "--method", "random", "--budget", "2", "--study-name", "secret", *SMALL, *storage]) == 0
    tuned = capsys.readouterr()
    assert f"{ROLE}:***@127.0.0.1" in tuned.out
    compare = ["compare", "--methods", "random", "--seeds", "0", "--budgets", "2", *SMALL, *storage]
    assert main(compare) == 0
    compared = capsys.readouterr()
    APILogWorker.drain_all(timeout=10)

    studies = {s.study_name: s for s in optuna.get_all_study_summaries(password_postgres)}
    assert studies["secret"].n_trials == 2 and len(studies) == 2  # the flows opened the real storage
    with sqlite3.connect(tracking) as db:
        logged = {value for (value,) in db.execute("select value from params where key = 'storage'")}
    assert logged == {masked(password_postgres)}
    with get_client(sync_client=True) as client:
        given = {run.parameters.get("storage") for run in client.read_flow_runs() if "storage" in run.parameters}
        logs = "\n".join(log.message for log in client.read_logs())
    without = password_postgres.replace(f":{PASSWORD}@", "@")
    where = without.split("@", 1)[1]  # this test's server and database: the session's Prefect has other tests' runs
    ours = {value for value in given if value and value.endswith(where)}
    assert ours == {without}  # the hpo-study and method-comparison runs
    assert "study secret: best trial" in logs
    results = Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"])
    result_files = [p.read_bytes() for p in results.rglob("*") if p.is_file()] if results.exists() else []
    everything = [tuned.out, tuned.err, compared.out, compared.err, caplog.text, logs]
    prefect_text = text_of(prefect_database())
    assert without in prefect_text  # the dump holds the flow runs' parameters
    everything += [text_of(tracking), prefect_text, *(b.decode(errors="replace") for b in result_files)]
    assert not [text[:200] for text in everything if PASSWORD in text]
