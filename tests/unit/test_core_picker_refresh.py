"""A picker's timed work (weighted round robin's weight update) is the core's timer's, never a pick's:
``tick`` runs it when due, ``next_deadline`` wakes the driver for it, and a driver that offloads slow
builds gets it off its event loop the same way."""

from __future__ import annotations

import random

import pytest

from lbkit.core import BalancerCore, PickerBuild
from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.orca import LoadReport
from lbkit.selectors import WeightedRoundRobin
from lbkit.selectors.weighted_round_robin import WeightedRoundRobinPicker
from lbkit.testing.clock import FakeClock
from lbkit.zones import ZonePicker, ZoneRouting

ADDRS = [f"10.0.0.{i}:50051" for i in range(1, 5)]


def ready_core(**kwargs: object) -> tuple[BalancerCore, FakeClock]:
    clock = FakeClock()
    policy = WeightedRoundRobin(blackout_period=0.0, weight_update_period=1.0)
    core = BalancerCore(policy, clock=clock, rng=random.Random(1), **kwargs)  # type: ignore[arg-type]
    core.set_endpoints(EndpointSet(Endpoint(a, zone=f"z{i % 2}") for i, a in enumerate(ADDRS)))
    for address in ADDRS:
        core.set_ready(address, True)
    return core, clock


def report_all(core: BalancerCore, heavy: str) -> None:
    for address in ADDRS:
        utilization = 0.125 if address == heavy else 0.5
        core.stats[address].record_load(LoadReport(application_utilization=utilization, qps=100.0))


def test_tick_refreshes_the_weights_when_due_and_picks_do_not() -> None:
    core, clock = ready_core()
    picker = core.picker
    assert isinstance(picker, WeightedRoundRobinPicker)
    due = core.next_deadline()
    assert due is not None and due <= clock() + 1.0  # the driver's timer wakes for the update
    report_all(core, heavy=ADDRS[1])
    clock.advance(1.0)
    for _ in range(20):
        picker.pick()
    assert set(picker.weights) == {1.0}  # nothing on the call path
    core.tick()
    assert core.picker is picker and picker.weights == (200.0, 800.0, 200.0, 200.0)
    nxt = core.next_deadline()
    assert nxt is not None and clock() < nxt <= clock() + 1.0


def test_a_slow_refresh_is_handed_to_the_offload_and_published_as_the_same_picker() -> None:
    core, clock = ready_core()
    picker = core.picker
    handed: list[PickerBuild] = []
    woken: list[int] = []
    core.offload = handed.append
    core.offload_above = 0.0  # every build counts as slow
    core.on_picker.append(lambda: woken.append(1))
    rebuilds = core.rebuilds
    report_all(core, heavy=ADDRS[2])
    clock.advance(1.0)
    core.tick()
    assert len(handed) == 1 and set(picker.weights) == {1.0}  # handed over, not run here
    assert core.next_deadline() is None  # no timer spinning while it runs elsewhere
    job = handed[0]
    core.publish(job, job())
    assert core.picker is picker and picker.weights == (200.0, 200.0, 800.0, 200.0)
    assert core.rebuilds == rebuilds and woken == []  # the same picker: no rebuild, nobody woken
    assert core.next_deadline() is not None


def test_zone_pickers_refresh_each_zone() -> None:
    core, clock = ready_core(zone="z0", zone_routing=ZoneRouting(min_cluster_size=1))
    picker = core.picker
    assert isinstance(picker, ZonePicker)
    report_all(core, heavy=ADDRS[2])
    clock.advance(1.0)
    assert picker.next_refresh() <= clock()
    core.tick()
    assert picker.next_refresh() > clock()
    fallback = picker.fallback
    assert isinstance(fallback, WeightedRoundRobinPicker)
    assert fallback.weights == pytest.approx((200.0, 200.0, 800.0, 200.0))
