"""Interrupts that wait for a safe point.

Ctrl-C (SIGINT) raises KeyboardInterrupt at whatever line Python is running, and so does Prefect's
SIGTERM handler. Measured on `fedhpo tune --workers 2`: one interrupt in three landed inside an
SQL commit of Optuna's storage, whose session was then unusable (the interrupted trials could not
be settled), and one in eight inside a garbage-collector callback, which swallowed it (the study
ran to its end). Within `cooperative_interrupts()`, a first SIGINT, SIGTERM or SIGHUP only sets an
event that the work checks at safe points (the end of a round, before the next trial) and leaves
by `Interrupted` from there; a second one interrupts at once. Local training looks at the request
between steps too (`fedhpo_core.client.steps_interrupted_by`): a round still running
`ROUND_GRACE_S` after the signal (many local epochs) is abandoned, not waited for.
"""

import os
import signal
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedhpo_core.client import steps_interrupted_by
from fedhpo_core.search.base import Interrupted
from fedhpo_core.stores import waits_interrupted_by

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Seconds a round in progress has to reach its end after a signal before local training abandons it.
ROUND_GRACE_S = 2.0


class StopRequest(threading.Event):
    """Set by the first signal; `number` is that signal's."""

    number: int = signal.SIGINT
    signalled: bool = False  # set by a signal, not by the work stopping itself (a failed trial)
    signalled_at: float = 0.0  # time.monotonic() of the signal

    def check(self) -> None:
        """Leave by `Interrupted` if a stop was asked for: call at safe points."""
        if self.is_set():
            raise Interrupted(self.number)

    def check_overdue(self) -> None:
        """Leave by `Interrupted` if a signal asked to stop `ROUND_GRACE_S` ago: a round that ends
        soon ends as usual (recorded as far as it went); a long one is abandoned."""
        if self.signalled and time.monotonic() - self.signalled_at > ROUND_GRACE_S:
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
        stop.number, stop.signalled, stop.signalled_at = number, True, time.monotonic()
        stop.set()

    previous = {number: signal.signal(number, request) for number in SIGNALS}
    try:
        # Waits for MLflow's server or the study's database, and rounds of local training, end on the request too.
        with waits_interrupted_by(stop.check_signal), steps_interrupted_by(stop.check_overdue):
            yield stop
    except Interrupted as interrupt:
        if stop.signalled:  # the work may leave by a bare `Interrupted`: the exit status is the signal's
            interrupt.number = stop.number
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    stop.check()


LOOKUP_TIMEOUT_S = 5  # an interrupted command's last look at its stores: a server that is away is not waited for


def left_behind(args) -> str:
    """What an interrupted command leaves, for its one line: a run or a study is named only where it
    exists (an interrupt during start-up, or while waiting for a store, leaves none)."""
    try:
        if args.command == "train":
            return train_left(args.experiment)
        if args.command == "tune":
            return tune_left(args)
    except (Exception, KeyboardInterrupt) as error:  # a store that does not answer, a second Ctrl-C: not guessed
        return f"what it left could not be read ({type(error).__name__})"
    if args.command == "compare":
        return "finished studies are recorded; the study in progress is marked as `fedhpo tune` marks one"
    return "stopped"


def train_left(experiment: str) -> str:
    runs = runs_of_this_process(experiment)
    if not runs:
        return "no MLflow run was created"
    return f"its MLflow run {runs[0].info.run_id} is marked {runs[0].info.status}"


def tune_left(args) -> str:
    from fedhpo_core.search.study import study_exists

    storage, name = study_of(args)
    if not study_exists(storage, name):
        return f"nothing was recorded (study {name!r} was not created yet)"
    return (
        f"what was trained is recorded in study {name!r} (a training cut short as far as it went, charged once); "
        "the same command with --resume continues it where it stood"
    )


def runs_of_this_process(experiment: str) -> list:
    """The MLflow runs this process created in `experiment` (their tag `fedhpo.process`), newest first."""
    import mlflow.environment_variables as variables
    from mlflow import MlflowClient

    from fedhpo_core.tracking import PROCESS_TAG, api_failure, is_server, process_identity, tracking_uri

    uri, identity = tracking_uri(), process_identity(os.getpid())
    if is_server(uri) and api_failure(uri) is not None:  # its health check may answer while its API fails
        raise ConnectionError(uri)
    if store_missing(uri):
        return []  # looking would create it
    quick = {variables.MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: "0"}  # the command ends next: no retries
    quick[variables.MLFLOW_HTTP_REQUEST_TIMEOUT.name] = str(LOOKUP_TIMEOUT_S)
    with environment(quick):
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None or identity is None:
            return []
        return client.search_runs([found.experiment_id], f"tags.`{PROCESS_TAG}` = '{identity}'")


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """The variables set for the block, as they were after it (a command may run in a process that goes on)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def store_missing(uri: str) -> bool:
    """Whether `uri` is a local MLflow store (an SQLite file, a folder) that does not exist yet."""
    if uri.startswith("sqlite:///"):
        return not Path(uri.removeprefix("sqlite:///")).exists()
    if uri.startswith("file:"):
        return not Path(urllib.parse.urlparse(uri).path).exists()
    return "://" not in uri and not Path(uri).exists()


def study_of(args) -> tuple[str, str]:
    """The storage and name of the study `fedhpo tune` was given (its name derived as the command derives it)."""
    from dataclasses import fields

    from cli.main import _given_options
    from fedhpo_core.search.study import TuneSettings, default_storage
    from fedhpo_core.settings import TrainSettings
    from fedhpo_core.task import prepared
    from fedhpo_core.tracking import tracking_uri

    storage = args.storage or default_storage(tracking_uri())
    if args.study_name:
        return storage, args.study_name
    fixed = prepared(TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)}))
    values = {f.name: getattr(args, f.name) for f in fields(TuneSettings) if f.name != "options"}
    return storage, TuneSettings(**values, options=_given_options(args)).name_for(fixed)
