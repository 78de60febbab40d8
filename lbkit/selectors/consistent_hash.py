"""Consistent hashing on mmh3: a ring with virtual nodes, or a Maglev table, with bounded loads.

Placement depends only on the endpoint set (addresses and weights), never on its order or on chance,
so every client and every rebuild maps a key to the same endpoint. A key is hashed with 32-bit
MurmurHash3 (``mmh3.hash(key, 0, signed=False)``); a call without a key goes to a random endpoint.

*Ring*: each endpoint owns ``vnodes * weight`` points, 32-bit words of
``mmh3_x64_128_digest(address, seed)`` for seeds 0, 1, ...; a key belongs to the first point at or
after its hash. Removing an endpoint moves only the keys it owned. Build cost grows with the number
of points, balance with the points per endpoint (max/mean load about ``1 + 2.5 / sqrt(vnodes)`` on
100 endpoints); the default, 100, keeps a rebuild of 1,000 endpoints near 40 ms.

*Maglev* (Eisenbud et al., NSDI 2016): endpoints take turns, in proportion to weight, claiming the
next free slot of their own permutation ``offset + j * skip (mod table_size)`` of a prime-sized table;
a key belongs to slot ``hash % table_size``. Shares differ by at most one slot per unit of weight
(max/mean about 1.02 on 100 endpoints), lookups are one index, and the build cost is fixed by the
table size; removing 1 of N endpoints moves a little more than 1/N of the keys.

*Bounded loads* (Mirrokni, Thorup, Zadimoghaddam, 2018): when the owner of a key carries at least
``bounded_load`` times its fair share of the calls in flight (for equal weights:
``in_flight + 1 > ceil(c * (total_in_flight + 1) / N)``), the key spills to the next endpoint on the
ring, or to the next slot of a probe sequence drawn from the key's hash on the Maglev table, that is
below its bound.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import sys
from array import array
from collections.abc import Callable
from operator import add, mod, mul, sub
from typing import ClassVar

import mmh3

from lbkit._config import check_choice, check_float, check_int, config
from lbkit.endpoint import Endpoint
from lbkit.errors import ConfigError
from lbkit.selectors.base import Key, Picker, Selector
from lbkit.selectors.weighted import smooth_order
from lbkit.stats import EndpointStats, Stats

__all__ = ["ConsistentHash", "hash_key"]

_hash32: Callable[[str | bytes, int, bool], int] = mmh3.hash
_digest: Callable[[bytes, int], bytes] = mmh3.mmh3_x64_128_digest
_hash64: Callable[[bytes, int, bool, bool], tuple[int, int]] = mmh3.hash64
_bisect = bisect.bisect_left
_getrandbits = random.getrandbits

_MAX_RING_POINTS = 1 << 22
"""Above this many points the per-endpoint counts are scaled down (and removals then move more keys)."""
_MAX_RING_ENDPOINTS = 1 << 20
"""A ring point packs a 32-bit hash and the owner's index into one exact float."""
_MAGLEV_TAIL = 192
"""The last slots of a Maglev table are filled by ranking the free slots instead of probing for them."""

_FLIP = bytes([1, 0]) + bytes(254)
"""Maps taken (1) to 0 and free (0) to 1."""

Row = tuple[Endpoint, EndpointStats, float]
"""An endpoint, its stats, and total weight / its weight (its load bound is c x mean x weight share)."""


def hash_key(key: str | bytes) -> int:
    """The 32-bit hash a key is placed by."""
    return _hash32(key, 0, False)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def _rows(ordered: list[Endpoint], stats: Stats) -> tuple[Row, ...]:
    total = sum(e.weight for e in ordered)
    return tuple((e, stats[e.address], total / e.weight) for e in ordered)


