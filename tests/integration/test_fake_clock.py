"""Both balancers run on the clock they are given: draining, ejection and waiting for readiness are
driven by a FakeClock, with no real waiting for the seconds they cover."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import grpc
import pytest

import lbkit
import lbkit.aio
from lbkit.events import EventKind
from lbkit.testing import FakeClock

from .conftest import async_wait_for, pb2, pb2_grpc, wait_for

pytestmark = pytest.mark.timeout(60)

DRAIN = 30.0


def _ejection_options() -> dict[str, Any]:
    return {
        "outlier_detection": lbkit.OutlierDetection(
            consecutive_failures=3, base_ejection_time=40.0, max_ejection_percent=100.0, jitter=0.0
        ),
        "retry": lbkit.RetryPolicy(max_attempts=1),
    }


def test_sync_drain_timeout_runs_on_the_balancer_clock(make_servers) -> None:
    (a,) = make_servers(1, hang=True)
    (b,) = make_servers(1)
    discovery = lbkit.StaticDiscovery([a.address])
    clock = FakeClock()
    with lbkit.Balancer(discovery, drain_timeout=DRAIN, clock=clock) as lb:
        lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())

        def call() -> None:
            # How a call cut by the drain ends is the call path's to test; here only the timing matters.
            with contextlib.suppress(grpc.RpcError):
                stub.Predict(pb2.PredictRequest(), timeout=30)

        caller = threading.Thread(target=call)
        caller.start()
        wait_for(lambda: lb.stats[a.address].in_flight == 1)
        discovery.update([b.address])
        wait_for(lambda: lb.endpoint_states().get(a.address) == "draining")
        clock.advance(DRAIN - 1.0)
        assert lb._drain() is not None  # one step of the timer at this time: still waiting for the call
        assert lb.endpoint_states().get(a.address) == "draining" and caller.is_alive()
        clock.advance(2.0)  # past the drain timeout: closed now, not 30 real seconds later
        wait_for(lambda: a.address not in lb.endpoint_states())
        caller.join(10)


def test_sync_ejection_ends_on_the_balancer_clock(make_servers) -> None:
    (a,) = make_servers(1, fail_rate=1.0, fail_code=grpc.StatusCode.INTERNAL)
    clock = FakeClock()
    events: list[lbkit.Event] = []
    with lbkit.Balancer([a.address], clock=clock, on_event=events.append, **_ejection_options()) as lb:
        lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                stub.Predict(pb2.PredictRequest(), timeout=5)
        wait_for(lambda: any(e.kind is EventKind.EJECTED for e in events))
        clock.advance(41.0)
        wait_for(lambda: any(e.kind is EventKind.RETURNED for e in events))
        assert [e.time for e in events if e.kind is EventKind.RETURNED] == [clock.now]


def test_sync_wait_ready_times_out_on_the_balancer_clock() -> None:
    clock = FakeClock()
    with lbkit.Balancer(["127.0.0.1:1"], clock=clock) as lb:
        raised: list[BaseException] = []

        def wait() -> None:
            try:
                lb.wait_ready(timeout=60.0)
            except lbkit.NoEndpointsError as err:
                raised.append(err)

        waiter = threading.Thread(target=wait)
        waiter.start()
        clock.advance(61.0)
        waiter.join(5)
        assert not waiter.is_alive() and isinstance(raised[0], lbkit.NoReadyEndpointError)


async def test_aio_drain_timeout_runs_on_the_balancer_clock(make_servers) -> None:
    (a,) = make_servers(1, hang=True)
    (b,) = make_servers(1)
    discovery = lbkit.StaticDiscovery([a.address])
    clock = FakeClock()
    async with lbkit.aio.Balancer(discovery, drain_timeout=DRAIN, clock=clock) as lb:
        await lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        call = stub.Predict(pb2.PredictRequest(), timeout=30)
        task = asyncio.ensure_future(call)
        await async_wait_for(lambda: lb.stats[a.address].in_flight == 1)
        discovery.update([b.address])
        await async_wait_for(lambda: lb.endpoint_states().get(a.address) == "draining")
        clock.advance(DRAIN - 1.0)
        assert await lb._drain() is not None
        assert lb.endpoint_states().get(a.address) == "draining" and not task.done()
        clock.advance(2.0)
        await async_wait_for(lambda: a.address not in lb.endpoint_states())
        with contextlib.suppress(grpc.RpcError, asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


async def test_aio_ejection_ends_on_the_balancer_clock(make_servers) -> None:
    (a,) = make_servers(1, fail_rate=1.0, fail_code=grpc.StatusCode.INTERNAL)
    clock = FakeClock()
    events: list[lbkit.Event] = []
    async with lbkit.aio.Balancer(
        [a.address], clock=clock, on_event=events.append, **_ejection_options()
    ) as lb:
        await lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                await stub.Predict(pb2.PredictRequest(), timeout=5)
        await async_wait_for(lambda: any(e.kind is EventKind.EJECTED for e in events))
        clock.advance(41.0)
        await async_wait_for(lambda: any(e.kind is EventKind.RETURNED for e in events))
        assert [e.time for e in events if e.kind is EventKind.RETURNED] == [clock.now]


async def test_aio_wait_ready_times_out_on_the_balancer_clock() -> None:

    clock = FakeClock()
    async with lbkit.aio.Balancer(["127.0.0.1:1"], clock=clock) as lb:
        waiter = asyncio.ensure_future(lb.wait_ready(timeout=60.0))
        await asyncio.sleep(0)
        clock.advance(61.0)
        with pytest.raises(lbkit.NoReadyEndpointError):
            await asyncio.wait_for(waiter, 5)
