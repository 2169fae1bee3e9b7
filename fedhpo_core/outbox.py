"""Writes to a tracking server that outlive its outages: kept in order, sent once it answers again.

MLflow's client retries a failed request (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default, backing
off up to about four minutes) and then raises: the write is lost and the caller crashes. Its
asynchronous logging drops a batch that fails and sends batches in no fixed order. An `Outbox`
sends each write at once while the server answers; from the first write the server did not take,
it keeps every write, in order: in memory, and beyond `memory_limit` bytes in its spool folder on
disk (artifacts' files always there). It asks the server's health check again every
`probe_interval` seconds as writes come, and when it answers sends what it kept, oldest first,
before anything newer. A call that needs the server's answer (creating a run, reading one) first
sends what was kept, waiting out the outage. A process that must end with writes unsent leaves its
spool (`set_aside`); `replay_spools` sends a spool later, each write once: the spool counts what
was sent, and every kind of write is idempotent on the server (the same metric twice is stored
once, a tag or a status set twice is set once, an artifact uploaded twice is overwritten).
"""

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fedhpo_core.locking import file_lock
from fedhpo_core.stores import while_waiting

MEMORY_LIMIT = 16 * 2**20  # bytes of writes kept in memory before they go to the spool on disk
PROBE_INTERVAL_S = 2.0  # how often an outage is checked on: the server is used within this of its return
RECORDS, SENT, FILES, ADDRESS = "records.jsonl", "sent", "files", "tracking_uri"

Send = Callable[[dict, Path | None], None]  # a write and the file it uploads, if any


class Spool:
    """A folder of writes not yet sent: `records.jsonl` in order, `sent` how many of them the server
    took, `files/` the artifacts they upload, `tracking_uri` where they go."""

    def __init__(self, folder: Path):
        self.folder = folder

    def add(self, records: list[dict], uri: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / ADDRESS).write_text(uri)
        with open(self.folder / RECORDS, "a") as out:
            out.writelines(json.dumps(record) + "\n" for record in records)

    def keep_file(self, number: int, file: Path) -> str:
        """A copy of `file` in the spool under its own name (the artifact's name on the server)."""
        kept = self.folder / FILES / str(number) / file.name
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, kept)
        return str(kept.relative_to(self.folder))

    def uri(self) -> str:
        return (self.folder / ADDRESS).read_text()

    def records(self) -> list[dict]:
        path = self.folder / RECORDS
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def sent(self) -> int:
        path = self.folder / SENT
        return int(path.read_text()) if path.exists() else 0

    def pending(self) -> int:
        return len(self.records()) - self.sent()

    def send(self, send: Send) -> int:
        """Send the writes not yet sent, in order, counting each once the server took it; how many.
        Raises what `send` raises (what was sent stays counted)."""
        records, done = self.records(), self.sent()
        for number, record in enumerate(records[done:], start=done + 1):
            send(record, self.folder / record["file"] if "file" in record else None)
            (self.folder / f"{SENT}.new").write_text(str(number))
            (self.folder / f"{SENT}.new").replace(self.folder / SENT)
        return len(records) - done


