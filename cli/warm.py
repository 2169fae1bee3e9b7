"""A warm process that runs `fedhpo` commands, so a command does not pay its imports (torch,
Prefect, MLflow, Optuna: about 9 s on 2 cores) every time.

`fedhpo` is a thin client. It connects to the runner of this environment and checkout (a Unix
socket in the user's private folder under the temp dir, `cli.user_state`), starting it in the
background if none answers, and sends its arguments, working directory, environment and standard
streams (the file descriptors themselves). The runner, which imported the flows once, forks a child
per command; the child takes over the client's directory, environment and streams and runs
`cli.main.main`, so output and exit status are the command's own, and so are PREFECT_HOME,
MLFLOW_TRACKING_URI and every other setting of the environment: one runner serves every experiment.
Signals the client receives (Ctrl-C, SIGTERM, SIGHUP) go to the child's process group; if the
client dies, even by SIGKILL, its connection closes and the runner kills the child's process group:
no work outlives its command. A runner whose code or installed packages changed since it started is
replaced (the client sends a fingerprint of both).

What a runner holds stays bounded: it exits after FEDHPO_RUNNER_IDLE_S seconds without a command
(default `IDLE_EXIT_S`), and it stops taking commands once its memory grew past `MEMORY_GROWTH` times
what it held after warming up (the next command starts a fresh one). It records itself in the user's
folder (`runner-<pid>.json`: process, start time, checkout, environment, last use, commands running),
where `fedhpo server status` and `fedhpo server stop` find it (`cli.background`).

Nothing is started to answer `--help` or `--version` (a runner that already runs answers, else the
client itself), nor `fedhpo server status` and `fedhpo server stop`, which the client answers itself;
a runner the client started for a command that was refused (exit status 2) is stopped after it.
`FEDHPO_WARM=0` runs a command in its own process, as does the client when no runner starts.
"""

import atexit
import contextlib
import hashlib
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import time
import traceback
from pathlib import Path

from cli.user_state import command_line, memory_bytes, seconds_setting, started_at, user_folder

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedhpo_core", "flows", "tasks", "cli")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
START_TIMEOUT_S = 120
# A runner no command used for 10 minutes exits. It holds about a gigabyte; restarting one costs the
# ~10 s of imports it saves, once. Ten minutes keeps it through a working session of commands a few
# minutes apart and frees the memory soon after one ends. FEDHPO_RUNNER_IDLE_S sets it (seconds, read
# by the command that starts the runner; 0 or less keeps it until `fedhpo server stop`).
IDLE_EXIT_S = 600
IDLE_VARIABLE = "FEDHPO_RUNNER_IDLE_S"
# A runner whose memory grew past this many times what it held after warming up stops taking
# commands (those it runs finish) and exits, so that the next command starts a fresh one. Commands
# run in forked children and do not grow it; this bounds what the runner itself might accumulate.
MEMORY_GROWTH = 1.5
POLL_S = 0.2
HEADER = struct.Struct("!I")
WARM_MODULES = (
    "mlflow.pytorch",
    "mlflow.store.tracking.sqlalchemy_store",
    "sklearn.datasets",
    "torch.export._trace",
    "torchvision.datasets",
)


def environment() -> Path:
    """This environment (sys.prefix), however the interpreter was reached (a symlink, a `//`)."""
    return Path(sys.prefix).resolve()


def address() -> Path:
    """The runner's socket: one per user, environment and checkout, whatever PREFECT_HOME or store a
    command names (those are the command's settings), in a folder only the user can read."""
    key = hashlib.sha256(f"{environment()}\0{ROOT}".encode()).hexdigest()[:16]
    return user_folder() / f"runner-{key}.sock"


def idle_exit_s() -> float:
    """How long a runner waits for a command before it exits: FEDHPO_RUNNER_IDLE_S, else `IDLE_EXIT_S`."""
    return seconds_setting(IDLE_VARIABLE, IDLE_EXIT_S)


def record_path(path: Path, pid: int) -> Path:
    """Where the runner `pid` of the socket `path` records itself (one file per process: a runner that
    finishes its last commands and the one that replaced it do not share a record)."""
    return path.parent / f"runner-{pid}.json"


def write_record(record: dict) -> None:
    """Replace a runner's record at once (a reader sees the old one or the new one, never half)."""
    target = record_path(Path(record["socket"]), record["pid"])
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, target)


