"""Passive outlier detection (gRFC A50, Envoy): eject endpoints whose calls fail, for a growing time.

Three ways to find an outlier:

* a streak of ``consecutive_failures`` failed calls, acted on at once
  (:meth:`OutlierDetector.on_failure_streak`);
* success rate, every ``interval``: an endpoint whose success rate is below
  ``mean - stdev * stdev_factor`` of its peers;
* failure percentage, every ``interval``: an endpoint whose failure percentage is at least ``threshold``.

An endpoint ejected for the n-th time stays out for ``min(base_ejection_time * n, cap) * (1 + U(0, jitter))``
seconds, ``cap`` being ``max(base_ejection_time, max_ejection_time)``: the jitter keeps endpoints ejected
together from returning together, so an ejection can outlast the cap by at most that share. ``n`` (the
multiplier) grows by one at each ejection, at most to where the cap is reached, and drops by one at
each interval the endpoint spends not ejected.

At most ``max_ejection_percent`` of the current endpoints (rounded down) are ejected at once, but one
endpoint may always be ejected, whatever the percentage (as in Envoy). Interval sweeps consider the
worst endpoints first, so the cap keeps those out.

The detector does no I/O and starts no timer: the balancer calls :meth:`OutlierDetector.tick` (or
:meth:`~OutlierDetector.evaluate` and :meth:`~OutlierDetector.expire`) at
:meth:`~OutlierDetector.next_deadline`. Its methods are safe to call from any thread.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import grpc

from lbkit._config import check_float, check_int, check_status_codes, config
from lbkit.errors import ConfigError
from lbkit.events import Cause, Event, EventKind
from lbkit.stats import EndpointStats, Stats

__all__ = [
    "DEFAULT_FAILURE_CODES",
    "FailurePercentageEjection",
    "OutlierDetection",
    "OutlierDetector",
    "SuccessRateEjection",
]

DEFAULT_FAILURE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
"""Status codes that count as an endpoint's failure: the server or the path to it failed, not the request."""

_EPSILON = 1e-9


def _check_percent(owner: str, name: str, value: object) -> float:
    return check_float(owner, name, value, minimum=0.0, maximum=100.0)


@config
class SuccessRateEjection:
    """Eject endpoints whose success rate in an interval is below ``mean - stdev * stdev_factor``."""

    stdev_factor: float = 1.9
    """How many standard deviations below the mean success rate an endpoint must fall."""
    enforcement_percentage: float = 100.0
    """Chance, in percent, that an outlier found this way is ejected."""
    minimum_hosts: int = 5
    """Endpoints with ``request_volume`` calls in the interval needed for the check to run at all."""
    request_volume: int = 100
    """Calls an endpoint needs in the interval to be judged."""

    def __post_init__(self) -> None:
        owner = "SuccessRateEjection"
        check_float(owner, "stdev_factor", self.stdev_factor, minimum=0.0)
        _check_percent(owner, "enforcement_percentage", self.enforcement_percentage)
        check_int(owner, "minimum_hosts", self.minimum_hosts, minimum=0)
        check_int(owner, "request_volume", self.request_volume, minimum=1)


@config
class FailurePercentageEjection:
    """Eject endpoints whose failure percentage in an interval is at least ``threshold``."""

    threshold: float = 85.0
    """Failure percentage at or above which an endpoint is an outlier."""
    enforcement_percentage: float = 100.0
    """Chance, in percent, that an outlier found this way is ejected."""
    minimum_hosts: int = 5
    """Current endpoints needed for the check to run at all."""
    request_volume: int = 50
    """Calls an endpoint needs in the interval to be judged."""

    def __post_init__(self) -> None:
        owner = "FailurePercentageEjection"
        _check_percent(owner, "threshold", self.threshold)
        _check_percent(owner, "enforcement_percentage", self.enforcement_percentage)
        check_int(owner, "minimum_hosts", self.minimum_hosts, minimum=0)
        check_int(owner, "request_volume", self.request_volume, minimum=1)


