"""The core with a subset: channels only to the subset, widening while its endpoints are down, narrowing
back when they recover (fake clock, no I/O)."""

from __future__ import annotations

import random

from lbkit.core import BalancerCore, PoolPlan
from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.events import Cause, Event, EventKind
from lbkit.health.outlier import OutlierDetection
from lbkit.selectors.round_robin import RoundRobin
from lbkit.subsetting import Subsetting
from lbkit.testing import FakeClock

ADDRS = [f"10.0.0.{i}:50051" for i in range(1, 13)]
SUBSET = Subsetting(3, client_id="client-a")
ORDER = [e.address for e in SUBSET.order(Endpoint(a) for a in ADDRS)]


def make(**kw: object) -> tuple[BalancerCore, list[Event], list[int]]:
    kw.setdefault("outlier_detection", None)
    core = BalancerCore(
        RoundRobin(), service="svc", clock=FakeClock(), rng=random.Random(1), subsetting=SUBSET, **kw
    )  # type: ignore[arg-type]
    events: list[Event] = []
    core.add_listener(events.append)
    hooks: list[int] = []
    core.on_pool.append(lambda: hooks.append(1))
    return core, events, hooks


def opened(plan: PoolPlan) -> list[str]:
    return [e.address for e in plan.open]


def picked(core: BalancerCore) -> set[str]:
    return {e.address for e in core.picker.endpoints}


def started(**kw: object) -> tuple[BalancerCore, list[Event], list[int]]:
    """A core whose subset (the first three of ORDER) is READY."""
    core, events, hooks = make(**kw)
    plan = core.set_endpoints(EndpointSet(ADDRS))
    assert opened(plan) == ORDER[:3] and plan.close == ()
    for a in ORDER[:3]:
        core.set_health(a, True, Cause.HEALTH_SERVING)
        core.set_ready(a, True)
    assert picked(core) == set(ORDER[:3])
    return core, events, hooks


def test_a_starting_pool_opens_only_the_subset_while_it_connects() -> None:
    core, events, hooks = make()
    plan = core.set_endpoints(EndpointSet(ADDRS))
    assert opened(plan) == ORDER[:3]
    assert set(core.members) == set(ORDER[:3])
    core.set_ready(ORDER[0], False)  # still connecting: not down
    assert core.take_plan() == PoolPlan((), ()) and hooks == []
    assert [e.kind for e in events] == [EventKind.ADDED] * 3


def test_a_subset_endpoint_that_fails_to_connect_is_replaced_by_the_next_in_order() -> None:
    core, events, hooks = started()
    core.set_ready(ORDER[1], False, "channel IDLE")  # dropped, reconnecting: not down yet
    assert core.take_plan() == PoolPlan((), ())
    core.set_ready(ORDER[1], False, "channel TRANSIENT_FAILURE", failed=True)
    assert hooks == [1]
    plan = core.take_plan()
    assert opened(plan) == [ORDER[3]] and plan.close == ()
    assert core.take_plan() == PoolPlan((), ())  # once
    added = [e for e in events if e.kind is EventKind.ADDED and e.address == ORDER[3]]
    assert [e.cause for e in added] == [Cause.SUBSET_WIDENED]
    assert ORDER[1] in core.members  # kept: its channel keeps reconnecting
    core.set_ready(ORDER[3], True)
    assert picked(core) == {ORDER[0], ORDER[2], ORDER[3]}
    # the failed endpoint recovers: the subset narrows back and the extra drains
    core.set_ready(ORDER[1], True)
    plan = core.take_plan()
    assert plan.open == () and plan.close == (ORDER[3],)
    assert picked(core) == set(ORDER[:3])
    assert any(e.kind is EventKind.REMOVED and e.cause is Cause.SUBSET_LEFT for e in events)


def test_an_endpoint_that_never_connects_widens_the_subset() -> None:
    core, _, _ = make()
    core.set_endpoints(EndpointSet(ADDRS))
    core.set_ready(ORDER[0], False, failed=True)
    assert opened(core.take_plan()) == [ORDER[3]]
    core.set_ready(ORDER[3], False, failed=True)  # the replacement is down too: the next one
    assert opened(core.take_plan()) == [ORDER[4]]
    core.set_ready(ORDER[0], True)  # the first recovers: the pool narrows to the three before ORDER[3]
    plan = core.take_plan()
    assert plan.close == (ORDER[3], ORDER[4])


