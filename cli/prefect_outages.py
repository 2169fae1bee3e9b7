"""A Prefect server that goes away and comes back (restarted, upgraded) while a command reports to it.

Task-run states reach the server as events on a websocket. Prefect's events client keeps every event
until the server confirms it, also one it failed to send, and resends them when it reconnects; but
meanwhile it logs a WARNING and its worker an ERROR per event (each after some seconds of reconnecting).
Logs go in batches over HTTP, retried as every API call is (PREFECT_CLIENT_MAX_RETRIES, backing off 2,
4, 8... s); a batch that still fails is lost with `--- Error logging to API ---` on stderr. `watch`
makes that one line when the events find the server unreachable and one when the events client has
reconnected, with the number of events it resent and of log lines lost.
"""

import contextlib
import logging
import time
from collections.abc import Iterator

import httpx
from prefect.logging import get_logger
from prefect.logging.handlers import APILogWorker, set_api_log_sink

logger = get_logger("fedhpo")
EVENTS_CLIENT = logging.getLogger("prefect.events.clients")
SERVICES = logging.getLogger("prefect._internal.concurrency")
EVENTS_WORKER = logging.getLogger("EventsWorker")


def failed_event(record: logging.LogRecord) -> bool:
    """Prefect's events worker's ERROR for an event it could not deliver."""
    return str(record.msg).startswith("Service %r failed to process item") and record.args[0] == "EventsWorker"


class Outage(logging.Filter):
    """The server's outage as the command's deliveries see it. A filter on Prefect's loggers of event
    delivery: their lines per failed event become its first line, the client's (debug) line that it
    resends the events it kept becomes its last; their other debug lines, and the worker's count of
    the events it still has to send at the end (every 4 s), are dropped."""

    def __init__(self, url: str, level: int):
        super().__init__()
        self.url, self.level = url, level
        self.began_at: float | None = None
        self.logs_lost = 0

    @property
    def ongoing(self) -> bool:
        return self.began_at is not None

    def begin(self, reason: object) -> None:
        if self.began_at is None:
            self.began_at = time.monotonic()
            logger.warning(
                "Prefect server %s unreachable (%s); its events are kept and resent when it is back", self.url, reason
            )

    def end(self, resent: int) -> None:
        lost = f", {self.logs_lost} log lines lost" if self.logs_lost else ""
        seconds = time.monotonic() - self.began_at
        logger.info(
            "Prefect server %s reachable again after %.0f s; %s events resent%s", self.url, seconds, resent, lost
        )
        self.began_at, self.logs_lost = None, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Unable to connect to"):  # args: the websocket's URL, the reason
            self.begin(record.args[-1])
            return False
        if failed_event(record):
            return False
        if str(record.msg).startswith("Resending %s unconfirmed events") and self.ongoing:
            self.end(record.args[0])
        if str(record.msg).startswith("Still processing items"):
            return False
        return record.name != EVENTS_CLIENT.name or record.levelno >= self.level


_outage = Outage("", logging.NOTSET)


class Abandoned(logging.Filter):
    """Drops the ERROR of an event that was in flight when the command gave up on a server that is
    gone (`cli.main`'s abandoned deliveries): it comes after the command's last line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not failed_event(record)


def silence_abandoned() -> None:
    """From now on, in this process, events that fail to reach the server are not logged."""
    for source in (SERVICES, EVENTS_WORKER):
        source.addFilter(Abandoned())


def server_away() -> bool:
    """Whether the command's events found the Prefect server unreachable and have not reached it since."""
    return _outage.ongoing


class CountedLogWorker(APILogWorker):
    """Prefect's worker that sends logs to the API; a batch that fails after the client's retries is counted."""

    async def _handle_batch(self, items: list[dict]) -> None:
        try:
            await self._client.create_logs(items)
        except httpx.HTTPError:
            _outage.logs_lost += len(items)


@contextlib.contextmanager
def watch(url: str) -> Iterator[Outage]:
    """Outages of the server at `url` during the block in one line each way, and one at its end where
    the server is still away."""
    global _outage
    level = EVENTS_CLIENT.level
    _outage = Outage(url, EVENTS_CLIENT.getEffectiveLevel())
    EVENTS_CLIENT.setLevel(logging.DEBUG)  # for the line that ends an outage
    for source in (EVENTS_CLIENT, SERVICES, EVENTS_WORKER):
        source.addFilter(_outage)
    set_api_log_sink(lambda log: CountedLogWorker.instance().send(log))
    try:
        yield _outage
    finally:
        set_api_log_sink(None)
        for source in (EVENTS_CLIENT, SERVICES, EVENTS_WORKER):
            source.removeFilter(_outage)
        EVENTS_CLIENT.setLevel(level)
        if _outage.ongoing:
            logger.warning("Prefect server %s still unreachable as the command ends; what it missed is dropped", url)
        elif _outage.logs_lost:
            logger.warning("%d log lines did not reach Prefect server %s", _outage.logs_lost, url)