@config
class OutlierDetection:
    """When to eject an endpoint for failing calls, and for how long (times in seconds)."""

    consecutive_failures: int | None = 5
    """Failed calls in a row that eject an endpoint at once; None turns this off."""
    failure_codes: Collection[grpc.StatusCode] = DEFAULT_FAILURE_CODES
    """Status codes that count as failures: ``grpc.StatusCode`` members but OK, kept as a frozenset."""
    interval: float = 10.0
    """Seconds between sweeps: success-rate and failure-percentage checks, multiplier decay."""
    base_ejection_time: float = 30.0
    """Seconds of the first ejection; the n-th lasts n times as long, up to the cap."""
    max_ejection_time: float = 300.0
    """The cap on an ejection's length (before jitter); ``base_ejection_time`` if that is larger."""
    max_ejection_percent: float = 10.0
    """Largest share of the current endpoints ejected at once; one endpoint may always be ejected."""
    success_rate: SuccessRateEjection | None = None
    """Success-rate ejection; None turns it off."""
    failure_percentage: FailurePercentageEjection | None = None
    """Failure-percentage ejection; None turns it off."""
    jitter: float = 0.1
    """Each ejection lasts its time times ``1 + U(0, jitter)``."""

    def __post_init__(self) -> None:
        owner = "OutlierDetection"
        if self.consecutive_failures is not None:
            check_int(owner, "consecutive_failures", self.consecutive_failures, minimum=1)
        codes = check_status_codes(owner, "failure_codes", self.failure_codes)
        object.__setattr__(self, "failure_codes", codes)
        check_float(owner, "interval", self.interval, minimum=0.0, strict_min=True)
        check_float(owner, "base_ejection_time", self.base_ejection_time, minimum=0.0, strict_min=True)
        check_float(owner, "max_ejection_time", self.max_ejection_time, minimum=0.0)
        _check_percent(owner, "max_ejection_percent", self.max_ejection_percent)
        if self.success_rate is not None and not isinstance(self.success_rate, SuccessRateEjection):
            raise ConfigError(
                f"{owner}: success_rate must be a SuccessRateEjection or None, got {self.success_rate!r}"
            )
        if self.failure_percentage is not None and not isinstance(
            self.failure_percentage, FailurePercentageEjection
        ):
            raise ConfigError(
                f"{owner}: failure_percentage must be a FailurePercentageEjection or None, "
                f"got {self.failure_percentage!r}"
            )
        check_float(owner, "jitter", self.jitter, minimum=0.0)

    @property
    def enabled(self) -> bool:
        """Whether any way of ejecting is on."""
        return self.consecutive_failures is not None or self.sweeps

    @property
    def sweeps(self) -> bool:
        """Whether success-rate or failure-percentage ejection is on (they need interval counts)."""
        return self.success_rate is not None or self.failure_percentage is not None

    @property
    def ejection_cap(self) -> float:
        """The longest ejection before jitter: ``max(base_ejection_time, max_ejection_time)``."""
        return max(self.base_ejection_time, self.max_ejection_time)


@dataclass
class _Entry:
    multiplier: int = 0
    ejected_at: float | None = None
    until: float = 0.0


