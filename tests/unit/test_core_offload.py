"""Slow picker builds handed to the driver (``BalancerCore.offload``): one at a time, published when done,
changes meanwhile built together after it, and a build made stale by a newer picker dropped."""

from __future__ import annotations

import random

from lbkit.core import BalancerCore, PickerBuild
from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.selectors.base import Picker, Selector
from lbkit.stats import Stats
from lbkit.testing.clock import FakeClock

ADDRS = [f"10.0.0.{i}:50051" for i in range(1, 9)]


class Listing(Selector):
    """A picker that just lists its endpoints; counts builds."""

    name = "listing"

    def __init__(self) -> None:
        self.builds = 0

    def _build(self, endpoints: tuple[Endpoint, ...], stats: Stats) -> Picker:
        self.builds += 1

        class Listed:
            def __init__(self) -> None:
                self.endpoints = endpoints

            def pick(self, key: object = None) -> Endpoint:
                return endpoints[0]

        return Listed()


def offloading_core() -> tuple[BalancerCore, Listing, list[PickerBuild], list[int]]:
    """A core whose every timed build counts as slow; its first (over one endpoint) runs inline."""
    selector = Listing()
    core = BalancerCore(selector, clock=FakeClock(), rng=random.Random(1))
    core.offload_above = 0.0
    handed: list[PickerBuild] = []
    pickers: list[int] = []
    core.offload = handed.append
    core.on_picker.append(lambda: pickers.append(len(core.picker.endpoints)))
    core.set_endpoints(EndpointSet(ADDRS))
    core.set_ready(ADDRS[0], True)
    assert selector.builds == 1 and handed == [] and pickers == [0, 1]
    pickers.clear()
    return core, selector, handed, pickers


def test_a_slow_build_is_handed_over_and_published_when_done() -> None:
    core, selector, handed, pickers = offloading_core()
    core.set_ready(ADDRS[1], True)
    assert len(handed) == 1 and selector.builds == 1 and pickers == []  # handed over, not run
    build = handed[0]
    assert build.size == 2
    core.publish(build, build())
    assert selector.builds == 2 and pickers == [2] and build.seconds > 0.0


def test_one_build_at_a_time_and_changes_meanwhile_are_built_together_after_it() -> None:
    core, _, handed, pickers = offloading_core()
    for address in ADDRS[1:]:
        core.set_ready(address, True)
        core.tick()
    assert len(handed) == 1  # the one build: no second while it runs...
    assert core.next_deadline() is None  # ...and no timer spinning meanwhile
    core.publish(handed[0], handed[0]())
    assert pickers == [2]
    # What changed while it ran is built next, all together, once the coalescing window has passed.
    assert core.next_deadline() is not None
    core.tick()
    assert len(handed) == 2 and handed[1].size == len(ADDRS)
    core.publish(handed[1], handed[1]())
    assert pickers == [2, len(ADDRS)] and core.next_deadline() is None


def test_a_build_that_is_no_longer_the_one_in_flight_is_not_published() -> None:
    core, _, handed, pickers = offloading_core()
    core.set_ready(ADDRS[1], True)
    dropped = handed[0]
    core.drop_build(dropped)  # as a driver does when a build fails
    core.set_ready(ADDRS[2], True)
    assert len(handed) == 2
    core.publish(dropped, dropped())  # late, and not the build in flight: ignored
    assert pickers == []
    core.publish(handed[1], handed[1]())
    assert pickers == [3]


def test_endpoints_gone_during_a_build_leave_the_picker_right_after_it() -> None:
    core, _, handed, pickers = offloading_core()
    core.set_ready(ADDRS[1], True)
    in_flight = handed[0]
    core.set_endpoints(EndpointSet([]))  # everything left while it ran
    core.publish(in_flight, in_flight())
    clock = core.clock
    assert isinstance(clock, FakeClock)
    deadline = core.next_deadline()
    assert deadline is not None
    clock.advance(max(deadline - clock.now, 0.0))
    core.tick()
    assert core.picker.endpoints == () and pickers == [2, 0]


def test_a_failed_build_is_dropped_and_the_next_change_rebuilds() -> None:
    core, _, handed, _ = offloading_core()
    core.set_ready(ADDRS[1], True)
    core.drop_build(handed[0])
    core.set_ready(ADDRS[2], True)
    assert len(handed) == 2 and handed[1].size == 3


