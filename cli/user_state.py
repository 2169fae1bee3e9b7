"""What fedhpo's background processes (warm runners, local Prefect servers) record so that any
command of the same user finds, lists and stops them: a private folder per user under the temp
dir, and what /proc says of a recorded process (standard library only: `fedhpo server status`
answers without importing torch or Prefect)."""

import os
import sys
import tempfile
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def user_folder() -> Path:
    """The user's folder of sockets, state and logs, readable by the user alone."""
    folder = Path(tempfile.gettempdir()) / f"fedhpo-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user")
    return folder


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, process group, ...; None if no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def started_at(pid: int) -> float | None:
    """When the process started (seconds since the epoch), None if there is none or it is a
    zombie: with the pid, what tells a recorded process from a later one given its pid."""
    fields = stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return None
    return round(time.time() - uptime + int(fields[19]) / TICKS, 1)


def command_line(pid: int) -> str | None:
    """The process's command line, its arguments joined by spaces; None if there is none."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def is_running(pid: int, started: float | None, command: str | None) -> bool:
    """Whether the recorded process still runs, proven by its start time and command line both: not
    a later process given its pid, nor another program a stale or planted record names. A record
    without either proves nothing."""
    now = started_at(pid)
    if now is None or started is None or abs(now - started) >= 2.0:
        return False
    return command is not None and command_line(pid) == command


def memory_bytes(pid: int) -> int | None:
    """The process's resident memory."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def seconds_setting(variable: str, default: float) -> float:
    """A number of seconds from the environment variable, else `default` (with a line on stderr
    where it is not a number: a background process's setting, never worth refusing a command for)."""
    value = os.environ.get(variable, "").strip()
    try:
        return float(value) if value else default
    except ValueError:
        print(f"fedhpo: {variable}={value!r} is not a number of seconds; using {default}", file=sys.stderr)
        return default
