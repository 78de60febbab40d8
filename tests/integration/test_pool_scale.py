"""The channel pool at scale, on real servers: threads do not grow with the endpoints, and readiness and
health reports still arrive for every endpoint (sync and asyncio)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import grpc
import pytest

import lbkit
import lbkit.aio
import lbkit.aio.balancer
import lbkit.balancer
from lbkit._connectivity import AsyncChannelPoller, ChannelPoller
from lbkit.events import Cause, Event, EventKind
from lbkit.testing import FakeClock, ModelServer
from lbkit.testing.port_farm import PortFarm

from .conftest import async_wait_for, pb2, pb2_grpc, wait_for

pytestmark = pytest.mark.timeout(120)

FEW, MANY = 10, 200


@pytest.fixture(scope="module")
def farm() -> Iterator[PortFarm]:
    """MANY endpoints: one server process listening on MANY ports."""
    with PortFarm(MANY) as farm:
        yield farm


def py_threads() -> int:
    """Python threads, but for the asyncio balancer's picker-build worker, which a balancer starts (one)
    once its picker builds get slow, at whatever size that is."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith("lbkit-build"))


def new_lbkit_threads(before: set[threading.Thread]) -> list[str]:
    """The names of lbkit's threads started since ``before`` was taken, sorted."""
    return sorted(t.name for t in set(threading.enumerate()) - before if t.name.startswith("lbkit-"))


def os_threads() -> int:
    """Threads of this process as the kernel counts them (grpc core's own included)."""
    return len(os.listdir("/proc/self/task"))


def addresses_of(events: list[Event], kind: EventKind) -> set[str]:
    return {e.address for e in events if e.kind is kind}


