"""The user's background processes (warm runners, local Prefect servers): how many there are, what
starts one, how they end, and `fedhpo server status` and `fedhpo server stop`, with real processes.

Each test's `fedhpo` processes have a temp dir of their own, hence a user folder of their own
(`cli.user_state`): they neither see nor stop the machine's runners and servers, nor the test
session's."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli import background, warm
from cli.user_state import is_running, started_at

FEDHPO = str(Path(sys.executable).with_name("fedhpo"))


@dataclass
class User:
    env: dict
    temp: Path  # their TMPDIR
    folder: Path  # their user folder, under it
    cwd: Path

    def run(self, *args: str, python: str | None = None, **env: str) -> subprocess.CompletedProcess:
        """A `fedhpo` command (through `python` as the interpreter if given), to its end."""
        command = [python, "-c", "from cli.warm import main; main()", *args] if python else [FEDHPO, *args]
        return subprocess.run(command, env=self.env | env, cwd=self.cwd, capture_output=True, text=True, timeout=300)

    def processes(self) -> list[int]:
        """The live processes (not zombies) started with this user's temp dir: runners, servers,
        watchdogs, commands."""
        mark = f"TMPDIR={self.temp}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            try:
                environment = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if mark in environment and started_at(int(entry.name)) is not None:
                found.append(int(entry.name))
        return found

    def records(self) -> list[dict]:
        """The runners and servers recorded in the user folder, as written (stale ones too)."""
        paths = [*self.folder.glob("runner-*.json"), *self.folder.glob("servers/*.json")]
        return [json.loads(path.read_text()) for path in paths if path.exists()]


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A user whose fedhpo processes are this test's alone; every one stopped after it. This process
    looks into the same user folder (`background.runners()` here lists that user's runners)."""
    temp = Path(tempfile.mkdtemp(prefix="fb-", dir="/tmp"))  # short: a socket's path has at most 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDHPO_")}
    env |= {
        "TMPDIR": str(temp),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    them = User(env, temp, temp / f"fedhpo-{os.getuid()}", tmp_path)
    try:
        yield them
    finally:
        them.run("server", "stop", "--all")
        shutil.rmtree(temp, ignore_errors=True)


def test_commands_of_ten_prefect_homes_and_of_every_spelling_of_a_path_share_one_runner(user, tmp_path):
    """The runner is one per environment and checkout, whatever PREFECT_HOME a command names, and
    however the path of the environment is spelled (a symlink, a `//`)."""
    for i in range(10):
        done = user.run("methods", PREFECT_HOME=str(tmp_path / f"home-{i}"))
        assert done.returncode == 0 and "Trial-level" in done.stdout, done.stdout + done.stderr
    [runner] = background.runners()
    (tmp_path / "link").symlink_to(tmp_path / "home-0")
    for home in (f"{tmp_path}//home-0", f"{tmp_path}/link", f"{tmp_path}/home-1/../home-0"):
        assert user.run("methods", "--help", PREFECT_HOME=home).returncode == 0
    (tmp_path / "venv").symlink_to(sys.prefix, target_is_directory=True)
    for python in (f"{tmp_path}/venv/bin/python", f"{sys.prefix}//bin/{Path(sys.executable).name}"):
        done = user.run("methods", python=python)
        assert done.returncode == 0 and "Trial-level" in done.stdout, done.stdout + done.stderr
    assert [r["pid"] for r in background.runners()] == [runner["pid"]]
    assert user.processes() == [runner["pid"]] and len(user.records()) == 1
    assert runner["checkout"] == str(warm.ROOT) and runner["environment"] == str(Path(sys.prefix).resolve())


def test_help_version_a_refused_command_and_server_status_start_nothing(user):
    """No runner answers: `--help` and `--version` are answered by the client, `server status` too;
    a refused command had to start a runner, which its client stops and waits for."""
    for args, code in [
        (["tune", "--help"], 0),
        (["--version"], 0),
        (["server", "status"], 0),
        (["train", "--rounds", "-1"], 2),  # refused in the runner it started: the runner is stopped after it
    ]:
        done = user.run(*args)
        assert done.returncode == code, done.stdout + done.stderr
        assert user.processes() == [] and user.records() == [], args
    assert "rounds must be >= 1" in done.stderr
    assert user.run("server", "status").stdout.splitlines() == [
        "No local Prefect server is running.",
        "No warm runner or local Prefect server of yours is running.",
    ]


def test_an_idle_runner_exits_on_its_own_and_the_next_command_starts_another(user):
    idle = {"FEDHPO_RUNNER_IDLE_S": "2"}
    assert user.run("methods", **idle).returncode == 0
    [first] = background.runners()
    assert first["idle_exit_s"] == 2
    deadline = time.monotonic() + 30
    while is_running(first["pid"], first["started"], first["command"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not is_running(first["pid"], first["started"], first["command"]) and user.records() == []
    assert user.run("methods", **idle).returncode == 0
    [second] = background.runners()
    assert second["pid"] != first["pid"]


def test_server_stop_all_returns_once_every_listed_process_exited(user, tmp_path):
    """One runner serves two PREFECT_HOMEs, each command with its own (each home gets its own
    server); `server status` lists the three; `server stop --all` returns once all are gone."""
    homes = [tmp_path / "one", tmp_path / "two"]
    for home in homes:
        done = user.run("server", "start", PREFECT_HOME=str(home))
        assert done.returncode == 0 and "Local Prefect server at http://127.0.0.1:" in done.stdout, done.stderr
        assert (home / "fedhpo-server.log").exists()
    status = user.run("server", "status", PREFECT_HOME=str(homes[0])).stdout.splitlines()
    rows = {line.split()[-1]: line.split() for line in status[2:]}
    assert status[0].startswith("Local Prefect server at http://127.0.0.1:"), status
    assert sorted(rows) == sorted([str(warm.ROOT), *map(str, homes)]), status
    assert [row[0] for row in rows.values()].count("runner") == 1
    assert all(re.fullmatch(r"\d+ MB", f"{row[2]} {row[3]}") for row in rows.values()), status

    servers = [record for record in user.records() if "watchdog_pid" in record]
    listed = [(r["pid"], r["started"], r["command"]) for r in background.runners()]
    listed += [(s["pid"], s["started"], s["command"]) for s in servers]
    listed += [(s["watchdog_pid"], s["watchdog_started"], s["watchdog_command"]) for s in servers]
    assert len(listed) == 5 and {pid for pid, *_ in listed} <= set(user.processes())
    stopped = user.run("server", "stop", "--all")
    assert [not is_running(*identity) for identity in listed] == [True] * len(listed)
    assert user.processes() == [] and user.records() == []
    lines = stopped.stdout.splitlines()
    assert len(lines) == 3 and sum(line.startswith("Stopped the local Prefect server") for line in lines) == 2
    assert lines[-1].startswith("Stopped the warm runner"), lines


# A runner that takes its SIGTERM as a real one with a command running does: it records that it
# finishes that command, and goes on with it.
BUSY_RUNNER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    from cli import warm
    from cli.user_state import command_line, started_at

    record = {"pid": os.getpid(), "started": started_at(os.getpid()), "command": command_line(os.getpid()),
              "checkout": "/busy", "socket": sys.argv[1],
              "state": "listening", "commands": 1, "last_used": time.time()}
    signal.signal(signal.SIGTERM, lambda *_: warm.write_record(record | {"state": "finishing"}))
    warm.write_record(record)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_stop_says_what_a_runner_still_finishes_and_never_signals_a_process_of_another_start(user, tmp_path):
    socket = user.folder / "runner-busy.sock"
    user.folder.mkdir(mode=0o700, exist_ok=True)
    busy = subprocess.Popen([sys.executable, "-c", BUSY_RUNNER, str(socket)], stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        assert busy.stdout.readline() == "ready\n"
        (user.folder / f"runner-{bystander.pid}.json").write_text(
            json.dumps({"pid": bystander.pid, "started": started_at(bystander.pid) - 100, "socket": str(socket)})
        )
        [record] = background.runners(socket)  # the bystander's record, whose start time is not its own, is dropped
        assert record["pid"] == busy.pid and not (user.folder / f"runner-{bystander.pid}.json").exists()
        started = time.monotonic()
        assert background.stop_runners([record]) == [
            f"The warm runner (pid {busy.pid}, /busy) finishes 1 command, then exits."
        ]
        assert time.monotonic() - started < 5 and busy.poll() is None and bystander.poll() is None
    finally:
        busy.kill()
        bystander.kill()
        busy.wait()
        bystander.wait()
    assert background.runners() == [] and background.stop_runners([record]) == []


def test_server_stop_leaves_alone_a_foreign_process_that_records_name_with_its_own_start_time(user):
    """Records planted in the user folder that name another program by its true pid and start time
    (a stale record whose pid was given again within the same second would look so): its command
    line is not the recorded one, so `server stop --all` neither signals nor lists it."""
    foreign = subprocess.Popen(["sleep", "120"], start_new_session=True)  # leads a group, as a server does
    try:
        pid, started = foreign.pid, started_at(foreign.pid)
        user.folder.mkdir(mode=0o700, exist_ok=True)
        (user.folder / "servers").mkdir(mode=0o700, exist_ok=True)
        runner = {"pid": pid, "started": started, "command": f"{sys.executable} -m cli.warm /x.sock 600"}
        runner |= {"socket": str(user.folder / "runner-x.sock"), "checkout": "/x", "state": "listening"}
        server = {"pid": pid, "started": started, "command": f"{sys.executable} -P -m prefect server start"}
        server |= {"watchdog_pid": pid, "watchdog_started": started, "watchdog_command": "python -m cli.local_server"}
        server |= {"url": "http://127.0.0.1:9/api", "home": "/x", "idle_s": 0}
        (user.folder / f"runner-{pid}.json").write_text(json.dumps(runner))
        (user.folder / "servers" / "planted.json").write_text(json.dumps(server))
        stopped = user.run("server", "stop", "--all")
        assert stopped.returncode == 0 and foreign.poll() is None, stopped.stdout + stopped.stderr
        assert stopped.stdout.splitlines() == ["No local Prefect server is running.", "No warm runner is running."]
        assert user.records() == []  # the planted records, which prove nothing, are dropped
    finally:
        foreign.kill()
        foreign.wait()


def test_the_idle_time_is_read_from_the_environment(monkeypatch, capsys):
    monkeypatch.delenv(warm.IDLE_VARIABLE, raising=False)
    assert warm.idle_exit_s() == warm.IDLE_EXIT_S
    monkeypatch.setenv(warm.IDLE_VARIABLE, "2.5")
    assert warm.idle_exit_s() == 2.5
    monkeypatch.setenv(warm.IDLE_VARIABLE, "soon")
    assert warm.idle_exit_s() == warm.IDLE_EXIT_S and "not a number of seconds" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "action"),
    [
        (["server", "status"], "status"),
        (["server", "stop"], "stop"),
        (["server", "stop", "--all"], "stop"),
        (["server", "--all", "stop"], "stop"),
        (["server", "start"], None),
        (["server", "stop", "--all", "--all"], None),
        (["server", "status", "--bogus"], None),
        (["train", "server", "status"], None),
    ],
)
def test_the_client_answers_server_status_and_stop_itself(argv, action):
    assert warm.answered_here(argv) == action


def test_the_address_is_one_for_every_spelling_of_the_environment(tmp_path, monkeypatch):
    (tmp_path / "venv").symlink_to(sys.prefix, target_is_directory=True)
    before = warm.address()
    for spelling in (str(tmp_path / "venv"), sys.prefix + "//", f"{sys.prefix}/../{Path(sys.prefix).name}"):
        monkeypatch.setattr(sys, "prefix", spelling)
        assert warm.address() == before, spelling
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "elsewhere"))
    assert warm.address() == before


