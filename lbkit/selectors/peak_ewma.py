"""Peak EWMA: latency-aware power of two choices, as in Finagle and Linkerd.

An endpoint's cost is its peak-EWMA round-trip time (decayed to now, see :class:`lbkit.stats.Stats`,
``decay`` 10 s by default) times ``in_flight + 1``, divided by its slow-start ``weight_factor``.
An endpoint with no latency sample yet costs 0 while idle, so it gets probed, and
:data:`PENALTY` per call in flight otherwise, so it is not flooded before its first answer.
"""

from __future__ import annotations

import math
import random
from typing import ClassVar

from lbkit._config import check_int, config
from lbkit.endpoint import Endpoint
from lbkit.selectors.base import Key, Picker, Selector
from lbkit.stats import EndpointStats, Stats

__all__ = ["PENALTY", "PeakEwma"]

PENALTY = 1e9
"""Cost, per call in flight, of an endpoint that has answered nothing yet (seconds x calls)."""

_random = random.random
_exp = math.exp

Row = tuple[Endpoint, EndpointStats]
"""An endpoint and its stats."""


class _PeakEwmaPicker:
    __slots__ = ("_choices", "_endpoints", "_n", "_rows", "_stats")

    def __init__(self, endpoints: tuple[Endpoint, ...], stats: Stats, choices: int) -> None:
        self._endpoints = endpoints
        self._rows: tuple[Row, ...] = tuple((e, stats[e.address]) for e in endpoints)
        self._n = len(endpoints)
        self._stats = stats
        self._choices = min(choices, self._n)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints this picker chooses from."""
        return self._endpoints

    def pick(self, key: Key = None) -> Endpoint:
        """The cheaper of two random endpoints (or the cheapest of ``choices``); ties at random."""
        n = self._n
        rows = self._rows
        stats = self._stats
        now = stats.clock()
        if self._choices == 2:
            i = int(_random() * n)
            j = int(_random() * (n - 1))
            if j >= i:
                j += 1
            a, sa = rows[i]
            b, sb = rows[j]
            # The decayed peak EWMA, inlined from EndpointStats.latency: this is the hot path.
            decay = stats.decay
            rtt = sa.ewma
            if rtt > 0.0:
                age = now - sa.ewma_stamp
                ca = (rtt * _exp(-age / decay) if age > 0.0 else rtt) * (sa.in_flight + 1)
            else:
                ca = PENALTY * sa.in_flight
            rtt = sb.ewma
            if rtt > 0.0:
                age = now - sb.ewma_stamp
                cb = (rtt * _exp(-age / decay) if age > 0.0 else rtt) * (sb.in_flight + 1)
            else:
                cb = PENALTY * sb.in_flight
            # Compare cost / weight_factor without dividing.
            return a if ca * sb.weight_factor <= cb * sa.weight_factor else b
        return self._pick_many(rows, n, now)

    def _pick_many(self, rows: tuple[Row, ...], n: int, now: float) -> Endpoint:
        seen: list[int] = []
        best = rows[0][0]
        best_cost = 0.0
        ties = 0
        while len(seen) < self._choices:
            i = int(_random() * n) if self._choices < n else len(seen)
            if i in seen:
                continue
            seen.append(i)
            endpoint, s = rows[i]
            rtt = s.latency(now)
            cost = (rtt * (s.in_flight + 1) if rtt > 0.0 else PENALTY * s.in_flight) / (
                s.weight_factor or 1e-9
            )
            if ties == 0 or cost < best_cost:
                best, best_cost, ties = endpoint, cost, 1
            elif cost == best_cost:
                ties += 1
                if _random() * ties < 1.0:
                    best = endpoint
        return best

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._n} endpoints)"


@config
class PeakEwma(Selector):
    """The cheapest of ``choices`` random endpoints by peak-EWMA latency x (in-flight + 1).

    The decay window lives in :class:`lbkit.stats.Stats` (``Stats(decay=10.0)``). With as many
    endpoints as ``choices`` or fewer, every endpoint is compared.
    """

    name: ClassVar[str] = "peak_ewma"
    uses_stats: ClassVar[bool] = True
    slow_start: ClassVar[bool] = True

    choices: int = 2

    def __post_init__(self) -> None:
        check_int("PeakEwma", "choices", self.choices, minimum=1)

    def _build(self, endpoints: tuple[Endpoint, ...], stats: Stats) -> Picker:
        return _PeakEwmaPicker(endpoints, stats, self.choices)