def established_to(port: int) -> int:
    """TCP connections this machine has open to ``port`` (from the client side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01":  # 01: ESTABLISHED
                    count += 1
    return count


@pytest.mark.parametrize("health", [False, True], ids=["health-off", "health-on"])
def test_sync_pool_threads_do_not_grow_with_endpoints(farm: PortFarm, health: bool) -> None:
    counts: dict[int, tuple[int, int]] = {}
    for n in (FEW, MANY):
        events: list[Event] = []
        addresses = farm.addresses[:n]
        check = lbkit.HealthCheck() if health else None
        before = set(threading.enumerate())
        with lbkit.Balancer(addresses, health_check=check, on_event=events.append) as lb:
            lb.wait_ready(count=n, timeout=30)
            counts[n] = (py_threads(), os_threads())
            assert addresses_of(events, EventKind.READY) == set(addresses)
            # discovery, timers and the pool's one poller, at any N
            assert new_lbkit_threads(before) == [
                "lbkit-discovery-static",
                "lbkit-pool-static",
                "lbkit-timers-static",
            ]
            stub = pb2_grpc.ModelServiceStub(lb.channel())
            for _ in range(n):
                stub.Predict(pb2.PredictRequest(), timeout=5)
    # One thread per balancer watches every channel; with `subscribe()` MANY endpoints cost MANY more
    # Python threads (and health checks two more each). grpc core's own pool may add a thread under load,
    # and threads other tests left behind may end meanwhile: no more, rather than exactly as many.
    assert counts[MANY][0] <= counts[FEW][0], counts
    assert counts[MANY][1] <= counts[FEW][1] + 3, counts


@pytest.mark.parametrize("health", [False, True], ids=["health-off", "health-on"])
async def test_aio_pool_threads_do_not_grow_with_endpoints(farm: PortFarm, health: bool) -> None:
    counts: dict[int, tuple[int, int]] = {}
    for n in (FEW, MANY):
        events: list[Event] = []
        addresses = farm.addresses[:n]
        check = lbkit.HealthCheck() if health else None
        async with lbkit.aio.Balancer(addresses, health_check=check, on_event=events.append) as lb:
            await lb.wait_ready(count=n, timeout=30)
            counts[n] = (py_threads(), os_threads())
            assert addresses_of(events, EventKind.READY) == set(addresses)
    assert counts[MANY][0] <= counts[FEW][0], counts
    assert counts[MANY][1] <= counts[FEW][1] + 3, counts


@pytest.mark.parametrize("health", [False, True], ids=["health-off", "health-on"])
async def test_aio_pool_runs_no_task_per_endpoint(farm: PortFarm, health: bool) -> None:
    """Each task is a coroutine chain the cyclic collector walks: at ten thousand endpoints a task per
    channel (and a health stream per endpoint) made every full collection stall the loop for longer."""
    tasks: dict[int, list[str]] = {}
    for n in (FEW, MANY):
        addresses = farm.addresses[:n]
        check = lbkit.HealthCheck() if health else None
        async with lbkit.aio.Balancer(addresses, health_check=check) as lb:
            await lb.wait_ready(count=n, timeout=30)  # with health checks: every first answer is in
            tasks[n] = sorted(repr(t.get_coro()) for t in asyncio.all_tasks())
    assert len(tasks[MANY]) == len(tasks[FEW]), tasks


def test_sync_health_flips_reach_every_endpoint(farm: PortFarm) -> None:
    events: list[Event] = []
    try:
        with lbkit.Balancer(farm.addresses, health_check=lbkit.HealthCheck(), on_event=events.append) as lb:
            lb.wait_ready(count=MANY, timeout=30)
            farm.set_serving(False)
            wait_for(lambda: addresses_of(events, EventKind.UNHEALTHY) == set(farm.addresses), timeout=20)
            # All connected and none healthy: panic mode balances over all of them.
            wait_for(lambda: lb.panic and len(lb.core.picker.endpoints) == MANY)
            farm.set_serving(True)
            wait_for(lambda: addresses_of(events, EventKind.HEALTHY) == set(farm.addresses), timeout=20)
            wait_for(lambda: not lb.panic)
    finally:
        farm.set_serving(True)


async def test_aio_health_flips_reach_every_endpoint(farm: PortFarm) -> None:
    events: list[Event] = []
    try:
        async with lbkit.aio.Balancer(
            farm.addresses, health_check=lbkit.HealthCheck(), on_event=events.append
        ) as lb:
            await lb.wait_ready(count=MANY, timeout=30)
            farm.set_serving(False)
            await async_wait_for(
                lambda: addresses_of(events, EventKind.UNHEALTHY) == set(farm.addresses), timeout=20
            )
            await async_wait_for(lambda: lb.panic and len(lb.core.picker.endpoints) == MANY)
            farm.set_serving(True)
            await async_wait_for(
                lambda: addresses_of(events, EventKind.HEALTHY) == set(farm.addresses), timeout=20
            )
    finally:
        farm.set_serving(True)


CHANNEL_OPTIONS = pytest.mark.parametrize(
    "options", [(), (("grpc.enable_channelz", 0),)], ids=["default-options", "channelz-off"]
)
"""Options a pool's channels get alike: the health-checked twin still shares the call channel's connection."""


@CHANNEL_OPTIONS
def test_sync_health_checks_ride_the_calls_connection_and_balancers_share_none(make_servers, options) -> None:
    (server,) = make_servers(1)
    port = int(server.address.rsplit(":", 1)[1])
    check = lbkit.HealthCheck()
    with lbkit.Balancer([server.address], health_check=check, channel_options=options) as lb:
        lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        stub.Predict(pb2.PredictRequest(), timeout=5)
        # The health-checked channel shares the call channel's connection: one, not two.
        assert established_to(port) == 1
        with lbkit.Balancer([server.address]) as other:
            other.wait_ready()
            # Another balancer's channel to the same server has a connection of its own.
            wait_for(lambda: established_to(port) == 2)


@CHANNEL_OPTIONS
async def test_aio_health_checks_ride_the_calls_connection_and_balancers_share_none(
    make_servers, options
) -> None:
    (server,) = make_servers(1)
    port = int(server.address.rsplit(":", 1)[1])
    check = lbkit.HealthCheck()
    async with lbkit.aio.Balancer([server.address], health_check=check, channel_options=options) as lb:
        await lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        await stub.Predict(pb2.PredictRequest(), timeout=5)
        assert established_to(port) == 1
        async with lbkit.aio.Balancer([server.address]) as other:
            await other.wait_ready()
            await async_wait_for(lambda: established_to(port) == 2)


@pytest.mark.parametrize("unimplemented", ["healthy", "unhealthy"])
def test_sync_server_without_health_service_is_healthy_or_not_as_configured(
    make_servers, unimplemented: str
) -> None:
    plain = ModelServer(health_service=False).start()
    (other,) = make_servers(1)
    events: list[Event] = []
    check = lbkit.HealthCheck(unimplemented=unimplemented)
    try:
        with lbkit.Balancer([plain.address, other.address], health_check=check, on_event=events.append) as lb:
            if unimplemented == "healthy":
                lb.wait_ready(count=2)
                assert addresses_of(events, EventKind.UNHEALTHY) == set()
            else:
                wait_for(lambda: plain.address in addresses_of(events, EventKind.UNHEALTHY))
                assert lb.endpoint_states()[plain.address] == "unhealthy"
                assert {e.cause for e in events if e.kind is EventKind.UNHEALTHY} == {
                    Cause.HEALTH_UNIMPLEMENTED
                }
                wait_for(lambda: [e.address for e in lb.core.picker.endpoints] == [other.address])
    finally:
        plain.stop(0)


@pytest.mark.parametrize("unimplemented", ["healthy", "unhealthy"])
async def test_aio_server_without_health_service_is_healthy_or_not_as_configured(
    make_servers, unimplemented: str
) -> None:
    plain = ModelServer(health_service=False).start()
    (other,) = make_servers(1)
    events: list[Event] = []
    check = lbkit.HealthCheck(unimplemented=unimplemented)
    addresses = [plain.address, other.address]
    try:
        async with lbkit.aio.Balancer(addresses, health_check=check, on_event=events.append) as lb:
            if unimplemented == "healthy":
                await lb.wait_ready(count=2)
                assert addresses_of(events, EventKind.UNHEALTHY) == set()
            else:
                await async_wait_for(lambda: plain.address in addresses_of(events, EventKind.UNHEALTHY))
                assert lb.endpoint_states()[plain.address] == "unhealthy"
                assert {e.cause for e in events if e.kind is EventKind.UNHEALTHY} == {
                    Cause.HEALTH_UNIMPLEMENTED
                }
                await async_wait_for(lambda: [e.address for e in lb.core.picker.endpoints] == [other.address])
    finally:
        plain.stop(0)


def test_a_failed_call_makes_the_pool_read_its_channel_at_once(make_servers, monkeypatch) -> None:
    # The pool's poller runs on a fake clock: once the endpoints are ready no sweep ever comes again, so
    # only the failed call can make it read the stopped server's channel.
    clock = FakeClock()
    monkeypatch.setattr(lbkit.balancer, "ChannelPoller", functools.partial(ChannelPoller, clock=clock))
    servers = make_servers(2)
    events: list[Event] = []
    with lbkit.Balancer([s.address for s in servers], on_event=events.append) as lb:
        wait_for(lambda: clock.advance(0.05) and len(lb.core.picker.endpoints) == 2)
        poller = lb._poller
        wait_for(lambda: (poller.next_due() or 0.0) > clock.now)  # the reads the last advance made are done
        reads = poller.reads
        servers[0].stop(0)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(4):  # round robin: some go to the stopped server (and may be retried elsewhere)
            with contextlib.suppress(grpc.RpcError):
                stub.Predict(pb2.PredictRequest(), timeout=5)
        assert lb.stats[servers[0].address].failures >= 1  # an attempt met the stopped server...
        # ...and that failure alone made the pool read the channel and take the endpoint out.
        wait_for(lambda: servers[0].address in addresses_of(events, EventKind.NOT_READY))
        wait_for(lambda: {e.address for e in lb.core.picker.endpoints} == {servers[1].address})
        # Every read came of a failed call there (the clock stands still: no sweep): at most two each, one
        # on the failed call's thread and one queued for the poller's, and the poller's one follow-up
        # first_interval after the change.
        wait_for(lambda: poller.reads - reads >= 2)
        assert poller.reads - reads <= 2 * lb.stats[servers[0].address].failures + 1


async def test_aio_a_failed_call_makes_the_pool_read_its_channel_at_once(make_servers, monkeypatch) -> None:
    # As the sync test above: the poller's clock stands still once the endpoints are ready.
    clock = FakeClock()
    monkeypatch.setattr(
        lbkit.aio.balancer, "AsyncChannelPoller", functools.partial(AsyncChannelPoller, clock=clock)
    )
    servers = make_servers(2)
    events: list[Event] = []
    async with lbkit.aio.Balancer([s.address for s in servers], on_event=events.append) as lb:
        await async_wait_for(lambda: clock.advance(0.05) and len(lb.core.picker.endpoints) == 2)
        poller = lb._poller
        await async_wait_for(lambda: (poller.next_due() or 0.0) > clock.now)
        reads = poller.reads
        servers[0].stop(0)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(4):
            with contextlib.suppress(grpc.RpcError):
                await stub.Predict(pb2.PredictRequest(), timeout=5)
        assert lb.stats[servers[0].address].failures >= 1
        await async_wait_for(lambda: servers[0].address in addresses_of(events, EventKind.NOT_READY))
        await async_wait_for(lambda: {e.address for e in lb.core.picker.endpoints} == {servers[1].address})
        await async_wait_for(lambda: poller.reads - reads >= 2)
        assert poller.reads - reads <= 2 * lb.stats[servers[0].address].failures + 1


class GatedRoundRobin(lbkit.Selector):
    """Round robin whose builds, once ``armed``, wait for ``gate`` (set by a coroutine on the loop)."""

    name = "gated_round_robin"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.armed = False
        self.builds = 0
        self.waited: list[bool] = []

    def _build(self, endpoints: tuple[lbkit.Endpoint, ...], stats: lbkit.Stats) -> lbkit.Picker:
        self.builds += 1
        if self.armed:
            self.waited.append(self.gate.wait(5.0))
        return lbkit.RoundRobin().build(endpoints, stats)


async def test_aio_slow_picker_builds_leave_the_event_loop_free(make_servers) -> None:
    servers = make_servers(3)
    addresses = [s.address for s in servers]
    discovery = lbkit.StaticDiscovery(addresses)
    selector = GatedRoundRobin()
    async with lbkit.aio.Balancer(discovery, selector=selector) as lb:
        await lb.wait_ready(count=3)
        lb.core.offload_above = 0.0  # every timed build counts as slow
        selector.armed = True
        builds = selector.builds
        discovery.update(addresses[:2])
        await async_wait_for(lambda: selector.builds > builds)
        # The build waits for the gate; only a loop that is free to run this line can open it.
        selector.gate.set()
        await async_wait_for(lambda: {e.address for e in lb.core.picker.endpoints} == set(addresses[:2]))
        assert selector.waited and all(selector.waited)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        seen = {(await stub.Predict(pb2.PredictRequest(), timeout=5)).served_by for _ in range(6)}
        assert seen == set(addresses[:2])


async def test_aio_slow_passes_over_the_members_leave_the_event_loop(make_servers) -> None:
    """Taking an endpoint set and finding the eligible endpoints walk every member: at ten thousand
    endpoints, milliseconds each. Once slow they run in the balancer's worker; events still reach the
    listeners on the loop, in order."""
    servers = make_servers(3)
    addresses = [s.address for s in servers]
    discovery = lbkit.StaticDiscovery(addresses)
    events: list[tuple[Event, int]] = []
    loop_thread = threading.get_ident()
    async with lbkit.aio.Balancer(
        discovery, on_event=lambda e: events.append((e, threading.get_ident()))
    ) as lb:
        await lb.wait_ready(count=3)
        core = lb.core
        core.offload_above = 0.0  # every pass over the members counts as slow...
        core.pass_min_members = 0  # ...even over three
        gate = threading.Event()
        updates: list[int] = []
        rebuilds: list[int] = []
        update_members, rebuild = core._update_members, core._rebuild

        def gated_update(*args: object, **kwargs: object) -> bool:
            updates.append(threading.get_ident())
            assert gate.wait(5.0)
            return update_members(*args, **kwargs)  # type: ignore[arg-type]

        def recorded_rebuild(now: float) -> None:
            rebuilds.append(threading.get_ident())
            rebuild(now)

        core._update_members = gated_update  # type: ignore[method-assign]
        core._rebuild = recorded_rebuild  # type: ignore[method-assign]
        discovery.update(addresses[:2])
        await async_wait_for(lambda: updates)
        gate.set()  # the pass waits for it: only a loop that is free to run this line can open it
        await async_wait_for(lambda: {e.address for e in core.picker.endpoints} == set(addresses[:2]))
        assert updates and loop_thread not in updates
        assert rebuilds and loop_thread not in rebuilds  # the rebuild the change asked for: at a tick, off it
        await async_wait_for(lambda: any(e.kind is EventKind.REMOVED for e, _ in events))
        assert [e.address for e, _ in events if e.kind is EventKind.REMOVED] == [addresses[2]]
        assert {thread for _, thread in events} == {loop_thread}
        kinds = [e.kind for e, _ in events]
        assert kinds.index(EventKind.READY) < kinds.index(EventKind.REMOVED)  # in the order they happened


def test_sync_drain_timer_keeps_the_draining_members_apart(farm: PortFarm) -> None:
    """The drain timer looks at the members draining, not at every member: at ten thousand endpoints a
    sweep of every member each time it wakes cost the calls more than the pool's own poller."""
    addresses = farm.addresses[:FEW]
    discovery = lbkit.StaticDiscovery(addresses)
    with lbkit.Balancer(discovery) as lb:
        lb.wait_ready(count=FEW, timeout=30)
        assert lb.draining == {}
        address = addresses[3]
        entry = lb.members[address].stats
        entry.in_flight += 1  # a call in flight keeps it draining
        discovery.update([a for a in addresses if a != address])
        wait_for(lambda: address in lb.draining, timeout=10)
        assert set(lb.draining) == {address} and lb.draining[address] is lb.members[address]
        entry.in_flight -= 1
        wait_for(lambda: address not in lb.members, timeout=10)
        assert lb.draining == {}
        discovery.update(addresses)  # back: a new member, nothing draining
        lb.wait_ready(count=FEW, timeout=30)
        assert lb.draining == {}
