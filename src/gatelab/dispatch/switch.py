"""A per-thread off switch, for the fast paths that benchmarks and tests turn off."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ThreadSwitch:
    """On unless turned off in the calling thread with ``with switch.off(): ...``."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def on(self) -> bool:
        return not getattr(self._local, "off", False)

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        previous = getattr(self._local, "off", False)
        self._local.off = True
        try:
            yield
        finally:
            self._local.off = previous
