"""Multi-machine stores, for real: two `fedhpo tune` processes share one Optuna study in PostgreSQL
and one MLflow tracking server (itself on PostgreSQL), all on 127.0.0.1."""

import os
import sys
from pathlib import Path

import optuna
import servers
import sqlalchemy
from mlflow import MlflowClient

BUDGET, CONFIGS = 48, 12  # 4 rounds per trial
# Enough work per round (LeNet-5, 3 local epochs: ~0.1 s) that the study outlasts the second or two
# between the two processes' starts, so both get trials.
WORK = ["--model", "lenet5", "--local-epochs", "3"]


def create_database(url: str, name: str) -> str:
    """A second database in the same cluster (MLflow's tables apart from Optuna's); its URL."""
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"


def test_two_tuner_processes_share_a_postgres_study_and_an_mlflow_server(postgres_url, tmp_path):
    with servers.mlflow_server(tmp_path / "mlflow-server", create_database(postgres_url, "mlflow")) as tracking:
        env = os.environ | {"MLFLOW_TRACKING_URI": tracking}
        command = [str(Path(sys.executable).with_name("fedhpo")), "tune", "--method", "tpe", "--join"]
        command += ["--budget", str(BUDGET), "--n-configs", str(CONFIGS), "--final-rounds", "0"]
        command += ["--storage", postgres_url, "--study-name", "shared", "--clients", "6", "--experiment", "shared"]
        command += WORK
        outputs = servers.run_together([command + ["--workers", str(workers)] for workers in (1, 2)], tmp_path, env)

        study = optuna.load_study(study_name="shared", storage=postgres_url)
        complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
        assert len(complete) == CONFIGS and len({t.number for t in complete}) == CONFIGS
        assert sum(t.user_attrs["rounds_used"] for t in complete) == BUDGET
        assert len(study.trials) == CONFIGS  # admitted under the study's lock: none created past the plan

        client = MlflowClient(tracking_uri=tracking)
        experiment = client.get_experiment_by_name("shared").experiment_id
        studies = client.search_runs([experiment], "tags.`fedhpo.role` = 'study'")
        assert len(studies) == 2 and all(r.info.status == "FINISHED" for r in studies)  # one per process
        trials = client.search_runs([experiment], "tags.`fedhpo.role` = 'trial'")
        by_trial = {int(r.data.tags["fedhpo.trial"]): r for r in trials}
        assert len(trials) == len(by_trial) == CONFIGS  # no trial trained twice, none lost
        for trial in complete:
            run = by_trial[trial.number]
            assert run.info.status == "FINISHED" and run.data.metrics["score"] == trial.value
            assert float(run.data.params["lr"]) == trial.params["lr"]
        # Both processes trained trials: each trial run is nested under one of the two study runs.
        parents = {r.data.tags["mlflow.parentRunId"] for r in trials}
        assert parents == {r.info.run_id for r in studies}, [output[-1500:] for output in outputs]
        for run in studies:  # each process's summary reports the study's rounds, all processes together
            assert run.data.metrics["rounds_used"] <= BUDGET


def test_two_asha_processes_share_a_postgres_study_within_budget_training_nothing_twice(postgres_url, tmp_path):
    """Asynchronous successive halving across processes: Optuna's pruner and the round grants in
    PostgreSQL (advisory locks), checkpoints through the tracking server."""
    with servers.mlflow_server(tmp_path / "mlflow-server", create_database(postgres_url, "mlflow")) as tracking:
        env = os.environ | {"MLFLOW_TRACKING_URI": tracking}
        command = [str(Path(sys.executable).with_name("fedhpo")), "tune", "--method", "asha", "--join"]
        command += ["--budget", str(BUDGET), "--n-configs", "9", "--final-rounds", "0", "--storage", postgres_url]
        command += ["--study-name", "asha", "--clients", "6", "--experiment", "asha", *WORK]
        outputs = servers.run_together([command, command + ["--workers", "2"]], tmp_path, env)

        study = optuna.load_study(study_name="asha", storage=postgres_url)
        assert not study.get_trials(states=[optuna.trial.TrialState.RUNNING])
        trained = study.get_trials(states=[optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED])
        charged = sum(t.user_attrs["rounds_used"] for t in trained)
        assert BUDGET - 3 <= charged <= BUDGET  # 3: trials running when the budget ran out end where they stand
        assert study.get_trials(states=[optuna.trial.TrialState.PRUNED])  # the pruner stopped some at a rung

        client = MlflowClient(tracking_uri=tracking)
        experiment = client.get_experiment_by_name("asha").experiment_id
        runs = client.search_runs([experiment], "tags.`fedhpo.role` = 'trial'")
        by_trial = {int(r.data.tags["fedhpo.trial"]): r for r in runs}
        assert len(runs) == len(by_trial) == len(trained)  # each trial trained once, in one run
        assert sum(int(r.data.metrics["rounds_used"]) for r in runs) == charged
        studies = client.search_runs([experiment], "tags.`fedhpo.role` = 'study'")
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {r.info.run_id for r in studies}, [
            output[-1500:] for output in outputs
        ]
