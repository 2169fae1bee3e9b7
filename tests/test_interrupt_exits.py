"""How an interrupted or killed command ends, with real processes and real signals: exit status
128 + the signal's number, one line that names only what exists, within seconds whatever the
command is doing (a long round of local training included), and nothing started to resume a
study that is finished."""

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from test_client import SPEC, make_client
from test_faults import ENDS_WITHIN_S, FEDHPO, trial_lines, wait_for
from test_startup import children_of

from cli import background, local_server, warm
from cli.interrupts import cooperative_interrupts
from fedhpo_core import cohort
from fedhpo_core.client import STEPS_BETWEEN_CHECKS, ClientJob, steps_interrupted_by, train_sequentially
from fedhpo_core.search.base import Interrupted
from fedhpo_core.settings import ClientConfig

SMALL = ["--clients", "3"]
TUNE = ["tune", "--method", "random", "--budget", "30", "--n-configs", "10", "--final-rounds", "0", *SMALL]
SLOW_TASK = """
import sys, time
from dataclasses import dataclass
from fedhpo_core.task import TableTask

@dataclass(frozen=True)
class Slow(TableTask):
    path: str = "slow"
    client_column: str = "band"
    target: str = "target"

    def read(self):
        print("reading the table", file=sys.stderr, flush=True)
        time.sleep(120)

slow = Slow()
"""


def start(command: list[str], tmp_path: Path, warm_runner: bool = True) -> tuple[subprocess.Popen, Path]:
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    if not warm_runner:
        env["FEDHPO_WARM"] = "0"
    log = tmp_path / "log.txt"
    with open(log, "w") as output:
        process = subprocess.Popen([FEDHPO, *command], cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
    return process, log


def signal_and_wait(process: subprocess.Popen, number: int) -> float:
    """Seconds from the signal to the command's end."""
    process.send_signal(number)
    sent = time.monotonic()
    process.wait(timeout=120)
    return time.monotonic() - sent


def our_lines(log: Path, command: str) -> list[str]:
    """The command's own lines (`fedhpo train: ...`), less Prefect's and MLflow's logging (and the
    client's, where the warm runner it shares with other tests was stopped under it)."""
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if line.startswith(f"fedhpo {command}")]


