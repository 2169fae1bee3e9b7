"""A study against a real MLflow tracking server that is stopped by SIGTERM mid-study and started again
on the same stores: nothing it logs is lost, nothing is sent twice, and rounds trained equal rounds charged.
A planted server that answers its health check but fails every request to its API: the lines say so, and
say when the command waits for it."""

import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import servers
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from test_faults import ENDS_WITHIN_S, FEDHPO, wait_for
from test_spool_safety import GOOD_WRITE, planted_server

from fedhpo_core import tracking
from fedhpo_core.outbox import WAITING
from fedhpo_core.search.base import rounds_spent
from fedhpo_core.stores import waits_interrupted_by

BUDGET, CONFIGS = 60, 4  # 15 rounds a trial
OUTAGE_S = 20  # longer than MLflow's retry budget as fedhpo sets it (2 retries, about 3 s)


def tune_command(storage: str, *extra: str) -> list[str]:
    command = [FEDHPO, "tune", "--method", "random", "--budget", str(BUDGET), "--n-configs", str(CONFIGS)]
    command += ["--clients", "3", "--final-rounds", "2", "--storage", storage, "--study-name", "away"]
    return command + ["--experiment", "away", *extra]


def stop_mid_trial(server: contextlib.ExitStack, url: str, trial: int = 1) -> None:
    """Stop the tracking server (SIGTERM) once trial `trial` has logged two of its 15 rounds."""

    def trained_two_rounds() -> bool:
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("away")
        runs = client.search_runs([experiment.experiment_id], f"tags.`fedhpo.trial`='{trial}'") if experiment else []
        return bool(runs) and len(client.get_metric_history(runs[0].info.run_id, "val_acc")) >= 2

    wait_for(trained_two_rounds)
    server.close()


