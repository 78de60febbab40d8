"""Consistent hashing: the public selector over the ring (:mod:`lbkit.selectors.ring_hash`) and Maglev
(:mod:`lbkit.selectors.maglev`) pickers, with bounded loads (:mod:`lbkit.selectors.bounded_load`).

Placement depends only on the endpoint set (addresses and weights), never on its order or on chance,
so every client and every rebuild maps a key to the same endpoint. A key is hashed with 32-bit
MurmurHash3 (``mmh3.hash(key, 0, signed=False)``); a call without a key goes to a random endpoint.
"""

from __future__ import annotations

from typing import ClassVar

from lbkit._config import check_choice, check_float, check_int, config
from lbkit.endpoint import Endpoint
from lbkit.errors import ConfigError
from lbkit.selectors.base import Picker, Selector
from lbkit.selectors.bounded_load import hash_key
from lbkit.selectors.maglev import MaglevPicker, is_prime
from lbkit.selectors.ring_hash import RingPicker
from lbkit.stats import Stats

__all__ = ["ConsistentHash", "hash_key"]


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
        if not is_prime(self.table_size):
            raise ConfigError(f"ConsistentHash: table_size must be a prime, got {self.table_size!r}")
        if self.bounded_load is not None:
            bound = check_float("ConsistentHash", "bounded_load", self.bounded_load, minimum=1.0)
            object.__setattr__(self, "bounded_load", bound)

    def _build(self, endpoints: tuple[Endpoint, ...], stats: Stats) -> Picker:
        if self.algorithm == "ring":
            return RingPicker(endpoints, stats, self.vnodes, self.bounded_load)
        return MaglevPicker(endpoints, stats, self.table_size, self.bounded_load)
