"""lbkit.aio.Balancer fed by ConsulDiscovery (its asyncio loop), end to end: the asyncio twin of
test_consul_balancer.py, with grpc.aio stubs and lbkit.registration.AsyncRegistration."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import lbkit
import lbkit.aio
from lbkit.events import EventKind
from lbkit.registration import AsyncRegistration, GrpcCheck, TtlCheck
from lbkit.testing import ModelServer
from tests.integration.conftest import pb2_grpc
from tests.integration.test_consul_balancer import REQ, SETTLE, TARGETS, Consul, Events, open_consul

MakeServers = Callable[..., list[ModelServer]]


@pytest.fixture(params=TARGETS)
def consul(request: pytest.FixtureRequest) -> Iterator[Consul]:
    """lbkit's ConsulServer, or the real agent at CONSUL_HTTP_ADDR."""
    with open_consul(request.param) as target:
        yield target


@pytest.fixture(params=TARGETS)
def acl_consul(request: pytest.FixtureRequest) -> Iterator[Consul]:
    """An ACL-enforcing ConsulServer, or the real agent when CONSUL_HTTP_TOKEN is set."""
    with open_consul(request.param, acl=True) as target:
        yield target


# --- helpers ---------------------------------------------------------------------------------------


async def wait_until(
    condition: Callable[[], bool],
    timeout: float = SETTLE,
    what: str = "condition",
    show: Callable[[], object] | None = None,
) -> None:
    """Poll ``condition`` every 5 ms until it holds; fail after ``timeout`` seconds (with ``show()``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s" + (f": {show()}" if show else ""))
        await asyncio.sleep(0.005)


def picker_addresses(lb: lbkit.aio.Balancer) -> set[str]:
    """Addresses the balancer's current picker chooses from."""
    return {e.address for e in lb.core.picker.endpoints}


def stub_of(lb: lbkit.aio.Balancer) -> Any:
    return pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]


