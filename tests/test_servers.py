"""The real local servers of tests/servers.py start, serve, and are gone after their `with` block, also when the
block raises."""

import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import optuna
import pytest
import servers
import sqlalchemy


class BodyFailed(Exception):
    pass


def pids_with_args(*args: object) -> list[int]:
    """Live processes whose command line holds `args` in a row (Linux /proc; zombies have an empty one)."""
    needle = b"\0" + b"\0".join(str(arg).encode() for arg in args) + b"\0"
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in b"\0" + cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return pids


def assert_tracks_metric_and_artifact(tracking_uri: str, download_dir: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment("servers-test")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "loss", 0.25, step=1)
    client.log_text(run_id, "hello from the test", "notes/hello.txt")
    client.set_terminated(run_id)

    again = MlflowClient(tracking_uri=tracking_uri)
    assert [(metric.step, metric.value) for metric in again.get_metric_history(run_id, "loss")] == [(1, 0.25)]
    downloaded = again.download_artifacts(run_id, "notes/hello.txt", dst_path=str(download_dir))
    assert Path(downloaded).read_text() == "hello from the test"


def test_postgres_serves_sqlalchemy_and_optuna(postgres_url):
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("select 1")).scalar() == 1
    engine.dispose()

    study = optuna.create_study(storage=postgres_url, study_name="servers-test")
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.01},
            distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)},
            value=0.5,
        )
    )
    loaded = optuna.load_study(study_name="servers-test", storage=postgres_url)
    assert [(trial.params, trial.value) for trial in loaded.trials] == [({"lr": 0.01}, 0.5)]


def test_postgres_stops_when_the_body_raises(tmp_path):
    with pytest.raises(BodyFailed), servers.postgres(tmp_path) as url:
        port = urlsplit(url).port
        assert servers.port_accepts_connections(port)
        assert pids_with_args("-p", port)
        raise BodyFailed
    assert not servers.port_accepts_connections(port)
    assert not pids_with_args("-p", port)


def test_mlflow_server_tracks_metrics_and_artifacts(mlflow_server_url, tmp_path):
    assert_tracks_metric_and_artifact(mlflow_server_url, tmp_path)


def test_mlflow_server_on_postgres_backend_store(postgres_url, tmp_path):
    with servers.mlflow_server(tmp_path / "server", backend_store_uri=postgres_url) as url:
        assert_tracks_metric_and_artifact(url, tmp_path / "downloads")
    # The server wrote the artifact into its own artifacts folder, not into the client's working directory.
    assert [path.read_text() for path in (tmp_path / "server" / "artifacts").rglob("hello.txt")] == [
        "hello from the test"
    ]


def test_prefect_api_url_serves_the_api(prefect_api_url):
    assert httpx.get(f"{prefect_api_url}/health").json() is True
    created = httpx.post(f"{prefect_api_url}/flows/", json={"name": "servers-test"})
    assert created.status_code == 201
    assert httpx.get(f"{prefect_api_url}/flows/{created.json()['id']}").json()["name"] == "servers-test"


def test_prefect_server_stops_when_the_body_raises(tmp_path):
    with pytest.raises(BodyFailed), servers.prefect_server(tmp_path) as api_url:
        port = urlsplit(api_url).port
        assert httpx.get(f"{api_url}/health").json() is True
        assert pids_with_args("--port", port)
        raise BodyFailed
    assert not servers.port_accepts_connections(port)
    assert not pids_with_args("--port", port)


def test_server_process_fails_fast_with_the_log_tail(tmp_path):
    command = [sys.executable, "-c", "print('cannot start: no config'); raise SystemExit(3)"]
    with (
        pytest.raises(RuntimeError, match=r"exited \(3\) before it was ready:\n.*cannot start: no config"),
        servers.ServerProcess(command, tmp_path / "server.log") as server,
    ):
        server.wait_ready(f"http://{servers.LOCALHOST}:{servers.free_port()}/", timeout=30)