def _ring_points(ordered: list[Endpoint], vnodes: int) -> tuple[list[float], int]:
    """The sorted ring, each point ``hash32 * 2**bits + owner index`` as an exact float, and ``bits``."""
    counts = [vnodes * e.weight for e in ordered]
    total = sum(counts)
    if total > _MAX_RING_POINTS:
        counts = [max(1, c * _MAX_RING_POINTS // total) for c in counts]
    bits = max(1, (len(ordered) - 1).bit_length())
    scale = float(1 << bits)
    ring: list[float] = []
    for index, (endpoint, count) in enumerate(zip(ordered, counts, strict=True)):
        name = endpoint.address.encode()
        words = array("I", b"".join([_digest(name, seed) for seed in range((count + 3) // 4)]))
        if sys.byteorder == "big":  # pragma: no cover - the digest is little-endian
            words.byteswap()
        del words[count:]
        ring.extend(map(add, map(mul, words, itertools.repeat(scale)), itertools.repeat(float(index))))
    ring.sort()
    ring.append(ring[0] + float(1 << (32 + bits)))  # sentinel: wraps around to the first point's owner
    return ring, bits


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


class _RingPicker:
    __slots__ = ("_bound", "_endpoints", "_mask", "_ring", "_rows", "_scale", "_stats")

    def __init__(
        self, endpoints: tuple[Endpoint, ...], stats: Stats, vnodes: int, bound: float | None
    ) -> None:
        ordered = sorted(endpoints, key=lambda e: e.address)
        if len(ordered) > _MAX_RING_ENDPOINTS:
            raise ConfigError(
                f"ConsistentHash: the ring holds at most {_MAX_RING_ENDPOINTS} endpoints, got {len(ordered)}"
            )
        self._endpoints = endpoints
        self._rows = _rows(ordered, stats)
        self._ring, bits = _ring_points(ordered, vnodes)
        self._scale = float(1 << bits)
        self._mask = (1 << bits) - 1
        self._bound = bound
        self._stats = stats

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints this picker chooses from."""
        return self._endpoints

    def pick(self, key: Key = None) -> Endpoint:
        """The owner of the first ring point at or after the key's hash (a random point without a key)."""
        ring = self._ring
        i = _bisect(ring, (_getrandbits(32) if key is None else _hash32(key, 0, False)) * self._scale)
        endpoint, s, share = self._rows[int(ring[i]) & self._mask]
        bound = self._bound
        if bound is None or s.in_flight * share < bound * (self._stats.total_in_flight + 1):
            return endpoint
        return self._spill(i, endpoint, bound * (self._stats.total_in_flight + 1))

    def _spill(self, i: int, owner: Endpoint, limit: float) -> Endpoint:
        ring, rows, mask = self._ring, self._rows, self._mask
        points = len(ring) - 1
        if i >= points:
            i = 0
        last = int(ring[i]) & mask
        for _ in range(points):
            i += 1
            if i >= points:
                i = 0
            index = int(ring[i]) & mask
            if index == last:
                continue
            last = index
            endpoint, s, share = rows[index]
            if s.in_flight * share < limit:
                return endpoint
        return owner

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._endpoints)} endpoints, {len(self._ring) - 1} points)"


class _MaglevPicker:
    __slots__ = ("_bound", "_endpoints", "_size", "_stats", "_table")

    def __init__(self, endpoints: tuple[Endpoint, ...], stats: Stats, size: int, bound: float | None) -> None:
        ordered = sorted(endpoints, key=lambda e: e.address)
        rows = _rows(ordered, stats)
        self._endpoints = endpoints
        self._table: list[Row] = list(map(rows.__getitem__, _maglev_table(ordered, size)))
        self._size = size
        self._bound = bound
        self._stats = stats

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints this picker chooses from."""
        return self._endpoints

    def pick(self, key: Key = None) -> Endpoint:
        """The owner of the key's slot (a random slot without a key)."""
        h = _getrandbits(32) if key is None else _hash32(key, 0, False)
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
            endpoint, s, share = table[slot]
            if endpoint is last:
                continue
            last = endpoint
            if s.in_flight * share < limit:
                return endpoint
        return owner

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._endpoints)} endpoints, {self._size} slots)"


@config
class ConsistentHash(Selector):
    """Maps ``pick(key=...)`` to the same endpoint for the same endpoint set, with bounded loads.

    ``algorithm`` is ``"maglev"`` (default: even shares, the fastest lookup, a build cost fixed by
    ``table_size``) or ``"ring"`` (fewest keys moved when the set changes). ``vnodes`` is the ring's
    points per unit of weight; ``table_size`` the Maglev table's size, a prime well above the number
    of endpoints. ``bounded_load`` (default 1.25, >= 1) caps an endpoint at that multiple of its fair
    share of the calls in flight, spilling keys past it; ``None`` turns the cap off.
    """

    name: ClassVar[str] = "consistent_hash"
    uses_stats: ClassVar[bool] = True
    uses_key: ClassVar[bool] = True

    algorithm: str = "maglev"
    vnodes: int = 100
    table_size: int = 65537
    bounded_load: float | None = 1.25

    def __post_init__(self) -> None:
        check_choice("ConsistentHash", "algorithm", self.algorithm, ("ring", "maglev"))
        check_int("ConsistentHash", "vnodes", self.vnodes, minimum=1)
        check_int("ConsistentHash", "table_size", self.table_size, minimum=2)
        if not _is_prime(self.table_size):
            raise ConfigError(f"ConsistentHash: table_size must be a prime, got {self.table_size!r}")
        if self.bounded_load is not None:
            bound = check_float("ConsistentHash", "bounded_load", self.bounded_load, minimum=1.0)
            object.__setattr__(self, "bounded_load", bound)

    def _build(self, endpoints: tuple[Endpoint, ...], stats: Stats) -> Picker:
        if self.algorithm == "ring":
            return _RingPicker(endpoints, stats, self.vnodes, self.bounded_load)
        return _MaglevPicker(endpoints, stats, self.table_size, self.bounded_load)