def fingerprint() -> str:
    """What the runner's imports depend on: our modules and the installed packages."""
    paths = sysconfig.get_paths()
    stamps = [str(environment()), *sorted(str(Path(paths[k]).resolve()) for k in ("purelib", "platlib"))]
    stamps += [str(os.stat(p).st_mtime_ns) for p in sorted(set(stamps[1:])) if os.path.exists(p)]
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            stat = path.stat()
            stamps.append(f"{path}:{stat.st_mtime_ns}:{stat.st_size}")
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()


def send_message(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    payload = json.dumps(message).encode()
    data = HEADER.pack(len(payload)) + payload
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    sock.sendall(data[sent:])


def receive_message(sock: socket.socket, fds: int = 0) -> tuple[dict | None, list[int]]:
    """A framed message and the file descriptors sent with it; None at the end of the stream. For
    a peer that sends one message and then waits for an answer (nothing after it is read ahead)."""
    data, received, _, _ = socket.recv_fds(sock, 1 << 16, fds) if fds else (sock.recv(1 << 16), [], 0, None)
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
        more = sock.recv(1 << 16)
        if not more:
            return None, received
        data += more
    return json.loads(data[HEADER.size :]), received


def read_message(reader) -> dict | None:
    """The next framed message from a buffered reader of the socket; None at the end of the stream."""
    header = reader.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    payload = reader.read(HEADER.unpack(header)[0])
    return json.loads(payload) if payload else None


# The client: the `fedhpo` command.


HELP = ("-h", "--help", "--version")  # what is answered without starting a runner


def main() -> None:
    argv = sys.argv[1:]
    if action := answered_here(argv):
        from cli import background

        sys.exit(background.command(action, every="--all" in argv))
    sock, started = None, None
    if os.environ.get("FEDHPO_WARM") != "0":
        sock, started = connect(may_start=bool(argv) and not any(arg in HELP for arg in argv))
    if sock is None:
        from cli.main import main as run_here

        sys.exit(run_here(argv))
    code = run_there(sock, argv)
    if code == 2 and started is not None:  # refused: leave nothing behind for it
        from cli import background

        background.stop_runners(r for r in background.runners(address()) if r["pid"] == started)
    if code == -signal.SIGINT:  # died of Ctrl-C: so does this process, for the shell to see
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    if code < 0:  # killed (SIGKILL, the kernel out of memory): one line, and 128 + the signal as a shell says
        print(f"fedhpo {argv[0]}: killed by {signal.Signals(-code).name}", file=sys.stderr)
        code = 128 - code
    sys.exit(code)


def answered_here(argv: list[str]) -> str | None:
    """The action of `fedhpo server status` and `fedhpo server stop [--all]`, which the client
    answers itself (no runner is started to list or stop runners); None for any other command."""
    actions = [arg for arg in argv[1:] if arg != "--all"]
    if argv[:1] == ["server"] and actions in (["status"], ["stop"]) and len(argv) - len(actions) <= 2:
        return actions[0]
    return None


def run_there(sock: socket.socket, argv: list[str]) -> int:
    """Run the command in the runner; its exit status (negative: the signal it died of)."""
    send_message(sock, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}, [0, 1, 2])
    replies = sock.makefile("rb")
    started = read_message(replies)
    if started is None:
        print("fedhpo: the warm runner refused the command", file=sys.stderr)
        sys.exit(1)
    for sig in FORWARDED:
        signal.signal(sig, lambda number, _: forward(started["pid"], number))
    try:
        status = read_message(replies)
    except (OSError, ValueError):  # the runner itself died mid-message
        status = None
    if status is None:
        print(
            f"fedhpo {argv[0]}: its warm runner ended before the command did (log {address().with_suffix('.log')})",
            file=sys.stderr,
        )
        return 1
    return status["exit"]


def forward(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, number)


def connect(may_start: bool = True) -> tuple[socket.socket | None, int | None]:
    """A connection to a current runner, or None when none answers and none may or can start; and
    the process id of the runner if this client started it."""
    from fedhpo_core.locking import file_lock

    try:
        path, current = address(), fingerprint()
    except OSError as error:
        print(f"fedhpo: no warm runner ({error}); running here", file=sys.stderr)
        return None, None
    for _ in range(2):
        sock, started = open_connection(path), None
        if sock is None and may_start:
            with file_lock(path.with_suffix(".lock")):
                sock = open_connection(path)
                if sock is None:
                    sock, started = start(path)
        if sock is None:
            return None, None
        try:
            send_message(sock, {"fingerprint": current})
            reply, _ = receive_message(sock)
        except OSError:  # a runner exiting as we connected (say, replaced after a code change)
            reply = None
        if reply == {"ready": True}:
            return sock, started
        sock.close()  # a stale runner: it has stopped listening; start a current one
    return None, None


