"""A study in optuna-dashboard: a real `fedhpo tune`, a real `optuna-dashboard` on its default storage, read
through the dashboard's JSON API (what its pages draw)."""

import json
import os
import subprocess
import urllib.request

import mlflow
import optuna
import pytest
import servers

from fedhpo_core.search.study import default_storage

TUNE = ["tune", "--method", "random", "--budget", "6", "--n-configs", "2", "--final-rounds", "0", "--dataset", "digits"]
ROUNDS_PER_TRIAL = 3  # budget 6 over 2 configurations


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[str, str]:
    """The tracking URI and Optuna storage of a finished `fedhpo tune`."""
    folder = tmp_path_factory.mktemp("tuned")
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri}
    done = subprocess.run(
        [servers.venv_bin("fedhpo"), *TUNE], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tracking_uri, default_storage(tracking_uri)


@pytest.fixture(scope="module")
def dashboard(tuned, tmp_path_factory) -> str:
    """The URL of `optuna-dashboard` serving the study's storage; stopped, and checked gone, after the tests."""
    folder = tmp_path_factory.mktemp("dashboard")
    port = servers.free_port()
    command = [servers.venv_bin("optuna-dashboard"), tuned[1], "--host", servers.LOCALHOST, "--port", port]
    # gunicorn, which the dashboard runs on where installed, puts its control socket in $XDG_RUNTIME_DIR.
    env = os.environ | {"XDG_RUNTIME_DIR": str(folder)}
    url = f"http://{servers.LOCALHOST}:{port}"
    with servers.ServerProcess(command, folder / "dashboard.log", env=env, cwd=folder) as server:
        server.wait_ready(f"{url}/api/studies", timeout=120)
        yield url
    assert server.process.returncode is not None and not servers.port_accepts_connections(port)


def api(url: str, path: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, whatever proxy is set
    with opener.open(url + path, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def shown(tuned, dashboard) -> tuple[optuna.Study, dict]:
    """The study as Optuna stores it, and its complete trials, by number, as the dashboard shows them."""
    (name,) = optuna.get_all_study_names(tuned[1])
    listed = {study["study_name"]: study["study_id"] for study in api(dashboard, "/api/studies")["study_summaries"]}
    assert name in listed
    detail = api(dashboard, f"/api/studies/{listed[name]}")
    trials = {trial["number"]: trial for trial in detail["trials"] if trial["state"] == "Complete"}
    return optuna.load_study(study_name=name, storage=tuned[1]), trials


def test_the_dashboard_lists_the_study_with_its_trials_as_optuna_stores_them(shown):
    study, trials = shown
    stored = {t.number: t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    assert len(trials) == 2 and trials.keys() == stored.keys()
    for number, trial in trials.items():
        assert {p["name"]: p["param_external_value"] for p in trial["params"]} == {
            name: str(value) for name, value in stored[number].params.items()
        }
        assert trial["values"] == stored[number].values


def test_each_trial_shows_its_validation_score_after_every_round(shown):
    study, trials = shown
    for trial in trials.values():
        reported = {value["step"]: value["value"] for value in trial["intermediate_values"]}
        assert sorted(reported) == list(range(1, ROUNDS_PER_TRIAL + 1)), reported
        assert reported == study.trials[trial["number"]].intermediate_values


def test_each_trial_names_its_mlflow_run(tuned, shown):
    _, trials = shown
    client = mlflow.MlflowClient(tuned[0])
    runs = client.search_runs([client.get_experiment_by_name("fedhpo").experiment_id], "tags.`fedhpo.role`='trial'")
    run_ids = {int(run.data.tags["fedhpo.trial"]): run.info.run_id for run in runs}
    for number, trial in trials.items():
        assert {a["key"]: a["value"] for a in trial["user_attrs"]}.get("mlflow_run_id") == run_ids[number]