def check_every_round_arrived(url: str, storage: str) -> optuna.Study:
    """Every trial ended, its run holds each round's metrics once and as many rounds as it was charged
    and trained; the study charged what its trials trained."""
    study = optuna.load_study(study_name="away", storage=storage)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("away").experiment_id
    runs = {int(r.data.tags["fedhpo.trial"]): r for r in client.search_runs([experiment], "tags.`fedhpo.role`='trial'")}
    trained = [t for t in study.trials if t.state != optuna.trial.TrialState.FAIL]
    assert sorted(runs) == [t.number for t in trained]  # a trial stopped before its run began failed
    for trial in trained:
        run = runs[trial.number]
        assert run.info.status == "FINISHED", (trial.number, run.info.status)
        used = trial.user_attrs["rounds_used"]
        assert run.data.metrics["rounds_used"] == run.data.metrics["rounds_trained"] == used
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert sorted(m.step for m in history) == list(range(1, used + 1)), trial.number  # each round once
        checkpoint = f"checkpoint/state-round{used}.pt"
        assert [f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")] == [checkpoint]
    assert rounds_spent(study) == sum(t.user_attrs.get("rounds_trained", 0) for t in study.trials)
    return study


@contextlib.contextmanager
def study_whose_server_goes_away(tmp_path: Path, port: int, storage: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """A `fedhpo tune` against an `mlflow server` on `port` that is stopped (SIGTERM) mid-trial; yields the
    process and the server's URL once the study said the server is unreachable; the process is killed on exit."""
    with contextlib.ExitStack() as first:
        url = first.enter_context(servers.mlflow_server(tmp_path / "mlflow", port=port))
        env = os.environ | {"MLFLOW_TRACKING_URI": url}
        with open(tmp_path / "log.txt", "w") as output:
            process = subprocess.Popen(
                tune_command(storage), cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            stop_mid_trial(first, url)
            wait_for(lambda: "unreachable" in (tmp_path / "log.txt").read_text(), timeout=60)
            yield process, url
        finally:
            process.kill()


def test_a_study_rides_out_a_tracking_server_outage_and_every_round_arrives(tmp_path):
    port, storage = servers.free_port(), f"sqlite:///{tmp_path / 'optuna.db'}"
    with study_whose_server_goes_away(tmp_path, port, storage) as (process, url):
        time.sleep(OUTAGE_S)
        with servers.mlflow_server(tmp_path / "mlflow", port=port):
            assert process.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-3000:]
            check_every_round_arrived(url, storage)
            experiment = MlflowClient(url).get_experiment_by_name("away").experiment_id
            (study_run,) = MlflowClient(url).search_runs([experiment], "tags.`fedhpo.role`='study'")
            assert study_run.info.status == "FINISHED" and "final_test_acc" in study_run.data.metrics
    text = (tmp_path / "log.txt").read_text()
    assert text.count("unreachable") == 1 and text.count("reachable again") == 1, text[-3000:]
    assert re.search(r"reachable again after \d+ s; sent the [1-9]\d* writes kept meanwhile", text)  # training went on
    assert "Traceback" not in text and "Max retries" not in text
    assert not (tmp_path / "fedhpo-spool").exists() or not list((tmp_path / "fedhpo-spool").iterdir())


def test_a_study_stopped_while_its_tracking_server_is_away_leaves_a_spool_that_sync_sends(tmp_path):
    port, storage = servers.free_port(), f"sqlite:///{tmp_path / 'optuna.db'}"
    with study_whose_server_goes_away(tmp_path, port, storage) as (process, url):
        time.sleep(3)  # training went on, its logs kept
        os.kill(process.pid, signal.SIGINT)
        stopped = time.monotonic()
        process.wait(timeout=120)
    took = time.monotonic() - stopped
    text = (tmp_path / "log.txt").read_text()
    lines = text.rstrip().splitlines()
    assert process.returncode == 128 + signal.SIGINT and took < ENDS_WITHIN_S, (took, lines[-10:])
    spool_root = tmp_path / "fedhpo-spool"
    assert lines[-1].startswith("fedhpo: MLflow tracking server") and str(spool_root) in lines[-1], lines[-5:]
    assert "Traceback" not in text
    (spool,) = [f for f in spool_root.iterdir() if f.is_dir()]

    env = os.environ | {"MLFLOW_TRACKING_URI": url}
    with servers.mlflow_server(tmp_path / "mlflow", port=port):
        synced = subprocess.run([FEDHPO, "sync"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert synced.returncode == 0 and f"from {spool}" in synced.stdout, synced.stdout + synced.stderr
        assert not spool.exists()
        resumed = subprocess.run(
            tune_command(storage, "--resume"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        study = check_every_round_arrived(url, storage)
        assert rounds_spent(study) <= BUDGET
    assert not [f for f in spool_root.iterdir() if f.is_dir()]


@contextlib.contextmanager
def outbox_of_a_server_whose_api_fails(tmp_path: Path, monkeypatch, caplog, api_status: int = 503) -> Iterator:
    """A planted server whose health check answers and whose API answers `api_status`, as the tracking store."""
    with planted_server(api_status) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("FEDHPO_SPOOL", str(tmp_path / "spools"))
        for name, value in tracking.MLFLOW_RETRIES.items():
            monkeypatch.setenv(name, value)
        with caplog.at_level(logging.WARNING, logger="fedhpo.tracking"):
            yield server


def test_a_server_answering_its_health_check_but_not_its_api_is_said_so_and_the_wait_for_it_too(
    tmp_path, monkeypatch, caplog
):
    with outbox_of_a_server_whose_api_fails(tmp_path, monkeypatch, caplog) as server:
        tracking.outbox().write(GOOD_WRITE)  # kept: training goes on
        waits = []

        def api_back_on_the_third_wait():
            waits.append(1)
            if len(waits) == 3:
                server.api_status = 200

        with waits_interrupted_by(api_back_on_the_third_wait):
            assert tracking.outbox().call(tracking.close_orphaned_runs, MlflowClient()) == []
        sent = [body for path, body in server.requests if path.endswith("/runs/log-batch")]
    lines = [record.getMessage() for record in caplog.records]
    assert lines[:2] == [
        f"MLflow tracking server {server.url} answers its health check but not its API (HTTP 503); training goes on, "
        "its logs kept and sent when the server is back",
        f"MLflow tracking server {server.url} still away; {WAITING}",
    ]
    assert (
        re.fullmatch(
            rf"MLflow tracking server {server.url} reachable again after \d+ s; sent the 1 writes kept "
            "meanwhile",
            lines[2],
        )
        and len(lines) == 3
    ), lines
    assert len(waits) == 3 and '"run_id": "run1"' in sent[-1]


def test_a_command_waiting_for_a_server_whose_api_fails_says_so_once_and_ctrl_c_ends_the_wait(
    tmp_path, monkeypatch, caplog
):
    with outbox_of_a_server_whose_api_fails(tmp_path, monkeypatch, caplog) as server:
        waits = []

        def ctrl_c_on_the_third_wait():
            waits.append(1)
            if len(waits) == 3:
                raise KeyboardInterrupt

        with waits_interrupted_by(ctrl_c_on_the_third_wait), pytest.raises(KeyboardInterrupt):
            tracking.outbox().call(tracking.close_orphaned_runs, MlflowClient())
    assert [record.getMessage() for record in caplog.records] == [
        f"MLflow tracking server {server.url} answers its health check but not its API (HTTP 503); {WAITING}"
    ]


def test_fedhpo_train_against_a_server_whose_api_fails_says_it_waits_and_ctrl_c_ends_it(tmp_path):
    with planted_server(api_status=503) as server:
        env = os.environ | {"MLFLOW_TRACKING_URI": server.url, "FEDHPO_SPOOL": str(tmp_path / "spools")}
        command = [FEDHPO, "train", "--rounds", "2", "--clients", "3", "--experiment", "api-away"]
        with open(tmp_path / "log.txt", "w") as output:
            process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: WAITING in (tmp_path / "log.txt").read_text(), timeout=120)
            os.kill(process.pid, signal.SIGINT)
            process.wait(timeout=ENDS_WITHIN_S)
        finally:
            process.kill()
    text = (tmp_path / "log.txt").read_text()
    assert process.returncode == 128 + signal.SIGINT, text[-3000:]
    said = [line for line in text.splitlines() if "MLflow tracking server" in line]
    assert len(said) == 1 and said[0].endswith(
        f"MLflow tracking server {server.url} answers its health check but not its API (HTTP 503); {WAITING}"
    ), text[-3000:]
    assert "training goes on" not in text and "unreachable" not in text and "Traceback" not in text


def test_a_server_whose_api_answers_404_is_no_outage_the_call_fails_at_once(tmp_path, monkeypatch, caplog):
    """Not an MLflow API at that address (a wrong path behind a proxy): waiting would never end."""
    server = outbox_of_a_server_whose_api_fails(tmp_path, monkeypatch, caplog, api_status=404)
    with server, pytest.raises(MlflowException, match="404"):
        tracking.outbox().call(tracking.close_orphaned_runs, MlflowClient())
    assert caplog.records == []
