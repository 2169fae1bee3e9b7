"""Fault injection: every way a command can end (bad input, interrupt, kill, failure mid-run,
arithmetic out of range) ends well: one line, the right exit status, within seconds, and stores
that agree with each other and with the work done. Real processes, real signals, real stores."""

import datetime
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import mlflow
import optuna
import pytest

from cli.main import main
from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, Federation, RoundSteps
from fedhpo_core.partition import partition_dataset
from fedhpo_core.registry import method as method_named
from fedhpo_core.search.base import RUN_ATTR, recorded_result, rounds_used
from fedhpo_core.search.halving import plan_cost, plan_rungs
from fedhpo_core.search.study import FINAL_ATTR, TuneSettings, check_study, open_study, study_definition
from fedhpo_core.settings import SettingsError, TrainSettings
from fedhpo_core.stores import check_sqlite
from fedhpo_core.tracking import PROCESS_TAG, close_orphaned_runs, process_identity
from fedhpo_core.tuners import FixedConfig

FEDHPO = str(Path(sys.executable).with_name("fedhpo"))
SMALL = ["--clients", "3", "--final-rounds", "0"]
ENDS_WITHIN_S = 30  # a bound on hanging (the issue saw minutes), not a speed measurement


def one_line_exit(capsys, command: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1, error
    assert error.startswith(f"fedhpo {command[0]}: error: "), error
    return error


# 5, 7: out-of-range and non-finite values.

FLOAT_SETTINGS = [f.name for f in fields(TrainSettings) if f.type in (float, float | None)]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_every_float_setting_refuses_non_finite_values(name, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = one_line_exit(capsys, ["train", f"--{name.replace('_', '-')}={value}"])
    assert f"{name} must be a finite number" in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("engine", ["cohort", "sequential"])
def test_values_beyond_float32_diverge_instead_of_crashing(engine):
    """lr 1e308 is finite for Python but inf for the float32 weights: whatever setting carries it,
    through whichever aggregator, the run ends as a diverged result (tau, which would freeze the
    model instead, is bounded by 1: tests/test_bounds.py)."""
    dataset = load_dataset("digits", "unused")
    data = FederatedData.build(dataset, partition_dataset(dataset.y_train.numpy(), 3, "iid", 0, 0.1, 0.1), "mlp")
    for aggregator in ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"):
        for name in ("lr", "weight_decay", "mu", "server_lr"):
            settings = replace(TrainSettings(clients=3, aggregator=aggregator), **{name: sys.float_info.max})
            result = Federation(data, settings.server, 1.0, 0).run(
                FixedConfig(settings.client_config), 2, RoundSteps(engine)
            )
            assert result.diverged, (aggregator, name)


def test_a_study_goes_on_past_a_diverging_configuration_and_both_stores_agree(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: categorical, choices: [0.05, 1.0e+308]}\n")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [FEDHPO, "tune", "--method", "grid", "--budget", "4", "--n-configs", "2", "--search-space", str(space)]
    command += [*SMALL, "--storage", storage, "--study-name", "diverging", "--experiment", "diverging"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "diverged at round 1 -> val score 0.0000" in done.stdout + done.stderr
    study = optuna.load_study(study_name="diverging", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("diverging").experiment_id], "tags.`fedhpo.role`='trial'")
    for run in runs:
        trial = study.trials[int(run.data.tags["fedhpo.trial"])]
        assert run.data.metrics["score"] == trial.value
        assert run.data.metrics["diverged"] == float(trial.params["lr"] > 1)
    assert min(t.value for t in study.trials) == 0.0 < max(t.value for t in study.trials)


# 6, 12: search spaces checked against the settings' own ranges.

SPACES = {
    "momentum: {type: float, low: 0.5, high: 2.0}\n": "search space entry 'momentum': momentum must be in [0, 1)",
    "lr: {type: float, low: 0.001, high: .inf, log: true}\n": "lr must be a finite number",
    "local_epochs: {type: float, low: 1, high: 3}\n": "local_epochs takes integers",
    "participation: {type: categorical, choices: [0.5, 2]}\n": "participation must be in (0, 1]",
    "server_lr: {type: float, low: 0.0, high: 1.0}\n": "server_lr must be > 0",
    "- lr\n- weight_decay\n": "the search space must map settings to domains",
}


@pytest.mark.parametrize("text", sorted(SPACES))
def test_search_space_bounds_are_checked_before_any_round(text, capsys, tmp_path, monkeypatch):
    (tmp_path / "space.yaml").write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    error = one_line_exit(capsys, ["tune", "--method", "random", "--search-space", str(tmp_path / "space.yaml")])
    assert SPACES[text] in error
    assert list(work.iterdir()) == []


# 9: unusable stores, told in one line within seconds.


def unusable_stores(tmp_path: Path) -> dict[str, tuple[str, list[str], str]]:
    """case -> (MLFLOW_TRACKING_URI, extra flags, message)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    fine = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    return {
        "tracking store under a file": (f"sqlite:///{a_file}/mlflow.db", [], "is not a folder"),
        "file store that is a file": (str(a_file), [], "a file store is a folder"),
        "unknown scheme": ("foo://somewhere", [], "unknown scheme 'foo'"),
        "location that cannot be written": ("sqlite:////proc/fedhpo/mlflow.db", [], "cannot write in /proc"),
        "tracking server that does not answer": ("http://127.0.0.1:9", [], "the tracking server does not answer"),
        "malformed storage": (fine, ["--storage", "optuna.db"], "is not a database URL"),
        "storage in a missing folder": (fine, ["--storage", f"sqlite:///{tmp_path}/missing/o.db"], "does not exist"),
        "corrupted storage": (fine, ["--storage", f"sqlite:///{corrupt}"], "is not a readable SQLite database"),
        "storage server that does not answer": (fine, ["--storage", "postgresql://u@127.0.0.1:9/x"], "cannot use"),
    }


@pytest.mark.parametrize("case", sorted(unusable_stores(Path("/tmp"))))
def test_unusable_stores_fail_fast_with_one_line(case, capsys, tmp_path, monkeypatch):
    uri, flags, message = unusable_stores(tmp_path)[case]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    error = one_line_exit(capsys, ["tune", *flags])
    assert message in error and time.monotonic() - started < ENDS_WITHIN_S
    assert list(work.iterdir()) == []


# 8: a study continues only with the settings it was created with.


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "tpe"], "was created with other settings (--method random)"),
        (["--budget", "24"], "(--budget 12)"),
        (["--lr", "0.1"], "(--lr 0.05)"),
        (["--method", "multiobjective"], "has one objective; MultiObjectiveSearch cannot continue it"),
    ],
)
def test_resume_refuses_other_settings_and_says_which(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tune, fixed = TuneSettings(method="random", budget=12, n_configs=4), TrainSettings(partition="iid")
    open_study(method_named("random").build(), storage, "made", False, definition=study_definition(tune, fixed))
    base = ["--method", "random", "--budget", "12", "--n-configs", "4"]
    error = one_line_exit(capsys, ["tune", "--resume", "--study-name", "made", "--storage", storage, *base, *flags])
    assert message in error
    check_study(
        storage, "made", method_named("random").build(), study_definition(tune, fixed), True, False
    )  # the same: fine
    with pytest.raises(SettingsError, match="exists"):
        check_study(storage, "made", method_named("random").build(), study_definition(tune, fixed), False, False)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "random,random"], "methods repeat a value: random,random"),
        (["--seeds", "0,0"], "seeds repeat a value"),
        (["--seeds", "1,-1"], "seed must be >= 0, got -1"),
        (["--seed", "-1"], "seed must be >= 0, got -1"),
        (["--final-rounds", "0"], "a comparison needs final_rounds >= 1"),
    ],
)
def test_compare_refuses_repeats_and_negative_seeds(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in one_line_exit(capsys, ["compare", *flags])
    assert list(tmp_path.iterdir()) == []


# 12: data errors say what they are and leave nothing behind.


def test_a_failed_dataset_load_creates_no_folders_and_a_truncated_file_is_not_a_download(tmp_path, shared_data):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="could not be downloaded"):
        load_dataset("fashion_mnist", str(missing))
    assert not missing.exists()

    raw = tmp_path / "truncated" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in (Path(shared_data) / "MNIST" / "raw").glob("*-ubyte"):
        data = source.read_bytes()
        (raw / source.name).write_bytes(data[: len(data) // 2] if source.name.startswith("train-images") else data)
    with pytest.raises(FileNotFoundError, match=r"does not read \(truncated or corrupt\?\)"):
        load_dataset("mnist", str(tmp_path / "truncated"))


# 1, 3, 4: interrupts and kills.


def trial_lines(path: Path) -> int:
    return sum(" - trial " in line and "rounds ->" in line for line in path.read_text(errors="replace").splitlines())


def wait_for(condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def check_stores_agree(
    study: optuna.Study, client: mlflow.MlflowClient, experiment: str, keeps_asked: bool = False
) -> dict:
    """Every finished trial has one FINISHED run with the score it was told; every failed one a
    KILLED run; nothing is RUNNING (but, where the method keeps the trials it asked for, one an
    interrupt left asked for and untrained, without a run). Returns {trial number: rounds its run
    trained}."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "tags.`fedhpo.role`='trial'")
    running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert not [t for t in running if not keeps_asked or recorded_result(t) or RUN_ATTR in t.user_attrs]
    trained = {}
    for run in runs:
        trial = study.trials[int(run.data.tags["fedhpo.trial"])]
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert run.info.status == "FINISHED" and run.data.metrics["score"] == trial.values[0]
            assert trial.number not in trained  # trained once
            trained[trial.number] = int(run.data.metrics["rounds_used"])
        elif trial.state == optuna.trial.TrialState.PRUNED:
            assert run.info.status == "FINISHED" and trial.number not in trained
            trained[trial.number] = int(run.data.metrics["rounds_used"])
        else:
            assert trial.state == optuna.trial.TrialState.FAIL and run.info.status == "KILLED", run.info
    return trained


@pytest.mark.parametrize(
    "sent, method, workers",
    [(signal.SIGINT, "random", 1), (signal.SIGINT, "random", 2), (signal.SIGTERM, "pbt", 1)],
)
def test_an_interrupted_study_ends_in_seconds_and_resumes_charging_what_it_trained(sent, method, workers, tmp_path):
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [FEDHPO, "tune", "--method", method, "--budget", "30", "--n-configs", "10", "--workers", str(workers)]
    command += [*SMALL, "--storage", storage, "--study-name", "stopped", "--experiment", "stopped"]
    log = tmp_path / "log.txt"
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
        wait_for(lambda: trial_lines(log) >= 3)
        os.kill(process.pid, sent)  # as a terminal's Ctrl-C, or a supervisor's SIGTERM
        signalled = time.monotonic()
        process.wait(timeout=120)
    took = time.monotonic() - signalled
    text = log.read_text()
    assert process.returncode == 128 + sent and took < ENDS_WITHIN_S, (took, text[-3000:])
    assert text.rstrip().splitlines()[-1].startswith("fedhpo tune: interrupted; ") and "Traceback" not in text

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    study = optuna.load_study(study_name="stopped", storage=storage)
    before = check_stores_agree(study, client, "stopped", keeps_asked=method_named(method).search.keeps_asked_trials)
    assert len(before) >= 3
    parent = client.search_runs([client.get_experiment_by_name("stopped").experiment_id], "tags.`fedhpo.role`='study'")
    assert [r.info.status for r in parent] == ["KILLED"]

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name="stopped", storage=storage)
    after = check_stores_agree(study, client, "stopped")
    assert {n: after[n] for n in before} == before  # nothing finished was lost or trained again
    charged = sum(t.user_attrs["rounds_used"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert charged == sum(after.values()) <= 30


# (method, budget, n_configs, trainings finished before the kill): mid-bracket for sha (9 trainings
# in its first rung, 3 in its second) and hyperband, mid-generation for pbt (4 members a generation).
MID_WAY = {"sha": (60, 9, 10), "hyperband": (90, 9, 10), "pbt": (24, 4, 6)}


@pytest.mark.parametrize("method", MID_WAY)
def test_a_study_killed_mid_bracket_or_generation_resumes_from_its_checkpoints(method, tmp_path):
    budget, n_configs, finished = MID_WAY[method]
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [FEDHPO, "tune", "--method", method, "--budget", str(budget), "--n-configs", str(n_configs), *SMALL]
    command += ["--storage", storage, "--study-name", "midway", "--experiment", "midway"]
    log = tmp_path / "log.txt"
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(lambda: trial_lines(log) >= finished)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before = optuna.load_study(study_name="midway", storage=storage).trials
    # A FAIL trial (killed between its start and its record) has no rounds_used.
    kept = {t.number: (t.params, t.state, t.user_attrs.get("rounds_used")) for t in before if t.state.is_finished()}
    # A RUNNING trial with a recorded result paused between rungs (or was killed right after its
    # record, before the result's parts were written as attributes of their own): its rounds are
    # the recorded result's.
    paused = {t.number: rounds_used(t) for t in before if t.state.name == "RUNNING" and recorded_result(t)}
    if method != "pbt":
        assert paused  # surviving configurations between rungs

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name="midway", storage=storage)
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    trained = check_stores_agree(study, client, "midway")  # nothing RUNNING, each run once
    for number, (params, state, rounds) in kept.items():  # nothing finished lost or trained again
        trial = study.trials[number]
        assert (trial.params, trial.state, trial.user_attrs.get("rounds_used")) == (params, state, rounds)
    for number, rounds in paused.items():  # the survivors went on from where they stood
        assert study.trials[number].state.is_finished() and trained[number] >= rounds
        run_id = study.trials[number].user_attrs["mlflow_run_id"]
        steps = {m.step for m in client.get_metric_history(run_id, "val_acc")}
        first = 1 if method != "pbt" else study.trials[number].user_attrs["generation"] * 2 + 1  # from a parent
        assert steps == set(range(first, first + trained[number]))  # one run, its rounds numbered on
    charged = sum(t.user_attrs.get("rounds_used", 0) for t in study.trials)  # a FAIL: killed before its record
    assert charged == sum(trained.values()) <= budget
    if method == "sha":  # no configuration was added: the bracket's own finished, at its planned cost
        assert len(study.trials) == n_configs and charged == plan_cost(plan_rungs(n_configs, budget))
    if method == "pbt":
        generations = [t.user_attrs["generation"] for t in study.trials if t.state.name == "COMPLETE"]
        assert sorted(generations) == sorted(list(range(budget // 8)) * 4)
        for trial in study.trials:
            if trial.state.name == "COMPLETE" and trial.user_attrs["generation"]:
                parent = study.trials[trial.user_attrs["parent_trial"]]
                assert parent.user_attrs["generation"] == trial.user_attrs["generation"] - 1


def test_a_trial_killed_after_training_is_told_its_recorded_score_not_trained_again(tmp_path):
    """Planted: a finished study whose last trial is put back as a killed process leaves it after
    its training (the result recorded, Optuna not told, the MLflow run RUNNING for a dead pid), and
    the study as it stood then (not yet marked finished by its final training)."""
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [FEDHPO, "tune", "--method", "random", "--budget", "12", "--n-configs", "4", *SMALL]
    command += ["--storage", storage, "--study-name", "planted", "--experiment", "planted"]
    assert subprocess.run(command, cwd=tmp_path, env=env, capture_output=True).returncode == 0
    last = optuna.load_study(study_name="planted", storage=storage).trials[-1]
    with sqlite3.connect(tmp_path / "optuna.db") as db:
        db.execute("update trials set state='RUNNING', datetime_complete=null where trial_id=?", (last._trial_id,))
        db.execute("delete from trial_values where trial_id=?", (last._trial_id,))
        db.execute("delete from trial_user_attributes where trial_id=? and key!='result'", (last._trial_id,))
        db.execute("delete from study_user_attributes where key=?", (FINAL_ATTR,))
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("planted").experiment_id
    (run,) = client.search_runs([experiment], f"tags.`fedhpo.trial`='{last.number}'")
    dead = subprocess.Popen(["true"])
    dead.wait()
    client.set_tag(run.info.run_id, PROCESS_TAG, f"{socket.gethostname()}:{dead.pid}:0")
    client.update_run(run.info.run_id, "RUNNING")

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name="planted", storage=storage)
    assert len(study.trials) == 4 and study.trials[-1].value == last.value
    trained = check_stores_agree(study, client, "planted")
    assert sum(trained.values()) == 12 == sum(t.user_attrs["rounds_used"] for t in study.trials)
    assert client.get_run(run.info.run_id).data.tags["fedhpo.orphaned"] == "true"


def test_runs_of_dead_processes_end_killed_and_runs_of_live_ones_are_left(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("orphans")
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = process_identity(os.getpid())
    reused = live.rsplit(":", 1)[0] + ":1"  # this pid, another start time: a pid the kernel gave again
    identities = {"live": live, "dead": f"{socket.gethostname()}:{dead.pid}:0", "reused": reused}
    identities["other machine"] = f"elsewhere:{dead.pid}:0"
    runs = {k: client.create_run(experiment, tags={PROCESS_TAG: v}).info.run_id for k, v in identities.items()}
    assert sorted(close_orphaned_runs(client)) == sorted([runs["dead"], runs["reused"]])
    status = {k: client.get_run(r).info.status for k, r in runs.items()}
    assert status == {"live": "RUNNING", "dead": "KILLED", "reused": "KILLED", "other machine": "RUNNING"}


# 2: a failure mid-run.


def test_a_run_whose_prefect_server_goes_away_ends_within_seconds_of_the_error_with_one_line(tmp_path):
    """Training goes on without the server (task-run states travel as events); the flow fails where
    it must write to the API, and then nothing is retried against the server that is gone."""
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
    }
    log = tmp_path / "log.txt"
    command = [FEDHPO, "train", "--rounds", "100", "--clients", "3", "--experiment", "gone"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
        wait_for(lambda: "round 10/100" in log.read_text())
        subprocess.run([FEDHPO, "server", "stop"], env=env, capture_output=True, timeout=60)
        process.wait(timeout=600)
    ended = datetime.datetime.now()
    text = log.read_text()
    lines = text.rstrip().splitlines()
    assert process.returncode == 1 and lines[-1].startswith("fedhpo train: failed: "), lines[-10:]
    assert "Traceback" not in text
    (failed,) = re.findall(r"(\d\d:\d\d:\d\d\.\d{3}) \| ERROR .* Encountered exception during execution", text)
    at = datetime.datetime.combine(ended.date(), datetime.time.fromisoformat(failed))
    assert (ended - at).total_seconds() < ENDS_WITHIN_S, (failed, ended)
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("gone").experiment_id])
    assert run.info.status in ("FINISHED", "FAILED")  # as far as training got; never left RUNNING


KILLED_MID_TRANSACTION = """
import os, signal, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("pragma cache_size=1")  # the transaction spills to the file: a hot journal is left
db.execute("begin")
for _ in range(2000):
    db.execute("insert into runs values (?)", ("x" * 500,))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_store_whose_writer_was_killed_mid_transaction_is_accepted_and_rolled_back(tmp_path):
    """Seen in CI: a study SIGKILLed while MLflow wrote left a hot journal, and the check before
    `--resume` refused the store as unreadable (a read-only look cannot roll a journal back)."""
    store = tmp_path / "mlflow.db"
    with sqlite3.connect(store) as db:
        db.execute("create table runs (value text)")
        db.execute("insert into runs values ('committed')")
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_TRANSACTION, str(store)], check=False)
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "mlflow.db-journal").exists()
    check_sqlite(store, "MLflow tracking store")
    assert not (tmp_path / "mlflow.db-journal").exists()
    with sqlite3.connect(store) as db:
        assert db.execute("select value from runs").fetchall() == [("committed",)]
