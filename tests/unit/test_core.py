"""The sans-I/O balancer core: membership, readiness, health, ejection, panic, slow start (fake clock)."""

from __future__ import annotations

import random
import time

import grpc
import pytest

from lbkit.core import BalancerCore
from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.errors import NoEndpointsError
from lbkit.events import KIND_CAUSES, Cause, EventKind
from lbkit.health.outlier import OutlierDetection
from lbkit.health.slow_start import SlowStart
from lbkit.selectors.base import Picker, Selector
from lbkit.stats import Stats
from lbkit.testing.clock import FakeClock


class Recording(Selector):
    """Builds a picker that returns the first endpoint, and remembers each build."""

    name = "recording"

    def __init__(self) -> None:
        self.builds: list[tuple[str, ...]] = []

    def _build(self, endpoints: tuple[Endpoint, ...], stats: Stats) -> Picker:
        self.builds.append(tuple(e.address for e in endpoints))

        class First:
            def __init__(self) -> None:
                self.endpoints = endpoints

            def pick(self, key: object = None) -> Endpoint:
                return endpoints[0]

        return First()


ADDRS = [f"10.0.0.{i}:50051" for i in range(1, 5)]


def make(**kw: object) -> tuple[BalancerCore, Recording, FakeClock, list]:
    clock = FakeClock()
    sel = Recording()
    core = BalancerCore(sel, service="svc", clock=clock, rng=random.Random(1), **kw)  # type: ignore[arg-type]
    events: list = []
    core.add_listener(events.append)
    return core, sel, clock, events


def picked(core: BalancerCore) -> set[str]:
    return {e.address for e in core.picker.endpoints}


def test_endpoints_enter_the_picker_only_when_ready():
    core, _, _, events = make()
    plan = core.set_endpoints(EndpointSet(ADDRS[:2]))
    assert [e.address for e in plan.open] == ADDRS[:2] and plan.close == ()
    with pytest.raises(NoEndpointsError) as info:
        core.picker.pick()
    assert "svc" in str(info.value) and "2 connecting" in str(info.value)
    core.set_ready(ADDRS[0], True)
    assert picked(core) == {ADDRS[0]}
    core.set_ready(ADDRS[1], True)
    core.set_ready(ADDRS[0], False)
    assert picked(core) == {ADDRS[1]}
    assert [e.kind for e in events].count(EventKind.READY) == 2


def test_removal_plans_a_close_and_drops_from_picker():
    core, _, _, events = make()
    core.set_endpoints(EndpointSet(ADDRS[:3]))
    for a in ADDRS[:3]:
        core.set_ready(a, True)
    plan = core.set_endpoints(EndpointSet(ADDRS[1:4]))
    assert plan.close == (ADDRS[0],)
    assert [e.address for e in plan.open] == [ADDRS[3]]
    assert picked(core) == set(ADDRS[1:3])
    assert any(e.kind is EventKind.REMOVED and e.address == ADDRS[0] for e in events)


def test_empty_set_from_discovery_empties_picker_with_reason():
    core, _, _, _ = make()
    core.set_endpoints(EndpointSet(ADDRS[:1]))
    core.set_ready(ADDRS[0], True)
    core.set_endpoints(EndpointSet())
    with pytest.raises(NoEndpointsError, match="no endpoints known"):
        core.picker.pick()


def test_weight_change_rebuilds_without_reopening():
    core, sel, _, _ = make()
    core.set_endpoints(EndpointSet([Endpoint(ADDRS[0], weight=1)]))
    core.set_ready(ADDRS[0], True)
    n = len(sel.builds)
    plan = core.set_endpoints(EndpointSet([Endpoint(ADDRS[0], weight=5)]))
    assert plan.open == () and plan.close == ()
    assert len(sel.builds) == n + 1
    assert core.picker.endpoints[0].weight == 5


def test_health_checked_endpoint_waits_for_first_answer_and_leaves_on_not_serving():
    core, _, _, events = make(health_checked=True)
    core.set_endpoints(EndpointSet(ADDRS[:2]))
    core.set_ready(ADDRS[0], True)
    core.set_ready(ADDRS[1], True)
    assert picked(core) == set()  # no health answer yet
    core.set_health(ADDRS[0], True, Cause.HEALTH_SERVING)
    core.set_health(ADDRS[1], True, Cause.HEALTH_SERVING)
    assert picked(core) == set(ADDRS[:2])
    core.set_health(ADDRS[1], False, Cause.HEALTH_NOT_SERVING, "NOT_SERVING")
    assert picked(core) == {ADDRS[0]}
    assert any(e.kind is EventKind.UNHEALTHY and e.address == ADDRS[1] for e in events)
    core.set_health(ADDRS[1], True, Cause.HEALTH_SERVING)
    assert picked(core) == set(ADDRS[:2])


