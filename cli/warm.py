"""A warm process that runs `fedhpo` commands, so a command does not pay its imports (torch,
Prefect, MLflow, Optuna: about 9 s on 2 cores) every time.

`fedhpo` is a thin client. It connects to the runner of this environment, checkout and PREFECT_HOME (a
Unix socket in a private folder under the temp dir), starting it in the background if none
answers, and sends its arguments, working directory, environment and standard streams (the file
descriptors themselves). The runner, which imported the flows once, forks a child per command;
the child takes over the client's directory, environment and streams and runs `cli.main.main`,
so output and exit status are the command's own. Signals the client receives (Ctrl-C, SIGTERM,
SIGHUP) go to the child's process group; if the client dies, even by SIGKILL, its connection
closes and the runner kills the child's process group: no work outlives its command. A runner
whose code or installed packages changed since it started is replaced (the client sends a
fingerprint of both). `FEDHPO_WARM=0` runs a command in its own process, as does the client when
no runner starts; `fedhpo server stop` stops the runner along with the local Prefect server.
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
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedhpo_core", "flows", "tasks", "cli")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
START_TIMEOUT_S = 120
IDLE_EXIT_S = 3600  # a runner no command used for an hour exits (an upgraded fedhpo starts its own)
POLL_S = 0.2
HEADER = struct.Struct("!I")
WARM_MODULES = (
    "mlflow.pytorch",
    "mlflow.store.tracking.sqlalchemy_store",
    "sklearn.datasets",
    "torch.export._trace",
    "torchvision.datasets",
)


def address() -> Path:
    """The runner's socket: one per environment (sys.prefix), checkout and PREFECT_HOME, in a folder
    only we can read."""
    home = os.path.expanduser(os.environ.get("PREFECT_HOME", "~/.prefect"))
    key = hashlib.sha256(f"{sys.prefix}\0{ROOT}\0{home}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"fedhpo-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user")
    return folder / f"{key}.sock"


def fingerprint() -> str:
    """What the runner's imports depend on: our modules and the installed packages."""
    stamps = [sys.prefix, *sorted(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))]
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


def main() -> None:
    argv = sys.argv[1:]
    sock = None if os.environ.get("FEDHPO_WARM") == "0" else connect()
    if sock is None:
        from cli.main import main as run_here

        sys.exit(run_here(argv))
    send_message(sock, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}, [0, 1, 2])
    replies = sock.makefile("rb")
    started = read_message(replies)
    if started is None:
        print("fedhpo: the warm runner refused the command", file=sys.stderr)
        sys.exit(1)
    for sig in FORWARDED:
        signal.signal(sig, lambda number, _: forward(started["pid"], number))
    status = read_message(replies)
    code = status["exit"] if status else 1
    if code < 0:  # the command died of a signal: so does this process, for the shell to see
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def forward(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, number)


def connect() -> socket.socket | None:
    """A connection to a current runner (started here if needed), or None when none can start."""
    from fedhpo_core.locking import file_lock

    try:
        path, current = address(), fingerprint()
    except OSError as error:
        print(f"fedhpo: no warm runner ({error}); running here", file=sys.stderr)
        return None
    for _ in range(2):
        sock = open_connection(path)
        if sock is None:
            with file_lock(path.with_suffix(".lock")):
                sock = open_connection(path) or start(path)
        if sock is None:
            return None
        try:
            send_message(sock, {"fingerprint": current})
            reply, _ = receive_message(sock)
        except OSError:  # a runner exiting as we connected (say, replaced after a code change)
            reply = None
        if reply == {"ready": True}:
            return sock
        sock.close()  # a stale runner: it has stopped listening; start a current one
    return None


def open_connection(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def start(path: Path) -> socket.socket | None:
    """Start a runner in the background (its log beside its socket) and connect once it listens."""
    path.unlink(missing_ok=True)
    with open(path.with_suffix(".log"), "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-u", "-m", "cli.warm", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        if sock := open_connection(path):
            return sock
        time.sleep(POLL_S)
    print(f"fedhpo: the warm runner did not start (log {path.with_suffix('.log')}); running here", file=sys.stderr)
    return None


def stop() -> bool:
    """Ask this checkout's runner to stop (it finishes the commands it runs); whether one ran."""
    try:
        state = json.loads(address().with_suffix(".json").read_text())
        os.kill(state["pid"], signal.SIGTERM)
    except (FileNotFoundError, ProcessLookupError, json.JSONDecodeError):
        return False
    return True


# The runner.


class Runner:
    """Accepts commands on `path` and runs each in a forked child, one thread, no locks held at fork."""

    def __init__(self, path: Path, code: str):
        self.path, self.fingerprint = path, code
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.children: dict[socket.socket, int] = {}  # each command's connection and process
        self.watched: set[socket.socket] = set()  # connections whose closing would stop their command
        self.listening = True
        path.with_suffix(".json").write_text(json.dumps({"pid": os.getpid(), "fingerprint": self.fingerprint}))
        signal.signal(signal.SIGTERM, lambda *_: self.stop_listening())

    def stop_listening(self) -> None:
        if self.listening:
            self.listening = False
            self.selector.unregister(self.listener)
            self.listener.close()
            self.path.unlink(missing_ok=True)
            self.path.with_suffix(".json").unlink(missing_ok=True)

    def serve(self) -> None:
        last_used = time.monotonic()
        while self.listening or self.children:
            if self.children:
                last_used = time.monotonic()
            elif time.monotonic() - last_used > IDLE_EXIT_S:
                self.stop_listening()
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
        hello, _ = receive_message(conn)
        if hello is None or hello.get("fingerprint") != self.fingerprint:
            send_message(conn, {"stale": True})
            conn.close()
            self.stop_listening()
            return
        send_message(conn, {"ready": True})
        request, fds = receive_message(conn, fds=3)
        if request is None or len(fds) != 3:
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            self.run_child(request, fds)
        for fd in fds:
            os.close(fd)
        send_message(conn, {"pid": pid})
        self.children[conn] = pid
        self.watched.add(conn)
        self.selector.register(conn, selectors.EVENT_READ)

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


def serve(path: Path) -> None:
    """Warm up, then serve commands (run as `python -m cli.warm <socket>`)."""
    code = fingerprint()  # before importing: the code that is imported
    warm_up()
    Runner(path, code).serve()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
