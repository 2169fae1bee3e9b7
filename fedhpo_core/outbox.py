"""Writes to a tracking server that outlive its outages: kept in order, sent once it answers again.

MLflow's client retries a failed request (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default, backing
off up to about four minutes) and then raises: the write is lost and the caller crashes. Its
asynchronous logging drops a batch that fails and sends batches in no fixed order. An `Outbox`
sends each write at once while the server answers; from the first write the server did not take,
it keeps every write, in order: in memory, and beyond `memory_limit` bytes in its spool folder on
disk (artifacts' files always there). It asks the server again every `probe_interval` seconds as
writes come, and when it answers sends what it kept, oldest first, before anything newer. A call
that needs the server's answer (creating a run, reading one) first sends what was kept, waiting
out the outage, and says so. A process that must end with writes unsent leaves its spool
(`set_aside`); `replay_spools` sends a spool later, each write once: the spool counts what was
sent, and every kind of write is idempotent on the server (the same metric twice is stored once, a
tag or a status set twice is set once, an artifact uploaded twice is overwritten). A spool is read
from the working directory, where anyone may have put one: it is sent whole or not at all, only
files inside its own folder are read, and one that is not sound is set aside, never tried again.
"""

import json
import os
import shutil
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedhpo_core.errors import one_line
from fedhpo_core.locking import file_lock
from fedhpo_core.stores import masked, while_waiting

MEMORY_LIMIT = 16 * 2**20  # bytes of writes kept in memory before they go to the spool on disk
PROBE_INTERVAL_S = 2.0  # how often an outage is checked on: the server is used within this of its return
RECORDS, SENT, FILES, ADDRESS = "records.jsonl", "sent", "files", "tracking_uri"
SET_ASIDE = "set-aside"  # under the spool root: spools refused, never sent again, kept for the user to read
WAITING = "waiting for it to answer before going on (Ctrl-C stops the command; its unsent writes are kept)"
MAX_SMALL_FILE = 4096  # bytes of `sent` or `tracking_uri`: more is no spool of ours

Send = Callable[[dict, Path | None], None]  # a write and the file it uploads, if any
CheckWrite = Callable[[dict], None]  # raises ValueError, saying why, for a write that cannot be sent


def shown(path: Path | str) -> str:
    """A path as a line shows it: quoted where a planted name holds a line break or another unprintable."""
    return str(path) if str(path).isprintable() else repr(str(path))


class SpoolRefused(Exception):
    """A spool that cannot be sent as it is; the message says why, in one line."""


@dataclass
class SetAside:
    """A spool refused and moved out of the way (`kept_in`), and why."""

    folder: Path
    kept_in: Path
    reason: str

    def line(self) -> str:
        return f"spool {shown(self.folder)} set aside, not sent: {self.reason}; moved to {shown(self.kept_in)}"


@dataclass
class Replay:
    """What `replay_spools` did: {spool folder: writes sent}, and the spools it set aside."""

    sent: dict[str, int] = field(default_factory=dict)
    set_aside: list[SetAside] = field(default_factory=list)


