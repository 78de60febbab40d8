"""The asyncio twin of test_load_reports: grpc.aio servers with AsyncLoadReportInterceptor, aio clients."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

import lbkit
import lbkit.aio
from lbkit.orca import MIRROR_TRAILER, decode
from lbkit.server import AsyncLoadReportInterceptor, ServerLoad, report_load
from tests.integration.conftest import async_wait_for, pb2, pb2_grpc

REQ = pb2.PredictRequest(features=[1.0])
FAST = lbkit.WeightedRoundRobin(blackout_period=0.3, weight_update_period=0.1)


class AsyncModel(pb2_grpc.ModelServiceServicer):
    """An asyncio ModelService: Predict takes ``delay`` seconds; StreamPredict is an async generator."""

    def __init__(self, name: str, delay: float = 0.0, token_delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.token_delay = token_delay

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.model_version == "report":
            report_load(context, named_metrics={"queue_depth": 5, "kv_cache_utilization": 0.25})
        if request.model_version == "fail":
            report_load(context, named_metrics={"queue_depth": 9})
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        context.set_trailing_metadata((("lb-served-by", self.name),))
        if self.delay:
            await asyncio.sleep(self.delay)
        return pb2.PredictResponse(predictions=[1.0], served_by=self.name)

    async def StreamPredict(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        for i in range(request.max_tokens or 3):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            yield pb2.TokenResponse(token=f"t{i}", served_by=self.name)


Start = Callable[..., Awaitable[tuple[str, ServerLoad]]]


@pytest.fixture
async def start_server() -> AsyncIterator[Start]:
    """Start grpc.aio servers reporting load (8 slots unless told, as many as the client keeps in flight);
    all stopped after the test."""
    started: list[grpc.aio.Server] = []

    async def start(delay: float = 0.0, **kwargs: Any) -> tuple[str, ServerLoad]:
        load = kwargs.pop("load", None) or ServerLoad(capacity=8, window=0.2)
        server = grpc.aio.server(interceptors=[AsyncLoadReportInterceptor(load)])
        port = server.add_insecure_port("127.0.0.1:0")
        address = f"127.0.0.1:{port}"
        pb2_grpc.add_ModelServiceServicer_to_server(AsyncModel(address, delay, **kwargs), server)  # type: ignore[no-untyped-call]
        await server.start()
        started.append(server)
        return address, load

    yield start
    for server in started:
        await server.stop(0)


async def shares_of(stub: Any, seconds: float, concurrency: int = 8) -> Counter[str]:
    counts: Counter[str] = Counter()
    end = time.monotonic() + seconds

    async def worker() -> None:
        for _ in range(5000):
            if time.monotonic() >= end:
                return
            counts[(await stub.Predict(REQ, timeout=5)).served_by] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


async def test_shares_follow_reported_capacity(start_server):
    fast1, _ = await start_server(0.003)
    fast2, _ = await start_server(0.003)
    slow, _ = await start_server(0.030)
    async with lbkit.aio.Balancer([fast1, fast2, slow], selector=FAST) as lb:
        await lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        await shares_of(stub, 1.0)
        counts = await shares_of(stub, 1.5)
        weights = dict(
            zip((e.address for e in lb.core.picker.endpoints), lb.core.picker.weights, strict=True)
        )
    total = sum(counts.values())
    assert counts[slow] / total < 0.25, (counts, weights)  # round robin: 1/3; capacity: about 1/11
    assert weights[slow] < 0.5 * min(weights[fast1], weights[fast2]), weights


async def test_named_metrics_reach_the_stats_and_trailers_merge(start_server):
    load = ServerLoad(window=0.2)
    load.set(cpu_utilization=0.6)
    address, _ = await start_server(load=load)
    async with lbkit.aio.Balancer([address], selector="weighted_round_robin") as lb:
        await lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        call = stub.Predict(pb2.PredictRequest(model_version="report"), timeout=5)
        reply = await call
        trailers = dict(await call.trailing_metadata())
        report = lb.stats[address].load_report
    assert reply.served_by == trailers["lb-served-by"] == address
    assert report is not None and decode(trailers[MIRROR_TRAILER]) == report
    assert report.cpu_utilization == 0.6
    assert dict(report.named_metrics) == {"queue_depth": 5.0, "kv_cache_utilization": 0.25}


async def test_an_aborted_call_carries_the_report_given_before_the_abort(start_server):
    now = [0.0]
    load = ServerLoad(window=10.0, clock=lambda: now[0])
    address, _ = await start_server(load=load)
    async with lbkit.aio.Balancer(
        [address], selector="weighted_round_robin", retry=lbkit.RetryPolicy(max_attempts=1)
    ) as lb:
        await lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Predict(pb2.PredictRequest(model_version="fail"), timeout=5)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        report = lb.stats[address].load_report
        assert report is not None and report.named_metrics["queue_depth"] == 9.0
    await async_wait_for(lambda: load.in_progress == 0)
    now[0] = 10.0
    assert load.figures() == {"qps": 0.1, "eps": 0.1}


async def test_a_stream_cancelled_mid_way_is_no_server_error(start_server):
    now = [0.0]
    load = ServerLoad(window=10.0, clock=lambda: now[0])
    load.set(cpu_utilization=0.5)
    address, _ = await start_server(load=load, token_delay=0.05)
    async with lbkit.aio.Balancer([address], selector="weighted_round_robin") as lb:
        await lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        whole = [t.token async for t in stub.StreamPredict(pb2.PredictRequest(max_tokens=2), timeout=5)]
        assert whole == ["t0", "t1"]
        await async_wait_for(lambda: lb.stats[address].load_report is not None)
        call = stub.StreamPredict(pb2.PredictRequest(max_tokens=100), timeout=5)
        first = await call.read()
        assert first.token == "t0" and load.in_progress == 1
        call.cancel()
        await async_wait_for(lambda: load.in_progress == 0)
    now[0] = 10.0
    assert load.figures() == {"qps": 0.2, "eps": 0.0, "cpu_utilization": 0.5}  # two streams, no failure


async def test_other_selectors_leave_reports_unread(start_server):
    address, _ = await start_server()
    async with lbkit.aio.Balancer([address], selector="peak_ewma") as lb:
        await lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(5):
            await stub.Predict(REQ, timeout=5)
        assert lb.stats[address].load_reports == 0
