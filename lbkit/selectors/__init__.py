"""Load-balancing policies: round robin, least connections, weighted, consistent hash, peak EWMA, weighted
round robin from load reports."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from lbkit.errors import ConfigError
from lbkit.selectors.base import EmptyPicker, Key, Picker, Selector
from lbkit.selectors.consistent_hash import ConsistentHash
from lbkit.selectors.least_connections import LeastConnections
from lbkit.selectors.peak_ewma import PeakEwma
from lbkit.selectors.round_robin import RoundRobin
from lbkit.selectors.weighted import Weighted
from lbkit.selectors.weighted_round_robin import WeightedRoundRobin

__all__ = [
    "SELECTORS",
    "ConsistentHash",
    "EmptyPicker",
    "Key",
    "LeastConnections",
    "PeakEwma",
    "Picker",
    "RoundRobin",
    "Selector",
    "Weighted",
    "WeightedRoundRobin",
    "by_name",
]

SELECTORS: Mapping[str, Selector] = MappingProxyType(
    {
        cls.name: cls()
        for cls in (RoundRobin, LeastConnections, Weighted, ConsistentHash, PeakEwma, WeightedRoundRobin)
    }
)
"""Every policy by name, with its default options (the instances are frozen, so sharing them is safe)."""


def by_name(name: str) -> Selector:
    """The policy called ``name`` with its default options; ConfigError naming it if there is none."""
    selector = SELECTORS.get(name) if isinstance(name, str) else None
    if selector is None:
        raise ConfigError(f"unknown selector {name!r}; valid names are {sorted(SELECTORS)}")
    return selector
