"""A study against a real MLflow tracking server that is stopped by SIGTERM mid-study and started again
on the same stores: nothing it logs is lost, nothing is sent twice, and rounds trained equal rounds charged."""

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import servers
from mlflow import MlflowClient
from test_faults import ENDS_WITHIN_S, FEDHPO, wait_for

from fedhpo_core.search.base import rounds_spent

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