def open_connection(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def start(path: Path) -> tuple[socket.socket | None, int | None]:
    """Start a runner in the background (its log beside its socket) and connect once it listens;
    the connection and the runner's process id."""
    path.unlink(missing_ok=True)
    with open(path.with_suffix(".log"), "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-u", "-m", "cli.warm", str(path), str(idle_exit_s())],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        if sock := open_connection(path):
            return sock, process.pid
        time.sleep(POLL_S)
    print(f"fedhpo: the warm runner did not start (log {path.with_suffix('.log')}); running here", file=sys.stderr)
    return None, None


def stop() -> bool:
    """Stop this environment's and checkout's runner (once the commands it runs end); whether one ran."""
    from cli import background

    return bool(background.stop_runners(background.runners(address())))


# The runner.


class Runner:
    """Accepts commands on `path` and runs each in a forked child, one thread, no locks held at fork.

    It serves until it stops listening: asked to (SIGTERM), idle for `idle_s`, grown past
    `MEMORY_GROWTH`, or met by a client of other code; then it finishes the commands it runs and
    returns. Its record says all along what it is doing."""

    def __init__(self, path: Path, record: dict, idle_s: float):
        self.path, self.record, self.idle_s = path, record, idle_s if idle_s > 0 else float("inf")
        self.rss_limit = MEMORY_GROWTH * (memory_bytes(os.getpid()) or float("inf"))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.inode = path.stat().st_ino  # ours to remove: a later runner may have bound the path since
        self.listener.listen()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.children: dict[socket.socket, int] = {}  # each command's connection and process
        self.watched: set[socket.socket] = set()  # connections whose closing would stop their command
        self.listening, self.asked_to_stop, self.last_used = True, False, time.monotonic()
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "asked_to_stop", True))
        self.update(state="listening", idle_exit_s=idle_s, rss_after_warm_up=memory_bytes(os.getpid()))

    def update(self, **changes) -> None:
        self.record.update(changes, commands=len(self.children))
        write_record(self.record)

    def used(self) -> None:
        self.last_used = time.monotonic()
        self.update(last_used=time.time())

    def stop_listening(self, why: str) -> None:
        if self.listening:
            self.listening = False
            self.selector.unregister(self.listener)
            self.listener.close()
            with contextlib.suppress(FileNotFoundError):
                if self.path.stat().st_ino == self.inode:
                    self.path.unlink()
            print(f"{time.strftime('%F %T')} {why}: stops listening, exits after {len(self.children)} command(s)")
            self.update(state="finishing")

    def serve(self) -> None:
        while True:
            if self.asked_to_stop:
                self.stop_listening("asked to stop")
            elif not self.children and time.monotonic() - self.last_used > self.idle_s:
                self.stop_listening(f"idle for {self.idle_s:g} s")
            if not (self.listening or self.children):
                return
            for key, _ in self.selector.select(timeout=POLL_S if self.children else 1.0):
                if key.fileobj is self.listener:
                    self.accept()
                else:  # the client went away (it never writes after its request): so does its command
                    forward(self.children[key.fileobj], signal.SIGKILL)
                    self.unwatch(key.fileobj)
            self.reap()

    def unwatch(self, conn: socket.socket) -> None:
        if conn in self.watched:
            self.watched.discard(conn)
            self.selector.unregister(conn)

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            request, fds = self.handshake(conn)
        except OSError:  # the client went away meanwhile
            request, fds = None, []
        if request is None or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            try:
                self.run_child(request, fds)  # ends the process
            except BaseException:  # before the command ran (its folder gone, say): never back to serving
                traceback.print_exc()
            os._exit(1)
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):  # a client gone meanwhile: its closed connection ends the command
            send_message(conn, {"pid": pid})
        self.children[conn] = pid
        self.watched.add(conn)
        self.selector.register(conn, selectors.EVENT_READ)
        self.used()

    def handshake(self, conn: socket.socket) -> tuple[dict | None, list[int]]:
        """The client's request and streams, once it showed it runs our code; None from a client that
        left, or that runs other code (a current runner must take over: this one stops listening
        first, so that the client's next try starts it)."""
        hello, _ = receive_message(conn)
        if hello is None:
            return None, []
        if hello.get("fingerprint") != self.record["fingerprint"]:
            self.stop_listening("a client of other code or packages came")
            send_message(conn, {"stale": True})
            return None, []
        send_message(conn, {"ready": True})
        return receive_message(conn, fds=3)

    def reap(self) -> None:
        for conn, pid in list(self.children.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            del self.children[conn]
            self.unwatch(conn)
            with contextlib.suppress(OSError):  # unless the client is gone
                send_message(conn, {"exit": os.waitstatus_to_exitcode(status)})
            conn.close()
            self.used()
            if (memory_bytes(os.getpid()) or 0) > self.rss_limit:
                self.stop_listening(f"memory grew past {MEMORY_GROWTH:g} times its size after warming up")

    def run_child(self, request: dict, fds: list[int]) -> None:
        """Become the command: its process group, streams, directory, environment; never returns."""
        self.selector.close()
        self.listener.close()
        for conn in self.children:
            conn.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Ctrl-C interrupts the command, as in a foreground interpreter, even where the runner was
        # started with SIGINT ignored (a background job of a shell without job control).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setpgid(0, 0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        ours = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
        os.environ.clear()
        os.environ.update(request["env"])
        # Imports as a fresh `fedhpo` would find them: the command's PYTHONPATH (an installed plugin
        # found through it), not the runner's, nor the folder the runner was started in (`-m`).
        theirs = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [*theirs, *(p for p in sys.path[1:] if os.path.abspath(p) not in ours)]
        importlib.invalidate_caches()
        sys.argv = ["fedhpo", *request["argv"]]
        reseed_and_reconfigure()
        from cli.main import main as run

        finish(lambda: run(request["argv"]))


def finish(command) -> None:
    """Run the command and end this process as the interpreter would, less its teardown of every
    module (about 4 s with torch loaded): exit handlers (Prefect's and MLflow's deliveries, logging)
    run, standard streams are flushed, and the exit status is the command's."""
    died_of = None
    try:
        code = command()
    except SystemExit as error:
        code = error.code if isinstance(error.code, int | None) else 1
        if not isinstance(error.code, int | None):
            print(error.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code, died_of = 1, signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if died_of:  # as Python does after an uncaught KeyboardInterrupt: the shell sees the signal
        signal.signal(died_of, signal.SIG_DFL)
        os.kill(os.getpid(), died_of)
    os._exit(code or 0)


def reseed_and_reconfigure() -> None:
    """What a fresh process would have: its own random streams, and Prefect's settings and logging
    read from the command's environment rather than the runner's."""
    import numpy as np
    import prefect.context
    import torch
    from prefect.logging.configuration import setup_logging

    np.random.seed()
    torch.seed()
    prefect.context.refresh_global_settings_context()
    setup_logging(incremental=False)


def warm_up() -> None:
    """Import what commands need, and what they import on the way (dataset readers, MLflow's SQL
    store and model flavor, torch.export's tracer), and fill MLflow's map of installed packages
    that every model logging checks its requirements against (~2 s each time otherwise). Nothing
    here starts a thread or touches a device: every child is forked from this state."""
    import cli.main  # noqa: F401
    import flows.comparison
    import flows.study
    import flows.training  # noqa: F401 - first: it sets up Prefect's logging, which a later import would preempt

    for module in WARM_MODULES:
        importlib.import_module(module)
    from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

    from fedhpo_core.tracking import torch_version

    warn_dependency_requirement_mismatches([f"torch=={torch_version()}"])


def serve(path: Path, idle_s: float) -> None:
    """Warm up, then serve commands (run as `python -m cli.warm SOCKET IDLE_S`). The runner is recorded
    from its start, so that it is seen and can be stopped while it warms up (SIGTERM ends it then)."""
    pid = os.getpid()
    record = {
        "pid": pid,
        "started": started_at(pid),
        "command": command_line(pid),
        "fingerprint": fingerprint(),  # before importing: the code that is imported
        "checkout": str(ROOT),
        "environment": str(environment()),
        "socket": str(path),
        "state": "warming up",
        "last_used": time.time(),
        "commands": 0,
    }
    write_record(record)
    try:
        warm_up()
        Runner(path, record, idle_s).serve()
    finally:
        record_path(path, pid).unlink(missing_ok=True)


if __name__ == "__main__":
    finish(lambda: serve(Path(sys.argv[1]), float(sys.argv[2])))
