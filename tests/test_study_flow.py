"""The hpo-study flow end to end, the `fedhpo tune` command's errors, and resume after SIGKILL."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from cli.main import main
from flows.study import hpo_study

FIXED = {"clients": 3, "experiment": "study-flow"}


def runs_of(client, experiment_id, study_name):
    return client.search_runs([experiment_id], f"tags.`fedhpo.study` = '{study_name}'")


@pytest.mark.usefixtures("prefect_server")
def test_study_leaves_a_parent_run_a_child_per_trial_and_a_final_run(mlflow_client, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    summary = hpo_study(method="random", budget=6, n_configs=3, final_rounds=2, storage=storage, train=FIXED)
    assert summary["rounds_used"] == 6 and 0 <= summary["final_test_acc"] <= 1
    parent = mlflow_client.get_run(summary["run_id"])
    assert parent.data.tags["fedhpo.role"] == "study"
    assert parent.data.params["method"] == "random" and parent.data.params["budget"] == "6"
    task = {"dataset": "digits", "model": "mlp", "partition": "iid", "clients": "3", "seed": "0"}
    assert task.items() <= parent.data.params.items() and "fixed.lr" in parent.data.params
    # What the study found, never the last trial's configuration under a name that reads like a result.
    found = {"best_val_score", "final_test_acc", "final_val_acc", "rounds_used", "trials_finished", "wall_time_s"}
    assert set(parent.data.metrics) == found | {"final_sim_time_s", "final_personal_acc", "final_personal_acc_worst10"}
    assert parent.data.metrics["best_val_score"] == summary["best_val_score"]
    assert parent.data.metrics["trials_finished"] == 3 and "best.lr" in parent.data.params

    children = mlflow_client.search_runs(
        [summary["experiment_id"]], f"tags.`mlflow.parentRunId` = '{summary['run_id']}'"
    )
    roles = sorted(r.data.tags["fedhpo.role"] for r in children)
    assert roles == ["final", "trial", "trial", "trial"]
    for child in children:
        assert child.info.status == "FINISHED"
        if child.data.tags["fedhpo.role"] == "trial":
            history = mlflow_client.get_metric_history(child.info.run_id, "val_acc")
            assert [m.step for m in history] == [1, 2]
            assert {a.path for a in mlflow_client.list_artifacts(child.info.run_id, "checkpoint")} == {
                "checkpoint/state-round2.pt"
            }
    study = optuna.load_study(study_name=summary["study_name"], storage=storage)
    trial_runs = {r.data.tags["fedhpo.trial"]: r.info.run_id for r in children if r.data.tags["fedhpo.role"] == "trial"}
    for trial in study.trials:  # what optuna-dashboard shows: the run, and the score after every round
        assert trial.user_attrs["mlflow_run_id"] == trial_runs[str(trial.number)]
        assert sorted(trial.intermediate_values) == [1, 2] and trial.intermediate_values[2] == trial.value

    (final,) = [r for r in children if r.data.tags["fedhpo.role"] == "final"]
    description = final.data.tags["mlflow.note.content"]
    assert f"| test accuracy | {summary['final_test_acc']:.4f} |" in description
    assert "| rounds trained | 2 |" in description
    assert f"| study | {summary['study_name']} |" in description and "| method | random |" in description
    artifacts = {a.path for a in mlflow_client.list_artifacts(summary["run_id"], "study")}
    assert artifacts == {
        "study/trials.csv",
        "study/best_so_far.png",
        "study/configs_vs_score.png",
        "study/param_importances.csv",
        "study/param_importances.png",
    }
    table = pd.read_csv(mlflow_client.download_artifacts(summary["run_id"], "study/trials.csv"))
    assert table.rounds_used.sum() == 6 and len(table) == 3


@pytest.mark.usefixtures("prefect_server")
def test_a_promoted_trial_continues_in_its_own_run(mlflow_client, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    summary = hpo_study(method="sha", budget=9, n_configs=3, final_rounds=0, storage=storage, train=FIXED)
    study = optuna.load_study(study_name=summary["study_name"], storage=storage)
    winner = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(winner) == 1 and winner[0].user_attrs["rounds_used"] == 3
    (run,) = [
        r
        for r in runs_of(mlflow_client, summary["experiment_id"], summary["study_name"])
        if r.data.tags.get("fedhpo.trial") == str(winner[0].number)
    ]
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3]
    assert run.info.status == "FINISHED"


BAD_TUNE = {
    "unknown method": (["--method", "annealing"], "unknown method 'annealing'"),
    "budget below one round each": (
        ["--budget", "10", "--n-configs", "30"],
        "smaller than one round per configuration",
    ),
    "negative final rounds": (["--final-rounds", "-1"], "final_rounds must be >= 0"),
    "empty search space": (["--search-space", "{empty}"], "search space is empty"),
    "malformed search space": (["--search-space", "{malformed}"], "malformed"),
    "grid over a float range": (["--method", "grid", "--search-space", "{floats}"], "grid search needs categorical"),
    "resume without a study": (["--resume", "--study-name", "nope"], "no study named 'nope'"),
    "bad fixed setting": (["--alpha", "0"], "alpha must be in (0, 1e+06]"),
    "zero workers": (["--workers", "0"], "workers must be >= 1"),
    "parallel trials of a sequential method": (["--method", "hyperband", "--workers", "2"], "not hyperband"),
    "join with resume": (["--join", "--resume"], "join and resume exclude each other"),
    "unknown task runner": (["--task-runner", "ray"], "unknown task_runner 'ray'"),
    "fedhyper's old one-scheduler name": (
        ["--method", "fedhyper-client"],
        "method 'fedhyper-client' is now fedhyper with an option: --method fedhyper --schedulers client_local",
    ),
    "unknown fedhyper scheduler": (["--method", "fedhyper", "--schedulers", "global,local"], "scheduler 'local'"),
    "fedhyper's option with another method": (["--schedulers", "global"], "an option of fedhyper, not of tpe"),
    "a model name the registry refuses": (["--register-model", "team/model"], "'team/model' is not a model name"),
    "registering without a final model": (
        ["--register-model", "m", "--final-rounds", "0"],
        "register_model needs final_rounds >= 1",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TUNE))
def test_bad_tune_input_fails_fast_with_one_line(case, capsys, tmp_path, monkeypatch):
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "empty.yaml").write_text("")
    (spaces / "malformed.yaml").write_text("lr: {type: float, low: 0.1}\n")
    (spaces / "floats.yaml").write_text("lr: {type: float, low: 0.001, high: 0.1, log: true}\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    flags, message = BAD_TUNE[case]
    flags = [f.format(**{n: spaces / f"{n}.yaml" for n in ("empty", "malformed", "floats")}) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("fedhpo tune: error: ") and message in error, error
    assert list(work.iterdir()) == []


def trial_states(path: Path) -> list[str]:
    """Trial states read straight from the file: opening it with Optuna while the other process
    creates its schema races that creation."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return [state for (state,) in db.execute("select state from trials order by number")]
    except sqlite3.Error:
        return []