class Spool:
    """A folder of writes not yet sent: `records.jsonl` in order, `sent` how many of them the server
    took, `files/` the artifacts they upload, `tracking_uri` where they go. A spool may be planted
    (it is read from the working directory): nothing of one is sent before all of it is found sound,
    and nothing outside its folder is read."""

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
        """The tracking server the spool is for: an http(s) URL, else the spool is refused."""
        uri = self._small_text(ADDRESS)
        parts = urllib.parse.urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.netloc or uri != uri.strip():
            raise SpoolRefused(f"{ADDRESS} holds {masked(uri)[:100]!r}, not a tracking server's http(s) URL")
        return uri

    def unsent(self, check_write: CheckWrite = lambda record: None) -> list[tuple[int, dict]]:
        """The writes not yet sent, numbered from 1, once the whole spool is found sound (its address,
        every write by `check_write`, every file it names, its count of writes sent); else
        `SpoolRefused`, before anything outside the spool is read."""
        if self.folder.is_symlink():
            raise SpoolRefused("the spool folder is a symbolic link")
        self.uri()
        records = self._records(check_write)
        for record in records:
            self.file(record)
        sent = self._small_text(SENT) if os.path.lexists(self.folder / SENT) else "0"
        if not (sent.isascii() and sent.isdigit() and int(sent) <= len(records)):
            raise SpoolRefused(f"{SENT} holds {sent[:20]!r}, not a count of writes from 0 to {len(records)}")
        return list(enumerate(records, start=1))[int(sent) :]

    def pending(self) -> int:
        return len(self.unsent())

    def file(self, record: dict) -> Path | None:
        """The file a write uploads, if it names one: a file of the spool's own."""
        return self._inside(record["file"]) if "file" in record else None

    def send(self, send: Send, check_write: CheckWrite = lambda record: None) -> int:
        """Send the writes not yet sent (`unsent`), in order, counting each once the server took it;
        how many. Raises what `send` raises (what was sent stays counted)."""
        unsent = self.unsent(check_write)
        for number, record in unsent:
            send(record, self.file(record))
            (self.folder / f"{SENT}.new").write_text(str(number))
            (self.folder / f"{SENT}.new").replace(self.folder / SENT)
        return len(unsent)

    def move_to(self, folder: Path) -> Path:
        """Move the spool into `folder` (under a name no other there has); where it is now."""
        folder.mkdir(parents=True, exist_ok=True)
        target, copies = folder / self.folder.name, 1
        while os.path.lexists(target):
            copies += 1
            target = folder / f"{self.folder.name}.{copies}"
        self.folder.rename(target)
        return target

    def _records(self, check_write: CheckWrite) -> list[dict]:
        if not os.path.lexists(self.folder / RECORDS):
            return []
        try:
            lines = self._inside(RECORDS).read_bytes().decode().splitlines()
        except UnicodeDecodeError as error:
            raise SpoolRefused(f"{RECORDS} is not text ({one_line(error)})") from error
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                check_write(record)
            except (ValueError, RecursionError) as error:  # RecursionError: JSON nested past Python's stack
                raise SpoolRefused(f"write {number} of {RECORDS}: {one_line(error)[:200]}") from error
            records.append(record)
        return records

    def _small_text(self, name: str) -> str:
        path = self._inside(name)
        if path.stat().st_size > MAX_SMALL_FILE:
            raise SpoolRefused(f"{name} holds more than {MAX_SMALL_FILE} bytes")
        try:
            return path.read_bytes().decode()
        except UnicodeDecodeError as error:
            raise SpoolRefused(f"{name} is not text ({one_line(error)})") from error

    def _inside(self, name: object) -> Path:
        """The spool's file `name`, resolved: a name that leads outside the spool (an absolute path,
        `..`, a symbolic link) or to anything but a file of its own (a folder, a fifo, a file with other
        hard links) refuses the spool, before anything there is opened."""
        if not isinstance(name, str):
            raise SpoolRefused(f"a file named by {str(name)[:100]!r}, not by a path")
        try:
            path = (self.folder / name).resolve()
            inside = path.is_relative_to(self.folder.resolve())
            status = path.stat() if inside else None
        except (OSError, ValueError, RuntimeError) as error:  # missing, a NUL byte, a symbolic link loop
            raise SpoolRefused(f"{name[:200]!r} is not a file of the spool ({type(error).__name__})") from error
        if status is None:
            raise SpoolRefused(f"{name[:200]!r} leads outside the spool, to {shown(path)}")
        if not stat.S_ISREG(status.st_mode) or status.st_nlink > 1:
            raise SpoolRefused(f"{name[:200]!r} is not a file of the spool's own (a folder, fifo, link or hard link)")
        return path


