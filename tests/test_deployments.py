"""prefect.yaml points at real flows with valid parameters, its nightly schedule is a valid cron, the README's
`prefect deployment run` commands name real deployments with valid parameters, and the README's walkthrough works
end to end: a real Prefect server, `prefect deploy --all`, a process worker, a deployment run, an MLflow run."""

import asyncio
import datetime
import importlib
import inspect
import json
import os
import re
import shlex
import subprocess
import time
import uuid
import zoneinfo
from dataclasses import fields
from pathlib import Path

import servers
import yaml

ROOT = Path(__file__).resolve().parents[1]
POOL = "fedhpo-process"
FLOW_NAMES = {
    "flows/training.py:federated_training": "federated-training",
    "flows/study.py:hpo_study": "hpo-study",
    "flows/comparison.py:method_comparison": "method-comparison",
}
NIGHTLY = "method-comparison"
CLI_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300
SCHEDULER_TIMEOUT_S = 60


def deployments() -> list[dict]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def load_flow(entrypoint: str):
    path, function = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)


def full_name(deployment: dict) -> str:
    return f"{FLOW_NAMES[deployment['entrypoint']]}/{deployment['name']}"


def check_settings(flow_name: str, parameters: dict) -> None:
    """The settings objects a flow builds from these parameters accept them (budget against method, etc.)."""
    from fedhpo_core.search.study import TuneSettings
    from fedhpo_core.settings import TrainSettings

    TrainSettings(**(parameters.get("train") or {}))
    tune = {name: parameters[name] for name in {f.name for f in fields(TuneSettings)} if name in parameters}
    if flow_name == "hpo-study":
        TuneSettings(**tune)
    elif flow_name == "method-comparison":
        for method in parameters["methods"]:
            for budget in parameters["budgets"]:
                TuneSettings(**(tune | {"method": method, "budget": budget}))


def test_each_deployment_is_a_flow_on_the_process_pool_taking_its_parameters():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert config["deployments"]
    names = [full_name(deployment) for deployment in config["deployments"]]
    assert len(names) == len(set(names)), names
    assert set(FLOW_NAMES.values()) <= {name.split("/")[0] for name in names}
    # The worker's flow runs load the entrypoints relative to the folder `prefect deploy` ran in.
    assert config["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}]
    for deployment in config["deployments"]:
        flow = load_flow(deployment["entrypoint"])
        assert flow.name == FLOW_NAMES[deployment["entrypoint"]]
        assert deployment["work_pool"]["name"] == POOL
        parameters = deployment.get("parameters", {})
        assert set(parameters) <= set(inspect.signature(flow.fn).parameters)
        flow.validate_parameters(parameters)  # types, as Prefect checks them before a run
        check_settings(flow.name, parameters)


def test_the_nightly_comparison_is_a_valid_active_daily_cron():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.server.schemas.schedules import CronSchedule as ServerCronSchedule

    scheduled = {full_name(d): d["schedules"] for d in deployments() if d.get("schedules")}
    assert list(scheduled) == [f"{NIGHTLY}/digits"]
    [schedule] = scheduled[f"{NIGHTLY}/digits"]
    assert schedule["active"] is True
    assert schedule["timezone"]
    cron = {"cron": schedule["cron"], "timezone": schedule["timezone"]}
    CronSchedule(**cron)  # raises on a bad cron string or timezone
    start = datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC)
    dates = asyncio.run(ServerCronSchedule(**cron).get_dates(n=3, start=start))
    local = [date.astimezone(zoneinfo.ZoneInfo(schedule["timezone"])) for date in dates]
    assert [(d.hour, d.minute) for d in local] == [(2, 0)] * 3
    assert [(b - a).days for a, b in zip(local, local[1:], strict=False)] == [1, 1]


def readme_runs() -> list[tuple[str, dict]]:
    """The README's `prefect deployment run` commands: (deployment, --param values)."""
    runs = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if "prefect deployment run " not in line:
            continue
        words = shlex.split(line[line.index("prefect deployment run ") :].split("`")[0])
        parameters = {}
        for flag, value in zip(words, words[1:], strict=False):
            if flag in ("--param", "-p"):
                name, _, text = value.partition("=")
                try:
                    parameters[name] = json.loads(text)  # as the CLI reads them: JSON, else a string
                except json.JSONDecodeError:
                    parameters[name] = text
        runs.append((words[3], parameters))
    return runs


