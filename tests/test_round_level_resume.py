"""Round-level runs continue from their tuner's state: a run stopped mid-way (a kill, or an
interrupt) resumes from its last checkpoint, with its tuner rebuilt and restored, and ends exactly
as the uninterrupted run of the same seed: the same weights, the same tuner trajectory, the same
score every round, each round charged once."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import torch

from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, RoundSteps, partition_of
from fedhpo_core.registry import ROUND, methods
from fedhpo_core.search.base import CHECKPOINT_ATTR, RUN_ATTR, TRAINED_ATTR, recorded_result, rounds_used
from fedhpo_core.search.space import SearchSpace
from fedhpo_core.search.study import open_study, run_search
from fedhpo_core.settings import TrainSettings
from fedhpo_core.tracking import Tracker, load_state
from fedhpo_core.trial import TrialTrainer

FEDHPO = str(Path(sys.executable).with_name("fedhpo"))
ROUND_LEVEL = sorted(name for name, declared in methods().items() if declared.kind == ROUND)
FIXED = TrainSettings(clients=3, experiment="round-level-resume")
BUDGET, STOPPED_AT = 8, 5


class Killed(BaseException):
    """Stands for a kill: nothing below catches it, and the trial is left RUNNING."""


@pytest.fixture(scope="module")
def data():
    return FederatedData.build(load_dataset("digits", FIXED.data_root), partition_of(FIXED.data), FIXED.model)


def study_of(name: str, data, stop_after: int | None = None, checkpoint_every: int = 1):
    """A round-level study of `name` on digits, stopped at the end of round `stop_after` if given."""
    declared = methods()[name]
    method = declared.search(declared.make_options({}))
    rounds = []

    def on_round(cost):
        rounds.append(cost.rounds)
        if stop_after is not None and len(rounds) == stop_after:
            raise Killed

    study = open_study(method, optuna.storages.InMemoryStorage(), name, False)
    tracker = Tracker(FIXED.experiment, f"study-{name}")
    trainer = TrialTrainer(
        data, FIXED, "server", tracker, name, RoundSteps(), on_round=on_round, checkpoint_every=checkpoint_every
    )
    search = (method, study, SearchSpace.load(None), "global", FIXED.clients, trainer, BUDGET, 30, 0, FIXED, data)
    return study, trainer, search


def same(rows: list[dict], others: list[dict]) -> bool:
    """Whether two trajectories are equal, a NaN (a reward before the first) equal to a NaN."""
    return pd.DataFrame(rows).equals(pd.DataFrame(others))


def ended(study, trainer) -> tuple:
    """What a run ended with: its weights, its tuner's trajectory and choice, its scores round by round."""
    (trial,) = study.trials
    start = trainer.load(trial.user_attrs[CHECKPOINT_ATTR])
    kept = pickle.loads(start.record)
    return start.state, kept["trajectory"], trial.user_attrs.get("chosen"), trial.intermediate_values, trial


@pytest.mark.parametrize("name", ROUND_LEVEL)
def test_a_stopped_round_level_run_resumes_from_its_checkpoint_and_ends_as_the_uninterrupted_one(name, data):
    study, trainer, search = study_of(name, data)
    run_search(*search)
    straight = ended(study, trainer)

    study, trainer, search = study_of(name, data, stop_after=STOPPED_AT, checkpoint_every=2)
    with pytest.raises(Killed):
        run_search(*search)
    (paused,) = study.trials
    # Paused at its last checkpoint (round 4 of 5 trained): charged for those rounds only.
    assert paused.state == optuna.trial.TrialState.RUNNING and rounds_used(paused) == 4
    assert recorded_result(paused).rounds == 4
    run_search(*search)  # --resume: the same study, a fresh search
    resumed = ended(study, trainer)

    assert resumed[0].round == straight[0].round == BUDGET
    assert torch.equal(resumed[0].weights, straight[0].weights)
    assert same(resumed[1], straight[1]) and resumed[2] == straight[2] and resumed[3] == straight[3]
    trial = resumed[4]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.values == straight[4].values
    assert rounds_used(trial) == trial.user_attrs[TRAINED_ATTR] == BUDGET


# One method of each tuner: the paper variants differ only in options.
KILLED = ["autofedrl", "clustered", "fedex", "fedhyper", "fedtune", "fts", "hpn", "stepwise"]
KILLED_BUDGET, KILL_AFTER = 24, 4


def scores_by_round(client: mlflow.MlflowClient, run_id: str) -> dict[int, set[float]]:
    values: dict[int, set[float]] = {}
    for metric in client.get_metric_history(run_id, "val_acc"):
        values.setdefault(metric.step, set()).add(metric.value)
    return values


@pytest.mark.parametrize("name", KILLED)
def test_a_killed_fedhpo_tune_of_a_round_level_method_resumes_to_the_uninterrupted_result(name, tmp_path, monkeypatch):
    """A real `fedhpo tune` SIGKILLed mid-run, then `--resume`d, against one run straight through."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # where checkpoints are read
    env = dict(os.environ)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [FEDHPO, "tune", "--method", name, "--budget", str(KILLED_BUDGET), "--dataset", "digits"]
    command += ["--clients", "3", "--final-rounds", "0", "--storage", storage, "--experiment", name]
    straight = subprocess.Popen([*command, "--study-name", "straight"], cwd=tmp_path, env=env)
    killed_command = [*command, "--study-name", "killed"]
    killed = subprocess.Popen(killed_command, cwd=tmp_path, env=env, start_new_session=True)

    def rounds_reported() -> int:
        try:
            trials = optuna.load_study(study_name="killed", storage=storage).trials
        except (KeyError, ValueError, Exception):  # the study or its tables are not there yet
            return 0
        return max((len(t.intermediate_values) for t in trials), default=0)

    deadline = time.monotonic() + 300
    while rounds_reported() < KILL_AFTER:
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    (before,) = optuna.load_study(study_name="killed", storage=storage).trials
    assert before.state == optuna.trial.TrialState.RUNNING and rounds_used(before) < KILLED_BUDGET
    resumed = subprocess.run([*killed_command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert straight.wait(timeout=300) == 0

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = {}
    for study_name in ("straight", "killed"):
        (trial,) = optuna.load_study(study_name=study_name, storage=storage).trials
        stored = load_state(trial.user_attrs[CHECKPOINT_ATTR])
        runs[study_name] = (trial, stored, pickle.loads(stored["record"].numpy().tobytes()))
    (trial, stored, record), (alike, alike_stored, alike_record) = runs["killed"], runs["straight"]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.values == alike.values
    assert torch.equal(stored["weights"], alike_stored["weights"]) and stored["round"] == KILLED_BUDGET
    assert same(record["trajectory"], alike_record["trajectory"])  # the tuner's distribution, round by round
    assert trial.user_attrs.get("chosen") == alike.user_attrs.get("chosen")
    assert trial.intermediate_values == alike.intermediate_values
    # Every round's score logged, the same as straight through (a round trained again after the kill
    # logs its value twice: the same value).
    scores = scores_by_round(client, trial.user_attrs[RUN_ATTR])
    alike_scores = scores_by_round(client, alike.user_attrs[RUN_ATTR])
    assert sorted(scores) == list(range(1, KILLED_BUDGET + 1)) and scores == alike_scores
    assert rounds_used(trial) == trial.user_attrs[TRAINED_ATTR] == KILLED_BUDGET
