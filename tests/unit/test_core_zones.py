"""Zone-aware routing inside the balancer core: readiness, health, ejection and panic move the plan."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lbkit.core import BalancerCore
from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.errors import ConfigError
from lbkit.events import Cause
from lbkit.health.outlier import OutlierDetection
from lbkit.options import BalancerOptions
from lbkit.selectors import RoundRobin
from lbkit.zones import LocalZonePicker, SplitZonePicker, ZoneMode, ZonePicker, ZoneRouting

ZONES = {"a": 3, "b": 3, "c": 3}
EPS = [
    Endpoint(f"10.0.{i}.{j + 1}:50051", zone=zone)
    for i, (zone, n) in enumerate(sorted(ZONES.items()))
    for j in range(n)
]
A = [e.address for e in EPS if e.zone == "a"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(zone: str | None = "a", endpoints: list[Endpoint] = EPS, **kw: object) -> BalancerCore:
    core = BalancerCore(
        RoundRobin(),
        service="svc",
        clock=Clock(),
        rng=random.Random(3),
        zone=zone,
        **kw,  # type: ignore[arg-type]
    )
    core.set_endpoints(EndpointSet(endpoints))
    for e in endpoints:
        core.set_ready(e.address, True)
    return settle(core)


def settle(core: BalancerCore) -> BalancerCore:
    """Let a coalesced rebuild happen (a build over a millisecond on a busy machine defers the next)."""
    core.clock.now += 1.0  # type: ignore[attr-defined]
    core.tick()
    return core


def local_share(core: BalancerCore, n: int = 20000) -> float:
    return Counter(core.picker.pick().zone for _ in range(n))["a"] / n


def test_all_ready_every_call_stays_in_the_zone():
    core = make()
    assert isinstance(core.picker, LocalZonePicker)
    assert core.zone_plan.mode is ZoneMode.DIRECT and core.zone_plan.zone == "a"
    assert local_share(core) == 1.0
    assert len(core.picker.endpoints) == 9


def test_a_local_channel_going_down_spills_a_quarter_and_coming_back_restores():
    core = make()
    core.set_ready(A[0], False)
    settle(core)
    assert core.zone_plan.mode is ZoneMode.RESIDUAL and core.zone_plan.local == pytest.approx(0.75)
    assert local_share(core) == pytest.approx(0.75, abs=0.015)
    core.set_ready(A[1], False)  # up[a] = 1/7, lo[a] = 1/3
    settle(core)
    assert core.zone_plan.local == pytest.approx(3 / 7)
    core.set_ready(A[0], True)
    settle(core)
    core.set_ready(A[1], True)
    settle(core)
    assert core.zone_plan.mode is ZoneMode.DIRECT and local_share(core) == 1.0


def test_an_unhealthy_local_endpoint_spills_like_a_down_one():
    core = make(health_checked=True, panic_threshold=0.0)
    for e in EPS:
        core.set_health(e.address, True, Cause.HEALTH_SERVING)
        settle(core)
    assert core.zone_plan.mode is ZoneMode.DIRECT
    core.set_health(A[2], False, Cause.HEALTH_NOT_SERVING)
    settle(core)
    assert core.zone_plan.local == pytest.approx(0.75)


def test_an_ejected_local_endpoint_spills_and_returns():
    od = OutlierDetection(
        consecutive_failures=2, base_ejection_time=10.0, jitter=0.0, max_ejection_percent=50
    )
    core = make(outlier_detection=od)
    entry = core.stats[A[0]]
    for _ in range(2):
        entry.finish(entry.start(), ok=False)
    settle(core)
    assert core.endpoint_states()[A[0]] == "ejected"
    assert core.zone_plan.local == pytest.approx(0.75)
    assert A[0] not in {core.picker.pick().address for _ in range(2000)}
    core.clock.now += 10.0  # type: ignore[attr-defined]
    settle(core)
    assert core.zone_plan.mode is ZoneMode.DIRECT


def test_panic_turns_zone_routing_off_and_uses_every_connected_endpoint():
    core = make(health_checked=True, panic_threshold=50.0)
    for e in EPS[:4]:
        core.set_health(e.address, True, Cause.HEALTH_SERVING)
        settle(core)
    for e in EPS[4:]:
        core.set_health(e.address, False, Cause.HEALTH_NOT_SERVING)  # 4 of 9 healthy: below 50 %
        settle(core)
    assert core.panic
    assert core.zone_plan.mode is ZoneMode.OFF and "panic" in core.zone_plan.reason
    assert not isinstance(core.picker, ZonePicker) and len(core.picker.endpoints) == 9


def test_an_empty_local_zone_spills_everything_and_too_few_endpoints_use_all_zones():
    core = make()
    for a in A:
        core.set_ready(a, False)
        settle(core)
    assert core.zone_plan.mode is ZoneMode.RESIDUAL and core.zone_plan.local == 0.0  # 6 usable >= 6
    assert local_share(core, 2000) == 0.0
    core.set_ready(EPS[-1].address, False)  # 5 usable < min_cluster_size 6
    settle(core)
    assert core.zone_plan.mode is ZoneMode.OFF and "min_cluster_size" in core.zone_plan.reason
    assert not isinstance(core.picker, ZonePicker)


def test_a_zone_discovery_reports_is_used_when_none_is_configured():
    core = make(zone=None)
    assert core.zone_plan.mode is ZoneMode.OFF and "unknown" in core.zone_plan.reason
    rebuilds = core.rebuilds
    core.set_zone("b")
    settle(core)
    assert core.rebuilds == rebuilds + 1 and core.zone_plan.zone == "b"
    assert {core.picker.pick().zone for _ in range(100)} == {"b"}
    core.set_zone("b")
    settle(core)
    assert core.rebuilds == rebuilds + 1  # no change, no rebuild
    configured = make(zone="a")
    configured.set_zone("b")
    settle(configured)
    assert configured.zone_plan.zone == "a"  # the option wins


def test_near_order_names_the_zone_and_a_reorder_moves_it():
    ranked = [Endpoint(e.address, zone=e.zone, rank=i) for i, e in enumerate(reversed(EPS))]
    core = make(zone=None, endpoints=ranked)
    assert core.zone_plan.zone == "c"
    reordered = [Endpoint(e.address, zone=e.zone, rank=i) for i, e in enumerate(EPS)]
    core.set_endpoints(EndpointSet(reordered))
    settle(core)
    assert core.zone_plan.zone == "a"
    assert isinstance(core.picker, LocalZonePicker)


def test_routing_enabled_below_100_always_splits():
    core = make(zone_routing=ZoneRouting(routing_enabled=50.0))
    assert isinstance(core.picker, SplitZonePicker)
    assert local_share(core) == pytest.approx(0.5 + 0.5 / 3, abs=0.015)


def test_zone_option_defaults_to_consul_zone(monkeypatch):
    monkeypatch.setenv("CONSUL_ZONE", "us-east-1b")
    assert BalancerOptions().zone == "us-east-1b"
    assert BalancerOptions(zone="us-east-1a").zone == "us-east-1a"
    assert BalancerOptions(zone="").zone == ""
    monkeypatch.setenv("CONSUL_ZONE", "")
    assert BalancerOptions().zone is None
    monkeypatch.delenv("CONSUL_ZONE")
    assert BalancerOptions().zone is None
    assert BalancerOptions().zone_routing == ZoneRouting()


def test_bad_zone_options_name_what_is_wrong(monkeypatch):
    monkeypatch.delenv("CONSUL_ZONE", raising=False)
    with pytest.raises(ConfigError, match="Balancer: zone must be"):
        BalancerOptions(zone=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="Balancer: zone must be"):
        BalancerOptions(zone=" a")
    with pytest.raises(ConfigError, match="zone_routing must be a ZoneRouting"):
        BalancerOptions(zone_routing={"min_cluster_size": 1})  # type: ignore[arg-type]
    monkeypatch.setenv("CONSUL_ZONE", "a ")
    with pytest.raises(ConfigError, match="CONSUL_ZONE"):
        BalancerOptions()


def test_an_offloaded_build_plans_under_the_lock_and_builds_the_zone_picker_elsewhere():
    import threading

    core = make()
    handed: list = []
    core.offload_above = 0.0  # every build is slow: handed to the driver
    core.offload = handed.append
    core.set_ready(A[0], False)
    assert len(handed) == 1
    # The plan is made at once; the picker in force is still the direct one until the build is published.
    assert core.zone_plan.mode is ZoneMode.RESIDUAL and isinstance(core.picker, LocalZonePicker)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(handed[0]()))
    worker.start()
    worker.join(10)
    core.publish(handed[0], result[0])
    assert isinstance(core.picker, SplitZonePicker) and core.picker.plan is core.zone_plan
    assert local_share(core) == pytest.approx(0.75, abs=0.015)
