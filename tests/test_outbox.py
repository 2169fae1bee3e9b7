"""The outbox: writes made while the tracking server is away arrive later, in order, each once."""

import threading
from pathlib import Path

import pytest

from fedhpo_core.outbox import WAITING, Outbox, Replay, Spool, replay_spools, spools
from fedhpo_core.stores import waits_interrupted_by


class Server:
    """A tracking server that is up or away, and what it received, in order."""

    def __init__(self):
        self.up = True
        self.received: list[tuple[dict, str | None]] = []
        self.fail_after: int | None = None  # goes away after this many more writes

    def send(self, record: dict, file: Path | None) -> None:
        if self.fail_after == 0:
            self.up, self.fail_after = False, None
        if not self.up:
            raise ConnectionError("refused")
        if self.fail_after is not None:
            self.fail_after -= 1
        self.received.append((record, file.read_text() if file else None))


def outbox_for(server: Server, folder: Path, said: list[str], memory_limit: int = 10_000) -> Outbox:
    return Outbox(
        "http://tracking",
        folder,
        server.send,
        is_outage=lambda error: isinstance(error, ConnectionError),
        reachable=lambda: server.up,
        absence=lambda error: f"unreachable ({type(error).__name__})",
        say=said.append,
        memory_limit=memory_limit,
        probe_interval=0.0,
    )


def replay(root: Path, uri: str | None, server: Server, alive=lambda name: False) -> Replay:
    """`replay_spools` to `server`, whose ConnectionError is its absence."""
    return replay_spools(
        root,
        uri,
        lambda uri: server.send,
        alive,
        is_outage=lambda uri, error: isinstance(error, ConnectionError),
        check_write=lambda record: None,
    )


def test_writes_made_while_the_server_is_away_arrive_in_order_once_past_the_memory_bound(tmp_path):
    server, said = Server(), []
    box = outbox_for(server, tmp_path / "spool", said, memory_limit=100)  # about ten writes in memory
    artifact = tmp_path / "table.csv"
    box.write({"n": 0})
    server.up = False
    for n in range(1, 40):
        if n == 20:
            artifact.write_text("kept while away")
            box.write({"n": n}, artifact)
            artifact.unlink()  # the caller's file is gone: the outbox kept its own copy
        else:
            box.write({"n": n})
    assert [r["n"] for r, _ in server.received] == [0]
    assert (tmp_path / "spool" / "records.jsonl").exists() and len(box.memory) < 39  # past the bound: on disk
    server.up = True
    box.write({"n": 40})
    assert [r["n"] for r, _ in server.received] == list(range(41))
    assert [file for r, file in server.received if r["n"] == 20] == ["kept while away"]
    assert not (tmp_path / "spool").exists()
    assert len(said) == 2 and "unreachable" in said[0] and "reachable again" in said[1] and "40 writes kept" in said[1]


def test_a_call_that_needs_the_server_sends_what_was_kept_first_and_a_stop_ends_its_wait(tmp_path):
    server, said = Server(), []
    box = outbox_for(server, tmp_path / "spool", said)
    server.up = False
    box.write({"n": 1})
    waits = []

    def come_back_on_the_third_wait():
        waits.append(1)
        if len(waits) == 3:
            server.up = True

    with waits_interrupted_by(come_back_on_the_third_wait):
        assert box.call(lambda: len(server.received)) == 1  # the kept write went first
    assert len(waits) == 3
    assert said == [
        "MLflow tracking server http://tracking unreachable (ConnectionError); training goes on, its logs kept and "
        "sent when the server is back",
        f"MLflow tracking server http://tracking still away; {WAITING}",  # said once, not once per wait
        "MLflow tracking server http://tracking reachable again after 0 s; sent the 1 writes kept meanwhile",
    ]

    server.up = False

    def stop_requested():
        raise KeyboardInterrupt

    with waits_interrupted_by(stop_requested), pytest.raises(KeyboardInterrupt):
        box.call(server.send, {"n": 2}, None)
    assert said[3:] == [f"MLflow tracking server http://tracking unreachable (ConnectionError); {WAITING}"]
    assert "Ctrl-C stops the command" in WAITING


def test_a_server_whose_health_check_answers_while_its_api_fails_is_back_only_once_a_call_went_through(tmp_path):
    """Its health check answering is no return: no line per failed attempt, no 'reachable again' before."""
    said, attempts = [], []

    def answer_on_the_fourth_attempt() -> str:
        attempts.append(1)
        if len(attempts) < 4:
            raise ConnectionError("no answer")
        return "run"

    box = Outbox(
        "http://tracking",
        tmp_path / "spool",
        Server().send,
        is_outage=lambda error: isinstance(error, ConnectionError),
        reachable=lambda: True,
        absence=lambda error: "answers its health check but not its API (HTTP 503)",
        say=said.append,
        probe_interval=0.0,
    )
    assert box.call(answer_on_the_fourth_attempt) == "run"
    assert said == [
        f"MLflow tracking server http://tracking answers its health check but not its API (HTTP 503); {WAITING}",
        "MLflow tracking server http://tracking reachable again after 0 s",
    ]


def test_a_spool_set_aside_is_replayed_once_even_when_the_server_goes_away_mid_replay(tmp_path):
    server, said = Server(), []
    root = tmp_path / "spools"
    box = outbox_for(server, root / "host:1:1", said, memory_limit=10**6)
    server.up = False
    for n in range(10):
        box.write({"n": n})
    line = box.set_aside()
    assert "10 writes not sent" in line and str(root / "host:1:1") in line
    (spool,) = spools(root)
    assert spool.pending() == 10 and spool.uri() == "http://tracking"

    server.up, server.fail_after = True, 4
    with pytest.raises(ConnectionError):
        replay(root, None, server)
    assert Spool(root / "host:1:1").pending() == 6
    server.up = True
    assert replay(root, "http://tracking", server) == Replay({str(root / "host:1:1"): 6})
    assert [r["n"] for r, _ in server.received] == list(range(10))  # each once, in order
    assert list(spools(root)) == []


def test_a_running_process_spool_and_another_servers_spool_are_left_alone(tmp_path):
    root = tmp_path / "spools"
    Spool(root / "host:2:2").add([{"n": 1}], "http://tracking")
    Spool(root / "host:3:3").add([{"n": 2}], "http://elsewhere")
    server = Server()
    assert replay(root, "http://tracking", server, alive=lambda name: name == "host:2:2") == Replay()
    assert server.received == []


def test_writes_from_threads_while_away_all_arrive(tmp_path):
    server, said = Server(), []
    box = outbox_for(server, tmp_path / "spool", said, memory_limit=2_000)
    server.up = False

    def write(thread: int) -> None:
        for n in range(50):
            box.write({"thread": thread, "n": n})

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.up = True
    assert box.flush()
    for t in range(4):  # each thread's writes in its order
        assert [r["n"] for r, _ in server.received if r["thread"] == t] == list(range(50))
