"""Health with real servers through lbkit.aio.Balancer: the asyncio twin of test_health_balancer."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc

import lbkit
import lbkit.aio
from lbkit.events import Event, EventKind
from tests.integration.conftest import SCHEDULING_MARGIN, async_wait_for, pb2, pb2_grpc

REQ = pb2.PredictRequest(features=[1.0])


async def run_calls(
    stub: object, n: int, concurrency: int = 1, timeout: float = 5.0
) -> tuple[Counter[str], list]:
    seen: Counter[str] = Counter()
    failures: list[BaseException] = []
    for _ in range(n // concurrency):
        results = await asyncio.gather(
            *(stub.Predict(REQ, timeout=timeout) for _ in range(concurrency)),  # type: ignore[attr-defined]
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                failures.append(r)
            else:
                seen[r.served_by] += 1
    return seen, failures


async def test_not_serving_leaves_the_picker_and_serving_returns(make_servers):
    servers = make_servers(3)
    events: list[Event] = []
    async with lbkit.aio.Balancer(
        [s.address for s in servers], health_check=lbkit.HealthCheck(), on_event=events.append
    ) as lb:
        await lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        servers[0].set_serving(False)
        await async_wait_for(lambda: servers[0].address not in {e.address for e in lb.core.picker.endpoints})
        before = servers[0].calls["Predict"]
        _, failures = await run_calls(stub, 60, concurrency=6)
        assert failures == [] and servers[0].calls["Predict"] == before
        servers[0].set_serving(True)
        await async_wait_for(lambda: len(lb.core.picker.endpoints) == 3)
        seen, _ = await run_calls(stub, 60)
        assert seen[servers[0].address] > 0
    assert any(e.kind is EventKind.UNHEALTHY and e.address == servers[0].address for e in events)


async def test_failing_server_is_ejected_and_costs_no_failed_call(make_servers):
    good = make_servers(3)
    bad = make_servers(1, fail_rate=1.0)[0]
    servers = [*good, bad]
    od = lbkit.OutlierDetection(max_ejection_percent=25.0)
    async with lbkit.aio.Balancer([s.address for s in servers], outlier_detection=od) as lb:
        await lb.wait_ready(count=4)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        seen, failures = await run_calls(stub, 200, concurrency=4)
        assert failures == []
        assert bad.address not in seen
        assert lb.endpoint_states()[bad.address] == "ejected"
    assert bad.calls["Predict"] <= 5 + 4


async def test_hanging_server_costs_no_failed_call_with_attempt_timeout(make_servers):
    good = make_servers(2)
    hung = make_servers(1, hang=True)[0]
    servers = [*good, hung]
    policy = lbkit.RetryPolicy(attempt_timeout=0.2)
    async with lbkit.aio.Balancer([s.address for s in servers], selector="round_robin", retry=policy) as lb:
        await lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        seen, failures = await run_calls(stub, 30, concurrency=3, timeout=3.0)
        assert failures == []
        assert hung.address not in seen
        assert lb.endpoint_states()[hung.address] == "ejected"


async def test_no_call_fails_with_a_deadline_shorter_than_the_hang(make_servers):
    servers = make_servers(2, hang=True)
    async with lbkit.aio.Balancer([s.address for s in servers]) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        start = time.monotonic()
        _, failures = await run_calls(stub, 1, timeout=0.3)
    # Every server hangs: the call fails with its own deadline, not later, and is not retried past it.
    assert [f.code() for f in failures] == [grpc.StatusCode.DEADLINE_EXCEEDED]
    assert time.monotonic() - start <= 0.3 + SCHEDULING_MARGIN


async def test_health_flips_under_calls_lose_no_call_with_retries_off(make_servers):
    # The asyncio twin of the sync test: a call picked for a server just before the balancer hears it
    # flip NOT_SERVING must still reach it (that server still serves).
    servers = make_servers(3)
    stop = asyncio.Event()
    failures: list[BaseException] = []
    served = [0]
    addresses = [s.address for s in servers]
    check, once = lbkit.HealthCheck(), lbkit.RetryPolicy(max_attempts=1)
    async with lbkit.aio.Balancer(addresses, health_check=check, retry=once) as lb:
        await lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())

        async def call() -> None:
            deadline = time.monotonic() + 60  # bounded: the flips below end it sooner
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    await stub.Predict(REQ, timeout=5)
                    served[0] += 1
                except grpc.RpcError as err:
                    failures.append(err)

        callers = [asyncio.create_task(call()) for _ in range(4)]
        try:
            for i in range(12):
                server = servers[i % 3]
                server.set_serving(False)
                await async_wait_for(lambda s=server: lb.endpoint_states()[s.address] == "unhealthy")
                server.set_serving(True)
                await async_wait_for(lambda s=server: lb.endpoint_states()[s.address] == "ready")
        finally:
            stop.set()
            await asyncio.gather(*callers)
    assert failures == [] and served[0] > 0
