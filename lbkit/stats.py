"""Per-endpoint call statistics: in-flight count, peak-EWMA latency, outcomes.

The balancer owns one :class:`Stats` for its lifetime; pickers read it and the call path
writes it through :meth:`EndpointStats.start` and :meth:`EndpointStats.finish`. Entries
survive picker rebuilds.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from lbkit._config import check_float

__all__ = ["DEFAULT_DECAY", "LATENCY_BUCKETS", "EndpointStats", "Stats"]

DEFAULT_DECAY = 10.0
"""Seconds of the peak-EWMA decay window, as in Finagle and Linkerd."""

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds, inclusive) of the call-latency histogram's buckets; one more holds the rest."""


class EndpointStats:
    """Counters for one endpoint. Fields are read without a lock; writes hold the group's lock."""

    __slots__ = (
        "_group",
        "address",
        "consecutive_failures",
        "ewma",
        "ewma_stamp",
        "failures",
        "in_flight",
        "interval_failures",
        "interval_successes",
        "latency_buckets",
        "latency_sum",
        "successes",
        "weight_factor",
    )

    def __init__(self, address: str, group: Stats) -> None:
        self.address = address
        self._group = group
        self.in_flight = 0
        """Calls started and not yet finished."""
        self.successes = 0
        """Calls finished ok, since the entry was made."""
        self.failures = 0
        """Calls finished failed, since the entry was made."""
        self.consecutive_failures = 0
        """Failures since the last success."""
        self.interval_successes = 0
        """Successes since the outlier detector last took the interval's counts."""
        self.interval_failures = 0
        """Failures since the outlier detector last took the interval's counts."""
        self.weight_factor = 1.0
        """Share of its full weight the endpoint gets now, in (0, 1]; below 1 during slow start."""
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        """Finished calls by latency: entry i counts those in (LATENCY_BUCKETS[i-1], LATENCY_BUCKETS[i]],
        the last those above every bound (not cumulative)."""
        self.latency_sum = 0.0
        """Seconds of latency over the calls counted in ``latency_buckets``."""
        self.ewma = 0.0
        """Peak-EWMA latency in seconds as of ``ewma_stamp``; :meth:`latency` decays it to now."""
        self.ewma_stamp = group.clock()
        """When ``ewma`` was last updated (``clock`` time)."""

    def start(self) -> float:
        """Count a call as in flight; return its start time for :meth:`finish`."""
        group = self._group
        with group.lock:
            self.in_flight += 1
            group.total_in_flight += 1
        return group.clock()

    def finish(self, started: float, ok: bool, *, observe_latency: bool = True) -> None:
        """End a call begun at ``started``: drop it from in-flight, record its outcome and latency."""
        group = self._group
        now = group.clock()
        streak = False
        with group.lock:
            self.in_flight -= 1
            group.total_in_flight -= 1
            if ok:
                self.successes += 1
                self.interval_successes += 1
                self.consecutive_failures = 0
            else:
                self.failures += 1
                self.interval_failures += 1
                self.consecutive_failures += 1
                streak = self.consecutive_failures == group.streak_threshold
            if observe_latency:
                rtt = now - started if now > started else 0.0
                self._observe(rtt, now)
                self.latency_buckets[bisect_left(LATENCY_BUCKETS, rtt)] += 1
                self.latency_sum += rtt
        if streak and group.on_failure_streak is not None:
            group.on_failure_streak(self)

    def observe(self, rtt: float) -> None:
        """Fold one round-trip time (seconds) into the peak-EWMA latency."""
        group = self._group
        now = group.clock()
        with group.lock:
            self._observe(rtt, now)

    def _observe(self, rtt: float, now: float) -> None:
        # Finagle's peak EWMA: jump to a higher sample at once, decay towards lower ones.
        if rtt > self.ewma:
            self.ewma = rtt
        else:
            w = math.exp(-max(now - self.ewma_stamp, 0.0) / self._group.decay)
            self.ewma = self.ewma * w + rtt * (1.0 - w)
        self.ewma_stamp = now

    def latency(self, now: float | None = None) -> float:
        """Peak-EWMA latency in seconds, decayed to ``now``; 0.0 before any sample."""
        if now is None:
            now = self._group.clock()
        return self.ewma * math.exp(-max(now - self.ewma_stamp, 0.0) / self._group.decay)

    def latency_histogram(self) -> tuple[tuple[int, ...], float]:
        """A consistent copy of (``latency_buckets``, ``latency_sum``): calls finished with a latency.

        ``observe`` samples (not calls) are left out, as are calls finished with ``observe_latency=False``.
        """
        with self._group.lock:
            return tuple(self.latency_buckets), self.latency_sum

    def take_interval(self) -> tuple[int, int]:
        """Return and reset (successes, failures) since the last call, for the outlier detector."""
        with self._group.lock:
            counts = (self.interval_successes, self.interval_failures)
            self.interval_successes = 0
            self.interval_failures = 0
        return counts

    def __repr__(self) -> str:
        return (
            f"EndpointStats({self.address!r}, in_flight={self.in_flight}, "
            f"latency={self.latency() * 1e3:.2f}ms, ok={self.successes}, failed={self.failures})"
        )


class Stats:
    """The per-endpoint statistics of one balancer (or of a selector used alone).

    ``clock`` returns seconds (monotonic); ``decay`` is the peak-EWMA window in seconds.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, decay: float = DEFAULT_DECAY) -> None:
        self.clock = clock
        self.decay = check_float("Stats", "decay", decay, minimum=0.0, strict_min=True)
        self.lock = threading.Lock()
        self.total_in_flight = 0
        """Calls in flight over all endpoints."""
        self.streak_threshold = 0
        """Consecutive failures at which ``on_failure_streak`` fires (0: never)."""
        self.on_failure_streak: Callable[[EndpointStats], None] | None = None
        self._entries: dict[str, EndpointStats] = {}

    def __getitem__(self, address: str) -> EndpointStats:
        """The entry for ``address``, made on first use."""
        entry = self._entries.get(address)
        if entry is None:
            with self.lock:
                entry = self._entries.get(address)
                if entry is None:
                    entry = self._entries[address] = EndpointStats(address, self)
        return entry

    def get(self, address: str) -> EndpointStats | None:
        """The entry for ``address`` if there is one."""
        return self._entries.get(address)

    def discard(self, address: str) -> None:
        """Forget ``address`` (once its endpoint is gone and drained)."""
        with self.lock:
            entry = self._entries.pop(address, None)
            if entry is not None:
                self.total_in_flight -= entry.in_flight

    def __contains__(self, address: object) -> bool:
        return address in self._entries

    def __iter__(self) -> Iterator[EndpointStats]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)