def test_without_an_offload_hook_every_build_runs_inline() -> None:
    selector = Listing()
    core = BalancerCore(selector, clock=FakeClock())
    core.offload_above = 0.0
    core.set_endpoints(EndpointSet(ADDRS))
    for address in ADDRS:
        core.set_ready(address, True)
    assert selector.builds == len(ADDRS)  # no offload hook: every build inline


# --------------------------------------------------------------------------- passes over every member


def deferring_core() -> tuple[BalancerCore, Listing, list[str], list[int]]:
    """A core whose driver runs slow passes off its loop (``defer_passes``), with every pass slow."""
    selector = Listing()
    core = BalancerCore(selector, clock=FakeClock(), rng=random.Random(1))
    core.defer_passes = True
    core.offload_above = 0.0
    core.pass_min_members = 0  # eight members: real passes this short are slow only when preempted
    deadlines: list[str] = []
    pickers: list[int] = []
    core.on_deadline.append(lambda: deadlines.append("moved"))
    core.on_picker.append(lambda: pickers.append(len(core.picker.endpoints)))
    core.set_endpoints(EndpointSet(ADDRS))  # no pass timed before it: small sets are taken inline
    assert core.rebuilds == 1 and core._pass_size == len(ADDRS)
    deadlines.clear()
    return core, selector, deadlines, pickers


def test_with_slow_passes_a_change_waits_for_the_next_tick_instead_of_rebuilding_on_the_callers_thread() -> (
    None
):
    core, selector, deadlines, pickers = deferring_core()
    rebuilds = core.rebuilds
    core.set_ready(ADDRS[0], True)
    core.set_ready(ADDRS[1], True)
    assert core.rebuilds == rebuilds and selector.builds == 0  # nothing walked every member here
    assert deadlines == ["moved"]  # once: the driver's timer wakes and ticks (where the driver wants)
    assert core.next_deadline() is not None and core.next_deadline() <= core.clock()
    core.tick()
    assert core.rebuilds == rebuilds + 1 and len(core.picker.endpoints) == 2  # both changes, one rebuild
    assert pickers[-1] == 2


def test_quick_passes_or_no_deferring_driver_rebuild_at_once() -> None:
    core, _, _, _ = deferring_core()
    core.offload_above = 1.0  # no pass takes a second: passes are quick
    core.set_ready(ADDRS[0], True)
    assert len(core.picker.endpoints) == 1  # rebuilt inline, as without a deferring driver
    core.defer_passes = False
    core.offload_above = 0.0
    core.set_ready(ADDRS[1], True)
    assert len(core.picker.endpoints) == 2


def test_slow_pass_scales_the_last_pass_by_size_and_counts_big_sets_slow_before_any() -> None:
    core = BalancerCore(Listing(), clock=FakeClock(), rng=random.Random(1))
    assert not core.slow_pass(10) and core.slow_pass(100_000)  # nothing timed yet: by size alone
    core.offload_above = 0.0
    assert not core.slow_pass(core.pass_min_members - 1)  # so few: never slow, whatever was timed
    core.offload_above = 0.002
    core.pass_min_members = 0
    core.set_endpoints(EndpointSet(ADDRS))  # times a pass over 8 members
    assert core._pass_size == len(ADDRS) and core._pass_seconds > 0.0
    core.offload_above = core._pass_seconds * 10.0
    assert not core.slow_pass() and not core.slow_pass(len(ADDRS) * 5)
    assert core.slow_pass(len(ADDRS) * 20)  # twenty times the members: twenty times the last pass


def test_a_dispatch_hook_gets_every_event_batch_to_deliver_elsewhere() -> None:
    core = BalancerCore(Listing(), clock=FakeClock(), rng=random.Random(1))
    heard: list[str] = []
    core.add_listener(lambda e: heard.append(e.address))
    batches: list[list[object]] = []
    core.dispatch = batches.append  # type: ignore[assignment]
    core.set_endpoints(EndpointSet(ADDRS[:2]))
    assert heard == [] and [len(b) for b in batches] == [2]  # two ADDED, held for the driver
    core.deliver(batches[0])  # type: ignore[arg-type]
    assert heard == ADDRS[:2]