def test_unhealthy_endpoints_widen_the_subset() -> None:
    core, _, _ = started(health_checked=True)
    core.set_health(ORDER[0], False, Cause.HEALTH_NOT_SERVING)
    assert opened(core.take_plan()) == [ORDER[3]]
    core.set_health(ORDER[3], True, Cause.HEALTH_SERVING)
    core.set_ready(ORDER[3], True)
    assert picked(core) == {ORDER[1], ORDER[2], ORDER[3]}
    core.set_health(ORDER[0], True, Cause.HEALTH_SERVING)
    assert core.take_plan().close == (ORDER[3],)


def test_ejection_widens_the_subset_and_the_ejection_ending_narrows_it() -> None:
    od = OutlierDetection(
        consecutive_failures=2, base_ejection_time=30.0, jitter=0.0, max_ejection_percent=50
    )
    core, _, _ = started(outlier_detection=od)
    entry = core.stats[ORDER[2]]
    for _ in range(2):
        entry.finish(entry.start(), ok=False)
    assert core.endpoint_states()[ORDER[2]] == "ejected"
    assert opened(core.take_plan()) == [ORDER[3]]
    core.set_ready(ORDER[3], True)
    assert picked(core) == {ORDER[0], ORDER[1], ORDER[3]}
    clock = core.clock
    assert isinstance(clock, FakeClock)
    clock.advance(30.0)
    core.tick()
    assert core.take_plan().close == (ORDER[3],)
    assert picked(core) == set(ORDER[:3])


def test_when_every_endpoint_is_down_the_pool_holds_them_all() -> None:
    core, _, _ = make()
    core.set_endpoints(EndpointSet(ADDRS))
    for a in ORDER:
        core.set_ready(a, False, failed=True)
        core.take_plan()
    assert set(core.members) == set(ADDRS)
    core.set_ready(ORDER[5], True)
    assert picked(core) == {ORDER[5]}


def test_a_subset_endpoint_leaving_discovery_is_replaced_and_field_changes_keep_channels() -> None:
    core, events, _ = started()
    plan = core.set_endpoints(EndpointSet([a for a in ADDRS if a != ORDER[0]]))
    assert opened(plan) == [ORDER[3]] and plan.close == (ORDER[0],)
    assert any(e.kind is EventKind.REMOVED and e.cause is Cause.DISCOVERY_REMOVED for e in events)
    heavier = [Endpoint(a, weight=2 if a == ORDER[1] else 1) for a in ADDRS if a != ORDER[0]]
    plan = core.set_endpoints(EndpointSet(heavier))
    assert plan == PoolPlan((), ())
    assert core.members[ORDER[1]].endpoint.weight == 2


def test_a_change_undone_before_the_driver_took_it_costs_nothing() -> None:
    core, _, hooks = started()
    core.set_ready(ORDER[0], False, failed=True)
    core.set_ready(ORDER[0], True)
    assert hooks == [1]
    assert core.take_plan() == PoolPlan((), ())  # opened and dropped before the driver saw it


def test_a_narrowed_endpoint_coming_back_before_the_driver_closed_it_is_kept() -> None:
    core, _, _ = started()
    core.set_ready(ORDER[0], False, failed=True)
    assert opened(core.take_plan()) == [ORDER[3]]
    core.set_ready(ORDER[0], True)  # ORDER[3] leaves ...
    core.set_ready(ORDER[1], False, failed=True)  # ... and is wanted again before the driver acted
    plan = core.take_plan()
    assert plan.close == (ORDER[3],) and opened(plan) == [ORDER[3]]  # close, then keep (revive)


def test_a_size_at_or_above_the_endpoint_count_holds_them_all() -> None:
    core = BalancerCore(RoundRobin(), subsetting=Subsetting(20, client_id="a"))
    assert {e.address for e in core.set_endpoints(EndpointSet(ADDRS)).open} == set(ADDRS)


def test_without_a_subset_a_failed_connect_rebuilds_nothing() -> None:
    core = BalancerCore(RoundRobin())
    core.set_endpoints(EndpointSet(ADDRS[:2]))
    core.set_ready(ADDRS[0], True)
    core.set_ready(ADDRS[0], False)
    rebuilds = core.rebuilds
    core.set_ready(ADDRS[0], False, failed=True)
    assert core.rebuilds == rebuilds and core.take_plan() == PoolPlan((), ())