def test_a_runner_grown_past_its_bound_stops_taking_commands_after_one_ends(monkeypatch):
    """After each command, a runner whose memory grew past MEMORY_GROWTH times its size after warming
    up stops listening (the next command starts a fresh one); its record says it is finishing."""
    folder = Path(tempfile.mkdtemp(prefix="fb-", dir="/tmp"))
    path = folder / "runner-test.sock"
    record = {"pid": os.getpid(), "started": started_at(os.getpid()), "socket": str(path), "commands": 0}
    previous = signal.getsignal(signal.SIGTERM)
    try:
        runner = warm.Runner(path, record | {"fingerprint": "ours", "state": "warming up"}, idle_s=600)
        command = subprocess.Popen(["true"])
        os.waitid(os.P_PID, command.pid, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped
        ours, theirs = socket.socketpair()
        runner.children[ours] = command.pid
        monkeypatch.setattr(warm, "memory_bytes", lambda pid: runner.rss_limit + 1)
        runner.reap()
        assert not runner.listening and not path.exists() and json.loads(theirs.recv(100)[4:]) == {"exit": 0}
        assert background.current(record) | {"last_used": 0} == runner.record | {"last_used": 0}
        assert runner.record["state"] == "finishing" and runner.record["commands"] == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(folder)
