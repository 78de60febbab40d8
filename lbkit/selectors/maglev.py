"""Maglev hashing on mmh3, with bounded loads.

Maglev (Eisenbud et al., NSDI 2016): endpoints take turns, in proportion to weight, claiming the
next free slot of their own permutation ``offset + j * skip (mod table_size)`` of a prime-sized table;
a key belongs to slot ``hash % table_size``. Shares differ by at most one slot per unit of weight
(max/mean about 1.02 on 100 endpoints), lookups are one index, and the build cost is fixed by the
table size; removing 1 of N endpoints moves a little more than 1/N of the keys.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from operator import mod, mul, sub

import mmh3

from lbkit.endpoint import Endpoint
from lbkit.selectors.base import Key
from lbkit.selectors.bounded_load import Row, fits, hash32, rows
from lbkit.selectors.weighted import smooth_order
from lbkit.stats import Stats

__all__ = ["MaglevPicker", "is_prime"]

_hash64: Callable[[bytes, int, bool, bool], tuple[int, int]] = mmh3.hash64
_getrandbits = random.getrandbits

_MAGLEV_TAIL = 192
"""The last slots of a Maglev table are filled by ranking the free slots instead of probing for them."""

_FLIP = bytes([1, 0]) + bytes(254)
"""Maps taken (1) to 0 and free (0) to 1."""


def is_prime(n: int) -> bool:
    """Whether ``n`` is a prime (a Maglev table's size must be)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def _maglev_table(ordered: list[Endpoint], size: int) -> list[int]:
    """Owner index per slot: the Maglev paper's fill, endpoints taking turns in proportion to weight."""
    offsets: list[int] = []
    skips: list[int] = []
    for endpoint in ordered:
        h1, h2 = _hash64(endpoint.address.encode(), 0, True, False)
        offsets.append(h1 % size)
        skips.append(h2 % (size - 1) + 1)
    order = _turns([e.weight for e in ordered], size)
    taken = bytearray(size)
    owner = [0] * size
    position = offsets[:]
    tail = min(_MAGLEV_TAIL, size)
    for i in order[: size - tail]:
        c = position[i]
        if taken[c]:
            s = skips[i]
            c += s
            if c >= size:
                c -= size
            while taken[c]:
                c += s
                if c >= size:
                    c -= size
        taken[c] = 1
        owner[c] = i
        c += skips[i]
        position[i] = c - size if c >= size else c
    # Near the end most probes would hit taken slots: take instead the free slot that comes first in
    # the endpoint's permutation (lowest rank (slot - offset) / skip), which is the same slot.
    free = list(itertools.compress(range(size), taken.translate(_FLIP)))
    for i in order[size - tail : size]:
        o, s = offsets[i], skips[i]
        rank = min(
            map(
                mod,
                map(mul, map(sub, free, itertools.repeat(o)), itertools.repeat(pow(s, -1, size))),
                itertools.repeat(size),
            )
        )
        slot = (o + rank * s) % size
        free.remove(slot)
        owner[slot] = i
    return owner


def _turns(weights: list[int], length: int) -> list[int]:
    """At least ``length`` turns, in rounds: per round each endpoint takes ``weight / max weight`` turns.

    Endpoints of equal weight move together, heaviest first, so a round costs one step per distinct
    weight; sets with many distinct, very uneven weights use the smooth sequence instead.
    """
    top = max(weights)
    groups: dict[int, list[int]] = {}
    for index, weight in enumerate(weights):
        groups.setdefault(weight, []).append(index)
    if len(groups) == 1:
        return list(range(len(weights))) * (length // len(weights) + 1)
    rounds = length * top // sum(weights) + 2
    if rounds * len(groups) > 4 * length:
        return smooth_order(weights, length)
    by_weight = sorted(groups.items(), reverse=True)
    order: list[int] = []
    r = 0
    while len(order) < length:
        for weight, members in by_weight:
            if (r + 1) * weight // top > r * weight // top:
                order.extend(members)
        r += 1
    return order


class MaglevPicker:
    """A Maglev picker over one endpoint set, with bounded loads when ``bound`` is set."""

    __slots__ = ("_bound", "_endpoints", "_size", "_stats", "_table")

    def __init__(self, endpoints: tuple[Endpoint, ...], stats: Stats, size: int, bound: float | None) -> None:
        ordered = sorted(endpoints, key=lambda e: e.address)
        table_rows = rows(ordered, stats)
        self._endpoints = endpoints
        self._table: list[Row] = list(map(table_rows.__getitem__, _maglev_table(ordered, size)))
        self._size = size
        self._bound = bound
        self._stats = stats

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints this picker chooses from."""
        return self._endpoints

    def pick(self, key: Key = None) -> Endpoint:
        """The owner of the key's slot (a random slot without a key)."""
        h = _getrandbits(32) if key is None else hash32(key, 0, False)
        endpoint, s, share = self._table[h % self._size]
        bound = self._bound
        if bound is None or s.in_flight * share < bound * (self._stats.total_in_flight + 1):
            return endpoint
        return self._spill(h, endpoint, bound * (self._stats.total_in_flight + 1))

    def _spill(self, h: int, owner: Endpoint, limit: float) -> Endpoint:
        table, size = self._table, self._size
        slot = h % size
        skip = (h // size) % (size - 1) + 1
        last = owner
        for _ in range(size):
            slot += skip
            if slot >= size:
                slot -= size
            row = table[slot]
            if row[0] is last:
                continue
            last = row[0]
            if fits(row, limit):
                return last
        return owner

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._endpoints)} endpoints, {self._size} slots)"
