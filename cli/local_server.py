"""The local Prefect server that `fedhpo` commands share: started by the first command that needs
it, in the background, reused by every later one, and stopped when it has been idle a while.

Prefect's temporary server (what a flow starts when no PREFECT_API_URL is set) took about 20 of
the 28 s of a `fedhpo train` on digits, every time: database migrations, services, UI files. A
server that outlives the command pays that once. There is one per PREFECT_HOME (normalized: a
path's spellings and symlinks are one home), on 127.0.0.1 on a free port, its database and log
(`fedhpo-server.log`) in PREFECT_HOME.

Its lifecycle: `api_url()` starts a watchdog (`python -m cli.local_server watch ...`, standard
library only, about 20 MB, a session of its own), which starts `prefect server start` as its child,
records both in the user's registry (`user_folder()/servers/<hash of the home>.json`: pids, start
times, URL, home) and polls every few seconds. Each `api_url()` marks the server used (the mtime of
`<hash>.used`); so does the watchdog while a flow run is active. Once unused for
FEDHPO_SERVER_IDLE_S seconds (default `IDLE_EXIT_S`, read when the server starts; 0 keeps it until
`fedhpo server stop`), the watchdog stops the server, removes its record and exits; the next
command starts another. It stops it and exits as well when the server dies or its record is
removed, and the server dies with it (no server runs unwatched). Starting and stopping a home's
server are serialized by a lock (`<hash>.lock`), so commands started at the same moment on a fresh
PREFECT_HOME do not race on migrating its database (the first starts the server, the others wait
for it and use it), and no command is handed a server that is being stopped. From the registry,
any command lists (`servers()`) and stops (`stop`, `stop_all`) the user's servers whatever its own
PREFECT_HOME, without importing Prefect; a recorded process is known by its pid and start time
together, so a process given the pid of one that exited is neither listed nor signalled.

A flow run is active while it is PENDING, RUNNING or CANCELLING (a process is working on it) and it
shows life: it or one of its task runs started or ended within the idle time (fedhpo's flows start
a task per round). SCHEDULED runs do not count: no worker runs them against this server
(deployments use a server of the user's own, docs/deploy.md). The second condition is there
because flow runs against this server send no heartbeats (`cli.main.local_prefect`): a command
killed by SIGKILL leaves its run RUNNING for ever, and that must not keep the server for ever.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cli.user_state import command_line, is_running, memory_bytes, seconds_setting, started_at, stat_fields, user_folder
from fedhpo_core.locking import file_lock

# Half an hour: long enough that the commands of a working session, minutes apart, find the server
# up, and that a run whose rounds take minutes shows life well within it; short enough that a
# forgotten server (about 250 MB) is gone within the half hour. Starting another costs about 20 s,
# paid at most once per half hour of idleness. 0 (or less) keeps it until `fedhpo server stop`.
IDLE_EXIT_S = 1800
IDLE_VARIABLE = "FEDHPO_SERVER_IDLE_S"
WATCH_EVERY_S = 5
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 10
POLL_S = 0.2
ACTIVE_STATES = ["PENDING", "RUNNING", "CANCELLING"]
# What the server is told besides the user's environment: no telemetry from an offline tool, and
# task-run events recorded 50 to a transaction (one each by default: on 2 cores that server work,
# beside the training, made each round a quarter slower).
SERVER_ENVIRONMENT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "50",
}
PR_SET_PDEATHSIG = 1
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 needs no proxy


def normalized(home: str | os.PathLike) -> Path:
    """One path per folder, whatever its spelling (`~`, `//`, `..`, symlinks)."""
    return Path(home).expanduser().resolve()


def prefect_home() -> Path:
    """The current PREFECT_HOME, created if missing, normalized. Prefect's settings are imported
    (a second or more) only where a file they read may set it: the environment variable takes
    precedence over them, and without it or such a file it is Prefect's default."""
    home = os.environ.get("PREFECT_HOME")
    if not home and not _home_may_be_set_in_files():
        home = "~/.prefect"
    if not home:
        from prefect.settings import get_current_settings

        home = get_current_settings().home
    home = Path(home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return normalized(home)


def _home_may_be_set_in_files() -> bool:
    """Whether one of the files Prefect's settings read besides the environment may set the home:
    the working folder's .env, prefect.toml and pyproject.toml, and the profiles."""
    profiles = os.environ.get("PREFECT_PROFILES_PATH", "~/.prefect/profiles.toml")
    marks = {".env": "PREFECT_HOME", "prefect.toml": "home", "pyproject.toml": "tool.prefect", profiles: "PREFECT_HOME"}
    for path, mark in marks.items():
        with contextlib.suppress(OSError):
            if mark in Path(path).expanduser().read_text(errors="replace"):
                return True
    return False


def idle_exit_s() -> float:
    """How long a server this command starts waits unused before it stops: FEDHPO_SERVER_IDLE_S,
    else `IDLE_EXIT_S`."""
    return seconds_setting(IDLE_VARIABLE, IDLE_EXIT_S)


def registry() -> Path:
    folder = user_folder() / "servers"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def registry_path(home: Path, suffix: str) -> Path:
    """The home's record (.json), use mark (.used) or lock (.lock) in the registry."""
    return registry() / (hashlib.sha256(str(home).encode()).hexdigest()[:16] + suffix)


def healthy(url: str) -> bool:
    try:
        with _direct.open(f"{url}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_state(home: Path) -> dict | None:
    """The recorded server of `home`, if its process still runs."""
    record = load(registry_path(normalized(home), ".json"))
    return record if record and is_running(record["pid"], record["started"], record.get("command")) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api_url() -> str:
    """The shared server's API URL, starting the server if none answers; marks it used."""
    home = prefect_home()
    with file_lock(registry_path(home, ".lock")):
        state = read_state(home)
        url = state["url"] if state and healthy(state["url"]) else start(home)
        registry_path(home, ".used").touch()
    return url + "/api"


def start(home: Path) -> str:
    """Start the server and its watchdog, detached (a session of their own: a signal to the
    command's process group leaves them running), and wait until it answers; its URL. Call with
    the home's lock held."""
    idle_s = idle_exit_s()
    _stop_locked(home)  # a recorded server that does not answer
    url = f"http://127.0.0.1:{free_port()}"
    record, log = registry_path(home, ".json"), home / "fedhpo-server.log"
    # its UI calls this server's API (by default it would call port 4200's)
    environment = SERVER_ENVIRONMENT | {"PREFECT_SERVER_UI_API_URL": f"{url}/api"} | os.environ
    # -P: not a `cli` package of the working folder's
    command = [sys.executable, "-P", "-m", "cli.local_server", "watch", str(record), str(home), url, str(idle_s)]
    with open(log, "ab") as output:
        watchdog = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=environment | {"PREFECT_HOME": str(home)},
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (record.exists() and healthy(url)):
        if watchdog.poll() is not None or time.monotonic() > deadline:
            _stop_locked(home)
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the local Prefect server did not start (log {log}):\n{tail}")
        time.sleep(POLL_S)
    return url


def stop(home: Path | None = None) -> str | None:
    """Stop the home's server (default: the current PREFECT_HOME's) and its watchdog; its URL once
    their processes are gone, None if none ran."""
    home = normalized(home) if home else prefect_home()
    with file_lock(registry_path(home, ".lock")):
        return _stop_locked(home)


def stop_all() -> list[dict]:
    """Stop every server of the user (`servers()`); those stopped, once all their processes are
    gone. A server that stopped on its own meanwhile is not among them."""
    listed = sorted(servers(), key=lambda server: server["home"])
    with contextlib.ExitStack() as locks:
        for server in listed:  # in one order, so that two `stop_all` cannot deadlock
            locks.enter_context(file_lock(registry_path(Path(server["home"]), ".lock")))
        records = [record for server in listed if (record := _live(Path(server["home"])))]
        _terminate(records)
    stopped = {record["pid"] for record in records}
    return [server for server in listed if server["pid"] in stopped]


def status() -> str | None:
    """The URL of the current PREFECT_HOME's server, if one answers."""
    state = read_state(prefect_home())
    return state["url"] if state and healthy(state["url"]) else None


def servers() -> list[dict]:
    """Every server of the user that runs: its pid and start time (seconds since the epoch), URL,
    PREFECT_HOME, seconds since it was last used or active (idle_s), and the resident memory of its
    processes and watchdog together (memory_bytes). Records of servers gone are removed."""
    found = []
    for path in sorted(registry().glob("*.json")):
        record = load(path)
        if record is None or not _alive(record):
            _remove_stale(path, record)
            continue
        try:
            used = path.with_suffix(".used").stat().st_mtime
        except FileNotFoundError:
            used = record["started"]
        watchdog = [record["watchdog_pid"]] if _watchdog_runs(record) else []
        pids = _group(record) + watchdog
        found.append(
            {
                "pid": record["pid"],
                "started": record["started"],
                "url": record["url"],
                "home": record["home"],
                "idle_s": round(max(time.time() - used, 0.0), 1),
                "memory_bytes": sum(memory_bytes(pid) or 0 for pid in pids),
                "watchdog_pid": record["watchdog_pid"],
            }
        )
    return found


def _stop_locked(home: Path) -> str | None:
    record = _live(home)
    if record is None:
        return None
    _terminate([record])
    return record["url"]


def _live(home: Path) -> dict | None:
    """The home's record if a process of it runs; a stale record is removed (call with the lock)."""
    path = registry_path(home, ".json")
    record = load(path)
    if record is not None and _alive(record):
        return record
    _remove(path)
    return None


def _remove(record: Path) -> None:
    record.unlink(missing_ok=True)
    record.with_suffix(".used").unlink(missing_ok=True)


def _remove_stale(path: Path, record: dict | None) -> None:
    """Remove a record of processes gone, unless a command holds the home's lock (it may be
    writing a new one)."""
    with open(path.with_suffix(".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        if load(path) == record:
            _remove(path)


def _group(record: dict) -> list[int]:
    """The live processes of the server's process group (it leads a session of its own); none if
    its pid is another process's now: the group it led is then empty, or the pid could not have
    been given again."""
    pid = record["pid"]
    if started_at(pid) is not None and not is_running(pid, record["started"], record.get("command")):
        return []
    members = []
    for entry in Path("/proc").iterdir():
        fields = stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields and fields[0] != "Z" and int(fields[2]) == pid:
            members.append(int(entry.name))
    return members


def _watchdog_runs(record: dict) -> bool:
    return is_running(record["watchdog_pid"], record["watchdog_started"], record.get("watchdog_command"))


def _alive(record: dict) -> bool:
    return _watchdog_runs(record) or bool(_group(record))


def _signal(records: list[dict], number: int, watchdog_first: bool) -> None:
    """Signal each recorded watchdog that is still the recorded process, and the server's group:
    with `watchdog_first`, only where the watchdog is gone (a live one stops its server itself)."""
    for record in records:
        with contextlib.suppress(ProcessLookupError):
            watched = _watchdog_runs(record)
            if watched:
                os.kill(record["watchdog_pid"], number)
            if not (watched and watchdog_first) and _group(record):
                os.killpg(record["pid"], number)


def _terminate(records: list[dict]) -> None:
    """Stop the recorded servers: SIGTERM to each watchdog (which stops its server, SIGTERM then
    SIGKILL), or to the server's group where its watchdog is gone; SIGKILL to what is left after
    the watchdog's own bound; return once all their processes are gone. Only processes whose pid
    and start time match a record are signalled. The records are removed."""
    _signal(records, signal.SIGTERM, watchdog_first=True)
    for bound_s, last in ((STOP_TIMEOUT_S + 5, False), (STOP_TIMEOUT_S, True)):
        deadline = time.monotonic() + bound_s
        while (left := [record for record in records if _alive(record)]) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if not left:
            break
        if last:
            raise RuntimeError(f"the local Prefect server (pid {left[0]['pid']}) did not stop")
        _signal(left, signal.SIGKILL, watchdog_first=False)
    for record in records:
        _remove(registry_path(Path(record["home"]), ".json"))


# The watchdog: `python -m cli.local_server watch RECORD HOME URL IDLE_S`, started by `start`.


class _Stopped(Exception):
    """A signal to the watchdog: stop the server and exit."""


def _raise_stopped(number: int, _frame) -> None:
    raise _Stopped(signal.Signals(number).name)


def _say(message: str) -> None:
    print(f"{datetime.now().isoformat(timespec='seconds')} fedhpo watchdog {os.getpid()}: {message}", flush=True)


def _die_with_parent() -> None:
    """In the server's process, before exec: SIGTERM when the watchdog dies, even by SIGKILL, so
    that no server runs unwatched."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _count(url: str, what: str, body: dict) -> int:
    request = urllib.request.Request(
        f"{url}/api/{what}/count", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with _direct.open(request, timeout=10) as response:
        return json.load(response)


def active(url: str, within_s: float) -> bool:
    """Whether a flow run is active (see the module's docstring): PENDING, RUNNING or CANCELLING,
    and it or a task run of it started or ended within the last `within_s`. A server that does not
    answer counts as active: busy (its SQLite database locked by the runs writing to it)."""
    since = (datetime.now(UTC) - timedelta(seconds=within_s)).isoformat()
    runs = {"state": {"type": {"any_": ACTIVE_STATES}}}
    try:
        return bool(
            _count(url, "flow_runs", {"flow_runs": runs | {"expected_start_time": {"after_": since}}})
            or _count(
                url,
                "task_runs",
                {
                    "flow_runs": runs,
                    "task_runs": {"operator": "or_", "start_time": {"after_": since}, "end_time": {"after_": since}},
                },
            )
        )
    except (OSError, ValueError):
        return True


def _end(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after STOP_TIMEOUT_S. The leader
    is reaped last, so that its pid (the group's id) cannot go to another process meanwhile."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not os.waitid(os.P_PID, server.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def watch(record: Path, home: Path, url: str, idle_s: float) -> None:
    """Run the server at `url` for `home` until it is idle for `idle_s` (never if 0 or less), it
    dies, its record is removed, or a signal comes; then stop it and remove its record."""
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, _raise_stopped)
    used, server = record.with_suffix(".used"), None
    try:
        used.touch()
        port = url.rsplit(":", 1)[1]
        server = subprocess.Popen(
            [sys.executable, "-P", "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        me = {"watchdog_pid": os.getpid(), "watchdog_started": started_at(os.getpid())}
        me["watchdog_command"] = command_line(os.getpid())
        state = {"pid": server.pid, "started": started_at(server.pid), "command": command_line(server.pid)}
        state |= {"url": url, "home": str(home), "idle_s": idle_s}
        record.with_suffix(".json.new").write_text(json.dumps(state | me))
        record.with_suffix(".json.new").replace(record)
        _say(f"started the server (pid {server.pid}) at {url}; it stops after {idle_s:g} s idle")
        every_s = min(WATCH_EVERY_S, max(idle_s / 4, 0.5)) if idle_s > 0 else WATCH_EVERY_S
        while server.poll() is None:
            time.sleep(every_s)
            if (load(record) or {}).get("watchdog_pid") != os.getpid():
                _say("its record is gone: stopping the server")
                return
            if server.poll() is not None or idle_s <= 0:
                continue
            if active(url, idle_s):
                used.touch()
                continue
            if time.time() - _mtime(used) < idle_s:
                continue
            with file_lock(record.with_suffix(".lock")):  # no command is handed the server meanwhile
                if time.time() - _mtime(used) >= idle_s:
                    _say(f"idle for {idle_s:g} s with no active flow run: stopping the server")
                    _remove(record)
                    _end(server)
                    return
        _say(f"the server exited ({server.returncode})")
    except _Stopped as stopped:
        _say(f"{stopped}: stopping the server")
    finally:
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, signal.SIG_IGN)
        if server is not None and server.returncode is None:
            _end(server)
        if (load(record) or {}).get("watchdog_pid") == os.getpid():
            _remove(record)


def _mtime(used: Path) -> float:
    """When the server was last used; now if its mark is gone (made again)."""
    try:
        return used.stat().st_mtime
    except FileNotFoundError:
        used.touch()
        return time.time()


if __name__ == "__main__" and sys.argv[1:2] == ["watch"]:
    watch(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
