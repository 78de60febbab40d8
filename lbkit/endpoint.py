"""Endpoints, immutable endpoint sets, and the diff between two sets."""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from lbkit.errors import ConfigError

__all__ = ["Endpoint", "EndpointDiff", "EndpointHealth", "EndpointSet", "parse_address"]

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$"
)


def parse_address(address: object) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port`` into (host, port); raise ConfigError naming a bad one."""
    if not isinstance(address, str):
        raise ConfigError(f"endpoint address must be a str 'host:port', got {address!r}")
    text = address.strip()
    if text != address or not text:
        raise ConfigError(f"bad endpoint address {address!r}: expected 'host:port' or '[v6]:port'")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ConfigError(f"bad endpoint address {address!r}: expected '[v6]:port'")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"bad endpoint address {address!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"bad endpoint address {address!r}: expected 'host:port'")
        if ":" in host:
            raise ConfigError(
                f"bad endpoint address {address!r}: put an IPv6 host in brackets, '[{host}]:port'"
            )
        if not _HOSTNAME.match(host):
            raise ConfigError(f"bad endpoint address {address!r}: {host!r} is not a valid host")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"bad endpoint address {address!r}: port {port_text!r} is not in 1..65535")
    return host, int(port_text)


_NO_METADATA: Mapping[str, str] = MappingProxyType({})
_NO_TAGS: frozenset[str] = frozenset()
"""Shared by every endpoint without tags or metadata: one object, not one per endpoint for the cyclic
garbage collector to walk."""

_SHARED_LIMIT = 1024
"""Distinct tag sets (and metadata) remembered for sharing; past this, the memory starts over."""
_shared_tags: dict[frozenset[str], frozenset[str]] = {}
_shared_metadata: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}
"""Endpoints with equal tags (equal metadata, in the same order) share one read-only object: a service's
instances mostly carry the same ones (Consul adds its node's metadata to each), and an object per
endpoint is one more for CPython's collector to walk in every full collection."""


def _shared_tag_set(tags: frozenset[str]) -> frozenset[str]:
    if not tags:
        return _NO_TAGS
    shared = _shared_tags.get(tags)
    if shared is None:
        if len(_shared_tags) >= _SHARED_LIMIT:
            _shared_tags.clear()
        shared = _shared_tags.setdefault(tags, tags)
    return shared


def _shared_mapping(meta: Mapping[str, str]) -> Mapping[str, str]:
    if not meta:
        return _NO_METADATA
    items = tuple(meta.items())
    shared = _shared_metadata.get(items)
    if shared is None:
        if len(_shared_metadata) >= _SHARED_LIMIT:
            _shared_metadata.clear()
        shared = _shared_metadata.setdefault(items, MappingProxyType(dict(items)))
    return shared


def _check_weight(weight: object, address: str) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise ConfigError(f"endpoint {address}: weight must be a positive int, got {weight!r}")
    if weight < 1:
        raise ConfigError(f"endpoint {address}: weight must be >= 1, got {weight!r}")
    return weight


class EndpointHealth(str, enum.Enum):
    """What discovery says of an endpoint's health (Consul: its checks' aggregated status)."""

    PASSING = "passing"
    """In a state discovery accepts: the endpoint may be picked."""
    CRITICAL = "critical"
    """Unhealthy (Consul: a critical check, or a warning one when only passing is accepted): out of the
    picker like an endpoint failing its active health check, and counted as unhealthy by panic mode."""
    MAINTENANCE = "maintenance"
    """In maintenance (Consul's maintenance mode): drained as if removed, its calls in flight finishing."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One server: ``host:port`` (``[v6]:port`` for IPv6), a weight >= 1, an optional zone, tags, metadata,
    and its health as discovery reports it.

    ``rank`` is the endpoint's place when discovery sorts by round-trip time from the client (Consul's
    ``near``; 0 is the nearest), None otherwise. Endpoints are equal when every field is equal; they hash
    by address alone.
    """

    address: str
    weight: int = 1
    zone: str = ""
    tags: frozenset[str] = field(default_factory=frozenset)
    metadata: Mapping[str, str] = field(default_factory=lambda: _NO_METADATA)
    rank: int | None = None
    health: EndpointHealth = EndpointHealth.PASSING

    def __post_init__(self) -> None:
        parse_address(self.address)
        _check_weight(self.weight, self.address)
        if not isinstance(self.health, EndpointHealth):
            raise ConfigError(
                f"endpoint {self.address}: health must be an EndpointHealth, got {self.health!r}"
            )
        if not isinstance(self.zone, str):
            raise ConfigError(f"endpoint {self.address}: zone must be a str, got {self.zone!r}")
        tags: Any = self.tags
        if isinstance(tags, str) or not isinstance(tags, Iterable):
            raise ConfigError(f"endpoint {self.address}: tags must be an iterable of str, got {tags!r}")
        tag_set = frozenset(tags)
        if not all(isinstance(t, str) for t in tag_set):
            raise ConfigError(
                f"endpoint {self.address}: every tag must be a str, got {sorted(map(repr, tag_set))}"
            )
        object.__setattr__(self, "tags", _shared_tag_set(tag_set))
        meta: Any = self.metadata
        if not isinstance(meta, Mapping):
            raise ConfigError(f"endpoint {self.address}: metadata must be a mapping, got {meta!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ConfigError(
                f"endpoint {self.address}: metadata keys and values must be str, got {dict(meta)!r}"
            )
        object.__setattr__(self, "metadata", _shared_mapping(meta))
        rank = self.rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ConfigError(f"endpoint {self.address}: rank must be an int >= 0 or None, got {rank!r}")

    def __hash__(self) -> int:
        return hash(self.address)

    @property
    def host(self) -> str:
        """The host part, without IPv6 brackets."""
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        """The port."""
        return parse_address(self.address)[1]

    def __repr__(self) -> str:
        extra = "" if self.weight == 1 else f", weight={self.weight}"
        if self.zone:
            extra += f", zone={self.zone!r}"
        if self.rank is not None:
            extra += f", rank={self.rank}"
        if self.health is not EndpointHealth.PASSING:
            extra += f", health={self.health.value!r}"
        return f"Endpoint({self.address!r}{extra})"


def _coerce(item: Endpoint | str) -> Endpoint:
    if isinstance(item, Endpoint):
        return item
    if isinstance(item, str):
        return Endpoint(item)
    raise ConfigError(f"expected an Endpoint or an address str, got {item!r}")


@dataclass(frozen=True, slots=True)
class EndpointDiff:
    """What changed from one endpoint set to the next, by address."""

    added: tuple[Endpoint, ...]
    removed: tuple[Endpoint, ...]
    changed: tuple[Endpoint, ...]
    """Endpoints whose address stayed but some other field (weight, tags, ...) changed; the new value."""

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


class EndpointSet:
    """An immutable set of endpoints with distinct addresses, in a stable order, with a version.

    An empty set is valid (a service with no instances); use ``StaticDiscovery`` to reject one.
    """

    __slots__ = ("_by_address", "_endpoints", "_version")

    def __init__(self, endpoints: Iterable[Endpoint | str] = (), version: int = 0) -> None:
        if isinstance(endpoints, (str, bytes)):
            raise ConfigError(f"expected a list of endpoints, got the str {endpoints!r}")
        items = tuple(_coerce(e) for e in endpoints)
        by_address: dict[str, Endpoint] = {}
        for e in items:
            if e.address in by_address:
                raise ConfigError(f"duplicate endpoint address {e.address!r}")
            by_address[e.address] = e
        self._endpoints = items
        self._by_address = MappingProxyType(by_address)
        self._version = version

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints, in the order given."""
        return self._endpoints

    @property
    def version(self) -> int:
        """A version number (the Consul index for Consul discovery)."""
        return self._version

    @property
    def by_address(self) -> Mapping[str, Endpoint]:
        """Endpoints keyed by address."""
        return self._by_address

    def __len__(self) -> int:
        return len(self._endpoints)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self._endpoints)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, Endpoint):
            return self._by_address.get(item.address) == item
        return item in self._by_address

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EndpointSet):
            return NotImplemented
        if len(self._endpoints) != len(other._endpoints):
            return False  # at once, not after copying ten thousand entries (failover compares each answer)
        if self._endpoints == other._endpoints:  # the same order (and objects: no field compared)
            return True
        return self._by_address == other._by_address

    def __hash__(self) -> int:
        return hash(frozenset(self._by_address))

    def __repr__(self) -> str:
        return f"EndpointSet({list(self._endpoints)!r}, version={self._version})"

    def diff(self, new: EndpointSet) -> EndpointDiff:
        """What changes going from this set to ``new``."""
        old = self._by_address
        added = tuple(e for e in new if e.address not in old)
        removed = tuple(e for e in self if e.address not in new._by_address)
        changed = tuple(e for e in new if e.address in old and old[e.address] != e)
        return EndpointDiff(added, removed, changed)