def running_trial_runs(path: Path) -> int:
    """MLflow runs of trials in progress, read straight from the store."""
    query = (
        "select count(*) from runs join tags on runs.run_uuid = tags.run_uuid "
        "where runs.status = 'RUNNING' and tags.key = 'fedhpo.role' and tags.value = 'trial'"
    )
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute(query).fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_study_killed_mid_trial_resumes_without_losing_or_repeating_a_trial(tmp_path):
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [str(Path(sys.executable).with_name("fedhpo")), "tune", "--method", "random", "--budget", "30"]
    command += ["--n-configs", "10", "--final-rounds", "0", "--study-name", "killed", "--storage", storage]
    command += ["--clients", "3", "--experiment", "killed"]

    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill once some trials finished and one is training
            time.sleep(0.2)
            states = trial_states(tmp_path / "optuna.db")
            training = running_trial_runs(tmp_path / "mlflow.db")
            if states[-1:] == ["RUNNING"] and states.count("COMPLETE") >= 3 and training:
                break
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    before = optuna.load_study(study_name="killed", storage=storage).trials
    finished_before = {t.number: t.params for t in before if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(finished_before) >= 3 and before[-1].state == optuna.trial.TrialState.RUNNING

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = optuna.load_study(study_name="killed", storage=storage).trials
    complete = {t.number: t.params for t in after if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(complete) == 10
    assert all(complete[n] == params for n, params in finished_before.items())
    # Killed in training, the trial is asked again; killed after its result was recorded, it is told.
    recorded = "result" in before[-1].user_attrs
    killed_state = optuna.trial.TrialState.COMPLETE if recorded else optuna.trial.TrialState.FAIL
    assert after[before[-1].number].state == killed_state
    assert sum(t.user_attrs["rounds_used"] for t in after if t.number in complete) == 30

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("killed").experiment_id
    trial_runs = client.search_runs([experiment], "tags.`fedhpo.role` = 'trial'")
    finished = sorted(int(r.data.tags["fedhpo.trial"]) for r in trial_runs if r.info.status == "FINISHED")
    killed = [int(r.data.tags["fedhpo.trial"]) for r in trial_runs if r.info.status == "KILLED"]
    assert finished == sorted(complete)  # one finished run per complete trial, none twice
    assert killed == ([] if recorded else [before[-1].number])
    orphaned = [int(r.data.tags["fedhpo.trial"]) for r in trial_runs if r.data.tags.get("fedhpo.orphaned")]
    assert orphaned == [before[-1].number]  # its process was gone: the next command closed its run
    parents = client.search_runs([experiment], "tags.`fedhpo.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


@pytest.mark.usefixtures("prefect_server")
def test_comparison_pairs_methods_on_seeds_and_tabulates_them(mlflow_client, tmp_path):
    from flows.comparison import method_comparison

    summary = method_comparison(
        methods=["random", "sha"],
        seeds=[0, 1],
        budgets=[4, 6],
        n_configs=2,
        final_rounds=1,
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        train=FIXED | {"experiment": "comparison"},
    )
    results = pd.DataFrame(summary["results"])
    assert len(results) == 8 and (results.rounds_used <= results.budget).all()
    assert sorted(results.groupby("method").seed.apply(sorted).tolist()) == [[0, 0, 1, 1], [0, 0, 1, 1]]
    run = mlflow_client.get_run(summary["run_id"])
    assert run.data.tags["fedhpo.role"] == "comparison"
    paths = {a.path for a in mlflow_client.list_artifacts(summary["run_id"], "comparison")}
    names = ("results.csv", "paired.csv", "table.csv", "table.md", "accuracy_vs_budget.png")
    personal = [
        f"{score}_{kind}"
        for score in ("personal_acc", "personal_acc_worst10")
        for kind in ("table.csv", "vs_budget.png")
    ]
    assert paths == {f"comparison/{n}" for n in (*names, *personal)}
    table = pd.read_csv(mlflow_client.download_artifacts(summary["run_id"], "comparison/table.csv"))
    assert list(table.columns) == ["method", "budget 4", "budget 4: vs random", "budget 6", "budget 6: vs random"]
    assert list(table.method) == ["random", "sha"]
    assert all("±" in cell for cell in table[["budget 4", "budget 6"]].values.ravel())
    # sha against random, seed by seed, as the results say.
    paired = pd.read_csv(mlflow_client.download_artifacts(summary["run_id"], "comparison/paired.csv"))
    for row in paired.itertuples():
        rows = results[results.budget == row.budget].set_index(["method", "seed"]).final_test_acc
        differences = [rows["sha", seed] - rows["random", seed] for seed in (0, 1)]
        assert row.method == "sha" and row.mean_difference == pytest.approx(np.mean(differences))
        assert row.verdict == ("tie" if row.ci_low <= 0 <= row.ci_high else "better" if row.ci_low > 0 else "worse")
    assert table["budget 4: vs random"][0] == "reference"
    studies = mlflow_client.search_runs(
        [summary["experiment_id"]], f"tags.`mlflow.parentRunId` = '{summary['run_id']}'"
    )
    assert len(studies) == 8 and {r.data.tags["fedhpo.role"] for r in studies} == {"study"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "random,annealing"], "unknown method 'annealing'"),
        (["--budgets", "30,5"], "smaller than one round per configuration"),
        (["--seeds", ""], "at least one value"),
        (["--register-model", "a:b"], "'a:b' is not a model name"),
    ],
)
def test_bad_compare_input_fails_fast_with_one_line(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *flags])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and message in error, error
    assert list(tmp_path.iterdir()) == []


