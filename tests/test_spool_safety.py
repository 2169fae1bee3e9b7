"""Spools read back from the working directory, where anyone may have put one: a write may upload
only a file of its own spool, nothing outside a spool is read, and a spool that is not sound is set
aside with one line naming it while the others are sent."""

import contextlib
import http.server
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_faults import FEDHPO

from fedhpo_core import tracking
from fedhpo_core.outbox import ADDRESS, RECORDS, SENT, SET_ASIDE, Replay, Spool, replay_spools

SECRET = "the neighbour must not see this"
GOOD_WRITE = {"op": "log_batch", "run_id": "run1", "metrics": [["loss", 0.5, 1000, 1]]}
ENDS_WITHIN_S = 20  # a replay that opened a fifo would block for ever


class PlantedServer(http.server.ThreadingHTTPServer):
    """A tracking server on 127.0.0.1 that records every request: its health check answers OK, its
    API `api_status` (200 with `{}`, which MLflow's client takes for any write or an empty search;
    any other with a body that is no JSON)."""

    def __init__(self, api_status: int = 200):
        self.api_status, self.requests = api_status, []
        super().__init__(("127.0.0.1", 0), PlantedHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class PlantedHandler(http.server.BaseHTTPRequestHandler):
    def answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode(errors="replace")
        self.server.requests.append((self.path, body))
        status = 200 if self.path.startswith("/health") else self.server.api_status
        text = b"OK" if self.path.startswith("/health") else b"{}" if status == 200 else b"no MLflow API here"
        self.send_response(status)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    do_GET = do_POST = do_PATCH = answer

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def planted_server(api_status: int = 200) -> Iterator[PlantedServer]:
    server = PlantedServer(api_status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def ended_process_folder(root: Path, number: int) -> Path:
    """A spool folder named for a process of this host that no longer runs (`tracking.process_gone`)."""
    return root / f"{socket.gethostname()}:{4_000_000_000 + number}:1"


def plant(root: Path, number: int, records: list[dict], uri: str = "http://tracking") -> Spool:
    spool = Spool(ended_process_folder(root, number))
    spool.add(records, uri)
    return spool


class Recorder:
    """A tracking server's `send` that reads every file it is given, as an upload does."""

    def __init__(self):
        self.writes: list[dict] = []
        self.files: list[tuple[Path, str]] = []

    def send(self, record: dict, file: Path | None) -> None:
        self.writes.append(record)
        if file is not None:
            self.files.append((file, file.read_text()))


def running(folder_name: str) -> bool:
    return False


def connection_lost(uri: str, error: BaseException) -> bool:
    return isinstance(error, ConnectionError)


def replay_within_bound(root: Path, recorder: Recorder) -> Replay:
    """`replay_spools` to `recorder` with the write checks of `tracking`, failing if it does not end
    (a fifo outside the spool opened)."""
    done: list[Replay] = []

    def to_recorder(uri: str):
        return recorder.send

    def replay() -> None:
        done.append(replay_spools(root, None, to_recorder, running, connection_lost, tracking.check_write))

    thread = threading.Thread(target=replay, daemon=True)
    thread.start()
    thread.join(ENDS_WITHIN_S)
    assert done, "the replay blocked: it opened a file outside the spool"
    return done[0]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the spools with a file only its owner reads, and a fifo that blocks whoever opens it."""
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "secret").write_text(SECRET)
    (folder / "secret").chmod(0o600)
    os.mkfifo(folder / "fifo")
    return folder


def artifact_write(name: str) -> dict:
    return {"op": "log_artifact", "run_id": "run1", "artifact_path": "", "file": name}


def naming_outside(spool: Spool, outside: Path, how: str) -> str:
    """The name a planted write gives a file outside `spool`, reached `how`."""
    if how == "absolute":
        return str(outside / "secret")
    if how == "dot-dot":
        return os.path.relpath(outside / "secret", spool.folder)
    if how == "symlink":
        (spool.folder / "files" / "1").mkdir(parents=True)
        (spool.folder / "files" / "1" / "table.csv").symlink_to(outside / "secret")
        return "files/1/table.csv"
    if how == "symlinked folder":
        (spool.folder / "files").symlink_to(outside)
        return "files/secret"
    if how == "hard link":
        (spool.folder / "files").mkdir()
        os.link(outside / "secret", spool.folder / "files" / "secret")
        return "files/secret"
    assert how == "fifo"
    return str(outside / "fifo")


@pytest.mark.parametrize("how", ["absolute", "dot-dot", "symlink", "symlinked folder", "hard link", "fifo"])
def test_a_write_naming_a_file_outside_its_spool_refuses_the_spool_and_nothing_outside_is_read(tmp_path, outside, how):
    root = tmp_path / "spools"
    hostile = plant(root, 1, [GOOD_WRITE])
    hostile.add([artifact_write(naming_outside(hostile, outside, how))], "http://tracking")
    good = plant(root, 2, [GOOD_WRITE, artifact_write("files/1/table.csv")])
    (good.folder / "files" / "1").mkdir(parents=True)
    (good.folder / "files" / "1" / "table.csv").write_text("a,b")
    recorder = Recorder()

    replay = replay_within_bound(root, recorder)

    assert recorder.writes == [GOOD_WRITE, artifact_write("files/1/table.csv")]  # the good spool's, none of the other's
    assert recorder.files == [((good.folder / "files/1/table.csv").resolve(), "a,b")]
    assert replay.sent == {str(good.folder): 2} and not good.folder.exists()
    (refused,) = replay.set_aside
    assert refused.folder == hostile.folder and refused.kept_in == root / SET_ASIDE / hostile.folder.name
    assert not hostile.folder.exists() and refused.kept_in.is_dir()
    line = refused.line()
    assert "\n" not in line and str(hostile.folder) in line and "set aside" in line
    assert "outside the spool" in line or "not a file of the spool's own" in line, line
    assert SECRET not in line
    assert (outside / "secret").read_text() == SECRET  # left where it was


def malformed(spool: Spool, kind: str) -> None:
    """Damage `spool` (which holds two good writes) in the way `kind` names."""
    records = spool.folder / RECORDS
    if kind == "a line that is no JSON":
        records.write_text(records.read_text() + '{"op": "log_batch", "run_id":\n')
    elif kind == "a JSON line that is no object":
        records.write_text(records.read_text() + "[1, 2]\n")
    elif kind == "a write of no known kind":
        records.write_text(records.read_text() + json.dumps({"op": "delete_experiment", "run_id": "r"}) + "\n")
    elif kind == "a write missing a field":
        records.write_text(records.read_text() + json.dumps({"op": "set_terminated", "run_id": "run1"}) + "\n")
    elif kind == "a batch of malformed metrics":
        records.write_text(records.read_text() + json.dumps(GOOD_WRITE | {"metrics": [["loss", "high"]]}) + "\n")
    elif kind == "writes that are not text":
        records.write_bytes(records.read_bytes() + b"\xff\xfe\n")
    elif kind == "an artifact whose file is missing":
        records.write_text(records.read_text() + json.dumps(artifact_write("files/9/gone.csv")) + "\n")
    elif kind == "a count of writes sent that is no integer":
        (spool.folder / SENT).write_text("one")
    elif kind == "a count of writes sent beyond the writes":
        (spool.folder / SENT).write_text("3")
    elif kind == "no address":
        (spool.folder / ADDRESS).unlink()
    elif kind == "an address that is no tracking server":
        (spool.folder / ADDRESS).write_text("sqlite:///mlflow.db")
    else:
        assert kind == "an address that is garbage"
        (spool.folder / ADDRESS).write_bytes(b"\x00\xff" * 3000)


MALFORMED = [
    "a line that is no JSON",
    "a JSON line that is no object",
    "a write of no known kind",
    "a write missing a field",
    "a batch of malformed metrics",
    "writes that are not text",
    "an artifact whose file is missing",
    "a count of writes sent that is no integer",
    "a count of writes sent beyond the writes",
    "no address",
    "an address that is no tracking server",
    "an address that is garbage",
]


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_spool_is_set_aside_whole_with_one_line_naming_it_and_the_others_are_sent(tmp_path, kind):
    root = tmp_path / "spools"
    first = plant(root, 1, [GOOD_WRITE])
    damaged = plant(root, 2, [GOOD_WRITE | {"run_id": "damaged"}, GOOD_WRITE | {"run_id": "damaged"}])
    malformed(damaged, kind)
    last = plant(root, 3, [GOOD_WRITE | {"run_id": "last"}])
    recorder = Recorder()

    replay = replay_within_bound(root, recorder)

    assert [w["run_id"] for w in recorder.writes] == ["run1", "last"]  # nothing of the damaged one, not even its start
    assert replay.sent == {str(first.folder): 1, str(last.folder): 1}
    (refused,) = replay.set_aside
    assert refused.folder == damaged.folder and "\n" not in refused.line() and str(damaged.folder) in refused.line()
    assert sorted(p.name for p in (root / SET_ASIDE).iterdir()) == [damaged.folder.name]
    assert replay_within_bound(root, recorder) == Replay()  # set aside for good: never tried again


def test_a_write_the_server_refuses_sets_its_spool_aside_and_the_next_is_sent(tmp_path):
    root = tmp_path / "spools"
    refused_spool = plant(root, 1, [GOOD_WRITE | {"run_id": "no such run"}])
    good = plant(root, 2, [GOOD_WRITE])
    recorder = Recorder()

    def send(record: dict, file: Path | None) -> None:
        if record["run_id"] == "no such run":
            raise ValueError("RESOURCE_DOES_NOT_EXIST: Run 'no such run' not found")
        recorder.send(record, file)

    replay = replay_spools(root, None, lambda uri: send, running, connection_lost, tracking.check_write)
    assert replay.sent == {str(good.folder): 1} and recorder.writes == [GOOD_WRITE]
    (refused,) = replay.set_aside
    assert refused.folder == refused_spool.folder and "Run 'no such run' not found" in refused.line()


def test_the_writes_fedhpo_itself_spools_pass_the_checks(tmp_path):
    """What `Tracker` writes through the outbox is what `tracking.check_write` takes."""
    writes = [
        GOOD_WRITE | {"params": [["lr", "0.1"]], "tags": [["fedhpo.role", "train"]]},
        {"op": "set_status", "run_id": "run1", "status": "RUNNING"},
        {"op": "set_terminated", "run_id": "run1", "status": "FINISHED", "end_time": 1_700_000_000_000},
        {"op": "set_experiment_tag", "experiment_id": "1", "key": "k", "value": "v"},
    ]
    for write in writes:
        tracking.check_write(json.loads(json.dumps(write)))


def sync_command(tmp_path: Path, root: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"FEDHPO_WARM": "0", "FEDHPO_SPOOL": str(root), "PREFECT_HOME": str(tmp_path / "prefect")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.run([FEDHPO, "sync"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_fedhpo_sync_sends_the_sound_spools_sets_aside_the_others_and_exits_1(tmp_path, outside):
    root = tmp_path / "spools"
    with planted_server() as server:
        hostile = plant(root, 1, [artifact_write(str(outside / "secret"))], server.url)
        damaged = plant(root, 2, [GOOD_WRITE], server.url)
        malformed(damaged, "a line that is no JSON")
        good = plant(root, 3, [GOOD_WRITE | {"run_id": "sent"}], server.url)

        synced = sync_command(tmp_path, root)

        api = [(path, body) for path, body in server.requests if path.startswith("/api/")]
    assert synced.returncode == 1, synced.stderr
    assert synced.stdout.splitlines() == [f"Sent 1 MLflow writes from {good.folder}."]
    errors = synced.stderr.splitlines()
    assert len(errors) == 2 and "Traceback" not in synced.stderr, synced.stderr
    assert errors[0].startswith(f"fedhpo sync: spool {hostile.folder} set aside") and "outside the spool" in errors[0]
    assert errors[1].startswith(f"fedhpo sync: spool {damaged.folder} set aside") and RECORDS in errors[1]
    assert [(path, json.loads(body)["run_id"]) for path, body in api] == [("/api/2.0/mlflow/runs/log-batch", "sent")]
    assert SECRET not in synced.stdout + synced.stderr
    assert sorted(p.name for p in (root / SET_ASIDE).iterdir()) == sorted([hostile.folder.name, damaged.folder.name])

    again = sync_command(tmp_path, root)
    assert again.returncode == 0 and again.stdout == f"Nothing to send: no spool in {root}.\n", again.stderr


def test_the_next_command_on_the_server_sets_a_malformed_spool_aside_in_one_line(tmp_path, monkeypatch, caplog):
    root = tmp_path / "spools"
    with planted_server() as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("FEDHPO_SPOOL", str(root))
        hostile = plant(root, 1, [artifact_write("../../home/secret")], server.url)
        good = plant(root, 2, [GOOD_WRITE], server.url)
        elsewhere = plant(root, 3, [GOOD_WRITE], "http://elsewhere")
        with caplog.at_level(logging.WARNING, logger="fedhpo.tracking"):
            tracking.prepare_store()
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        f"sent 1 MLflow writes a stopped process left in {good.folder}",
        f"spool {hostile.folder} set aside, not sent: '../../home/secret' leads outside the spool, to "
        f"{(tmp_path / 'home' / 'secret').resolve()}; moved to {root / SET_ASIDE / hostile.folder.name}",
    ]
    assert elsewhere.folder.exists()  # another server's spool waits for its server


def test_a_spool_folder_that_is_a_symbolic_link_is_refused(tmp_path, outside):
    elsewhere = Spool(outside / "spool")
    elsewhere.add([artifact_write("files/secret")], "http://tracking")
    (outside / "spool" / "files").mkdir()
    (outside / "spool" / "files" / "secret").write_text(SECRET)
    root = tmp_path / "spools"
    root.mkdir()
    ended_process_folder(root, 1).symlink_to(outside / "spool")
    recorder = Recorder()

    replay = replay_within_bound(root, recorder)

    assert recorder.writes == [] and "symbolic link" in replay.set_aside[0].line()


@pytest.mark.parametrize("name", ["not-a-process", "{host}", "{host}:pid:1", "{host}:12:34:56", "{host}:" + "9" * 200])
def test_a_spool_folder_named_otherwise_than_a_process_is_no_running_process(name):
    host = socket.gethostname()
    assert tracking.process_gone(name.format(host=host)) == name.startswith("{host}")


def test_a_spool_whose_name_breaks_lines_is_set_aside_in_one_line(tmp_path):
    root = tmp_path / "spools"
    spool = Spool(root / f"{socket.gethostname()}:1\nfedhpo: all sent:1")
    spool.add([artifact_write("files/\n/x")], "http://tracking")

    (refused,) = replay_within_bound(root, Recorder()).set_aside

    assert "\n" not in refused.line() and repr(str(spool.folder)) in refused.line()
