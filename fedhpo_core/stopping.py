"""Where long work looks for a stop request: the work calls a `StopChecks` now and then, and
whoever runs it (a command's signal handling: `cli.interrupts`) installs the check, which may
raise to end the work there."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StopChecks:
    """The checks installed by `during`, innermost last; calling this calls the innermost one (with
    none installed, nothing: a list test and no call)."""

    def __init__(self):
        self.checks: list[Callable[[], None]] = []

    def __call__(self) -> None:
        if self.checks:
            self.checks[-1]()

    @contextmanager
    def during(self, check: Callable[[], None]) -> Iterator[None]:
        """While the block runs, calling this calls `check`, which may raise."""
        self.checks.append(check)
        try:
            yield
        finally:
            self.checks.remove(check)