def test_fedhyper_schedulers_are_an_option_of_its_one_method():
    from fedhpo_core.search.study import TuneSettings, study_definition
    from fedhpo_core.settings import TrainSettings
    from fedhpo_core.tuners.fedhyper import SCHEDULERS

    fixed, default = TrainSettings(), TuneSettings(method="fedhyper")
    chosen = TuneSettings(method="fedhyper", options={"schedulers": "global,client_local"})
    assert chosen.search_method().final_tuner(fixed).schedulers == ("global", "client_local")
    assert default.search_method().final_tuner(fixed).schedulers == SCHEDULERS
    # Another choice of schedulers is another study; the default one keeps the names it had.
    assert chosen.name_for(fixed).startswith("fedhyper[global,client_local]-")
    assert default.name_for(fixed).startswith("fedhyper-global-")
    assert study_definition(chosen, fixed)["schedulers"] == "global,client_local"
    assert "schedulers" not in study_definition(default, fixed)


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("method", ["fedtune", "fedex", "stepwise", "fedhyper"])
def test_round_level_methods_run_one_tracked_run_within_the_budget(method, mlflow_client, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    summary = hpo_study(method=method, budget=4, final_rounds=1, storage=storage, train=FIXED)
    assert summary["rounds_used"] == 4
    (trial,) = optuna.load_study(study_name=summary["study_name"], storage=storage).trials
    names = {
        "fedtune": {f"{p}/client_{c}" for p in ("lr", "weight_decay") for c in range(3)},
        "fedhyper": {"lr"},
    }.get(method, {"lr", "weight_decay"})
    assert trial.params == {} and set(trial.user_attrs["chosen"]) == names
    (run,) = [
        r
        for r in runs_of(mlflow_client, summary["experiment_id"], summary["study_name"])
        if r.data.tags.get("fedhpo.role") == "trial"
    ]
    paths = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "trajectory")}
    assert paths == {
        f"trajectory/{name}.{kind}" for name in ("tuner_state", "client_hyperparameters") for kind in ("csv", "png")
    }
    state = pd.read_csv(mlflow_client.download_artifacts(run.info.run_id, "trajectory/tuner_state.csv"))
    assert sorted(state["round"].unique()) == [1, 2, 3, 4]
    # Per-client state and configurations are tables, never a metric series per client.
    assert not [key for key in run.data.metrics if re.search(r"client_\d", key)]
    if method == "fedtune":  # each client's distribution sums to one in every round
        pi = state[state.name.str.startswith("fedtune/pi/")]
        assert np.allclose(pi.groupby(["round", "client"]).value.sum(), 1.0) and pi.client.nunique() == 3
        assert len(mlflow_client.get_metric_history(run.info.run_id, "fedtune/pi_entropy")) == 4
    elif method == "fedex":  # one distribution per setting (the space is a grid), each summing to one
        theta = state[state.name.str.startswith("fedex/p/")]
        setting = theta.name.str.extract(r"fedex/p/(\w+)/", expand=False)
        assert set(setting) == {"lr", "weight_decay"}
        assert np.allclose(theta.groupby(["round", setting]).value.sum(), 1.0)
    elif method == "stepwise":
        assert set(state.name) == {"stepwise/feedback", "stepwise/round_time_s"}
    else:
        assert set(state.name) == {"fedhyper/alpha", "fedhyper/beta", "fedhyper/hypergradient"}
        # FedHyper schedules during training: its final run is a scheduled run too.
        (final,) = mlflow_client.search_runs(
            [summary["experiment_id"]],
            f"tags.`mlflow.parentRunId` = '{summary['run_id']}' and tags.`fedhpo.role` = 'final'",
        )
        assert final.data.params["scheduled_by"] == "FedHyper"
        assert len(mlflow_client.get_metric_history(final.info.run_id, "fedhyper/alpha")) == 1
    # Every round's configuration of every taking part client is in the table, summarized per round.
    configs = pd.read_csv(mlflow_client.download_artifacts(run.info.run_id, "trajectory/client_hyperparameters.csv"))
    assert sorted(configs["round"].unique()) == [1, 2, 3, 4] and "lr" in set(configs.name)
    lr = {m.step: m.value for m in mlflow_client.get_metric_history(run.info.run_id, "hp/lr/mean")}
    assert lr == pytest.approx(configs[configs.name == "lr"].groupby("round").value.mean().to_dict())