class Outbox:
    """One tracking store's writes, in order (see the module's docstring). `is_outage` tells a
    failure of the server being away from any other (which is raised); `reachable` asks whether the
    server answers again; `absence` says how it is away (unreachable, or answering its health check
    but not its API); `say` takes the one line said when it goes away, when a call waits for it, and
    when it is back."""

    def __init__(
        self,
        uri: str,
        folder: Path,
        send: Send,
        is_outage: Callable[[BaseException], bool],
        reachable: Callable[[], bool],
        absence: Callable[[BaseException], str],
        say: Callable[[str], None],
        memory_limit: int = MEMORY_LIMIT,
        probe_interval: float = PROBE_INTERVAL_S,
    ):
        self.uri, self.spool, self.send = uri, Spool(folder), send
        self.is_outage, self.reachable, self.absence, self.say = is_outage, reachable, absence, say
        self.memory_limit, self.probe_interval = memory_limit, probe_interval
        self.memory: list[dict] = []  # kept writes not spooled, after any spooled ones
        self.memory_bytes = 0
        self.spooled = 0  # kept writes in the spool, sent or not
        self.kept_total = 0
        self.down_since: float | None = None
        self.said_waiting = False  # this outage
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
                    self._went_away(error, "training goes on, its logs kept and sent when the server is back")
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
                        answer = function(*args, **kwargs)
                    except Exception as error:
                        if not self.is_outage(error):
                            raise
                        self._went_away(error, WAITING)
                    else:
                        self._back()
                        return answer
                if not self.said_waiting:
                    self.say(f"MLflow tracking server {masked(self.uri)} still away; {WAITING}")
                    self.said_waiting = True
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
                    self.send(record, self.spool.file(record))
                    self.memory_bytes -= len(json.dumps(self.memory.pop(0)))
            except Exception as error:
                if not self.is_outage(error):
                    raise
                return False
            if self.spool.folder.exists():
                shutil.rmtree(self.spool.folder)
            if self.kept_total:  # the server took them: it is back
                self._back()
            return True

    def set_aside(self) -> str | None:
        """At the end of the process: writes still unsent go to the spool; the line that says where."""
        with self.lock:
            if not self.kept() or self.flush():
                return None
            self.spool.add(self.memory, self.uri)
            self.memory, self.memory_bytes = [], 0
            return (
                f"MLflow tracking server {masked(self.uri)} did not answer: {self.spool.pending()} writes not sent, "
                f"kept in {self.spool.folder}; `fedhpo sync` sends them (so does the next fedhpo command on this store)"
            )

    def _went_away(self, error: BaseException, meanwhile: str) -> None:
        if self.down_since is None:
            self.down_since = self.last_probe = time.monotonic()
            self.said_waiting = meanwhile == WAITING
            self.say(f"MLflow tracking server {masked(self.uri)} {self.absence(error)}; {meanwhile}")

    def _back(self) -> None:
        if self.down_since is not None:
            away = time.monotonic() - self.down_since
            kept = f"; sent the {self.kept_total} writes kept meanwhile" if self.kept_total else ""
            self.say(f"MLflow tracking server {masked(self.uri)} reachable again after {away:.0f} s{kept}")
        self.down_since, self.kept_total, self.said_waiting = None, 0, False

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
    """The spools under `root`, oldest first (those set aside are not): folders holding writes or an address."""
    folders = [f for f in root.iterdir() if _written(f)] if root.is_dir() else []
    yield from (Spool(f) for f in sorted(folders, key=lambda f: _written(f).lstat().st_mtime))


def _written(folder: Path) -> Path | None:
    """A spool's address, else its writes (one of them may be missing: damaged, or planted); None for no spool."""
    return next((folder / name for name in (ADDRESS, RECORDS) if os.path.lexists(folder / name)), None)


def replay_spools(
    root: Path,
    uri: str | None,
    send_to: Callable[[str], Send],
    alive: Callable[[str], bool],
    is_outage: Callable[[str, BaseException], bool],
    check_write: CheckWrite,
) -> Replay:
    """Send the spools under `root` of processes no longer running (`alive(folder name)`), those
    for `uri` only if given; one process sends a spool at a time. A spool refused (malformed, naming
    a file outside itself: `Spool.unsent`) or holding a write that fails other than by its server's
    absence (`is_outage(its uri, error)`) is moved to `root`/set-aside, never tried again; the
    server's absence is raised."""
    replay = Replay()
    for spool in spools(root):
        if alive(spool.folder.name):
            continue
        with file_lock(root / f"{spool.folder.name}.lock"):
            if not os.path.lexists(spool.folder):
                continue  # another process sent it
            try:
                if uri is not None and spool.uri() != uri:
                    continue
                replay.sent[str(spool.folder)] = spool.send(send_to(spool.uri()), check_write)
            except SpoolRefused as refusal:
                replay.set_aside.append(SetAside(spool.folder, spool.move_to(root / SET_ASIDE), str(refusal)))
                continue
            except Exception as error:
                if is_outage(spool.uri(), error):
                    raise
                reason = f"a write failed ({type(error).__name__}: {one_line(error)[:200]})"
                replay.set_aside.append(SetAside(spool.folder, spool.move_to(root / SET_ASIDE), reason))
                continue
            shutil.rmtree(spool.folder)
    return replay
