"""Progress of a command: a live bar in the terminal, counters in the log and the Prefect UI.

A `fedhpo` command whose log goes to a terminal draws one bar below it (`live_bar`, around the flow
the command runs): what is spent of what is planned (rounds, or a study's budget unit), trials
finished, studies done, elapsed time and ETA; log lines print above it. The outermost flow plans
the bar and the flows advance it (`bar()`): a training its rounds, a study each round's cost in its
budget's unit and its trials, a comparison its studies. Without a
terminal, or outside a command (a deployment's run), the bar draws nothing and the log lines are
all there is.
"""

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import optuna
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from rich.console import Console
from rich.default_styles import DEFAULT_STYLES
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.theme import Theme

from cli.prefect_outages import server_away
from fedhpo_core.cost import Cost
from fedhpo_core.search.base import Budget, finished_trials, spent


class Bar:
    """The command's progress line, drawn by `progress` (none: nothing is drawn). The first `plan`
    sets what it counts and later ones are ignored, so a comparison plans the rounds of all its
    studies and the studies it runs do not plan again. Thread-safe: parallel trials share one."""

    def __init__(self, progress: Progress | None = None):
        self.progress, self.task = progress, None
        self.total = self.trials = self.studies = self.planned_studies = None
        self.lock = threading.Lock()

    def plan(
        self,
        total: float,
        done: float = 0,
        trials: int | None = None,
        studies: int | None = None,
        unit: str = "rounds",
    ) -> None:
        """`total` to spend in `unit` (a budget's, `cost.UNITS`; `done` of it already: a resumed
        study), and counters of the trials finished and the `studies` to run, where they are
        counted (None: not shown)."""
        with self.lock:
            if self.progress is None or self.task is not None:
                return
            self.total, self.trials, self.planned_studies = total, trials, studies
            self.studies = None if studies is None else 0
            self.task = self.progress.add_task("", total=total, completed=done, counts=self.counts(), unit=unit)

    def advance(self, amount: float = 0, trials: int = 0, studies: int = 0) -> None:
        with self.lock:
            if self.task is None:
                return
            if trials:
                self.trials += trials
            if studies:
                self.studies += studies
            self.progress.update(self.task, advance=amount, counts=self.counts())

    def drop(self, amount: float) -> None:
        """What was planned and will not be spent (a study that ended under its budget)."""
        with self.lock:
            if self.task is not None:
                self.total -= amount
                self.progress.update(self.task, total=self.total)

    def counts(self) -> str:
        trials = "" if self.trials is None else f" · {self.trials} trials"
        studies = "" if self.studies is None else f" · {self.studies}/{self.planned_studies} studies"
        return trials + studies


_bar = Bar()
# Prefect's console has its own styles only: the bar brings rich's for its columns.
BAR_STYLES = Theme({k: v for k, v in DEFAULT_STYLES.items() if k.startswith(("bar.", "progress."))}, inherit=False)


def bar() -> Bar:
    """The running command's bar (one that draws nothing where no `live_bar` is open)."""
    return _bar


def log_console() -> Console:
    """The console Prefect's log handler prints with: the bar draws on it, so that log lines print
    above the bar instead of across it."""
    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    return handlers[0].console if handlers else Console(stderr=True)


@contextmanager
def live_bar() -> Iterator[Bar]:
    """A bar below the log for the block, where the log goes to a terminal; it is removed when the
    block ends, however it ends (done, failed, interrupted)."""
    global _bar
    console = log_console()
    # A terminal, not a file that FORCE_COLOR has rich treat as one, nor a dumb terminal.
    if not (console.file.isatty() and console.is_terminal) or console.is_dumb_terminal:
        yield _bar
        return
    progress = Progress(
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}{task.fields[counts]} ·"),
        TimeElapsedColumn(),
        TextColumn("elapsed · ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        refresh_per_second=4,
        redirect_stdout=sys.stdout.isatty(),  # a print would cross the bar; output to a file stays there
    )
    previous, _bar = _bar, Bar(progress)
    try:
        with console.use_theme(BAR_STYLES), progress:
            yield _bar
    finally:
        _bar = previous


class StudyProgress:
    """Counters of a study in progress: trials finished and the budget spent, in its unit (a round
    on a fifth of the clients is a fifth of a round's client updates), in the log (`trial`), on the
    command's bar, and in a Prefect progress artifact (the UI) updated at most once a second (an
    API call each, skipped while the server is away). Thread-safe: parallel trials share one."""

    UPDATE_INTERVAL_S = 1.0

    def __init__(self, study: optuna.Study, budget: Budget):
        self.unit, self.limit = budget.unit, budget.limit
        self.trials, self.spent = len(finished_trials(study)), spent(study, self.unit)
        self.started_at = self.spent  # spent before this process (a resumed study)
        self.lock = threading.Lock()
        self.artifact = create_progress_artifact(self.percent, description=f"{self.unit} spent of {self.limit:g}")
        self.updated = time.monotonic()
        self.trained = 0.0  # what this process's rounds cost
        self.bar = bar()
        self.bar.plan(self.limit, done=self.spent, trials=self.trials, unit=self.unit)

    @property
    def percent(self) -> float:
        return min(100.0, 100.0 * self.spent / self.limit)

    def round(self, cost: Cost) -> None:
        amount = cost.in_unit(self.unit)
        with self.lock:
            self.spent += amount
            self.trained += amount
            if time.monotonic() - self.updated >= self.UPDATE_INTERVAL_S:
                self.update_unless_away()
                self.updated = time.monotonic()
        self.bar.advance(amount)

    def update_unless_away(self) -> None:
        """Update the artifact where the Prefect server answers at once: training does not wait for a
        server that is away (restarted, say); a later update catches up."""
        if server_away():
            return
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}), contextlib.suppress(httpx.HTTPError):
            update_progress_artifact(self.artifact, self.percent)

    def finish(self, spent: float) -> None:
        """The study's charge in its unit, by every process that shared it."""
        with self.lock:
            self.spent = spent
            update_progress_artifact(self.artifact, self.percent)
            self.bar.drop(self.limit - self.started_at - self.trained)

    def trial(self) -> str:
        with self.lock:
            self.trials += 1
            self.bar.advance(trials=1)
            return f"[{self.trials} trials, {self.spent:g}/{self.limit:g} {self.unit}]"