def test_panic_mode_balances_over_all_connected_when_too_few_healthy():
    core, _, _, events = make(health_checked=True, panic_threshold=50.0)
    core.set_endpoints(EndpointSet(ADDRS))
    for a in ADDRS:
        core.set_ready(a, True)
        core.set_health(a, True, Cause.HEALTH_SERVING)
    core.set_health(ADDRS[0], False, Cause.HEALTH_NOT_SERVING)
    core.set_health(ADDRS[1], False, Cause.HEALTH_NOT_SERVING)
    assert picked(core) == set(ADDRS[2:]) and not core.panic  # 2 of 4 healthy: at the threshold
    core.set_health(ADDRS[2], False, Cause.HEALTH_NOT_SERVING)
    assert core.panic and picked(core) == set(ADDRS)
    assert any(e.kind is EventKind.PANIC_START for e in events)
    core.set_health(ADDRS[2], True, Cause.HEALTH_SERVING)
    assert not core.panic and picked(core) == set(ADDRS[2:])
    assert any(e.kind is EventKind.PANIC_END for e in events)


def test_panic_threshold_zero_never_panics():
    core, _, _, _ = make(health_checked=True, panic_threshold=0.0)
    core.set_endpoints(EndpointSet(ADDRS[:2]))
    for a in ADDRS[:2]:
        core.set_ready(a, True)
        core.set_health(a, False, Cause.HEALTH_NOT_SERVING)
    assert not core.panic and picked(core) == set()


def test_failure_streak_ejects_and_time_returns_it():
    od = OutlierDetection(
        consecutive_failures=3, base_ejection_time=30.0, jitter=0.0, max_ejection_percent=50.0
    )
    core, _, clock, events = make(outlier_detection=od)
    core.set_endpoints(EndpointSet(ADDRS[:2]))
    for a in ADDRS[:2]:
        core.set_ready(a, True)
    entry = core.stats[ADDRS[0]]
    for _ in range(3):
        entry.finish(entry.start(), ok=False)
    assert picked(core) == {ADDRS[1]}
    assert core.endpoint_states()[ADDRS[0]] == "ejected"
    assert any(e.kind is EventKind.EJECTED and e.address == ADDRS[0] for e in events)
    deadline = core.next_deadline()
    assert deadline is not None and deadline <= clock.now + 30.0
    clock.now += 30.0
    core.tick()
    assert picked(core) == set(ADDRS[:2])
    assert any(e.kind is EventKind.RETURNED for e in events)


def test_every_event_carries_the_typed_cause_of_what_happened():
    od = OutlierDetection(consecutive_failures=2, base_ejection_time=10, jitter=0.0, max_ejection_percent=50)
    core, _, clock, events = make(health_checked=True, outlier_detection=od, panic_threshold=50.0)
    core.set_endpoints(EndpointSet(ADDRS[:2]))
    for a in ADDRS[:2]:
        core.set_ready(a, True)
        core.set_health(a, True, Cause.HEALTH_SERVING)  # first answers: no event
    core.set_health(ADDRS[1], False, Cause.HEALTH_SERVICE_UNKNOWN)  # 1 of 2 healthy: at the threshold
    entry = core.stats[ADDRS[0]]
    for _ in range(2):
        entry.finish(entry.start(), ok=False)  # ejected: 0 of 2 healthy, panic
    clock.now += 10.0
    core.tick()  # back
    core.set_health(ADDRS[1], True, Cause.HEALTH_SERVING)
    core.set_discovery_status(True, "connection refused")
    core.set_discovery_status(False, "answering again")
    core.set_endpoints(EndpointSet(ADDRS[1:2]))
    core.set_ready(ADDRS[1], False)

    a, b = ADDRS[:2]
    assert [(e.kind, e.address, e.cause) for e in events] == [
        (EventKind.ADDED, a, Cause.DISCOVERED),
        (EventKind.ADDED, b, Cause.DISCOVERED),
        (EventKind.READY, a, Cause.CHANNEL_STATE),
        (EventKind.READY, b, Cause.CHANNEL_STATE),
        (EventKind.UNHEALTHY, b, Cause.HEALTH_SERVICE_UNKNOWN),
        (EventKind.EJECTED, a, Cause.CONSECUTIVE_FAILURES),
        (EventKind.PANIC_START, "", Cause.PANIC_THRESHOLD),
        (EventKind.RETURNED, a, Cause.EJECTION_ENDED),
        (EventKind.PANIC_END, "", Cause.PANIC_THRESHOLD),
        (EventKind.HEALTHY, b, Cause.HEALTH_SERVING),
        (EventKind.DISCOVERY_ERROR, "", Cause.DISCOVERY_FAILED),
        (EventKind.DISCOVERY_RECOVERED, "", Cause.DISCOVERY_ANSWERED),
        (EventKind.REMOVED, a, Cause.DISCOVERY_REMOVED),
        (EventKind.NOT_READY, b, Cause.CHANNEL_STATE),
    ]
    assert all(e.cause in KIND_CAUSES[e.kind] for e in events)
    assert events[4].reason == "health_service_unknown"  # no words given: the cause's name
    assert events[5].reason.startswith("2 consecutive failures")


def test_every_kind_has_causes_and_every_cause_a_kind():
    assert set(KIND_CAUSES) == set(EventKind)
    assert {c for causes in KIND_CAUSES.values() for c in causes} == set(Cause)