def test_the_readme_runs_real_deployments_with_valid_parameters():
    by_name = {full_name(deployment): deployment for deployment in deployments()}
    runs = readme_runs()
    assert ("hpo-study/digits", {"method": "fedtune", "budget": 60}) in runs
    for name, overrides in runs:
        if "<" in name:  # a placeholder, as in `prefect deployment run '<flow>/<deployment>'`
            continue
        assert name in by_name, f"the README runs {name!r}, which prefect.yaml does not declare"
        deployment = by_name[name]
        parameters = deployment.get("parameters", {}) | overrides
        flow = load_flow(deployment["entrypoint"])
        flow.validate_parameters(parameters)
        check_settings(flow.name, parameters)


# --- end to end: the README's walkthrough against a real Prefect server ------------------------------------------


def walkthrough_env(api_url: str, tmp_path: Path) -> dict[str, str]:
    """A clean environment for the Prefect CLI, the worker and its flow runs: none of the test session's Prefect or
    MLflow settings (conftest.py sets some), the test's own server, home and MLflow store."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PREFECT_", "MLFLOW_"))}
    return env | {
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        # prefect.yaml's pull step is the folder `prefect deploy` ran in, read from $PWD as a shell would set it.
        "PWD": str(ROOT),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    }


def prefect(*args: str, env: dict[str, str], timeout: float = CLI_TIMEOUT_S) -> str:
    """Run the Prefect CLI from the repository root; its output, or a failure with the output."""
    command = [servers.venv_bin("prefect"), *args]
    done = subprocess.run(
        command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{shlex.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
    return done.stdout


def test_deploy_all_then_a_worker_runs_a_deployment_into_mlflow(prefect_api_url, tmp_path):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = walkthrough_env(prefect_api_url, tmp_path)
    # The flow runs' working directory is the repository: keep MLflow's artifacts out of it.
    mlflow = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment_id = mlflow.create_experiment("fedhpo", artifact_location=(tmp_path / "mlartifacts").as_uri())

    prefect("work-pool", "create", POOL, "--type", "process", env=env)
    deployed = prefect("--no-prompt", "deploy", "--all", env=env)
    for deployment in deployments():
        assert f"Deployment '{full_name(deployment)}' successfully created" in deployed, deployed

    worker_command = [servers.venv_bin("prefect"), "worker", "start", "--pool", POOL]
    with servers.ServerProcess(worker_command, tmp_path / "worker.log", env=env, cwd=ROOT) as worker:
        worker.wait_ready(lambda: "started!" in worker.tail(), timeout=CLI_TIMEOUT_S)
        try:
            watched = prefect(
                *("deployment", "run", "federated-training/digits", "--param", "rounds=2"),
                *("--watch", "--watch-timeout", str(RUN_TIMEOUT_S)),
                env=env,
                timeout=RUN_TIMEOUT_S + 30,
            )
        except (AssertionError, subprocess.TimeoutExpired) as error:
            raise AssertionError(f"{error}\nworker log:\n{worker.tail()}") from error
    assert "Flow run finished successfully in 'Completed'" in watched, watched
    flow_run_id = uuid.UUID(re.search(r"UUID: ([0-9a-f-]{36})", watched)[1])

    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}), get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        assert flow_run.state.type == StateType.COMPLETED
        assert flow_run.parameters == {"dataset": "digits", "clients": 10, "rounds": 2}
        assert flow_run.name.startswith("digits-mlp-s0-")  # named for its parameters, then a random slug
        assert flow_run.deployment_id == client.read_deployment_by_name("federated-training/digits").id

        # The server's scheduler turns the nightly cron into scheduled runs of the comparison.
        nightly = client.read_deployment_by_name(f"{NIGHTLY}/digits")
        [schedule] = nightly.schedules
        assert schedule.active and schedule.schedule.cron == "0 2 * * *"
        scheduled_only = FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[nightly.id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
        )
        deadline = time.monotonic() + SCHEDULER_TIMEOUT_S
        while not (upcoming := client.read_flow_runs(flow_run_filter=scheduled_only, limit=10)):
            assert time.monotonic() < deadline, (
                f"no scheduled run of {NIGHTLY}/digits after {SCHEDULER_TIMEOUT_S} s: does the server's scheduler"
                " fail? (Prefect 3.8 with SQLAlchemy 2.1: 'Can't evaluate bulk DML statement' in its log)"
            )
            time.sleep(1)
        timezone = zoneinfo.ZoneInfo(schedule.schedule.timezone)
        starts = [run.expected_start_time.astimezone(timezone) for run in upcoming]
        assert all((start.hour, start.minute) == (2, 0) for start in starts), starts

    [run] = mlflow.search_runs([experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert run.info.status == "FINISHED"
    assert 0 < run.data.metrics["final_test_acc"] <= 1
    assert run.data.metrics["rounds_completed"] == 2
    assert run.data.params["rounds"] == "2"
    assert mlflow.get_metric_history(run.info.run_id, "val_acc")[-1].step == 2
