"""Weighted round robin: a smooth, interleaved sequence in proportion to endpoint weights.

Weights 8:4 give ``A B A A B A ...`` (every window of three holds two A and one B), never 8 A then 4 B.
Two pickers do the work, both O(1) per pick and flat in N, both lock-free:

* the exact period, when the gcd-reduced integer weights sum to at most :data:`TABLE_LIMIT`: one
  period of the smooth sequence (each endpoint's turns at its ideal times ``(k + 1/2) / w``,
  merged) is precomputed and a shared counter walks it from a random offset;
* otherwise (large or fractional weights, e.g. during slow start): a golden-ratio Weyl sequence
  mapped through Walker's alias table, which gives every endpoint exactly its share in the long run
  and spreads each endpoint's turns evenly.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from typing import ClassVar

from lbkit._config import config
from lbkit.endpoint import Endpoint
from lbkit.selectors.base import Key, Picker, Selector
from lbkit.stats import Stats

__all__ = ["TABLE_LIMIT", "AliasPicker", "TablePicker", "Weighted", "smooth_order", "weighted_picker"]

TABLE_LIMIT = 1 << 16
"""Largest period (sum of gcd-reduced weights) that is precomputed as a table."""

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
"""2**64 divided by the golden ratio, odd: the step of the Weyl sequence."""


def smooth_order(weights: Sequence[int], length: int | None = None) -> list[int]:
    """The first ``length`` turns (default: one period, ``sum(weights)``) of the smooth weighted sequence.

    Endpoint ``i`` takes its ``k``-th turn at the ideal time ``(k + 1/2) / weights[i]``; turns are
    merged by time, ties going to the lower index. Every prefix gives each endpoint its share to
    within one turn.
    """
    total = sum(weights)
    if length is None:
        length = total
    n = len(weights)
    if len(set(weights)) <= 1:
        order = list(range(n)) * (length // n + 1)
        del order[length:]
        return order
    times: list[float] = []
    owners: list[int] = []
    for i, w in enumerate(weights):
        turns = length * w // total + 1
        step = 1.0 / w
        times.extend([(k + 0.5) * step for k in range(turns)])
        owners.extend(itertools.repeat(i, turns))
    order = sorted(range(len(times)), key=times.__getitem__)  # stable: ties keep the lower index first
    return list(map(owners.__getitem__, order[:length]))


class TablePicker:
    """Walks a precomputed sequence of endpoints from a random offset with a lock-free counter."""

    __slots__ = ("_endpoints", "_n", "_next", "_table")

    def __init__(self, endpoints: tuple[Endpoint, ...], table: Sequence[Endpoint]) -> None:
        self._endpoints = endpoints
        self._table = tuple(table)
        self._n = len(self._table)
        self._next: Callable[[], int] = itertools.count(random.randrange(self._n)).__next__

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints this picker chooses from."""
        return self._endpoints

    def pick(self, key: Key = None) -> Endpoint:
        """The next endpoint of the sequence; ``key`` is ignored."""
        return self._table[self._next() % self._n]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._endpoints)} endpoints, period {self._n})"


class AliasPicker:
    """Maps a golden-ratio Weyl sequence through Walker's alias table: exact long-run shares, O(1) picks.

    Pick ``k`` takes ``u = k * 2**64 / phi mod 2**64``; the top part of ``u * n`` chooses a column,
    the rest is compared with the column's threshold to choose its endpoint or its alias.
    """

    __slots__ = ("_alias", "_endpoints", "_n", "_next", "_threshold")

    def __init__(self, endpoints: tuple[Endpoint, ...], weights: Sequence[float]) -> None:
        n = len(endpoints)
        total = math.fsum(weights)
        scaled = [w * n / total for w in weights]
        threshold = [1 << 64] * n  # a column whose threshold is 2**64 never uses its alias
        alias = list(range(n))
        small = [i for i, p in enumerate(scaled) if p < 1.0]
        large = [i for i, p in enumerate(scaled) if p >= 1.0]
        while small and large:
            s = small.pop()
            g = large[-1]
            threshold[s] = min(int(scaled[s] * 2.0**64), 1 << 64)
            alias[s] = g
            scaled[g] -= 1.0 - scaled[s]
            if scaled[g] < 1.0:
                small.append(large.pop())
        self._endpoints = endpoints
        self._n = n
        self._threshold = tuple(threshold)
        self._alias = tuple(endpoints[a] for a in alias)
        self._next: Callable[[], int] = itertools.count(random.getrandbits(64)).__next__

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints this picker chooses from."""
        return self._endpoints

    def pick(self, key: Key = None) -> Endpoint:
        """The next endpoint of the weighted sequence; ``key`` is ignored."""
        x = ((self._next() * _GOLDEN64) & _MASK64) * self._n
        column = x >> 64
        if (x & _MASK64) < self._threshold[column]:
            return self._endpoints[column]
        return self._alias[column]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._n} endpoints)"


def weighted_picker(endpoints: tuple[Endpoint, ...], weights: Sequence[float]) -> Picker:
    """A picker for positive ``weights``: the exact period if it is small, else the alias sequence."""
    if all(float(w).is_integer() for w in weights):
        ints = [int(w) for w in weights]
        g = math.gcd(*ints)
        ints = [w // g for w in ints]
        if sum(ints) <= TABLE_LIMIT:
            return TablePicker(endpoints, [endpoints[i] for i in smooth_order(ints)])
    return AliasPicker(endpoints, weights)


@config
class Weighted(Selector):
    """Smooth weighted round robin by ``Endpoint.weight`` times the slow-start ``weight_factor``.

    Each build starts at a random point of the sequence, so many clients do not move in step.
    Weight factors are read when the picker is built.
    """

    name: ClassVar[str] = "weighted"
    slow_start: ClassVar[bool] = True

    def _build(self, endpoints: tuple[Endpoint, ...], stats: Stats) -> Picker:
        factors = [stats[e.address].weight_factor for e in endpoints]
        if all(f >= 1.0 for f in factors):
            return weighted_picker(endpoints, [e.weight for e in endpoints])
        return weighted_picker(
            endpoints, [e.weight * max(f, 1e-9) for e, f in zip(endpoints, factors, strict=True)]
        )