class Outbox:
    """One tracking store's writes, in order (see the module's docstring). `is_outage` tells a
    failure of the server being away from any other (which is raised); `reachable` asks its health
    check; `say` takes the one line said when it goes away and when it is back."""

    def __init__(
        self,
        uri: str,
        folder: Path,
        send: Send,
        is_outage: Callable[[BaseException], bool],
        reachable: Callable[[], bool],
        say: Callable[[str], None],
        memory_limit: int = MEMORY_LIMIT,
        probe_interval: float = PROBE_INTERVAL_S,
    ):
        self.uri, self.spool, self.send = uri, Spool(folder), send
        self.is_outage, self.reachable, self.say = is_outage, reachable, say
        self.memory_limit, self.probe_interval = memory_limit, probe_interval
        self.memory: list[dict] = []  # kept writes not spooled, after any spooled ones
        self.memory_bytes = 0
        self.spooled = 0  # kept writes in the spool, sent or not
        self.kept_total = 0
        self.down_since: float | None = None
        self.last_probe = 0.0
        self.lock = threading.RLock()

    def write(self, record: dict, file: Path | None = None) -> None:
        """Send a write (uploading `file`, if given), or keep it behind those kept before it."""
        with self.lock:
            if self.down_since is None and not self.kept():
                try:
                    self.send(record, file)
                    return
                except Exception as error:
                    if not self.is_outage(error):
                        raise
                    self._went_away(error)
            self._keep(record, file)
            if time.monotonic() - self.last_probe >= self.probe_interval:
                self.flush()

    def call(self, function: Callable, *args, **kwargs):
        """`function`'s answer from the server, after every kept write is sent: waits out an outage,
        asking again every `probe_interval` seconds (a stop request may end the wait: `stores.while_waiting`)."""
        while True:
            with self.lock:
                if self.flush():
                    try:
                        return function(*args, **kwargs)
                    except Exception as error:
                        if not self.is_outage(error):
                            raise
                        self._went_away(error)
            while_waiting()
            time.sleep(self.probe_interval)

    def kept(self) -> int:
        """Writes kept (those in the spool counted until all of it is sent): no read of the spool per write."""
        return len(self.memory) + self.spooled

    def flush(self) -> bool:
        """Send what was kept if the server answers; whether nothing is left."""
        with self.lock:
            if not self.kept() and self.down_since is None:
                return True
            self.last_probe = time.monotonic()
            if not self.reachable():
                return False
            try:
                if self.spooled:
                    self.spool.send(self.send)
                    self.spooled = 0
                while self.memory:
                    record = self.memory[0]
                    self.send(record, self.spool.folder / record["file"] if "file" in record else None)
                    self.memory_bytes -= len(json.dumps(self.memory.pop(0)))
            except Exception as error:
                if not self.is_outage(error):
                    raise
                return False
            away = time.monotonic() - self.down_since if self.down_since is not None else 0.0
            kept = f"; sent the {self.kept_total} writes kept meanwhile" if self.kept_total else ""
            self.say(f"MLflow tracking server {self.uri} reachable again after {away:.0f} s{kept}")
            self.down_since, self.kept_total = None, 0
            if self.spool.folder.exists():
                shutil.rmtree(self.spool.folder)
            return True

    def set_aside(self) -> str | None:
        """At the end of the process: writes still unsent go to the spool; the line that says where."""
        with self.lock:
            if not self.kept() or self.flush():
                return None
            self.spool.add(self.memory, self.uri)
            self.memory, self.memory_bytes = [], 0
            return (
                f"MLflow tracking server {self.uri} unreachable: {self.spool.pending()} writes not sent, kept in "
                f"{self.spool.folder}; `fedhpo sync` sends them (so does the next fedhpo command on this store)"
            )

    def _went_away(self, error: BaseException) -> None:
        if self.down_since is None:
            self.down_since = self.last_probe = time.monotonic()
            self.say(
                f"MLflow tracking server {self.uri} unreachable ({type(error).__name__}); training goes on, "
                f"its logs kept and sent when the server is back"
            )

    def _keep(self, record: dict, file: Path | None) -> None:
        self.kept_total += 1
        if file is not None:
            record = record | {"file": self.spool.keep_file(self.kept_total, file)}
        size = len(json.dumps(record))
        if self.spooled or self.memory_bytes + size > self.memory_limit:
            self.spool.add([*self.memory, record], self.uri)
            self.spooled += len(self.memory) + 1
            self.memory, self.memory_bytes = [], 0
        else:
            self.memory.append(record)
            self.memory_bytes += size


def spools(root: Path) -> Iterator[Spool]:
    """The spools under `root`, oldest first."""
    folders = [f for f in root.iterdir() if (f / ADDRESS).exists()] if root.is_dir() else []
    yield from (Spool(f) for f in sorted(folders, key=lambda f: (f / ADDRESS).stat().st_mtime))


def replay_spools(root: Path, uri: str | None, send_to: Callable[[str], Send], alive: Callable[[str], bool]) -> dict:
    """Send the spools under `root` of processes no longer running (`alive(folder name)`), those
    for `uri` only if given; {folder: writes sent}. One process sends a spool at a time."""
    sent = {}
    for spool in spools(root):
        if alive(spool.folder.name) or (uri is not None and spool.uri() != uri):
            continue
        with file_lock(root / f"{spool.folder.name}.lock"):
            if spool.folder.exists():
                sent[str(spool.folder)] = spool.send(send_to(spool.uri()))
                shutil.rmtree(spool.folder)
    return sent
