"""The user's fedhpo processes in the background, seen and stopped from any command: warm runners
(`cli.warm`, one per environment and checkout, recorded in the user's folder) and local Prefect
servers (`cli.local_server`, one per PREFECT_HOME).

Standard library only, and those of our modules that are: `fedhpo server status` and `fedhpo server
stop` are answered by the client itself, without importing torch or Prefect and without starting a
runner. A recorded process is known by its pid and start time together, so that a process that
was given the pid of one that exited is neither listed nor signaled.
"""

import json
import os
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from cli import local_server, warm
from cli.user_state import is_running, memory_bytes, user_folder

# How long a stop waits for a runner that runs no command to exit before it kills it (one exits
# within about a second of SIGTERM; one warming up, at once).
STOP_WAIT_S = 15
POLL_S = 0.1


def runners(address: Path | None = None) -> list[dict]:
    """The records of the user's runners that still run (those of the socket `address` alone if
    given); the record of one that died without removing it is removed."""
    found = []
    for path in sorted(user_folder().glob("runner-*.json")):
        try:
            record = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # removed as we read it
            continue
        if not is_running(record["pid"], record["started"], record.get("command")):
            path.unlink(missing_ok=True)
        elif address is None or record["socket"] == str(address):
            found.append(record)
    return found


def ask_to_stop(records: Iterable[dict]) -> list[dict]:
    """SIGTERM each runner that is still the recorded process: it stops listening at once and exits
    once the commands it runs end. Those asked."""
    asked = []
    for record in records:
        if is_running(record["pid"], record["started"], record.get("command")):
            try:
                os.kill(record["pid"], signal.SIGTERM)
            except ProcessLookupError:
                continue
            asked.append(record)
    return asked


def wait_for(asked: list[dict]) -> list[str]:
    """Wait until each runner asked to stop has exited or says which commands it finishes first; a
    line for each. One that runs no command but has not exited within STOP_WAIT_S is killed."""
    lines, pending = {}, {record["pid"]: record for record in asked}
    deadline = time.monotonic() + STOP_WAIT_S
    while pending:
        for pid, record in list(pending.items()):
            name = f"the warm runner (pid {pid}, {record['checkout']})"
            now = current(record)
            if not is_running(pid, record["started"], record.get("command")):
                lines[pid] = f"Stopped {name}."
            elif now and now["state"] == "finishing" and now["commands"]:
                count = now["commands"]
                lines[pid] = f"{name[0].upper()}{name[1:]} finishes {count} command{'s' * (count > 1)}, then exits."
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                while is_running(pid, record["started"], record.get("command")):
                    time.sleep(POLL_S)
                lines[pid] = f"Killed {name}: it had not exited {STOP_WAIT_S} s after it was asked to."
            else:
                continue
            del pending[pid]
        if pending:
            time.sleep(POLL_S)
    return [lines[record["pid"]] for record in asked]


def stop_runners(records: Iterable[dict]) -> list[str]:
    """Stop these runners (see `wait_for`); a line for each that ran."""
    return wait_for(ask_to_stop(records))


def current(record: dict) -> dict | None:
    """What the runner of `record` records now, None once it removed its record."""
    try:
        return json.loads(warm.record_path(Path(record["socket"]), record["pid"]).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def stop(every: bool = False) -> list[str]:
    """Stop this PREFECT_HOME's server and this environment's and checkout's runner, or, with
    `every`, every server and runner of the user; what was stopped, one line each, once it is gone."""
    asked = ask_to_stop(runners() if every else runners(warm.address()))  # they exit while servers stop
    if every:
        stopped = local_server.stop_all()
        lines = [f"Stopped the local Prefect server at {s['url']} (PREFECT_HOME {s['home']})." for s in stopped]
    else:
        url = local_server.stop()
        lines = [f"Stopped the local Prefect server at {url}."] if url else []
    lines = lines or ["No local Prefect server is running."]
    return lines + (wait_for(asked) or ["No warm runner is running."])


def status() -> list[str]:
    """This PREFECT_HOME's server, then a line for each runner and server of the user: pid, memory,
    age, time since its last command, and its checkout or PREFECT_HOME."""
    servers = local_server.servers()
    home = local_server.prefect_home()
    here = [s["url"] for s in servers if Path(s["home"]) == home]
    lines = [f"Local Prefect server at {here[0]}." if here else "No local Prefect server is running."]
    now, rows = time.time(), []  # rows: kind, pid, memory, age, idle, where
    for record in runners():
        if record["state"] == "warming up":
            idle = "starting"
        elif record["commands"]:
            idle = "busy"
        else:
            idle = duration(now - record["last_used"])
        where = record["checkout"] + (" (exits after its commands)" if record["state"] == "finishing" else "")
        rows.append(("runner", record["pid"], memory_bytes(record["pid"]), since(record["started"]), idle, where))
    for server in servers:
        idle = "?" if server["idle_s"] is None else duration(server["idle_s"])
        rows.append(("server", server["pid"], server["memory_bytes"], since(server["started"]), idle, server["home"]))
    if not rows:
        return [*lines, "No warm runner or local Prefect server of yours is running."]
    lines.append(f"{'':6} {'pid':>7} {'memory':>8} {'age':>7} {'idle':>8}  checkout or PREFECT_HOME")
    for kind, pid, memory, age, idle, where in rows:
        size = "?" if memory is None else f"{memory / 2**20:.0f} MB"
        lines.append(f"{kind:6} {pid:>7} {size:>8} {age:>7} {idle:>8}  {where}")
    return lines


def since(moment: float | None) -> str:
    return "?" if moment is None else duration(time.time() - moment)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def command(action: str, every: bool = False) -> int:
    """`fedhpo server status` or `fedhpo server stop [--all]`."""
    try:
        lines = status() if action == "status" else stop(every)
    except (OSError, RuntimeError) as error:  # a server that would not stop, a folder not ours
        print(f"fedhpo server {action}: failed: {error}", file=sys.stderr)
        return 1
    print("\n".join(lines), flush=True)
    return 0
