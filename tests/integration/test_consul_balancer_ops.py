"""Balancers fed by ConsulDiscovery, with real model servers: Consul's health feeds the picker (critical
instances leave it, panic mode applies when all are critical), maintenance mode drains with the calls in
flight finishing, and calls fail over to the next datacenter and come back without a failed call. Sync
and asyncio alike."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import lbkit
from lbkit.events import Cause, Event, EventKind
from lbkit.testing import ConsulServer, ModelServer
from tests.integration.conftest import async_wait_for, pb2, pb2_grpc, wait_for
from tests.integration.test_consul_balancer import Load

SERVICE = "model"
FAST = {"wait": 5.0, "min_interval": 0.01, "backoff_initial": 0.05, "backoff_max": 0.2}
REQ = pb2.PredictRequest(features=[1.0])


def ttl(client: Any, sid: str, server: ModelServer) -> None:
    check = {"CheckID": f"service:{sid}", "Name": "ttl", "TTL": "60s", "Status": "passing"}
    client.agent.service.register(SERVICE, service_id=sid, address=server.host, port=server.port, check=check)


def picker(lb: Any) -> set[str]:
    return {e.address for e in lb.core.picker.endpoints}


class Events:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)

    def causes(self, kind: EventKind) -> list[tuple[str, Cause]]:
        with self.lock:
            return [(e.address, e.cause) for e in self.events if e.kind is kind]


@pytest.fixture
def consul() -> Iterator[ConsulServer]:
    with ConsulServer() as server:
        yield server


def test_critical_instances_leave_the_picker_and_all_critical_is_panic(
    consul: ConsulServer, make_servers: Any
) -> None:
    servers = make_servers(3)
    c = consul.client()
    for i, s in enumerate(servers):
        ttl(c, f"m{i}", s)
    events = Events()
    discovery = lbkit.ConsulDiscovery(SERVICE, address=consul.address, env={}, **FAST)
    with lbkit.Balancer(discovery, on_event=events) as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
        c.agent.check.ttl_fail("service:m0")
        wait_for(lambda: picker(lb) == {servers[1].address, servers[2].address})
        # (events reach listeners just after the picker they come with is in place)
        wait_for(lambda: (servers[0].address, Cause.CONSUL_CRITICAL) in events.causes(EventKind.UNHEALTHY))
        assert servers[0].address not in {stub.Predict(REQ, timeout=5).served_by for _ in range(30)}
        c.agent.check.ttl_fail("service:m1")
        c.agent.check.ttl_fail("service:m2")
        wait_for(lambda: lb.core.panic)
        # every instance critical: calls are still tried on all of them (the pool is not drained)
        served = Counter(stub.Predict(REQ, timeout=5).served_by for _ in range(60))
        assert set(served) == {s.address for s in servers}
        wait_for(lambda: events.causes(EventKind.PANIC_START) != [])
        assert [c for _, c in events.causes(EventKind.PANIC_START)] == [Cause.PANIC_THRESHOLD]
        for i in range(3):
            c.agent.check.ttl_pass(f"service:m{i}")
        wait_for(lambda: not lb.core.panic and len(picker(lb)) == 3)


def test_maintenance_drains_the_instance_and_its_stream_in_flight_finishes(
    consul: ConsulServer, make_servers: Any
) -> None:
    slow, other = make_servers(2, delay=0.05)
    c = consul.client()
    ttl(c, "slow", slow)
    ttl(c, "other", other)
    events = Events()
    discovery = lbkit.ConsulDiscovery(SERVICE, address=consul.address, env={}, **FAST)
    with lbkit.Balancer(discovery, on_event=events, selector="round_robin") as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
        stream = None
        for _ in range(4):  # round robin: one of the first calls lands on the slow one
            candidate = stub.StreamPredict(pb2.PredictRequest(max_tokens=20), timeout=10)
            first = next(candidate)
            if first.served_by == slow.address:
                stream = candidate
                break
            candidate.cancel()
        assert stream is not None
        c.agent.service.maintenance("slow", True, "upgrade")
        wait_for(lambda: picker(lb) == {other.address})
        wait_for(lambda: (slow.address, Cause.MAINTENANCE) in events.causes(EventKind.REMOVED))
        rest = list(stream)  # the stream in flight on the drained instance runs to its end
        assert len(rest) == 19 and rest[-1].is_finished and {t.served_by for t in rest} == {slow.address}
        assert {stub.Predict(REQ, timeout=5).served_by for _ in range(10)} == {other.address}
        c.agent.service.maintenance("slow", False)
        wait_for(lambda: picker(lb) == {slow.address, other.address})


async def test_async_maintenance_drains_and_the_stream_in_flight_finishes(
    consul: ConsulServer, make_servers: Any
) -> None:
    slow, other = make_servers(2, delay=0.05)
    c = consul.client()
    await asyncio.to_thread(ttl, c, "slow", slow)
    await asyncio.to_thread(ttl, c, "other", other)
    discovery = lbkit.ConsulDiscovery(SERVICE, address=consul.address, env={}, **FAST)
    async with lbkit.aio.Balancer(discovery, selector="round_robin") as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
        stream = None
        for _ in range(4):
            candidate = stub.StreamPredict(pb2.PredictRequest(max_tokens=20), timeout=10)
            first = await candidate.read()
            if first.served_by == slow.address:
                stream = candidate
                break
            candidate.cancel()
        assert stream is not None
        await asyncio.to_thread(c.agent.service.maintenance, "slow", True)
        await async_wait_for(lambda: picker(lb) == {other.address})
        rest = [t async for t in stream]
        assert len(rest) == 19 and rest[-1].is_finished
        replies = [await stub.Predict(REQ, timeout=5) for _ in range(6)]
        assert {r.served_by for r in replies} == {other.address}


@contextlib.contextmanager
def two_datacenters() -> Iterator[tuple[ConsulServer, ConsulServer]]:
    with ConsulServer(datacenter="dc1") as dc1, ConsulServer(datacenter="dc2", node_name="node-2") as dc2:
        dc1.join_wan(dc2)
        yield dc1, dc2


def test_calls_fail_over_to_the_next_datacenter_and_back_without_a_failed_call(make_servers: Any) -> None:
    near, far = make_servers(2)
    with two_datacenters() as (dc1, dc2):
        ttl(dc1.client(), "near", near)
        ttl(dc2.client(), "far", far)
        discovery = lbkit.ConsulDiscovery(SERVICE, address=dc1.address, failover=["dc2"], env={}, **FAST)
        with lbkit.Balancer(discovery) as lb:
            lb.wait_ready(count=1)
            stub = pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
            with Load(stub, threads=2, max_seconds=15.0) as load:
                load.wait_for_calls(20)
                assert set(load.snapshot()) == {near.address}
                dc1.client().agent.check.ttl_fail("service:near")
                wait_for(lambda: picker(lb) == {far.address})
                before = load.snapshot()
                load.wait_for_calls(20)
                assert load.snapshot()[far.address] > before[far.address]
                dc1.client().agent.check.ttl_pass("service:near")
                wait_for(lambda: picker(lb) == {near.address})
                before = load.snapshot()
                load.wait_for_calls(20)
                assert load.snapshot()[near.address] > before[near.address]
            assert load.errors == []


async def test_async_calls_fail_over_to_the_next_datacenter_and_back(make_servers: Any) -> None:
    near, far = make_servers(2)
    with two_datacenters() as (dc1, dc2):
        await asyncio.to_thread(ttl, dc1.client(), "near", near)
        await asyncio.to_thread(ttl, dc2.client(), "far", far)
        discovery = lbkit.ConsulDiscovery(SERVICE, address=dc1.address, failover=["dc2"], env={}, **FAST)
        async with lbkit.aio.Balancer(discovery) as lb:
            await lb.wait_ready(count=1)
            stub = pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]
            served: Counter[str] = Counter()
            failures: list[BaseException] = []
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    try:
                        served[(await stub.Predict(REQ, timeout=5)).served_by] += 1
                    except Exception as exc:
                        failures.append(exc)
                    await asyncio.sleep(0.001)

            task = asyncio.create_task(load())
            try:
                await async_wait_for(lambda: served[near.address] >= 10)
                await asyncio.to_thread(dc1.client().agent.check.ttl_fail, "service:near")
                await async_wait_for(lambda: picker(lb) == {far.address})
                mark = served[far.address]
                await async_wait_for(lambda: served[far.address] >= mark + 10)
                await asyncio.to_thread(dc1.client().agent.check.ttl_pass, "service:near")
                await async_wait_for(lambda: picker(lb) == {near.address})
                mark = served[near.address]
                await async_wait_for(lambda: served[near.address] >= mark + 10)
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
            assert failures == []


def test_metrics_expose_consul_staleness(consul: ConsulServer, make_servers: Any) -> None:
    from prometheus_client import CollectorRegistry

    from lbkit.metrics import instrument

    (server,) = make_servers(1)
    ttl(consul.client(), "m", server)
    discovery = lbkit.ConsulDiscovery(SERVICE, address=consul.address, consistency="stale", env={}, **FAST)
    registry = CollectorRegistry()
    with lbkit.Balancer(discovery) as lb:
        lb.wait_ready(count=1)
        instrument(lb, registry)
        labels = {"service": SERVICE}
        assert registry.get_sample_value("lbkit_discovery_known_leader", labels) == 1.0
        assert registry.get_sample_value("lbkit_discovery_last_contact_seconds", labels) == 0.0
        consul.set_raft(leader=False, last_contact=2.0)
        wait_for(lambda: registry.get_sample_value("lbkit_discovery_known_leader", labels) == 0.0, timeout=10)
        assert registry.get_sample_value("lbkit_discovery_last_contact_seconds", labels) == 2.0
        consul.set_raft()


def test_the_clients_zone_from_the_agent_reaches_zone_routing(make_servers: Any) -> None:
    a, b = make_servers(2)
    with ConsulServer(node_meta={"zone": "eu-1b"}) as consul:
        c = consul.client()
        for sid, server, zone in (("a", a, "eu-1a"), ("b", b, "eu-1b")):
            check = {"CheckID": f"service:{sid}", "Name": "ttl", "TTL": "60s", "Status": "passing"}
            c.agent.service.register(
                SERVICE,
                service_id=sid,
                address=server.host,
                port=server.port,
                check=check,
                meta={"zone": zone},
            )
        discovery = lbkit.ConsulDiscovery(
            SERVICE, address=consul.address, zone_from_agent=True, env={}, **FAST
        )
        with lbkit.Balancer(discovery) as lb:
            lb.wait_ready(count=2)
            assert lb.core.zones.learned == "eu-1b"
            assert lb.core.zone_plan.zone == "eu-1b"  # what zone routing plans with (its rules decide)
