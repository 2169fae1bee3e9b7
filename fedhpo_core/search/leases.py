"""Leases: a process holds the trials it trains by renewing a lease on each, and a process sharing
the study (`--join`) settles a trial whose lease expired as `--resume` would, while the study goes on.

A lease is a trial system attribute (`LEASE_ATTR`): its holder (host, pid and a token of the
process), a renewal count and the holder's grace. A thread of the holder's writes it again every
`period_s`, however long a round trains. Watchers compare no clocks across machines: each times,
by its own monotonic clock, how long it has seen a lease unchanged, and a lease unchanged for its
holder's grace has expired: its process is gone (or has not reached the database for that long).
A RUNNING trial without a lease (just created, or its process killed before its first renewal) is
timed the same, from when the watcher first saw it, against the watcher's own grace. A watcher that
could not look for more than two periods (the database away, its own process stalled) starts every
clock again: it judges only time it watched, so an outage of the database expires no lease.

An expired trial is settled (`settle_interrupted_trials`: told its recorded result, else FAIL and
its room asked again) under the study's lock (`study_lock`), after reading it again: still RUNNING,
with the lease the watcher timed. So two watchers settle it once, and a trial finished meanwhile
(told by its holder, back after a stall) is left as it is.
"""

import contextlib
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from fedhpo_core.search.base import SearchMethod, recorded_result, settle_interrupted_trials
from fedhpo_core.search.storage import study_lock
from fedhpo_core.settings import SettingsError
from fedhpo_core.stores import one_line

LEASE_ATTR = "fedhpo:lease"  # Optuna system attribute: the lease on a RUNNING trial (`Leases.renew`)
# A write per running trial every 10 s is nothing to a database; 60 s without one (six renewals
# missed) is no busy database or network blip, and a dead process's room is back within a minute,
# small beside trials that train for minutes.
LEASE_S, LEASE_GRACE_S = 10.0, 60.0
RUNNING = optuna.trial.TrialState.RUNNING
STOP_WAIT_S = 5.0  # how long the end of a search waits for a renewal in progress (then leaves it: a daemon thread)

logger = logging.getLogger("fedhpo.leases")


@dataclass(frozen=True)
class LeaseTerms:
    """A process renews its leases every `period_s`; a lease unrenewed for `grace_s` has expired."""

    period_s: float = LEASE_S
    grace_s: float = LEASE_GRACE_S

    def __post_init__(self):
        for name, value in (("lease_s", self.period_s), ("lease_grace_s", self.grace_s)):
            if not (math.isfinite(value) and value > 0):
                raise SettingsError(f"{name} must be a number > 0, got {value}")
        if self.grace_s < 2 * self.period_s:
            raise SettingsError(
                f"lease_grace_s must be at least twice lease_s (a lease is renewed every lease_s), "
                f"got {self.grace_s:g} and {self.period_s:g}"
            )


