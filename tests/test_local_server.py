"""The local Prefect server that `fedhpo` commands share (`cli.local_server`), with real servers and
real processes: it exits when idle and not before, one per PREFECT_HOME whatever its spelling, and
the user's servers are listed and stopped from any command. Each test has its own temp folder (so
its own registry of servers) and PREFECT_HOME; idle times are seconds."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from cli import local_server
from cli.user_state import started_at

_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
IMPORT_CHECK = (
    "import sys\n"
    "from pathlib import Path\n"
    "from cli import local_server\n"
    "listed = local_server.servers()\n"
    "stopped = local_server.stop(Path(sys.argv[1])), local_server.stop_all()\n"
    "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'torch', 'mlflow', 'optuna'})\n"
    "print(listed, stopped, heavy)\n"
)


@pytest.fixture
def private(tmp_path, monkeypatch):
    """A temp folder of the test's own (the registry of servers is in it), for this process and
    the processes it starts, and a PREFECT_HOME under it; servers idle after 3 s."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv(local_server.IDLE_VARIABLE, "3")
    yield tmp_path
    local_server.stop_all()  # what a failed test left


def processes(server: dict) -> list[tuple[int, float]]:
    """The server's and its watchdog's pid and start time."""
    return [(server["pid"], server["started"]), (server["watchdog_pid"], started_at(server["watchdog_pid"]))]


def gone(server: dict) -> bool:
    """Neither process runs: no process has the pid, or one started at another time."""
    now = [(started_at(pid), started) for pid, started in processes(server)]
    return all(then is None or abs(then - started) >= 2 for then, started in now)


def wait_until(condition, timeout: float) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    begun = time.monotonic()
    while not condition():
        assert time.monotonic() - begun < timeout, f"not within {timeout} s"
        time.sleep(0.2)
    return time.monotonic() - begun