async def served_by(stub: Any, n: int) -> Counter[str]:
    """Make ``n`` Predict calls one after another; count which endpoint answered each."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        seen[(await stub.Predict(REQ, timeout=5)).served_by] += 1
    return seen


async def blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking py-consul call off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


class Load:
    """Predict calls from ``tasks`` tasks, each pausing ``pause`` s between calls, until stopped or
    ``max_calls`` / ``max_seconds`` run out. Counts where calls landed and keeps every failure."""

    def __init__(
        self,
        stub: Any,
        *,
        tasks: int = 4,
        pause: float = 0.001,
        max_calls: int = 40_000,
        max_seconds: float = 20.0,
    ) -> None:
        self.stub = stub
        self.pause = pause
        self.max_calls = max_calls
        self.max_seconds = max_seconds
        self.tasks = tasks
        self.served: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self.calls = 0
        self._stop = asyncio.Event()
        self._running: list[asyncio.Task[None]] = []

    async def _run(self) -> None:
        end = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < end and self.calls < self.max_calls:
            self.calls += 1
            try:
                reply = await self.stub.Predict(REQ, timeout=5)
            except Exception as exc:
                self.errors.append(exc)
            else:
                self.served[reply.served_by] += 1
            await asyncio.sleep(self.pause)

    async def wait_for_calls(self, n: int, timeout: float = SETTLE) -> None:
        """Wait until ``n`` more calls have been answered."""
        target = sum(self.served.values()) + n
        await wait_until(lambda: sum(self.served.values()) >= target, timeout, f"{n} more calls")

    async def __aenter__(self) -> Load:
        self._running = [asyncio.create_task(self._run()) for _ in range(self.tasks)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._running), 10.0)


# --- registration, checks, weights ------------------------------------------------------------------


async def test_registration_reaches_the_balancer_and_deregistration_drains(
    consul: Consul, make_servers: MakeServers
) -> None:
    a, b = make_servers(2)
    await blocking(consul.register, "a", a)  # py-consul
    async with lbkit.aio.Balancer(consul.discovery()) as lb:
        await lb.wait_ready(timeout=SETTLE)
        stub = stub_of(lb)
        assert await served_by(stub, 10) == {a.address: 10}

        async with AsyncRegistration(consul.service, b.address, **consul.agent_options("b")) as reg:
            await wait_until(lambda: picker_addresses(lb) == {a.address, b.address}, what="b in the picker")
            assert await served_by(stub, 20) == {a.address: 10, b.address: 10}

            # Calls in flight on b when it leaves Consul still complete on b.
            b.behavior.delay = 0.5
            a0, b0 = a.calls["Predict"], b.calls["Predict"]
            calls = [asyncio.ensure_future(stub.Predict(REQ, timeout=5)) for _ in range(4)]

            def reached() -> int:
                return a.calls["Predict"] - a0 + b.calls["Predict"] - b0

            await wait_until(lambda: reached() == 4, what="all four calls at a server")
            in_flight = b.calls["Predict"] - b0
            assert in_flight >= 1 and lb.stats[b.address].in_flight == in_flight
            assert await reg.deregister()
        await wait_until(lambda: b.address not in picker_addresses(lb), what="b out of the picker")
        assert lb.endpoint_states()[b.address] == "draining"
        assert await served_by(stub, 20) == {a.address: 20}  # no new call lands on b
        replies = await asyncio.wait_for(asyncio.gather(*calls), 5.0)
        assert Counter(r.served_by for r in replies)[b.address] == in_flight  # drained calls finished on b
        assert b.calls["Predict"] - b0 == in_flight  # and b saw no other call
        await wait_until(lambda: b.address not in lb.members, what="b's channel closed after draining")


async def test_an_instance_registered_again_while_draining_is_picked_again(
    consul: Consul, make_servers: MakeServers
) -> None:
    a, b = make_servers(2)
    await blocking(consul.register, "a", a)
    await blocking(consul.register, "b", b)
    async with lbkit.aio.Balancer(consul.discovery()) as lb:
        await lb.wait_ready(timeout=SETTLE, count=2)
        stub = stub_of(lb)
        b.behavior.delay = 1.0
        calls = [asyncio.ensure_future(stub.Predict(REQ, timeout=5)) for _ in range(4)]
        b_stats = lb.stats.get(b.address)
        assert b_stats is not None
        await wait_until(lambda: b_stats.in_flight >= 1, what="a call in flight on b")
        await blocking(consul.deregister, "b")
        await wait_until(lambda: lb.endpoint_states().get(b.address) == "draining", what="b draining")
        b.behavior.delay = 0.0
        await blocking(consul.register, "b", b)  # back before its calls in flight finished
        try:
            await wait_until(
                lambda: picker_addresses(lb) == {a.address, b.address},
                3.0,
                "b pickable again",
                lb.endpoint_states,
            )
            assert (await served_by(stub, 20))[b.address] == 10
        finally:
            await asyncio.wait_for(asyncio.gather(*calls), 5.0)


async def test_ttl_check_critical_takes_the_endpoint_out_and_passing_puts_it_back(
    consul: Consul, make_servers: MakeServers
) -> None:
    servers = make_servers(3)
    for i, s in enumerate(servers):
        await blocking(consul.register, f"m{i}", s, ttl=True)
    every = {s.address for s in servers}
    sick = servers[2]
    async with lbkit.aio.Balancer(consul.discovery()) as lb:
        await lb.wait_ready(timeout=SETTLE, count=3)
        stub = stub_of(lb)
        await blocking(consul.client.agent.check.ttl_fail, "service:m2")
        await wait_until(lambda: picker_addresses(lb) == every - {sick.address}, what="m2 out")
        before = sick.calls["Predict"]
        assert sick.address not in await served_by(stub, 30)
        assert sick.calls["Predict"] == before

        await blocking(consul.client.agent.check.ttl_pass, "service:m2")
        await wait_until(lambda: picker_addresses(lb) == every, what="m2 back")
        assert (await served_by(stub, 30))[sick.address] == 10


async def test_grpc_check_not_serving_takes_the_endpoint_out(
    consul: Consul, make_servers: MakeServers
) -> None:
    if not consul.local:
        pytest.skip("the agent must run here to probe 127.0.0.1")
    servers = make_servers(2)
    check = GrpcCheck(interval=0.1, timeout=1.0, deregister_after=None)
    regs = [
        await AsyncRegistration(
            consul.service, s.address, check=check, **consul.agent_options(f"g{i}")
        ).register()
        for i, s in enumerate(servers)
    ]
    every = {s.address for s in servers}
    sick = servers[1]
    settle = SETTLE if consul.server else 10.0  # a real agent checks at most once a second
    try:
        async with lbkit.aio.Balancer(consul.discovery()) as lb:
            await lb.wait_ready(timeout=settle, count=2)
            stub = stub_of(lb)
            sick.set_serving(False)
            await wait_until(
                lambda: picker_addresses(lb) == every - {sick.address}, settle, "NOT_SERVING out"
            )
            assert sick.address not in await served_by(stub, 20)
            sick.set_serving(True)
            await wait_until(lambda: picker_addresses(lb) == every, settle, "SERVING back")
            assert (await served_by(stub, 20))[sick.address] == 10
    finally:
        for reg in regs:
            await reg.close()


async def test_consul_weights_reach_endpoints_and_split_weighted_calls(
    consul: Consul, make_servers: MakeServers
) -> None:
    heavy, light = make_servers(2)
    await blocking(consul.register, "heavy", heavy, weight=8)
    await blocking(consul.register, "light", light, weight=4)
    async with lbkit.aio.Balancer(consul.discovery(), selector="weighted") as lb:
        await lb.wait_ready(timeout=SETTLE, count=2)
        weights = {e.address: e.weight for e in lb.core.picker.endpoints}
        assert weights == {heavy.address: 8, light.address: 4}
        seen = await served_by(stub_of(lb), 300)
        assert abs(seen[heavy.address] - 200) <= 6 and abs(seen[light.address] - 100) <= 6, seen


# --- Consul failures ----------------------------------------------------------------------------------


async def test_consul_killed_and_restarted_costs_no_call(consul: Consul, make_servers: MakeServers) -> None:
    server = consul.hooks
    a, b, c = make_servers(3)
    await blocking(consul.register, "a", a)
    await blocking(consul.register, "b", b)
    discovery = consul.discovery()
    events = Events()
    async with lbkit.aio.Balancer(discovery, on_event=events) as lb:
        await lb.wait_ready(timeout=SETTLE, count=2)
        async with Load(stub_of(lb)) as load:
            await load.wait_for_calls(50)
            await blocking(server.stop)
            await wait_until(lambda: discovery.status.consecutive_errors >= 2, what="failed queries")
            assert discovery.status.stale
            await load.wait_for_calls(200)  # calls go on while Consul is down ...
            assert picker_addresses(lb) == {a.address, b.address}  # ... over the last set
            assert load.served[a.address] > 50 and load.served[b.address] > 50

            await blocking(server.start)
            await blocking(consul.register, "c", c)
            await wait_until(lambda: c.address in picker_addresses(lb), what="c after the restart")
            await load.wait_for_calls(100)
            assert not discovery.status.stale
        assert load.errors == []
        assert load.served[c.address] > 0
        assert picker_addresses(lb) == {a.address, b.address, c.address}
        assert events.of(EventKind.REMOVED) == []
        assert lb.calls_retried == 0


@pytest.mark.parametrize("fault", ["500", "garbage"])
async def test_consul_errors_under_load_change_nothing(
    consul: Consul, make_servers: MakeServers, fault: str
) -> None:
    server = consul.hooks
    servers = make_servers(2)
    for i, s in enumerate(servers):
        await blocking(consul.register, f"m{i}", s)
    every = {s.address for s in servers}
    discovery = consul.discovery(wait=0.2)
    events = Events()
    async with lbkit.aio.Balancer(discovery, on_event=events) as lb:
        await lb.wait_ready(timeout=SETTLE, count=2)
        version = lb.core.endpoint_set.version
        async with Load(stub_of(lb)) as load:
            await load.wait_for_calls(50)
            errors = discovery.status.errors
            if fault == "500":
                server.fail_next(6, status=500, body="rpc error making call: No cluster leader")
            else:
                server.garbage_next(6)
            await wait_until(lambda: discovery.status.errors >= errors + 6, what="six failed queries")
            assert picker_addresses(lb) == every
            await wait_until(lambda: not discovery.status.stale, what="a good answer again")
            await load.wait_for_calls(100)
        assert load.errors == []
        assert {a for a, n in load.served.items() if n > 0} == every
        assert lb.core.endpoint_set.version == version
        assert events.of(EventKind.REMOVED) == [] and set(events.of(EventKind.ADDED)) == every
        assert lb.calls_retried == 0


async def test_a_flapping_instance_costs_the_others_no_call(
    consul: Consul, make_servers: MakeServers
) -> None:
    stable = make_servers(3)
    flapper = make_servers(1)[0]
    for i, s in enumerate(stable):
        await blocking(consul.register, f"s{i}", s)
    every = {s.address for s in [*stable, flapper]}
    async with lbkit.aio.Balancer(consul.discovery()) as lb:
        await lb.wait_ready(timeout=SETTLE, count=3)
        async with Load(stub_of(lb)) as load:
            await load.wait_for_calls(50)
            start = time.monotonic()
            flaps = 0
            while flaps < 60 and time.monotonic() - start < 3.0:
                await blocking(consul.register, "flap", flapper)
                await asyncio.sleep(0.01)
                await blocking(consul.deregister, "flap")
                await asyncio.sleep(0.01)
                flaps += 1
            await blocking(consul.register, "flap", flapper)  # the final state: registered
            await wait_until(lambda: picker_addresses(lb) == every, 3.0, "the final set", lb.endpoint_states)
            await load.wait_for_calls(100)
        assert flaps >= 10, "the flapping loop was too slow to test anything"
        assert load.errors == []
        assert all(load.served[s.address] > 100 for s in stable)
        assert set(lb.core.endpoint_set.by_address) == every == await blocking(consul.catalog)
        assert await served_by(stub_of(lb), 40) == dict.fromkeys(every, 10)

        await blocking(consul.deregister, "flap")
        await wait_until(lambda: picker_addresses(lb) == every - {flapper.address}, what="flapper gone")
        await wait_until(lambda: flapper.address not in lb.members, what="flapper's channel closed")
        assert set(lb.members) == {s.address for s in stable}


# --- ACL token ------------------------------------------------------------------------------------------


async def test_acl_token_works_and_never_shows(
    acl_consul: Consul, make_servers: MakeServers, caplog: pytest.LogCaptureFixture
) -> None:
    token = acl_consul.token
    assert token
    a, b = make_servers(2)
    with caplog.at_level(logging.DEBUG):
        await blocking(acl_consul.register, "a", a)
        options = acl_consul.agent_options("b")
        async with AsyncRegistration(
            acl_consul.service, b.address, check=TtlCheck(ttl=30.0), **options
        ) as reg:
            discovery = acl_consul.discovery()
            async with lbkit.aio.Balancer(discovery) as lb:
                await lb.wait_ready(timeout=SETTLE, count=2)
                assert set(await served_by(stub_of(lb), 10)) == {a.address, b.address}
                shown = [repr(discovery), repr(lb), repr(discovery.options), repr(reg), str(discovery.status)]
                shown += [repr(lb.options), repr(discovery.connection)]

        wrong = acl_consul.discovery(token="wrong-" + token)
        async with lbkit.aio.Balancer(wrong, wait_timeout=0.2) as bad:
            await wait_until(lambda: wrong.status.errors >= 2, what="refused queries")
            with pytest.raises(lbkit.NoEndpointsError):
                await stub_of(bad).Predict(REQ, timeout=1)
            shown += [repr(wrong), repr(bad), wrong.status.last_error]
    refused = [
        r for r in caplog.records if r.levelno == logging.ERROR and "ACL token refused" in r.getMessage()
    ]
    assert refused
    for text in [caplog.text, *shown]:
        assert token not in text
    for record in caplog.records:
        assert token not in repr(record.args) and token not in str(record.msg)
    if acl_consul.server is not None:
        gets = [r for r in acl_consul.server.requests if r.path == f"/v1/health/service/{acl_consul.service}"]
        assert gets and all(token not in str(r.query) for r in gets)
