"""Interrupts that wait for a safe point.

Ctrl-C (SIGINT) raises KeyboardInterrupt at whatever line Python is running, and so does Prefect's
SIGTERM handler. Measured on `fedhpo tune --workers 2`: one interrupt in three landed inside an
SQL commit of Optuna's storage, whose session was then unusable (the interrupted trials could not
be settled), and one in eight inside a garbage-collector callback, which swallowed it (the study
ran to its end). Within `cooperative_interrupts()`, a first SIGINT, SIGTERM or SIGHUP only sets an
event that the work checks at safe points (the end of a round, before the next trial) and leaves
by `Interrupted` from there; a second one interrupts at once.
"""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedhpo_core.search.base import Interrupted
from fedhpo_core.stores import waits_interrupted_by

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest(threading.Event):
    """Set by the first signal; `number` is that signal's."""

    number: int = signal.SIGINT
    signalled: bool = False  # set by a signal, not by the work stopping itself (a failed trial)

    def check(self) -> None:
        """Leave by `Interrupted` if a stop was asked for: call at safe points."""
        if self.is_set():
            raise Interrupted(self.number)

    def check_signal(self) -> None:
        """Leave by `Interrupted` if a signal asked to stop: a wait for a server that is away ends
        on the user's request, not when the work stops itself on an error (which goes on)."""
        if self.signalled:
            raise Interrupted(self.number)


@contextmanager
def cooperative_interrupts() -> Iterator[StopRequest]:
    """Signals ask the block to stop at its next safe point (`StopRequest.check`); if the block ends
    without reaching one, it is interrupted as it ends. Outside the main thread, where signals are
    not delivered, the request is never set."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(number: int, _frame) -> None:
        if stop.is_set():  # asked twice: at once
            raise Interrupted(number)
        stop.number, stop.signalled = number, True
        stop.set()

    previous = {number: signal.signal(number, request) for number in SIGNALS}
    try:
        # Waits for MLflow's server or the study's database end on the request too.
        with waits_interrupted_by(stop.check_signal):
            yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    stop.check()