class Leases:
    """This process's leases on a study's trials, and with `watch` its watch over the others'.

    `held()` names the trials this process trains (`SearchContext.started`): those still RUNNING are
    renewed every period, and never settled here. `tick` renews, then (with `watch`) times the other
    RUNNING trials' leases and settles those expired; as a context manager, a daemon thread ticks
    every period from entry (a first tick at once) to exit. `outlast` keeps a finished search
    looking while other processes' trials run."""

    def __init__(
        self,
        study: optuna.Study,
        method: SearchMethod,
        held: Callable[[], set[int]],
        terms: LeaseTerms = LeaseTerms(),
        watch: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.study, self.method, self.held, self.terms, self.watch, self.clock = (
            study,
            method,
            held,
            terms,
            watch,
            clock,
        )
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.renewals = 0
        self.seen: dict[int, tuple[object, float]] = {}  # other trial -> (its lease, when first seen so)
        self.looked_at: float | None = None
        self.expired: set[int] = set()  # trials this watcher found expired (settled, or left paused)
        self.changed = threading.Event()  # set when a trial was settled here
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Leases":
        self._thread = threading.Thread(target=self._run, name="fedhpo-leases", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(STOP_WAIT_S)

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception as error:  # the database away past its retries, say: the next tick tries again
                logger.warning("leases: %s: %s", type(error).__name__, one_line(error))
            if self._stop.wait(self.terms.period_s):
                return

    def tick(self) -> None:
        """Renew this process's running trials; with `watch`, settle others' expired ones."""
        running = self.study.get_trials(deepcopy=False, states=(RUNNING,))
        held = self.held()
        self.renew([t for t in running if t.number in held])
        if self.watch:
            for trial in self.expire([t for t in running if t.number not in held]):
                self.settle(trial)

    def renew(self, trials: list[optuna.trial.FrozenTrial]) -> None:
        self.renewals += 1
        lease = {"holder": self.holder, "renewal": self.renewals, "grace_s": self.terms.grace_s}
        for trial in trials:
            with contextlib.suppress(UpdateFinishedTrialError):  # finished since it was read
                self.study._storage.set_trial_system_attr(trial._trial_id, LEASE_ATTR, lease)

    def expire(self, others: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
        """Of other processes' RUNNING trials (as just read), those whose lease expired."""
        now = self.clock()
        if self.looked_at is not None and now - self.looked_at > 2 * self.terms.period_s:
            self.seen.clear()  # this watcher could not look: it judges only time it watched
        self.looked_at = now
        expired = []
        for trial in others:
            lease = trial.system_attrs.get(LEASE_ATTR)
            seen = self.seen.get(trial.number)
            if seen is None or seen[0] != lease:
                self.seen[trial.number] = (lease, now)
            elif now - seen[1] >= grace_of(lease, self.terms.grace_s) and trial.number not in self.expired:
                expired.append(trial)
        numbers = {t.number for t in others}
        self.seen = {n: s for n, s in self.seen.items() if n in numbers}
        return expired

    def settle(self, seen: optuna.trial.FrozenTrial) -> None:
        """Settle an expired trial as `--resume` does, unless it changed since it was seen."""
        storage, lease = self.study._storage, seen.system_attrs.get(LEASE_ATTR)
        with study_lock(self.study):
            trial = storage.get_trial(seen._trial_id)
            if trial.state != RUNNING or trial.system_attrs.get(LEASE_ATTR) != lease:
                return  # finished, or renewed after all: timed again from the next look
            try:
                settle_interrupted_trials(self.study, self.method, {seen.number})
            except (UpdateFinishedTrialError, ValueError):  # told meanwhile by a process without the lock
                if not storage.get_trial(seen._trial_id).state.is_finished():
                    raise
                return
        self.expired.add(seen.number)
        state = storage.get_trial(seen._trial_id).state
        holder = lease["holder"] if isinstance(lease, dict) else "a process that never renewed it"
        ended = "paused with its recorded result" if state == RUNNING else state.name
        told = " from its recorded result" if recorded_result(trial) and state != RUNNING else ""
        logger.warning(
            "trial %d: its lease expired (held by %s, unrenewed for %g s): settled as %s%s",
            seen.number,
            holder,
            grace_of(lease, self.terms.grace_s),
            ended,
            told,
        )
        self.changed.set()

    def others(self) -> set[int]:
        """Other processes' RUNNING trials, those found expired here aside."""
        held = self.held()
        running = self.study.get_trials(deepcopy=False, states=(RUNNING,))
        return {t.number for t in running if t.number not in held and t.number not in self.expired}

    def outlast(self, search: Callable[[], None], stopping: Callable[[], None], poll_s: float = 1.0) -> None:
        """After this process's search is done, while other processes' trials run: each time one of
        them ends (told, failed, or settled here once its lease expired) `search` again, for room it
        left (a failed trial is asked again); `stopping()` raises once this process is asked to stop.
        The last process of a study so stays until every trial has ended, or been settled."""
        others = self.others()
        while others:
            self.changed.wait(poll_s)
            self.changed.clear()
            stopping()
            now = self.others()
            if others - now:
                search()
                now = self.others()
            others = now


def grace_of(lease: object, default: float) -> float:
    """The grace a lease's holder gave it (a trial without a lease: the watcher's own)."""
    return float(lease.get("grace_s", default)) if isinstance(lease, dict) else default
