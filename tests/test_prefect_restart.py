"""A study survives a restart of the Prefect server it reports to (the user's, PREFECT_API_URL): a real
`prefect server start`, stopped by SIGTERM mid-study and started again on its port and database."""

import os
import signal
import subprocess
import time

import mlflow
import optuna
import servers
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings
from test_faults import FEDHPO, SMALL, check_stores_agree, trial_lines, wait_for

BUDGET = 40
PAUSE_S = 3  # between the server's stop and its start again, which takes 10-30 s more on 2 cores
# Prefect's own lines per undelivered event or batch of logs, which one line each way replaces.
PER_EVENT_LINES = ("EventsWorker", "Unable to connect", "Error logging to API", "Traceback", "Still processing")


def round_task_runs(api_url: str) -> list[StateType]:
    """The states of the single flow run's task runs that trained a round's clients ('round-3-clients')."""
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="round-")))
        return [task.state_type for task in tasks]


def test_a_study_rides_out_a_restart_of_its_prefect_server_with_one_line_each_way(tmp_path):
    server_dir, port = tmp_path / "prefect-server", servers.free_port()
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [FEDHPO, "tune", "--method", "random", "--budget", str(BUDGET), "--n-configs", "5", *SMALL]
    command += ["--storage", storage, "--study-name", "restart", "--experiment", "restart"]
    log = tmp_path / "log.txt"
    process = None
    try:
        with servers.prefect_server(server_dir, port) as api_url, open(log, "w") as output:
            env["PREFECT_API_URL"] = api_url
            process = subprocess.Popen(
                command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
            wait_for(lambda: trial_lines(log) >= 2 or process.poll() is not None)
        stopped = time.monotonic()  # the block stopped the server: SIGTERM to its process group
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(PAUSE_S)
        with servers.prefect_server(server_dir, port):
            down_s = time.monotonic() - stopped
            process.wait(timeout=600)
            text = log.read_text()
            assert process.returncode == 0, text[-3000:]
            with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                (flow_run,) = client.read_flow_runs()
            assert flow_run.state_type == StateType.COMPLETED
            # Every round's task run reached the server, those of the outage resent (recorded in the background).
            wait_for(lambda: len(round_task_runs(api_url)) >= BUDGET, timeout=60)
            assert round_task_runs(api_url) == [StateType.COMPLETED] * BUDGET
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    assert not [line for line in text.splitlines() if any(part in line for part in PER_EVENT_LINES)], text[-3000:]
    # One line each way (again where the reconnected client lost its connection to the busy server).
    outage = [line.split(f"Prefect server {api_url} ")[1] for line in text.splitlines() if "Prefect server" in line]
    ways = [line.split(" ")[0] for line in outage]
    assert ways and ways == ["unreachable", "reachable"] * (len(ways) // 2), (down_s, outage)

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    study = optuna.load_study(study_name="restart", storage=storage)
    trained = check_stores_agree(study, client, "restart")  # nothing RUNNING, each trial's run once
    assert sum(trained.values()) == sum(t.user_attrs["rounds_used"] for t in study.trials) == BUDGET
    for trial in study.trials:
        steps = [m.step for m in client.get_metric_history(trial.user_attrs["mlflow_run_id"], "val_acc")]
        assert sorted(steps) == list(range(1, trained[trial.number] + 1))
