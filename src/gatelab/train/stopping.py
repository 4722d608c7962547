"""How a run is asked to stop: Ctrl-C (SIGINT) and the wall-clock budget.

A first Ctrl-C asks the loop to stop after the current step (it then saves); a second one
interrupts the step itself, which the trainer rolls back before saving. The handler is
installed only for the duration of ``Trainer.fit`` and only on the main thread (signals
cannot be handled elsewhere), and the previous handler is put back afterwards.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["StopRequests"]

REASONS = (None, "time_budget", "interrupted")


class StopRequests:
    """Ctrl-C and time-budget requests to stop; ``say`` prints a one-line message."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.interrupted = False
        self.t0 = time.perf_counter()

    def start(self) -> None:
        """A new ``fit`` call: the budget counts from now, earlier Ctrl-Cs are forgotten."""
        self.interrupted = False
        self.t0 = time.perf_counter()

    def code(self, time_budget_s: float | None) -> int:
        """0 (go on), 1 (the time budget is spent) or 2 (Ctrl-C): an index of REASONS, as an
        int so the ranks of a distributed run can agree on the largest."""
        if self.interrupted:
            return 2
        return int(time_budget_s is not None and time.perf_counter() - self.t0 >= time_budget_s)

    def _handler(self, signum, frame) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self.say("Ctrl-C: stopping after this step and saving (press again to stop now)")

    @contextlib.contextmanager
    def sigint(self) -> Iterator[None]:
        """Route Ctrl-C to :meth:`_handler` inside the block (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
