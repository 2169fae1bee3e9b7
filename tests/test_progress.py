"""Progress: a live bar below the log in a terminal (real `fedhpo train` under a pseudo-terminal),
plain log lines through a pipe, and the bar's and a study's counters on their own."""

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import subprocess
import termios
import threading
import time

import optuna
import pytest
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress
from test_startup import FEDHPO, SMALL

from cli import progress
from cli.progress import Bar, StudyProgress, live_bar
from fedhpo_core.cost import Cost
from fedhpo_core.search.base import Budget

TRAIN = ["train", "--dataset", "digits", "--rounds", "3", *SMALL]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def command_env(tmp_path) -> dict:
    """A fresh MLflow store, an ordinary terminal type, and none of rich's overrides."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")}
    return env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "TERM": "xterm-256color"}


def run_in_terminal(args: list[str], cwd, env: dict, timeout: float = 300) -> tuple[int, str]:
    """Run `fedhpo` with a pseudo-terminal, 160 columns wide, as its standard streams; its exit
    status and everything it wrote."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(
        [FEDHPO, *args], stdin=follower, stdout=follower, stderr=follower, cwd=cwd, env=env, start_new_session=True
    )
    os.close(follower)
    output, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1)[0]:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 1 << 16)
            except OSError:  # EIO: every writer closed the terminal
                break
            output += chunk
        return process.wait(timeout=max(1, deadline - time.monotonic())), output.decode(errors="replace")
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()


def test_train_in_a_terminal_draws_a_bar_below_its_log_lines(tmp_path):
    code, output = run_in_terminal(TRAIN, tmp_path, command_env(tmp_path))
    assert code == 0, output[-3000:]
    assert "\r\x1b[2K" in output  # the bar is redrawn in place
    frames = [ANSI.sub("", part) for part in output.split("\r")]
    bars = [f for f in frames if re.search(r"\d/3 rounds · \d+:\d\d:\d\d elapsed · ETA", f)]
    assert any("3/3 rounds" in f for f in bars), output[-3000:]
    assert any(re.search(r"ETA \d+:\d\d:\d\d", f) for f in bars), output[-3000:]
    # What the terminal shows: each line as its last redraw left it. Each round's log line stands
    # on a line of its own, the bar erased before it and drawn again below it.
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in ANSI.sub("", output).split("\n")]
    for k in (1, 2, 3):
        [line] = [line for line in shown if f"round {k}/3:" in line]
        assert "rounds ·" not in line and "Flow run" in line, line
    assert "Trained 3 rounds" in output.rsplit("\x1b[?25h", 1)[-1]  # the summary after the bar is gone


def test_train_through_a_pipe_logs_plain_lines(tmp_path):
    done = subprocess.run(
        [FEDHPO, *TRAIN], cwd=tmp_path, env=command_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert all(f"round {k}/3: train_loss" in output for k in (1, 2, 3)), output
    assert not any(mark in output for mark in ("\r", "\x1b[", "━", "ETA")), output


def terminal() -> Progress:
    console = Console(file=io.StringIO(), force_terminal=True, width=160, color_system=None)
    return Progress(MofNCompleteColumn(), console=console, auto_refresh=False)


def test_the_first_plan_sets_the_totals_and_counters_add_up():
    bar = Bar(terminal())
    bar.plan(90, trials=0, studies=3)  # a comparison's
    bar.plan(30, done=12, trials=5)  # a study it runs: ignored
    bar.advance(28)
    bar.drop(2)  # the study ended under its budget
    bar.advance(trials=4, studies=1)
    [task] = bar.progress.tasks
    assert (task.completed, task.total) == (28, 88)
    assert task.fields["counts"] == " · 4 trials · 1/3 studies"


def test_a_bar_without_a_terminal_counts_nothing():
    bar = Bar()
    bar.plan(10, trials=0)
    bar.advance(1, trials=1)
    bar.drop(1)
    assert bar.task is None


def test_live_bar_draws_only_on_a_terminal(monkeypatch):
    piped = Console(file=io.StringIO(), width=160)
    monkeypatch.setattr(progress, "log_console", lambda: piped)
    with live_bar() as bar:
        bar.plan(3)
        assert bar.progress is None
    assert piped.file.getvalue() == ""


def test_a_log_line_prints_above_the_bar_and_the_bar_goes_when_the_block_fails(monkeypatch):
    """Through Prefect's console handler, as a command's log lines are."""
    from prefect.logging.handlers import PrefectConsoleHandler

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    handler = PrefectConsoleHandler(stream=Terminal())
    monkeypatch.setattr(progress, "log_console", lambda: handler.console)
    with pytest.raises(KeyboardInterrupt), live_bar() as bar:
        bar.plan(20)
        bar.advance(7)
        handler.emit(logging.makeLogRecord({"msg": "round 7/20"}))
        raise KeyboardInterrupt
    assert progress.bar() is not bar and progress.bar().progress is None
    written = ANSI.sub("", handler.stream.getvalue())
    assert re.search(r"\rround 7/20\n[^\r]*/20 rounds", written)  # the bar erased, the line, the bar below it
    assert handler.stream.getvalue().endswith("\x1b[1A\x1b[2K")  # and erased at the end


def fake_artifacts(monkeypatch) -> list[float]:
    updates = []
    monkeypatch.setattr(progress, "create_progress_artifact", lambda percent, description: "artifact")
    monkeypatch.setattr(progress, "update_progress_artifact", lambda artifact, percent: updates.append(percent))
    return updates


def test_study_progress_counts_rounds_from_threads_and_trials_in_the_log(monkeypatch):
    updates = fake_artifacts(monkeypatch)
    bar = Bar(terminal())
    monkeypatch.setattr(progress, "_bar", bar)
    study_progress = StudyProgress(optuna.create_study(), Budget(60))
    one = Cost(rounds=1, client_updates=10)
    threads = [threading.Thread(target=lambda: [study_progress.round(one) for _ in range(9)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert study_progress.trial() == "[1 trials, 36/60 rounds]"
    study_progress.finish(36)
    assert updates[-1] == 60.0
    [task] = bar.progress.tasks
    assert (task.completed, task.total, task.fields["counts"]) == (36, 36, " · 1 trials")
    assert task.fields["unit"] == "rounds"


def test_study_progress_counts_the_budget_in_its_unit(monkeypatch):
    """A round on a fifth of the clients spends a fifth of a full round's client updates."""
    updates = fake_artifacts(monkeypatch)
    bar = Bar(terminal())
    monkeypatch.setattr(progress, "_bar", bar)
    study_progress = StudyProgress(optuna.create_study(), Budget(600, "client-updates", round_cost=10))
    for _ in range(5):
        study_progress.round(Cost(rounds=1, client_updates=2))
    study_progress.round(Cost(rounds=1, client_updates=10))
    assert study_progress.trial() == "[1 trials, 20/600 client-updates]"
    [task] = bar.progress.tasks
    assert (task.completed, task.total, task.fields["unit"]) == (20, 600, "client-updates")
    study_progress.finish(582)
    assert updates[-1] == 97.0
