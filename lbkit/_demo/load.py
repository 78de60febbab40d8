"""The demo's client load: calls on a fixed schedule (``rate`` per second) from a bounded pool of threads.

Each call is recorded (start offset, latency, who answered, status), so the demo can count, take
percentiles and plot latency over time. The load ends by itself at ``duration`` or at :meth:`PacedLoad.stop`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Call", "PacedLoad", "Record", "percentile"]

Call = Callable[[int], tuple[bool, str, str]]
"""One call, given its sequence number: returns (ok, address that answered or "", status code name)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One finished call: when it started (seconds after the load began), how long it took, its outcome."""

    at: float
    latency_ms: float
    ok: bool
    server: str
    code: str


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(max(round(q / 100.0 * len(ordered) + 0.5) - 1, 0), len(ordered) - 1)
    return ordered[rank]


class PacedLoad:
    """``rate`` calls per second for ``duration`` seconds, from at most ``workers`` threads.

    Call ``n`` is due at ``start + n / rate``; a worker that falls behind sends at once, so at most
    ``workers`` calls are in flight and at most ``rate * duration`` are sent.
    """

    def __init__(self, call: Call, *, rate: float, workers: int, duration: float) -> None:
        if rate <= 0 or workers < 1 or duration <= 0:
            raise ValueError(f"bad load: rate={rate}, workers={workers}, duration={duration}")
        self._call = call
        self.rate = rate
        self.duration = duration
        self.records: list[Record] = []
        """Finished calls, appended as they end (list.append is atomic)."""
        self.failed = 0
        self._slots = itertools.count()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"lbkit-demo-load-{i}", daemon=True)
            for i in range(workers)
        ]
        self.started_at = 0.0
        """``time.monotonic()`` when the load began."""

    def start(self) -> PacedLoad:
        """Begin sending now."""
        self.started_at = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def _work(self) -> None:
        total = int(self.rate * self.duration)
        for n in self._slots:
            if n >= total or self._stop.is_set():
                return
            due = self.started_at + n / self.rate
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            t0 = time.monotonic()
            try:
                ok, server, code = self._call(n)
            except Exception as exc:  # a broken call is a failed call, not a dead worker
                ok, server, code = False, "", type(exc).__name__
            t1 = time.monotonic()
            if not ok:
                self.failed += 1
            self.records.append(Record(t0 - self.started_at, (t1 - t0) * 1e3, ok, server, code))

    @property
    def elapsed(self) -> float:
        """Seconds since the load began (0 before :meth:`start`)."""
        return time.monotonic() - self.started_at if self.started_at else 0.0

    def done(self) -> bool:
        """Whether every worker has finished."""
        return not any(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending and wait up to ``timeout`` seconds in all for calls in flight to end."""
        self._stop.set()
        self.join(timeout)

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds in all for the workers to finish."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.ident is not None:
                t.join(max(0.0, deadline - time.monotonic()))
