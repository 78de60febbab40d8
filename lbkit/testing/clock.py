"""``FakeClock``: a monotonic clock that moves only when a test moves it."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["FakeClock"]


class FakeClock:
    """A stand-in for ``time.monotonic``: pass it as ``clock=`` to a balancer, ``Stats`` or the core.

    ``now`` is the time it reads; :meth:`advance` moves it forward and tells whoever subscribed with
    :meth:`on_advance` (the balancers do, so their timers and waiting calls look at the new time at once).
    Safe to read and advance from any thread.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = float(start)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (>= 0), wake the subscribers, and return the new time."""
        if not seconds >= 0:
            raise ValueError(f"FakeClock.advance: seconds must be >= 0, got {seconds!r}")
        with self._lock:
            self.now += seconds
            now = self.now
            listeners = list(self._listeners)
        for listener in listeners:
            listener()
        return now

    def sleep(self, seconds: float) -> None:
        """Advance instead of sleeping, for code that takes a ``sleep`` function."""
        self.advance(seconds)

    def on_advance(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every :meth:`advance`."""
        with self._lock:
            self._listeners.append(listener)

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now!r})"