class OutlierDetector:
    """The outlier-ejection state of one balancer's endpoints, by address."""

    def __init__(
        self,
        config: OutlierDetection,
        stats: Stats,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._stats = stats
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._ejected: frozenset[str] = frozenset()
        self._next_sweep = clock() + config.interval
        cap, base = config.ejection_cap, config.base_ejection_time
        self._max_multiplier = max(1, math.ceil(cap / base - _EPSILON))

    # -- queries ---------------------------------------------------------------------------------

    def is_failure(self, code: grpc.StatusCode | None) -> bool:
        """Whether a call ending with ``code`` counts as a failure; None (no status) counts as UNAVAILABLE."""
        if code is None:
            code = grpc.StatusCode.UNAVAILABLE
        return code in self.config.failure_codes

    def is_ejected(self, address: str) -> bool:
        """Whether ``address`` is ejected now (until :meth:`expire` returns it)."""
        return address in self._ejected

    def ejected_until(self, address: str) -> float | None:
        """When ejected ``address`` is due back (clock time), or None if it is not ejected."""
        with self._lock:
            entry = self._entries.get(address)
            return entry.until if entry is not None and entry.ejected_at is not None else None

    @property
    def ejected(self) -> frozenset[str]:
        """The addresses ejected now."""
        return self._ejected

    @property
    def next_sweep(self) -> float | None:
        """When :meth:`evaluate` is next due, or None if no way of ejecting is on."""
        return self._next_sweep if self.config.enabled else None

    def next_deadline(self) -> float | None:
        """The earliest of the next sweep and the earliest return of an ejected endpoint; None if neither."""
        with self._lock:
            times = [e.until for e in self._entries.values() if e.ejected_at is not None]
        if self.config.enabled:
            times.append(self._next_sweep)
        return min(times) if times else None

    # -- changes ---------------------------------------------------------------------------------

    def on_failure_streak(self, entry: EndpointStats, addresses: Collection[str]) -> Event | None:
        """Eject ``entry``'s endpoint after a streak of failures if the cap allows; its EJECTED event or None.

        ``addresses`` are the current endpoints; an address not among them (one draining) is left alone.
        When the cap refuses the ejection, the streak starts over so a further streak may try again.
        """
        threshold = self.config.consecutive_failures
        if threshold is None:
            return None
        address = entry.address
        current = _as_set(addresses)
        with self._lock:
            if address not in current or address in self._ejected:
                return None
            event = (
                self._eject(
                    address, Cause.CONSECUTIVE_FAILURES, f"{threshold} consecutive failures", self._clock()
                )
                if self._room(current)
                else None
            )
        if event is None:
            self._reset_streak(address)
        return event

    def evaluate(self, addresses: Collection[str]) -> list[Event]:
        """Run one interval's sweep over the current endpoints ``addresses``; the events, in order.

        Brings back endpoints whose ejection time passed, takes each endpoint's interval counts, runs
        success-rate then failure-percentage ejection, and lowers the multiplier of every endpoint
        that stayed in. The next sweep is due ``interval`` seconds from now.
        """
        now = self._clock()
        current = _as_set(addresses)
        with self._lock:
            events = self._expire(now)
            returned = {e.address for e in events}
            if self.config.sweeps:
                counts = self._take_counts(current)
                events += self._success_rate(counts, current, now)
                events += self._failure_percentage(counts, current, now)
            for address, entry in list(self._entries.items()):
                if entry.ejected_at is None and address not in returned:
                    entry.multiplier = max(0, entry.multiplier - 1)
                    if entry.multiplier == 0:
                        del self._entries[address]
            self._next_sweep = now + self.config.interval
        self._reset_streaks(e.address for e in events if e.kind is EventKind.RETURNED)
        return events

    def expire(self) -> list[Event]:
        """Return the endpoints whose ejection time has passed; their RETURNED events."""
        with self._lock:
            events = self._expire(self._clock())
        self._reset_streaks(e.address for e in events)
        return events

    def tick(self, addresses: Collection[str]) -> list[Event]:
        """What a timer calls at :meth:`next_deadline`; the events, in order.

        Runs :meth:`evaluate` when the sweep is due, else only :meth:`expire`.
        """
        if self.config.enabled and self._clock() >= self._next_sweep:
            return self.evaluate(addresses)
        return self.expire()

    def forget(self, address: str) -> None:
        """Drop all state of ``address`` (its endpoint was removed) and restart its streak; no event."""
        with self._lock:
            self._entries.pop(address, None)
            self._ejected = self._ejected - {address}
        self._reset_streak(address)

    # -- internals (the lock is held) ------------------------------------------------------------

    def _room(self, current: frozenset[str]) -> bool:
        allowed = max(1, math.floor(len(current) * self.config.max_ejection_percent / 100.0 + _EPSILON))
        return len(self._ejected & current) < allowed

    def _eject(self, address: str, cause: Cause, why: str, now: float) -> Event:
        cfg = self.config
        entry = self._entries.setdefault(address, _Entry())
        entry.multiplier = min(entry.multiplier + 1, self._max_multiplier)
        duration = min(cfg.base_ejection_time * entry.multiplier, cfg.ejection_cap)
        if cfg.jitter > 0.0:
            duration *= 1.0 + cfg.jitter * self._rng.random()
        entry.ejected_at = now
        entry.until = now + duration
        self._ejected = self._ejected | {address}
        return Event(EventKind.EJECTED, address, f"{why}; ejected for {duration:.1f}s", now, cause)

    def _expire(self, now: float) -> list[Event]:
        events: list[Event] = []
        for address, entry in self._entries.items():
            if entry.ejected_at is not None and entry.until <= now:
                held = entry.until - entry.ejected_at
                entry.ejected_at = None
                reason = f"ejection of {held:.1f}s ended"
                events.append(Event(EventKind.RETURNED, address, reason, now, Cause.EJECTION_ENDED))
        if events:
            self._ejected = self._ejected - {e.address for e in events}
        return events

    def _take_counts(self, current: frozenset[str]) -> dict[str, tuple[int, int]]:
        counts: dict[str, tuple[int, int]] = {}
        for address in sorted(current):
            entry = self._stats.get(address)
            counts[address] = entry.take_interval() if entry is not None else (0, 0)
        return counts

    def _enforced(self, percentage: float) -> bool:
        if percentage >= 100.0:
            return True
        if percentage <= 0.0:
            return False
        return self._rng.random() * 100.0 < percentage

    def _success_rate(
        self, counts: dict[str, tuple[int, int]], current: frozenset[str], now: float
    ) -> list[Event]:
        sr = self.config.success_rate
        if sr is None:
            return []
        rates = {a: ok / (ok + bad) for a, (ok, bad) in counts.items() if ok + bad >= sr.request_volume}
        if not rates or len(rates) < sr.minimum_hosts:
            return []
        mean = math.fsum(rates.values()) / len(rates)
        stdev = math.sqrt(math.fsum((r - mean) ** 2 for r in rates.values()) / len(rates))
        limit = mean - stdev * sr.stdev_factor
        events: list[Event] = []
        for address, rate in sorted(rates.items(), key=lambda item: (item[1], item[0])):
            if rate >= limit - _EPSILON:
                break
            if not self._room(current):
                break
            if address in self._ejected or not self._enforced(sr.enforcement_percentage):
                continue
            why = f"success rate {rate:.1%} below {limit:.1%} (mean {mean:.1%} of {len(rates)} endpoints)"
            events.append(self._eject(address, Cause.SUCCESS_RATE, why, now))
        return events

    def _failure_percentage(
        self, counts: dict[str, tuple[int, int]], current: frozenset[str], now: float
    ) -> list[Event]:
        fp = self.config.failure_percentage
        if fp is None or len(current) < fp.minimum_hosts:
            return []
        percents = {
            a: 100.0 * bad / (ok + bad) for a, (ok, bad) in counts.items() if ok + bad >= fp.request_volume
        }
        events: list[Event] = []
        for address, percent in sorted(percents.items(), key=lambda item: (-item[1], item[0])):
            if percent < fp.threshold - _EPSILON:
                break
            if not self._room(current):
                break
            if address in self._ejected or not self._enforced(fp.enforcement_percentage):
                continue
            why = f"failure percentage {percent:.1f}% at or above {fp.threshold:g}%"
            events.append(self._eject(address, Cause.FAILURE_PERCENTAGE, why, now))
        return events

    # -- stats (the detector's lock is not held) -------------------------------------------------

    def _reset_streak(self, address: str) -> None:
        entry = self._stats.get(address)
        if entry is not None:
            with self._stats.lock:
                entry.consecutive_failures = 0

    def _reset_streaks(self, addresses: Iterable[str]) -> None:
        for address in addresses:
            self._reset_streak(address)


def _as_set(addresses: Collection[str]) -> frozenset[str]:
    return addresses if isinstance(addresses, frozenset) else frozenset(addresses)
