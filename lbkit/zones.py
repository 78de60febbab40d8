"""Zone-aware routing: calls stay in the client's zone while it has the capacity, and spill the rest.

The rule is Envoy's zone-aware routing. Let ``up[z]`` be zone ``z``'s share of the usable capacity
(the weights of its ready, healthy, not ejected endpoints over all of them) and ``lo[z]`` its share of
the clients (by default the same for every zone that has an endpoint known to discovery, healthy or
not: clients spread evenly over the service's zones). For the client's zone ``L``:

* ``up[L] >= lo[L]`` (and ``up[L] > 0``), *direct*: every call stays in ``L``;
* otherwise, *residual*: a share ``up[L] / lo[L]`` of calls stays in ``L``, and the rest goes to the
  other zones in proportion to their residual capacity ``max(up[z] - lo[z], 0)``.

When every client runs this rule, each zone receives exactly its share of the usable capacity, so every
endpoint sees about the same request rate. Zone routing is off (every call goes to the picker over all
usable endpoints) while the client's zone is unknown, in panic mode, when usable endpoints span fewer
than two zones, when clients do (``client_shares``), when the client's zone has no clients, or when
fewer than ``min_cluster_size`` endpoints are usable. ``routing_enabled`` percent of calls follow the
rule; the others go to the picker over all usable endpoints.

The plan is computed when pickers are built (:class:`ZoneRouter`, called by the balancer core); a call
pays one random draw and a comparison (for keyed selectors, a hash of the key, so a key keeps its zone).
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import mmh3

from lbkit._config import check_float, check_int, config
from lbkit.endpoint import Endpoint
from lbkit.errors import ConfigError
from lbkit.selectors.base import Key, Picker, RefreshingPicker, Selector, refreshing
from lbkit.stats import Stats

__all__ = [
    "KEY_SEED",
    "KeyedSplitZonePicker",
    "LocalZonePicker",
    "SplitZonePicker",
    "ZoneMode",
    "ZonePicker",
    "ZonePlan",
    "ZoneRouter",
    "ZoneRouting",
    "plan_zones",
]

log = logging.getLogger("lbkit")

KEY_SEED = 0x7A6F6E65
"""MurmurHash3 seed of the hash that chooses a key's zone: independent of the hash that places the key
inside the zone (seed 0)."""

_hash: Callable[[str | bytes, int], int] = mmh3.hash
"""MurmurHash3 x86 32-bit, signed: the fastest form mmh3 offers."""


@config
class ZoneRouting:
    """How calls are kept in the client's zone (Envoy's zone-aware routing; see :mod:`lbkit.zones`).

    The client's zone itself is the balancer's ``zone=`` option.
    """

    min_cluster_size: int = 6
    """Fewest usable endpoints for zone routing to apply (Envoy's default, 6); below it, all zones."""
    routing_enabled: float = 100.0
    """Percent of calls routed by zone, in [0, 100]; the others go to any zone."""
    client_shares: Mapping[str, float] | None = None
    """Each zone's share of the clients, any positive scale (``{"a": 2, "b": 1}``). None: an equal share
    for every named zone with an endpoint known to discovery (in any state)."""

    def __post_init__(self) -> None:
        o = "ZoneRouting"
        check_int(o, "min_cluster_size", self.min_cluster_size, minimum=1)
        check_float(o, "routing_enabled", self.routing_enabled, minimum=0.0, maximum=100.0)
        shares = self.client_shares
        if shares is None:
            return
        if not isinstance(shares, Mapping):
            raise ConfigError(f"{o}: client_shares must be a mapping of zone to share, got {shares!r}")
        clean: dict[str, float] = {}
        for zone, share in shares.items():
            if not isinstance(zone, str) or not zone:
                raise ConfigError(f"{o}: client_shares keys must be non-empty zone names, got {zone!r}")
            clean[zone] = check_float(o, f"client_shares[{zone!r}]", share, minimum=0.0)
        if not any(v > 0 for v in clean.values()):
            raise ConfigError(
                f"{o}: client_shares must give some zone a positive share, got {dict(shares)!r}"
            )
        object.__setattr__(self, "client_shares", MappingProxyType(clean))


class ZoneMode(str, enum.Enum):
    """How a plan routes calls (Envoy's names in brackets)."""

    OFF = "off"
    """Every call goes to any zone (NoLocalityRouting)."""
    DIRECT = "direct"
    """Every zone-routed call stays in the client's zone (LocalityDirect)."""
    RESIDUAL = "residual"
    """Some calls stay, the rest spill by residual capacity (LocalityResidual)."""


@dataclass(frozen=True, slots=True)
class ZonePlan:
    """Where zone-routed calls go: a share to the client's zone, the rest per other zone."""

    mode: ZoneMode
    zone: str
    """The client's zone ("" when unknown)."""
    local: float = 0.0
    """Share of zone-routed calls kept in ``zone``, in [0, 1]."""
    spill: tuple[tuple[str, float], ...] = ()
    """``(zone, share)`` of zone-routed calls for each other zone taking some; the shares sum to
    ``1 - local``."""
    reason: str = ""
    """Why zone routing is off, or a summary of the plan."""

    @property
    def shares(self) -> dict[str, float]:
        """Every zone's share of zone-routed calls (empty when off)."""
        if self.mode is ZoneMode.OFF:
            return {}
        out = {self.zone: self.local} if self.local > 0 else {}
        out.update(self.spill)
        return out


def _off(zone: str, reason: str) -> ZonePlan:
    return ZonePlan(ZoneMode.OFF, zone, reason=reason)


def plan_zones(
    zone: str,
    capacity: Mapping[str, float],
    clients: Mapping[str, float],
    *,
    usable_count: int,
    min_cluster_size: int = 6,
    panic: bool = False,
) -> ZonePlan:
    """Envoy's zone-aware rule for a client in ``zone``.

    ``capacity`` is each zone's usable capacity (the weights of its usable endpoints), ``clients`` each
    zone's share of the clients (any scale), ``usable_count`` the number of usable endpoints.
    """
    if not zone:
        return _off(zone, "the client's zone is unknown")
    if panic:
        return _off(zone, "panic mode: calls go to every connected endpoint")
    live = {z: c for z, c in capacity.items() if c > 0}
    if len(live) < 2:
        return _off(zone, f"usable endpoints are in {len(live)} zone{'s' if len(live) != 1 else ''}")
    origin = {z: c for z, c in clients.items() if c > 0}
    if len(origin) < 2:
        return _off(zone, f"clients are in {len(origin)} zone{'s' if len(origin) != 1 else ''}")
    if zone not in origin:
        return _off(zone, f"zone {zone!r} has no share of the clients")
    if usable_count < min_cluster_size:
        return _off(zone, f"{usable_count} usable endpoints, fewer than min_cluster_size {min_cluster_size}")
    total_up = math.fsum(live.values())
    total_lo = math.fsum(origin.values())
    up = {z: c / total_up for z, c in live.items()}
    lo = {z: c / total_lo for z, c in origin.items()}
    up_local, lo_local = up.get(zone, 0.0), lo[zone]
    if up_local > 0 and up_local >= lo_local:
        return ZonePlan(
            ZoneMode.DIRECT,
            zone,
            local=1.0,
            reason=f"zone {zone!r} has {up_local:.1%} of the capacity for {lo_local:.1%} of the clients",
        )
    local = up_local / lo_local
    residual = {z: u - lo.get(z, 0.0) for z, u in up.items() if z != zone and u > lo.get(z, 0.0)}
    total_residual = math.fsum(residual.values())
    if total_residual <= 0.0:  # only by rounding: spread over the other zones alike
        residual = {z: 1.0 for z in up if z != zone}
        total_residual = float(len(residual))
    spill = tuple(sorted((z, (1.0 - local) * r / total_residual) for z, r in residual.items()))
    return ZonePlan(
        ZoneMode.RESIDUAL,
        zone,
        local=local,
        spill=spill,
        reason=(
            f"zone {zone!r} has {up_local:.1%} of the capacity for {lo_local:.1%} of the clients: "
            f"{local:.1%} of calls stay, the rest spill by residual capacity"
        ),
    )


# ---------------------------------------------------------------------------------------------------
# Pickers


class ZonePicker:
    """A picker that routes by zone: its endpoints are every usable one; ``fallback`` picks from all zones
    (for a call that must avoid endpoints it already tried)."""

    __slots__ = ("_endpoints", "_timed", "fallback", "plan")

    def __init__(self, endpoints: tuple[Endpoint, ...], fallback: Picker, plan: ZonePlan) -> None:
        self._endpoints = endpoints
        self.fallback = fallback
        self.plan = plan
        self._timed: tuple[RefreshingPicker, ...] = ()

    def _follow(self, pickers: Iterable[Picker]) -> None:
        """Refresh these pickers (each zone's, and the fallback) with this one."""
        timed = {id(p): p for p in map(refreshing, (self.fallback, *pickers)) if p is not None}
        self._timed = tuple(timed.values())

    def next_refresh(self) -> float:
        """The earliest refresh of the zones' pickers (``math.inf``: none has timed work)."""
        return min((p.next_refresh() for p in self._timed), default=math.inf)

    def refresh(self, now: float | None = None) -> None:
        """Refresh the zones' pickers (each does what is due)."""
        for p in self._timed:
            p.refresh(now)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every usable endpoint, in every zone."""
        return self._endpoints

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._endpoints)} endpoints, {self.plan.mode.value})"


class LocalZonePicker(ZonePicker):
    """Every call goes to the client's zone."""

    __slots__ = ("_local",)

    def __init__(self, endpoints: tuple[Endpoint, ...], fallback: Picker, plan: ZonePlan, local: Picker):
        super().__init__(endpoints, fallback, plan)
        self._local = local.pick
        self._follow((local,))

    def pick(self, key: Key = None) -> Endpoint:
        """The local zone's pick."""
        return self._local(key)


class SplitZonePicker(ZonePicker):
    """A share of calls to the client's zone, the rest to other zones (or any zone) by precomputed odds:
    one random draw per pick."""

    __slots__ = ("_last", "_local", "_p_local", "_random", "_rest")

    def __init__(
        self,
        endpoints: tuple[Endpoint, ...],
        fallback: Picker,
        plan: ZonePlan,
        routes: Sequence[tuple[float, Picker]],
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(endpoints, fallback, plan)
        bounds: list[tuple[float, Callable[[Key], Endpoint]]] = []
        acc = 0.0
        for share, picker in routes:
            if share > 0:
                acc += share
                bounds.append((acc, picker.pick))
        if not bounds:
            bounds.append((1.0, fallback.pick))
        self._p_local, self._local = bounds[0]
        self._rest = tuple(bounds[1:])
        self._last = bounds[-1][1]
        self._random = rng
        self._follow(picker for _, picker in routes)

    def pick(self, key: Key = None) -> Endpoint:
        """One draw against the cumulative odds, then that zone's pick."""
        u = self._random()
        if u < self._p_local:
            return self._local(key)
        for bound, pick in self._rest:
            if u < bound:
                return pick(key)
        return self._last(key)  # u at the top edge, by rounding


class KeyedSplitZonePicker(SplitZonePicker):
    """:class:`SplitZonePicker` for key-aware selectors: a call's key, when it has one, chooses the zone
    by its hash (seed :data:`KEY_SEED`), so a key keeps its zone, and so its endpoint."""

    __slots__ = ("_h_local", "_h_rest")

    def __init__(
        self,
        endpoints: tuple[Endpoint, ...],
        fallback: Picker,
        plan: ZonePlan,
        routes: Sequence[tuple[float, Picker]],
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(endpoints, fallback, plan, routes, rng=rng)
        # The cumulative odds as bounds on the signed 32-bit hash, so a pick compares ints only.
        self._h_local = _signed_bound(self._p_local)
        self._h_rest = tuple((_signed_bound(b), pick) for b, pick in self._rest)

    def pick(self, key: Key = None) -> Endpoint:
        """The key's zone (a random one without a key), then that zone's pick."""
        if key is None:
            return SplitZonePicker.pick(self, key)
        h = _hash(key, KEY_SEED)
        if h < self._h_local:
            return self._local(key)
        for bound, pick in self._h_rest:
            if h < bound:
                return pick(key)
        return self._last(key)


def _signed_bound(share: float) -> int:
    """The bound ``b`` such that a signed 32-bit hash ``h`` falls below it with probability ``share``."""
    return int(share * 4294967296.0) - 2147483648


# ---------------------------------------------------------------------------------------------------
# The router the core calls


class ZoneRouter:
    """The zone state of one balancer: the client's zone and the last plan. Not thread-safe: the core
    calls it under its lock."""

    def __init__(
        self,
        zone: str | None,
        routing: ZoneRouting | None = None,
        *,
        service: str = "",
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.configured = zone
        """The zone option: a zone, "" (zone routing off), or None (learn it from discovery)."""
        self.learned = ""
        """A zone discovery reported for this client (:meth:`set_learned`)."""
        self.routing = routing if routing is not None else ZoneRouting()
        self.service = service
        self.rng = rng
        self.plan = _off(zone or "", "no picker built yet")

    def set_learned(self, zone: str) -> None:
        """Take the client's zone from discovery (used when the ``zone`` option is None)."""
        self.learned = zone

    def zone_for(self, known: Iterable[Endpoint]) -> str:
        """The client's zone: the option, else what discovery reported, else the zone of the nearest known
        endpoint when discovery ranks them by round-trip time (Consul's ``near``); "" when unknown."""
        if self.configured is not None:
            return self.configured
        if self.learned:
            return self.learned
        best: int | None = None
        zone = ""
        for e in known:
            rank = e.rank
            if rank is not None and (best is None or rank < best):
                best, zone = rank, e.zone
        return zone

    def prepare(
        self,
        selector: Selector,
        usable: Sequence[Endpoint],
        known: Iterable[Endpoint],
        stats: Stats,
        *,
        panic: bool = False,
    ) -> Callable[[], Picker]:
        """Plan now (cheap; the core calls it under its lock) and return the picker's build: a function
        that touches no shared state, so it may run in another thread.

        ``usable`` are the endpoints to pick from, ``known`` every endpoint discovery reports (any
        state): the default placement of clients.
        """
        usable = tuple(usable)
        plan = self._plan(usable, known, panic)
        self._set(plan)
        enabled = self.routing.routing_enabled / 100.0
        return functools.partial(_build, selector, usable, stats, plan, enabled, self.rng)

    def build(
        self,
        selector: Selector,
        usable: Sequence[Endpoint],
        known: Iterable[Endpoint],
        stats: Stats,
        *,
        panic: bool = False,
    ) -> Picker:
        """:meth:`prepare`, then build the picker here."""
        return self.prepare(selector, usable, known, stats, panic=panic)()

    def _plan(self, usable: tuple[Endpoint, ...], known: Iterable[Endpoint], panic: bool) -> ZonePlan:
        if self.configured == "":
            return _off("", "zone routing is off (zone='')")
        known = tuple(known)
        zone = self.zone_for(known)
        if not zone:
            return _off("", "the client's zone is unknown")
        capacity: dict[str, float] = {}
        for e in usable:
            capacity[e.zone] = capacity.get(e.zone, 0.0) + e.weight
        clients: Mapping[str, float]
        if self.routing.client_shares is not None:
            clients = self.routing.client_shares
        else:
            # Clients spread evenly over the zones the service is deployed in. Not weighted by the
            # endpoints: an instance deregistered or drained does not move its zone's clients away.
            clients = {e.zone: 1.0 for e in known if e.zone}
        return plan_zones(
            zone,
            capacity,
            clients,
            usable_count=len(usable),
            min_cluster_size=self.routing.min_cluster_size,
            panic=panic,
        )

    def _set(self, plan: ZonePlan) -> None:
        old = self.plan
        self.plan = plan
        if (old.mode, old.zone) != (plan.mode, plan.zone) or abs(old.local - plan.local) >= 0.01:
            level = logging.DEBUG if plan.mode is ZoneMode.OFF and old.mode is ZoneMode.OFF else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level, "%s zone routing %s: %s", self.service or "lbkit", plan.mode.value, plan.reason
                )


def _build(
    selector: Selector,
    usable: tuple[Endpoint, ...],
    stats: Stats,
    plan: ZonePlan,
    enabled: float,
    rng: Callable[[], float],
) -> Picker:
    """The picker for ``plan``: the selector's own when zone routing is off, else a zone picker over one
    picker per zone that takes calls, and the picker over every zone."""
    everywhere = selector.build(usable, stats)
    if plan.mode is ZoneMode.OFF:
        return everywhere
    groups: dict[str, list[Endpoint]] = {}
    for e in usable:
        groups.setdefault(e.zone, []).append(e)
    endpoints = everywhere.endpoints
    if plan.mode is ZoneMode.DIRECT and enabled >= 1.0:
        return LocalZonePicker(endpoints, everywhere, plan, selector.build(groups[plan.zone], stats))
    routes: list[tuple[float, Picker]] = []
    if plan.local > 0:
        routes.append((enabled * plan.local, selector.build(groups[plan.zone], stats)))
    routes.extend((enabled * share, selector.build(groups[z], stats)) for z, share in plan.spill)
    routes.append((1.0 - enabled, everywhere))
    split = KeyedSplitZonePicker if selector.uses_key else SplitZonePicker
    return split(endpoints, everywhere, plan, routes, rng=rng)