@pytest.mark.usefixtures("prefect_server")
def test_fedex_is_wrapped_in_random_search_over_server_settings(mlflow_client, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "lr: {type: categorical, choices: [0.1, 0.01]}\nserver_lr: {type: categorical, choices: [0.5, 1.0]}\n"
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    summary = hpo_study(method="fedex", budget=6, final_rounds=1, search_space=str(space), storage=storage, train=FIXED)
    trials = optuna.load_study(study_name=summary["study_name"], storage=storage).trials
    assert len(trials) == 3 and all(t.user_attrs["rounds_used"] == 2 for t in trials)
    assert all(set(t.params) == {"server_lr"} and set(t.user_attrs["chosen"]) == {"lr"} for t in trials)
    assert summary["rounds_used"] == 6 and {"server_lr", "lr"} <= set(summary)
    final = mlflow_client.search_runs(
        [summary["experiment_id"]],
        f"tags.`mlflow.parentRunId` = '{summary['run_id']}' and tags.`fedhpo.role` = 'final'",
    )
    assert {"server_lr", "lr"} <= set(final[0].data.params)


@pytest.mark.usefixtures("prefect_server")
def test_pbt_study_logs_its_lineage(mlflow_client, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    summary = hpo_study(method="pbt", budget=16, final_rounds=1, storage=storage, train=FIXED)
    assert summary["rounds_used"] == 16
    paths = {a.path for a in mlflow_client.list_artifacts(summary["run_id"], "study")}
    assert "study/pbt_lineage.png" in paths
    table = pd.read_csv(mlflow_client.download_artifacts(summary["run_id"], "study/trials.csv"))
    assert sorted(table.generation.unique()) == [0, 1] and table.parent_trial.notna().sum() == 4


@pytest.mark.usefixtures("prefect_server")
def test_a_privacy_budget_keeps_the_best_within_it_or_ends_without_one(mlflow_client, tmp_path):
    private = FIXED | {"dp_clip": 1.0, "participation": 0.5, "clients": 4}
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: categorical, choices: [0.05, 0.1]}\ndp_noise: {type: categorical, choices: [0.5, 4]}")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = {"method": "grid", "budget": 12, "n_configs": 4, "final_rounds": 2, "storage": storage}
    summary = hpo_study(**common, search_space=str(space), max_epsilon=5.0, train=private, study_name="within")
    study = optuna.load_study(study_name="within", storage=storage)
    spent = {t.number: t.user_attrs["result"]["objectives"]["epsilon"] for t in study.trials}
    assert min(spent.values()) <= 5.0 < max(spent.values())  # noise 0.5 spends more than 5, 4.0 less
    assert spent[summary["best_trial"]] <= 5.0 and "final_test_acc" in summary
    feasible = [t for t in study.trials if spent[t.number] <= 5.0]
    assert summary["best_val_score"] == max(t.value for t in feasible)

    none = hpo_study(**common, search_space=str(space), max_epsilon=0.01, train=private, study_name="none")
    assert none["best_trial"] is None and "final_test_acc" not in none
    children = mlflow_client.search_runs([none["experiment_id"]], f"tags.`mlflow.parentRunId` = '{none['run_id']}'")
    assert {r.data.tags["fedhpo.role"] for r in children} == {"trial"}  # trials, and no final run