def post(api: str, path: str, body: dict) -> dict:
    """The API's answer, asked again after a 503 (the server's SQLite database busy: Prefect's own
    client retries those too)."""
    request = urllib.request.Request(f"{api}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    for attempt in range(10):
        try:
            with _direct.open(request, timeout=30) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == 9:
                raise
            time.sleep(0.5)


def api_url_command(home: str) -> subprocess.Popen:
    """A command of the user's, with another PREFECT_HOME: what `fedhpo` does before a flow."""
    return subprocess.Popen(
        [sys.executable, "-c", "from cli import local_server; print(local_server.api_url())"],
        env=os.environ | {"PREFECT_HOME": home},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_an_idle_server_exits_on_its_own_and_the_next_command_starts_another(private, monkeypatch):
    url = local_server.api_url()
    [first] = local_server.servers()
    assert first["url"] + "/api" == url and first["home"] == str((private / "prefect-home").resolve())
    assert first["idle_s"] < 3 and first["memory_bytes"] > 50e6
    idle_for = wait_until(lambda: gone(first), timeout=40)
    assert idle_for > 1.5, "stopped before it was idle for 3 s"
    assert local_server.servers() == [] and local_server.status() is None
    assert not list((private / "tmp" / f"fedhpo-{os.getuid()}" / "servers").glob("*.json"))
    assert "idle for 3 s with no active flow run" in (private / "prefect-home" / "fedhpo-server.log").read_text()

    monkeypatch.setenv(local_server.IDLE_VARIABLE, "600")  # read as a server starts
    assert local_server.api_url() == local_server.status() + "/api"
    [second] = local_server.servers()
    assert second["pid"] != first["pid"] and not gone(second)
    assert local_server.stop() == second["url"] and gone(second)  # gone by the time it returns
    assert local_server.servers() == [] and local_server.stop() is None


def test_a_server_is_not_stopped_while_a_flow_run_is_active(private, monkeypatch):
    """A RUNNING flow run that starts a task every second (a round, say) holds the server for
    two idle times; once it shows no more life (still RUNNING, as a killed command leaves its
    run), the server stops after an idle time."""
    idle_s = 8  # a margin for the first requests of a new server on a busy machine (seen: 503 with 4)
    monkeypatch.setenv(local_server.IDLE_VARIABLE, str(idle_s))
    api = local_server.api_url()
    [server] = local_server.servers()
    flow = post(api, "/flows/", {"name": "planted"})
    run = post(api, "/flow_runs/", {"flow_id": flow["id"], "state": {"type": "RUNNING"}})
    held_until = time.monotonic() + 2 * idle_s
    for round_ in range(100):
        if time.monotonic() > held_until:
            break
        post(api, "/task_runs/", {"flow_run_id": run["id"], "task_key": "round", "dynamic_key": str(round_),
                                  "name": f"round-{round_}", "state": {"type": "RUNNING"}})  # fmt: skip
        time.sleep(1)
    assert not gone(server) and local_server.servers()[0]["idle_s"] < 2
    assert wait_until(lambda: gone(server), timeout=60) > idle_s / 2


def test_one_server_per_home_whatever_its_spelling_and_stop_all_waits_for_every_process(private, monkeypatch):
    monkeypatch.setenv(local_server.IDLE_VARIABLE, "600")
    (private / "a" / "prefect").mkdir(parents=True)
    (private / "link").symlink_to(private / "a")
    commands = [api_url_command(f"{private}/a//prefect"), api_url_command(f"{private}/b/prefect")]
    urls = [command.communicate(timeout=240)[0].strip().splitlines()[-1] for command in commands]
    for spelling in (f"{private}/a/./prefect", f"{private}/link/prefect", f"{private}/a/prefect/"):
        monkeypatch.setenv("PREFECT_HOME", spelling)
        assert local_server.api_url() == urls[0]
    listed = local_server.servers()
    assert sorted(server["url"] + "/api" for server in listed) == sorted(urls)
    assert sorted(server["home"] for server in listed) == [str(private.resolve() / x / "prefect") for x in "ab"]
    assert all(server["memory_bytes"] > 50e6 and 0 <= server["idle_s"] < 600 for server in listed)
    assert all(abs(server["started"] - time.time()) < 300 for server in listed)

    stopped = local_server.stop_all()
    assert sorted(server["pid"] for server in stopped) == sorted(server["pid"] for server in listed)
    assert all(gone(server) for server in listed)  # every server and watchdog, as it returns
    assert local_server.servers() == [] and local_server.stop_all() == []


def test_a_record_whose_pids_are_other_processes_is_dropped_and_nothing_is_killed(private):
    """A record left by a server long gone, its pids given to other processes since (a `sleep`
    here, leading a process group as the server did): listing drops it, stopping kills nothing.
    Listing and stopping import neither Prefect nor torch."""
    home = private / "prefect-home"
    others = [subprocess.Popen(["sleep", "300"], start_new_session=True) for _ in range(2)]
    try:
        record = {
            "pid": others[0].pid,
            "started": started_at(others[0].pid) - 1000,
            "watchdog_pid": others[1].pid,
            "watchdog_started": started_at(others[1].pid) - 1000,
            "url": "http://127.0.0.1:1",
            "home": str(home.resolve()),
            "idle_s": 3,
        }
        path = local_server.registry_path(home.resolve(), ".json")
        path.write_text(json.dumps(record))
        assert local_server.stop(home) is None and not path.exists()
        path.write_text(json.dumps(record))
        checked = subprocess.run(
            [sys.executable, "-c", IMPORT_CHECK, str(home)], capture_output=True, text=True, timeout=60
        )
        assert checked.stdout.strip() == "[] (None, []) []", checked.stdout + checked.stderr
        assert not path.exists()
        assert all(other.poll() is None for other in others)
    finally:
        for other in others:
            other.kill()
            other.wait()


def test_a_server_whose_watchdog_is_killed_exits_too(private, monkeypatch):
    """No server runs unwatched: killed by SIGKILL, the watchdog cannot stop it, the kernel does."""
    monkeypatch.setenv(local_server.IDLE_VARIABLE, "600")
    local_server.api_url()
    [server] = local_server.servers()
    os.kill(server["watchdog_pid"], signal.SIGKILL)
    wait_until(lambda: gone(server), timeout=30)
    assert local_server.servers() == [] and local_server.stop() is None


def test_the_home_is_prefects_and_prefect_is_imported_only_where_a_file_may_set_it(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))  # Prefect's default home and profiles are under it
    monkeypatch.chdir(tmp_path)
    ours = "from cli import local_server; import sys; print(local_server.prefect_home(), 'prefect' in sys.modules)"
    prefects = "from prefect.settings import get_current_settings as s; print(s().home.expanduser().resolve())"

    def run(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()

    assert run(ours) == f"{run(prefects)} False" == f"{(tmp_path / '.prefect').resolve()} False"
    (tmp_path / "prefect.toml").write_text(f'home = "{tmp_path}//from-toml"\n')
    assert run(ours) == f"{run(prefects)} True" == f"{(tmp_path / 'from-toml').resolve()} True"


def test_the_idle_time_is_read_from_the_environment(monkeypatch, capsys):
    monkeypatch.delenv(local_server.IDLE_VARIABLE, raising=False)
    assert local_server.idle_exit_s() == local_server.IDLE_EXIT_S == 1800
    monkeypatch.setenv(local_server.IDLE_VARIABLE, "2.5")
    assert local_server.idle_exit_s() == 2.5
    monkeypatch.setenv(local_server.IDLE_VARIABLE, "soon")
    assert local_server.idle_exit_s() == 1800 and "not a number of seconds" in capsys.readouterr().err
