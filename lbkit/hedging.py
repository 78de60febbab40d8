"""Hedged calls (gRFC A6 hedging): the policy, and the adaptive delay's window of recent latencies.

A hedged call sends its first attempt at once and, while no response has come, another attempt to an
endpoint not yet tried every ``hedging_delay``, up to ``max_attempts`` in all. The first response wins
and the other attempts are cancelled. A failure with a status in ``non_fatal_status_codes`` sends the
next hedge at once; any other failure ends the call with it. Hedges are throttled by the same retry
budget as retries and never outlive the call's deadline.
"""

from __future__ import annotations

import math
import re
import threading
from array import array
from collections.abc import Iterable

import grpc

from lbkit._config import check_float, check_int, check_status_codes, config
from lbkit.errors import ConfigError

__all__ = ["MAX_HEDGED_ATTEMPTS", "HedgingPolicy", "LatencyWindow", "hedge_delay", "parse_percentile"]

MAX_HEDGED_ATTEMPTS = 5
"""gRFC A6 caps ``maxAttempts`` at 5 (larger values are treated as 5 there; lbkit rejects them)."""

_PERCENTILE = re.compile(r"p(\d+(?:\.\d+)?)")


def parse_percentile(text: str, owner: str = "HedgingPolicy") -> float:
    """The percentile a delay like ``"p95"`` or ``"p99.9"`` names, in (0, 100); ConfigError otherwise."""
    match = _PERCENTILE.fullmatch(text)
    value = float(match.group(1)) if match else math.nan
    if not 0.0 < value < 100.0:
        raise ConfigError(
            f"{owner}: hedging_delay must be seconds >= 0 or a percentile 'pNN' in (0, 100), got {text!r}"
        )
    return value


@config
class HedgingPolicy:
    """Send a call to more than one endpoint when the first is slow to answer (gRFC A6 ``hedgingPolicy``).

    For unary calls and server streams before their first response; client and bidirectional streams
    under a hedging policy are sent once. Give it per method through ``retry=``'s method mapping (a
    method has a retry policy or a hedging policy, as in gRPC's service config).
    """

    max_attempts: int = 2
    """Attempts in all, the first included: 2 to 5."""
    hedging_delay: float | str = "p95"
    """Seconds to wait for a response before the next hedge (0 sends all attempts at once), or a
    percentile such as ``"p95"``: hedge once the call has waited longer than that percentile of recent
    latencies of the method (about 5 % extra load at p95, "The Tail at Scale")."""
    non_fatal_status_codes: Iterable[grpc.StatusCode] = ()
    """Statuses that send the next hedge at once instead of ending the call."""
    min_samples: int = 50
    """With a percentile delay, the latencies a method needs before the percentile is used."""
    window: int = 1000
    """With a percentile delay, how many recent latencies of a method the percentile is taken over."""
    fallback_delay: float | None = 1.0
    """With a percentile delay, the delay while the method has fewer than ``min_samples`` latencies (a
    new client knows nothing of its servers yet): seconds, or None to hedge nothing until then."""

    def __post_init__(self) -> None:
        name = "HedgingPolicy"
        check_int(name, "max_attempts", self.max_attempts, minimum=2)
        if self.max_attempts > MAX_HEDGED_ATTEMPTS:
            raise ConfigError(
                f"{name}: max_attempts must be <= {MAX_HEDGED_ATTEMPTS} (gRFC A6's cap), "
                f"got {self.max_attempts!r}"
            )
        delay = self.hedging_delay
        if isinstance(delay, str):
            parse_percentile(delay, name)
        else:
            check_float(name, "hedging_delay", delay, minimum=0.0)
        codes = check_status_codes(name, "non_fatal_status_codes", self.non_fatal_status_codes)
        object.__setattr__(self, "non_fatal_status_codes", codes)
        check_int(name, "min_samples", self.min_samples, minimum=1)
        check_int(name, "window", self.window, minimum=self.min_samples)
        if self.fallback_delay is not None:
            check_float(name, "fallback_delay", self.fallback_delay, minimum=0.0)

    @property
    def percentile(self) -> float | None:
        """The percentile of an adaptive delay, or None for a fixed delay."""
        delay = self.hedging_delay
        return parse_percentile(delay) if isinstance(delay, str) else None


def hedge_delay(policy: HedgingPolicy, window: LatencyWindow | None) -> float:
    """Seconds a call under ``policy`` waits for a response before its next hedge: the fixed delay, or
    the window's percentile once it holds ``min_samples`` latencies (``fallback_delay`` until then;
    infinity, no hedge, when that is None)."""
    delay = policy.hedging_delay
    if not isinstance(delay, str):
        return delay
    if window is not None and window.count >= policy.min_samples:
        return window.threshold
    fallback = policy.fallback_delay
    return math.inf if fallback is None else fallback


class LatencyWindow:
    """The last ``size`` latencies of one method and a percentile of them, for an adaptive hedging delay.

    :meth:`record` is a store and an increment; the percentile is recomputed (a sort of ``size``
    numbers) once every ``size // 10`` records, so its cost per call stays well under a microsecond.
    """

    __slots__ = ("_count", "_every", "_lock", "_min", "_q", "_samples", "_threshold")

    def __init__(self, percentile: float, size: int = 1000, min_samples: int = 50) -> None:
        self._q = percentile / 100.0
        self._samples = array("d", bytes(8 * size))
        self._count = 0
        self._every = max(1, size // 10)
        self._min = min_samples
        self._threshold = math.inf
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        """Add one latency (seconds)."""
        with self._lock:
            n = self._count
            self._samples[n % len(self._samples)] = seconds
            self._count = n + 1
            if n + 1 >= self._min and (n + 1 - self._min) % self._every == 0:
                self._recompute(min(n + 1, len(self._samples)))

    def _recompute(self, filled: int) -> None:
        ordered = sorted(self._samples[:filled])
        # Nearest-rank percentile: the smallest sample with at least q of the samples at or below it.
        self._threshold = ordered[max(0, math.ceil(self._q * filled) - 1)]

    @property
    def threshold(self) -> float:
        """Seconds a call waits before it is hedged: the percentile, or infinity before ``min_samples``."""
        return self._threshold

    @property
    def count(self) -> int:
        """Latencies recorded so far."""
        return self._count
