"""The balancer core takes the health discovery reports (Consul's checks): critical endpoints leave the
picker like unhealthy ones and panic mode counts them; endpoints in maintenance are drained as if
removed, even in panic."""

from __future__ import annotations

import random

from lbkit.core import BalancerCore
from lbkit.endpoint import Endpoint, EndpointHealth, EndpointSet
from lbkit.events import Cause, Event, EventKind
from lbkit.selectors.round_robin import RoundRobin
from lbkit.subsetting import Subsetting
from lbkit.testing.clock import FakeClock

P, C, M = EndpointHealth.PASSING, EndpointHealth.CRITICAL, EndpointHealth.MAINTENANCE
ADDRS = [f"10.0.0.{i}:50051" for i in range(1, 5)]


def endpoints(*health: EndpointHealth) -> EndpointSet:
    return EndpointSet([Endpoint(a, health=h) for a, h in zip(ADDRS, health, strict=False)])


def make(**kw: object) -> tuple[BalancerCore, list[Event]]:
    core = BalancerCore(RoundRobin(), service="svc", clock=FakeClock(), rng=random.Random(1), **kw)  # type: ignore[arg-type]
    events: list[Event] = []
    core.add_listener(events.append)
    return core, events


def ready(core: BalancerCore) -> None:
    for address in list(core.members):
        core.set_ready(address, True)


def picked(core: BalancerCore) -> set[str]:
    return {e.address for e in core.picker.endpoints}


def causes(events: list[Event], kind: EventKind) -> list[tuple[str, Cause]]:
    return [(e.address, e.cause) for e in events if e.kind is kind]


def test_a_critical_endpoint_leaves_the_picker_and_returns_when_passing() -> None:
    core, events = make()
    core.set_endpoints(endpoints(P, P, P, P))
    ready(core)
    assert picked(core) == set(ADDRS)
    plan = core.set_endpoints(endpoints(C, P, P, P))
    assert not plan  # its channel stays: it may be needed in panic mode, and comes back as it is
    assert picked(core) == set(ADDRS[1:])
    assert core.endpoint_states()[ADDRS[0]] == "unhealthy"
    assert causes(events, EventKind.UNHEALTHY) == [(ADDRS[0], Cause.CONSUL_CRITICAL)]
    core.set_endpoints(endpoints(P, P, P, P))
    assert picked(core) == set(ADDRS)
    assert causes(events, EventKind.HEALTHY) == [(ADDRS[0], Cause.CONSUL_PASSING)]


def test_panic_mode_applies_to_discovery_health() -> None:
    core, events = make(panic_threshold=50.0)
    core.set_endpoints(endpoints(P, P, P, P))
    ready(core)
    core.set_endpoints(endpoints(C, C, P, P))
    assert not core.panic and picked(core) == set(ADDRS[2:])  # 2 of 4: at the threshold
    core.set_endpoints(endpoints(C, C, C, C))
    assert core.panic and picked(core) == set(ADDRS)  # every one critical: all are tried
    assert [e.cause for e in events if e.kind is EventKind.PANIC_START] == [Cause.PANIC_THRESHOLD]
    core.set_endpoints(endpoints(C, C, P, P))
    assert not core.panic and picked(core) == set(ADDRS[2:])


def test_an_endpoint_in_maintenance_is_drained_as_if_removed_and_returns() -> None:
    core, events = make()
    core.set_endpoints(endpoints(P, P, P))
    ready(core)
    plan = core.set_endpoints(endpoints(M, P, P))
    assert plan.close == (ADDRS[0],) and plan.open == ()  # its channel drains; calls in flight finish
    assert ADDRS[0] not in core.members and picked(core) == set(ADDRS[1:3])
    assert causes(events, EventKind.REMOVED) == [(ADDRS[0], Cause.MAINTENANCE)]
    plan = core.set_endpoints(endpoints(P, P, P))
    assert [e.address for e in plan.open] == [ADDRS[0]]
    assert causes(events, EventKind.ADDED)[-1] == (ADDRS[0], Cause.DISCOVERED)


def test_maintenance_is_never_used_even_in_panic() -> None:
    core, _ = make(panic_threshold=50.0)
    core.set_endpoints(endpoints(P, P, P))
    ready(core)
    core.set_endpoints(endpoints(M, C, C))
    assert core.panic and picked(core) == set(ADDRS[1:3])
    core.set_endpoints(endpoints(M, M, M))
    assert not core.members and not core.picker.endpoints


def test_an_endpoint_discovered_critical_is_never_picked_while_others_are_healthy() -> None:
    core, events = make()
    core.set_endpoints(endpoints(P, P, P, C))
    ready(core)
    assert picked(core) == set(ADDRS[:3])
    assert causes(events, EventKind.UNHEALTHY) == [(ADDRS[3], Cause.CONSUL_CRITICAL)]


def test_a_critical_endpoint_counts_as_down_for_the_subset() -> None:
    core, _ = make(subsetting=Subsetting(2, client_id="c1"))
    core.set_endpoints(endpoints(P, P, P, P))
    ready(core)
    chosen = set(core.members)
    assert len(chosen) == 2
    victim = sorted(chosen)[0]
    health = [C if a == victim else P for a in ADDRS]
    core.set_endpoints(endpoints(*health))
    ready(core)
    assert len(core.members) == 3 and victim in core.members  # widened by one, the critical one kept
    assert victim not in picked(core) and len(picked(core)) == 2
