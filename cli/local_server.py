"""The local Prefect server that `fedhpo` commands share: started by the first command that needs
it, in the background, and reused by every later one, until `fedhpo server stop`.

Prefect's temporary server (what a flow starts when no PREFECT_API_URL is set) took about 20 of
the 28 s of a `fedhpo train` on digits, every time: database migrations, services, UI files. A
server that outlives the command pays that once. It listens on 127.0.0.1 on a free port and keeps
its database, log and state in PREFECT_HOME (`fedhpo-server.json`: process id and URL;
`fedhpo-server.log`). Starting is serialized by a lock file there, so commands started at the same
moment on a fresh PREFECT_HOME do not race on migrating its database: the first starts the server,
the others wait for it and use it.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fedhpo_core.locking import file_lock

START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 10
POLL_S = 0.2
# What the server is told besides the user's environment: no telemetry from an offline tool, and
# task-run events recorded 50 to a transaction (one each by default: on 2 cores that server work,
# beside the training, made each round a quarter slower).
SERVER_ENVIRONMENT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "50",
}
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 needs no proxy


def prefect_home() -> Path:
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def healthy(url: str) -> bool:
    try:
        with _direct.open(f"{url}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (exited, not yet reaped by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def read_state(home: Path) -> dict | None:
    """The recorded server, if its process still runs."""
    try:
        state = json.loads((home / "fedhpo-server.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if running(state["pid"]) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api_url() -> str:
    """The shared server's API URL, starting the server if none answers."""
    home = prefect_home()
    state = read_state(home)
    if state and healthy(state["url"]):
        return state["url"] + "/api"
    with file_lock(home / "fedhpo-server.lock"):
        state = read_state(home)
        if state and healthy(state["url"]):
            return state["url"] + "/api"
        return start(home) + "/api"


def start(home: Path) -> str:
    """Start the server detached (its own session: a signal to the command's process group leaves
    it running) and wait until it answers; its URL. Call with the lock held."""
    stop(home)  # a recorded server that does not answer
    url = f"http://127.0.0.1:{free_port()}"
    log = home / "fedhpo-server.log"
    command = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        url.rsplit(":", 1)[1],
    ]
    with open(log, "ab") as output:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            # its UI calls this server's API (by default it would call port 4200's)
            env=SERVER_ENVIRONMENT | {"PREFECT_SERVER_UI_API_URL": f"{url}/api"} | os.environ,
            start_new_session=True,
        )
    (home / "fedhpo-server.json").write_text(json.dumps({"pid": process.pid, "url": url}))
    deadline = time.monotonic() + START_TIMEOUT_S
    while not healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(home)
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the local Prefect server did not start (log {log}):\n{tail}")
        time.sleep(POLL_S)
    return url


def stop(home: Path | None = None) -> str | None:
    """Stop the recorded server (SIGTERM to its process group, then SIGKILL); its URL if one ran."""
    home = home or prefect_home()
    state = read_state(home)
    (home / "fedhpo-server.json").unlink(missing_ok=True)
    if state is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(state["pid"], signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while running(state["pid"]) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        os.killpg(state["pid"], signal.SIGKILL)
    return state["url"]


def status() -> str | None:
    """The URL of the running shared server, if one answers."""
    state = read_state(prefect_home())
    return state["url"] if state and healthy(state["url"]) else None