def flow_runs() -> int:
    """Flow runs the tests' local Prefect server holds."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = local_server.read_state(local_server.prefect_home())["url"] + "/api"
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        return client.count_flow_runs()


def mlflow_runs(tmp_path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        return db.execute("select run_uuid, status from runs").fetchall()


@pytest.mark.parametrize(
    "command, number, warm_runner",
    [
        ("tune", signal.SIGTERM, True),
        ("tune", signal.SIGHUP, True),
        ("tune", signal.SIGINT, True),
        ("tune", signal.SIGTERM, False),
        ("train", signal.SIGTERM, True),
        ("train", signal.SIGHUP, False),
        ("compare", signal.SIGTERM, True),
    ],
)
def test_each_signal_gives_its_exit_status_and_one_line(command, number, warm_runner, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    if command == "tune":
        flags = [*TUNE, "--storage", storage, "--study-name", "stopped", "--experiment", "stopped"]
        process, log = start(flags, tmp_path, warm_runner)
        wait_for(lambda: trial_lines(log) >= 1)
    elif command == "compare":  # as its first study's flow run begins, Prefect's own SIGTERM handler in place
        flags = ["compare", "--methods", "random,tpe", "--seeds", "0", "--budgets", "30", "--n-configs", "10", *SMALL]
        process, log = start([*flags, "--final-rounds", "1", "--experiment", "stopped"], tmp_path, warm_runner)
        wait_for(lambda: "Beginning flow run 'random" in log.read_text(errors="replace"))
    else:
        process, log = start(["train", "--rounds", "100000", *SMALL, "--experiment", "stopped"], tmp_path, warm_runner)
        wait_for(lambda: "round 2/" in log.read_text(errors="replace"))
    took = signal_and_wait(process, number)
    assert process.returncode == 128 + number and took < ENDS_WITHIN_S, (took, log.read_text()[-3000:])
    lines = our_lines(log, command)
    assert len(lines) == 1, lines
    [line] = lines
    if command == "tune":
        assert line.startswith("fedhpo tune: interrupted; what was trained is recorded in study 'stopped'"), line
        assert "--resume continues it" in line
    elif command == "compare":
        assert line.startswith("fedhpo compare: interrupted; finished studies are recorded"), line
    else:
        [(run_id, status)] = mlflow_runs(tmp_path)
        assert line == f"fedhpo train: interrupted; its MLflow run {run_id} is marked KILLED" and status == "KILLED"


@pytest.mark.parametrize("command", ["tune", "train"])
def test_an_interrupt_before_the_study_or_run_exists_names_none(command, tmp_path):
    """Interrupted while its task loads (before the flow starts): no study, no run to name."""
    (tmp_path / "slow.py").write_text(SLOW_TASK)
    flags = ["--task", "slow.py", "--experiment", "early", "--clients", "3"]
    if command == "tune":
        flags = ["tune", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--study-name", "early", *flags]
    else:
        flags = ["train", *flags]
    process, log = start(flags, tmp_path)
    wait_for(lambda: "reading the table" in log.read_text(errors="replace"), timeout=120)
    took = signal_and_wait(process, signal.SIGTERM)
    assert process.returncode == 143 and took < ENDS_WITHIN_S, (took, log.read_text()[-3000:])
    expected = {
        "tune": "fedhpo tune: interrupted; nothing was recorded (study 'early' was not created yet)",
        "train": "fedhpo train: interrupted; no MLflow run was created",
    }
    assert our_lines(log, command) == [expected[command]]
    assert not (tmp_path / "mlflow.db").exists()  # nothing created to look for a run


def test_a_round_of_many_local_epochs_is_abandoned_on_sigterm(tmp_path):
    """100 local epochs of batch 1 of one client holding all of digits' training data: about 130,000
    steps, 40 s or more in one round (3 clients' took 14 s in CI), which SIGTERM cuts short."""
    flags = ["train", "--local-epochs", "100", "--batch-size", "1", "--rounds", "1", "--clients", "1"]
    flags += ["--experiment", "long"]
    process, log = start(flags, tmp_path, warm_runner=False)
    wait_for(lambda: "Beginning flow run" in log.read_text(errors="replace"))
    time.sleep(10)  # into the round (its first step checks the request if it came earlier)
    took = signal_and_wait(process, signal.SIGTERM)
    text = log.read_text()
    assert process.returncode == 143 and took < 15, (took, text[-3000:])  # an interpreter's exit with torch: ~5 s
    assert "round 1/1" not in text  # abandoned, not finished
    [(run_id, status)] = mlflow_runs(tmp_path)
    assert our_lines(log, "train") == [f"fedhpo train: interrupted; its MLflow run {run_id} is marked KILLED"]


def test_resume_of_a_finished_study_says_so_and_starts_nothing(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    flags = ["tune", "--method", "random", "--budget", "6", "--n-configs", "2", "--final-rounds", "1", *SMALL]
    flags += ["--storage", storage, "--study-name", "done", "--experiment", "done"]
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    first = subprocess.run([FEDHPO, *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    runs, flows = mlflow_runs(tmp_path), flow_runs()
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        [(final,)] = db.execute("select run_uuid from tags where key = 'fedhpo.role' and value = 'final'").fetchall()
    started = time.monotonic()
    again = subprocess.run([FEDHPO, *flags, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and time.monotonic() - started < ENDS_WITHIN_S, again.stderr[-3000:]
    [line] = again.stdout.splitlines()
    assert line.startswith("Study 'done' is finished: best trial ") and f"final MLflow run {final}" in line, line
    assert "Traceback" not in again.stderr and flow_runs() == flows
    assert mlflow_runs(tmp_path) == runs  # no run created, none reopened


def test_a_command_whose_process_is_killed_ends_its_client_with_one_line(tmp_path):
    process, log = start(["train", "--rounds", "100000", *SMALL, "--experiment", "killed"], tmp_path)
    wait_for(lambda: "round 2/" in log.read_text(errors="replace"))
    [command] = [
        pid
        for runner in background.runners(warm.address())
        for pid in children_of(runner["pid"])
        if Path(f"/proc/{pid}/cwd").resolve() == tmp_path.resolve()  # the runner may run others' commands too
    ]
    os.kill(command, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    process.wait(timeout=60)
    assert process.returncode == 137
    assert our_lines(log, "train") == ["fedhpo train: killed by SIGKILL"]


def test_a_bare_interrupt_leaving_the_block_carries_the_signal_that_asked_for_it():
    """A search that stops asking for trials leaves by a bare `Interrupted` (SIGINT's): after a
    SIGTERM the command still ends 143, not 130."""
    with pytest.raises(Interrupted) as raised, cooperative_interrupts() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(stop.is_set, timeout=5)
        raise Interrupted
    assert raised.value.number == signal.SIGTERM


@pytest.mark.parametrize("engine", [train_sequentially, cohort.train_cohort])
def test_local_training_looks_at_the_stop_request_between_steps(engine):
    """24 samples in batches of 1 for 50 epochs: 1200 steps a client; the third look stops it."""
    looks = []

    def check():
        looks.append(1)
        if len(looks) == 3:
            raise Interrupted(signal.SIGTERM)

    jobs = [ClientJob(c, 1, ClientConfig(batch_size=1, local_epochs=50), seed=c) for c in range(2)]
    clients = [make_client(seed=c) for c in range(2)]
    with steps_interrupted_by(check), pytest.raises(Interrupted):
        engine(SPEC, SPEC.initial_weights(0), jobs, clients)
    assert len(looks) == 3
    looks.clear()
    engine(SPEC, SPEC.initial_weights(0), jobs[:1], clients[:1])  # the check is the block's only
    assert not looks and 1200 // STEPS_BETWEEN_CHECKS > 3
