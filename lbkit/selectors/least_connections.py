"""Least connections: the power of two (or ``choices``) random choices over in-flight counts."""

from __future__ import annotations

import random
from typing import ClassVar

from lbkit._config import check_int, config
from lbkit.endpoint import Endpoint
from lbkit.selectors.base import Key, Picker, Selector
from lbkit.stats import EndpointStats, Stats

__all__ = ["EXACT_LIMIT", "LeastConnections"]

EXACT_LIMIT = 4
"""Up to this many endpoints (or up to ``choices``) every pick scans them all for the exact minimum."""

_random = random.random

Row = tuple[Endpoint, EndpointStats]


class _Base:
    __slots__ = ("_endpoints", "_n", "_rows")

    def __init__(self, endpoints: tuple[Endpoint, ...], stats: Stats) -> None:
        self._endpoints = endpoints
        self._rows: tuple[Row, ...] = tuple((e, stats[e.address]) for e in endpoints)
        self._n = len(endpoints)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints this picker chooses from."""
        return self._endpoints

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._n} endpoints)"


class _ExactPicker(_Base):
    """Scans every endpoint; ties between equally loaded endpoints are broken uniformly at random."""

    __slots__ = ()

    def pick(self, key: Key = None) -> Endpoint:
        """The endpoint with the least ``(in_flight + 1) / weight_factor``."""
        best: Endpoint | None = None
        best_load = 0.0
        ties = 0
        for endpoint, s in self._rows:
            load = (s.in_flight + 1) / (s.weight_factor or 1e-9)
            if best is None or load < best_load:
                best, best_load, ties = endpoint, load, 1
            elif load == best_load:
                ties += 1
                if _random() * ties < 1.0:
                    best = endpoint
        assert best is not None
        return best


class _TwoChoicesPicker(_Base):
    """Two distinct endpoints at random; the less loaded wins, a tie goes to either at random."""

    __slots__ = ()

    def pick(self, key: Key = None) -> Endpoint:
        """The less loaded of two random endpoints."""
        n = self._n
        rows = self._rows
        i = int(_random() * n)
        j = int(_random() * (n - 1))
        if j >= i:
            j += 1
        a, sa = rows[i]
        b, sb = rows[j]
        # Compare (in_flight + 1) / weight_factor without dividing.
        if (sa.in_flight + 1) * sb.weight_factor <= (sb.in_flight + 1) * sa.weight_factor:
            return a
        return b


class _ManyChoicesPicker(_Base):
    """``choices`` distinct endpoints at random; the least loaded wins, ties at random."""

    __slots__ = ("_choices",)

    def __init__(self, endpoints: tuple[Endpoint, ...], stats: Stats, choices: int) -> None:
        super().__init__(endpoints, stats)
        self._choices = choices

    def pick(self, key: Key = None) -> Endpoint:
        """The least loaded of ``choices`` random endpoints."""
        n = self._n
        rows = self._rows
        seen: list[int] = []
        best = rows[0][0]
        best_load = 0.0
        while len(seen) < self._choices:
            i = int(_random() * n)
            if i in seen:
                continue
            seen.append(i)
            endpoint, s = rows[i]
            load = (s.in_flight + 1) / (s.weight_factor or 1e-9)
            if len(seen) == 1 or load < best_load:  # sample order is random: the first minimum is fair
                best, best_load = endpoint, load
        return best


@config
class LeastConnections(Selector):
    """The least loaded of ``choices`` random endpoints (power of two choices by default).

    Load is ``(in_flight + 1) / weight_factor``, so an endpoint in slow start looks busier. Sets of at
    most ``max(choices, EXACT_LIMIT)`` endpoints get the exact minimum. Ties go to a random endpoint,
    so a client at concurrency 1 still spreads its calls. ``choices=1`` picks uniformly at random.
    """

    name: ClassVar[str] = "least_connections"
    uses_stats: ClassVar[bool] = True
    slow_start: ClassVar[bool] = True

    choices: int = 2

    def __post_init__(self) -> None:
        check_int("LeastConnections", "choices", self.choices, minimum=1)

    def _build(self, endpoints: tuple[Endpoint, ...], stats: Stats) -> Picker:
        n = len(endpoints)
        if self.choices == 1:
            return _ManyChoicesPicker(endpoints, stats, 1)
        if n <= max(self.choices, EXACT_LIMIT):
            return _ExactPicker(endpoints, stats)
        if self.choices == 2:
            return _TwoChoicesPicker(endpoints, stats)
        return _ManyChoicesPicker(endpoints, stats, self.choices)
