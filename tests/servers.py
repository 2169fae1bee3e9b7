"""Real local servers for integration tests: PostgreSQL, an MLflow tracking server and a Prefect API server.

Each is a context manager that binds 127.0.0.1 on a free port, yields the URL to reach it, and stops the server
when the `with` block ends, also when the block raises. `PostgresCluster` yields itself (its `url`), to be
restarted within the block.
"""

import contextlib
import http.client
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

LOCALHOST = "127.0.0.1"
POLL_INTERVAL_S = 0.2
STOP_TIMEOUT_S = 10
LOG_TAIL_CHARS = 4000
POSTGRES_TOOLS = ("initdb", "pg_ctl", "createdb")
POSTGRES_USER = "postgres"
# Servers on 127.0.0.1 are reached directly, whatever proxy the environment names.
_direct_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def port_accepts_connections(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port`."""
    with socket.socket() as sock:
        return sock.connect_ex((LOCALHOST, port)) == 0


def answers_ok(url: str) -> bool:
    """Whether a GET of `url` answers 200."""
    try:
        with _direct_opener.open(url, timeout=5) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):
        return False


def log_tail(path: Path) -> str:
    """The end of a log file, or a note that there is none."""
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except FileNotFoundError:
        return f"(no log at {path})"


def run_together(commands: Sequence[Sequence[str]], cwd: Path, env: dict[str, str], timeout: float = 400) -> list[str]:
    """Start every command at the same moment, wait for all, and fail unless each exits 0; their outputs."""
    processes = [
        subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for command in commands
    ]
    try:
        outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    return outputs


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test for want of a server, or fail it where FEDHPO_REQUIRE_SERVERS=1 (CI)."""
    if os.environ.get("FEDHPO_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason} (FEDHPO_REQUIRE_SERVERS=1)")
    pytest.skip(reason)


class ServerProcess:
    """A command run in a process group of its own, its output in `log_path`; the group is stopped on exit."""

    def __init__(
        self, command: Sequence[object], log_path: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
    ):
        self.command = [str(part) for part in command]
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def exit_status(self) -> int | None:
        """The leader's exit status once it has exited, else None. It is left unreaped, so that its process group
        id cannot be handed to another process before `stop` has killed what is left of the group."""
        if self.process.returncode is not None:
            return self.process.returncode
        exited = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return None if exited is None else exited.si_status

    def wait_ready(self, ready: str | Callable[[], bool], timeout: float) -> None:
        """Poll until `ready` (a URL that must answer 200, or a check) holds; raise with the log tail if the
        process exits first or `timeout` seconds pass."""
        is_ready = (lambda: answers_ok(ready)) if isinstance(ready, str) else ready
        deadline = time.monotonic() + timeout
        while not is_ready():
            if (status := self.exit_status()) is not None:
                raise RuntimeError(f"{shlex.join(self.command)} exited ({status}) before it was ready:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{shlex.join(self.command)} not ready after {timeout} s:\n{self.tail()}")
            time.sleep(POLL_INTERVAL_S)

    def tail(self) -> str:
        """The end of the server's log."""
        return log_tail(self.log_path)

    def stop(self) -> None:
        """SIGTERM the process group, wait up to STOP_TIMEOUT_S for the leader, then SIGKILL whatever is left of
        the group and reap the leader."""
        try:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while self.exit_status() is None and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL_S)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def postgres_bin_dir() -> Path | None:
    """The folder with initdb, pg_ctl and createdb: that of the initdb on PATH, else Debian's newest version."""
    candidates = []
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda bin_dir: [int(number) for number in re.findall(r"\d+", bin_dir.parent.name)],
        reverse=True,
    )
    return next((bin_dir for bin_dir in candidates if all((bin_dir / tool).is_file() for tool in POSTGRES_TOOLS)), None)


def as_user(user: str) -> list[str]:
    """The command prefix that runs a command as `user` (we are root)."""
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--"]
    if shutil.which("setpriv"):
        account = pwd.getpwnam(user)
        return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups", "--"]
    # su would take options of the command (-c, -D) for its own without the "--".
    return ["su", "-s", "/bin/sh", user, "-c", '"$0" "$@"', "--"]


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with an empty database `fedhpo` at `url`; `stop` and `start`
    restart it on the same port and data (what a database server's restart is to its clients).

    PostgreSQL refuses to run as root, so as root the cluster runs as the postgres user, in a folder of its own
    under the system temp folder (pytest's temp folders are private to root); otherwise it lives under `tmpdir`.
    """

    def __init__(self, tmpdir: Path):
        self.bin_dir = postgres_bin_dir()
        if self.bin_dir is None:
            skip_or_fail("no PostgreSQL binaries (initdb, pg_ctl, createdb) on PATH or under /usr/lib/postgresql/*/bin")
        as_root = os.geteuid() == 0
        self.run_as = []
        if as_root:
            try:
                account = pwd.getpwnam(POSTGRES_USER)
            except KeyError:
                skip_or_fail(f"running as root, PostgreSQL needs a {POSTGRES_USER!r} system user to run as")
            self.run_as = as_user(POSTGRES_USER)
        self.workdir = Path(tempfile.mkdtemp(prefix="fedhpo-postgres-", dir=None if as_root else tmpdir))
        if as_root:
            os.chown(self.workdir, account.pw_uid, account.pw_gid)
        self.data, self.log = self.workdir / "data", self.workdir / "postgres.log"
        self.port = free_port()
        self.url = f"postgresql+psycopg2://{POSTGRES_USER}@{LOCALHOST}:{self.port}/fedhpo"

    def run(self, tool: str, *args: object, check: bool = True) -> None:
        command = [*self.run_as, str(self.bin_dir / tool), *map(str, args)]
        done = subprocess.run(command, cwd=self.workdir, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n{log_tail(self.log)}"
            )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-h {LOCALHOST} -p {self.port} -k {self.workdir}"
        self.run("pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", 60, "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (fast: its clients are disconnected) and wait until it has."""
        self.run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", 60, "stop")

    def __enter__(self) -> "PostgresCluster":
        try:
            self.run(
                "initdb", "-D", self.data, "-U", POSTGRES_USER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"
            )
            self.start()
            self.run("createdb", "-h", LOCALHOST, "-p", self.port, "-U", POSTGRES_USER, "fedhpo")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        # Fails harmlessly where the server never started or is stopped.
        self.run("pg_ctl", "-D", self.data, "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def postgres(tmpdir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (`PostgresCluster`); yields its SQLAlchemy URL."""
    with PostgresCluster(tmpdir) as cluster:
        yield cluster.url


def venv_bin(name: str) -> str:
    """A script installed next to the running Python (the virtual environment's bin folder)."""
    return str(Path(sys.executable).parent / name)


@contextlib.contextmanager
def mlflow_server(tmpdir: Path, backend_store_uri: str | None = None, port: int | None = None) -> Iterator[str]:
    """An MLflow tracking server that stores runs in `backend_store_uri` (default: SQLite under `tmpdir`) and
    artifacts under `tmpdir`/artifacts, proxied through the server, on `port` (default: a free one; the same
    port and `tmpdir` start it again on the same stores); yields its tracking URL."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", LOCALHOST,
        "--port", port,
        "--backend-store-uri", backend_store_uri or f"sqlite:///{tmpdir / 'mlflow.db'}",
        "--artifacts-destination", tmpdir / "artifacts",
        "--workers", 1,
    ]  # fmt: skip
    env = {name: value for name, value in os.environ.items() if name != "MLFLOW_TRACKING_URI"}
    # Job execution (GenAI scorers) would start seven huey consumers and leave a folder in /dev/shm per server.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    url = f"http://{LOCALHOST}:{port}"
    with ServerProcess(command, tmpdir / f"mlflow-server-{time.time_ns()}.log", env=env, cwd=tmpdir) as server:
        server.wait_ready(f"{url}/health", timeout=120)
        yield url


@contextlib.contextmanager
def prefect_server(tmpdir: Path, port: int | None = None) -> Iterator[str]:
    """A Prefect API server (no UI) with its home and SQLite database under `tmpdir`, on `port` (default: a free
    one); yields its API URL. The same `tmpdir` and `port` again restart the server on its database."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [venv_bin("prefect"), "server", "start", "--host", LOCALHOST, "--port", port]
    env = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    env |= {
        "PREFECT_HOME": str(tmpdir / "prefect-home"),
        # The current names; PREFECT_API_DATABASE_CONNECTION_URL and PREFECT_UI_ENABLED are their older aliases.
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmpdir / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    url = f"http://{LOCALHOST}:{port}/api"
    # cwd: Prefect also reads settings from ./prefect.toml, ./.env and ./pyproject.toml.
    with ServerProcess(command, tmpdir / "prefect-server.log", env=env, cwd=tmpdir) as server:
        server.wait_ready(f"{url}/health", timeout=180)
        yield url