def test_outlier_failure_codes_follow_config():
    core, _, _, _ = make(outlier_detection=OutlierDetection())
    assert core.outlier is not None
    assert core.outlier.is_failure(grpc.StatusCode.UNAVAILABLE)
    assert not core.outlier.is_failure(grpc.StatusCode.INVALID_ARGUMENT)


def test_slow_start_ramps_weight_factor_and_rebuilds_until_full():
    core, sel, clock, _ = make(slow_start=SlowStart(window=10.0, min_weight_percent=10.0))
    core.set_endpoints(EndpointSet(ADDRS[:1]))
    core.set_ready(ADDRS[0], True)
    assert core.stats[ADDRS[0]].weight_factor == 1.0  # the first set starts warm
    core.set_endpoints(EndpointSet(ADDRS[:2]))
    core.set_ready(ADDRS[1], True)
    entry = core.stats[ADDRS[1]]
    assert entry.weight_factor == pytest.approx(0.1)
    clock.now += 5.0
    core.tick()
    assert entry.weight_factor == pytest.approx(0.5)
    assert core.next_deadline() is not None
    clock.now += 5.0
    core.tick()
    assert entry.weight_factor == 1.0
    assert core.next_deadline() is None
    builds = len(sel.builds)
    clock.now += 5.0
    core.tick()
    assert len(sel.builds) == builds  # no rebuilds once the ramp is over


def test_listener_exceptions_do_not_break_the_core():
    core, _, _, _ = make()

    def bad(_event: object) -> None:
        raise RuntimeError("boom")

    core.add_listener(bad)
    core.set_endpoints(EndpointSet(ADDRS[:1]))
    core.set_ready(ADDRS[0], True)
    assert picked(core) == {ADDRS[0]}


def test_slow_start_applies_to_a_first_set_endpoint_once_it_has_dropped_out():
    core, _, clock, _ = make(slow_start=SlowStart(window=10.0, min_weight_percent=10.0))
    core.set_endpoints(EndpointSet(ADDRS[:2]))
    core.set_ready(ADDRS[0], True)
    core.set_ready(ADDRS[1], True)
    core.set_ready(ADDRS[0], False)
    clock.now += 1.0
    core.set_ready(ADDRS[0], True)  # back after a disconnect: ramps like a newcomer
    assert core.stats[ADDRS[0]].weight_factor == pytest.approx(0.1)
    assert core.stats[ADDRS[1]].weight_factor == 1.0


class SlowRecording(Recording):
    """A selector whose builds take 5 ms of the core's clock, like a Maglev table over many endpoints."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def _build(self, endpoints: tuple[Endpoint, ...], stats: Stats) -> Picker:
        self.clock.advance(0.005)
        return super()._build(endpoints, stats)


def test_slow_rebuilds_are_coalesced_and_the_timer_publishes_the_rest():
    clock = FakeClock()
    sel = SlowRecording(clock)
    core = BalancerCore(sel, service="svc", clock=clock, rng=random.Random(1))
    woken: list[int] = []
    core.on_deadline.append(lambda: woken.append(1))
    addrs = [f"10.0.1.{i}:50051" for i in range(1, 21)]
    core.set_endpoints(EndpointSet(addrs))
    for a in addrs:
        core.set_ready(a, True)  # twenty changes at one instant
    assert len(sel.builds) <= 2  # the first change built; the rest wait for the coalescing window
    assert woken  # the driver's timer was told to wake for the deferred rebuild
    deadline = core.next_deadline()
    assert deadline is not None and deadline <= clock.now + 0.1
    clock.now = deadline
    core.tick()
    assert picked(core) == set(addrs)
    assert core.next_deadline() is None


def test_fast_rebuilds_publish_every_change_at_once():
    core, sel, _, _ = make()
    core.set_endpoints(EndpointSet(ADDRS))
    for a in ADDRS:
        core.set_ready(a, True)
        assert a in picked(core)
    assert core.next_deadline() is None

    # What a build costs is read on the core's clock: a build slowed by a busy machine (real time, the
    # fake clock standing still) does not defer the next change, so a test's picker is never stale.
    real_build = sel._build

    def busy_build(endpoints: tuple[Endpoint, ...], stats: Stats) -> Picker:
        started = time.perf_counter()
        while time.perf_counter() - started < 0.003:
            pass
        return real_build(endpoints, stats)

    sel._build = busy_build  # type: ignore[method-assign]
    core.set_ready(ADDRS[0], False)
    core.set_ready(ADDRS[1], False)
    assert picked(core) == set(ADDRS[2:])


def test_the_concepts_page_lists_every_cause_of_every_kind():
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "concepts.md").read_text()
    rows = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            for kind in re.findall(r"`(\w+)`", cells[0]):
                rows[kind] = set(re.findall(r"`([A-Z_]+)`", cells[2]))
    documented = {kind.name: rows.get(kind.name) for kind in KIND_CAUSES}
    assert documented == {kind.name: {c.name for c in causes} for kind, causes in KIND_CAUSES.items()}
