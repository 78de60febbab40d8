"""Bounded loads for consistent hashing, the rule the ring and Maglev pickers share.

*Bounded loads* (Mirrokni, Thorup, Zadimoghaddam, 2018): when the owner of a key carries at least
``bounded_load`` times its fair share of the calls in flight (for equal weights:
``in_flight + 1 > ceil(c * (total_in_flight + 1) / N)``), the key spills to the next endpoint on the
ring, or to the next slot of a probe sequence drawn from the key's hash on the Maglev table, that is
below its bound.
"""

from __future__ import annotations

from collections.abc import Callable

import mmh3

from lbkit.endpoint import Endpoint
from lbkit.stats import EndpointStats, Stats

__all__ = ["Row", "fits", "hash32", "hash_key", "rows"]

hash32: Callable[[str | bytes, int, bool], int] = mmh3.hash

Row = tuple[Endpoint, EndpointStats, float]
"""An endpoint, its stats, and total weight / its weight (its load bound is c x mean x weight share)."""


def hash_key(key: str | bytes) -> int:
    """The 32-bit hash a key is placed by."""
    return hash32(key, 0, False)


def rows(ordered: list[Endpoint], stats: Stats) -> tuple[Row, ...]:
    """One row per endpoint of ``ordered``: the endpoint, its stats and total weight / its weight."""
    total = sum(e.weight for e in ordered)
    return tuple((e, stats[e.address], total / e.weight) for e in ordered)


def fits(row: Row, limit: float) -> bool:
    """Whether ``row``'s endpoint may take one more call under ``limit`` = bound x (total in flight + 1).

    An endpoint of weight share ``w / W`` may carry ``bound x (total + 1) x w / W`` calls in flight; the
    pickers test ``in_flight x (W / w) < limit`` inline on their hot path, this same inequality.
    """
    return row[1].in_flight * row[2] < limit
