"""Hedged calls on real servers, asyncio: the twins of test_hedging_sync.py."""

from __future__ import annotations

import asyncio
import gc
import time

import grpc
import pytest

import lbkit
import lbkit.aio
from lbkit.testing import FakeClock
from tests.integration.conftest import SCHEDULING_MARGIN, async_wait_for, pb2, pb2_grpc

pytestmark = pytest.mark.timeout(60)

REQ = pb2.PredictRequest(features=[1.0, 2.0])
SERVICE = "/lbkit.inference.v1.ModelService"
STALL = 30.0
"""A stall far longer than any test waits: only a cancel can end it early."""


def hedged(delay: float | str = 0.05, **kw: object) -> dict[str, object]:
    return {f"{SERVICE}/*": lbkit.HedgingPolicy(hedging_delay=delay, **kw)}  # type: ignore[arg-type]


async def call(stub: pb2_grpc.ModelServiceStub, kind: str, timeout: float | None = 10.0) -> str:
    """One call of ``kind``; the address of the server that answered."""
    if kind == "unary":
        return str((await stub.Predict(REQ, timeout=timeout)).served_by)
    tokens = [t async for t in stub.StreamPredict(pb2.PredictRequest(max_tokens=3), timeout=timeout)]
    assert [t.token for t in tokens] == ["tok0", "tok1", "tok2"]
    return str(tokens[0].served_by)


@pytest.mark.parametrize("kind", ["unary", "stream"])
async def test_a_stalled_endpoint_is_hedged_the_hedge_wins_and_the_loser_is_cancelled(make_servers, kind):
    (stalling,) = make_servers(1, stall_rate=1.0, stall=STALL)
    (steady,) = make_servers(1)
    async with lbkit.aio.Balancer([stalling.address, steady.address], retry=hedged()) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(4):
            start = time.monotonic()
            assert await call(stub, kind) == steady.address
            assert time.monotonic() - start < 0.05 + SCHEDULING_MARGIN + 1.0
        servicer = stalling.servicer
        assert servicer is not None and lb.hedges_won >= 1
        assert servicer.stalled == lb.hedges_cancelled == lb.hedges_sent
        await async_wait_for(lambda: servicer.abandoned == servicer.stalled)
        await async_wait_for(lambda: lb.stats.total_in_flight == 0)
        loser = lb.stats[stalling.address]
        assert (loser.failures, loser.successes) == (0, 0)
        assert lb.stats[steady.address].successes == 4


async def test_hedges_go_to_endpoints_not_tried_yet_and_never_outlive_the_deadline(make_servers):
    servers = make_servers(3, stall_rate=1.0, stall=STALL)
    async with lbkit.aio.Balancer([s.address for s in servers], retry=hedged(0.05, max_attempts=5)) as lb:
        await lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            await stub.Predict(REQ, timeout=0.6)
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 0.6 + SCHEDULING_MARGIN
        assert [s.calls["Predict"] for s in servers] == [1, 1, 1]
        assert lb.hedges_sent == 2
        await async_wait_for(lambda: lb.stats.total_in_flight == 0)
        assert sum(e.failures for e in lb.stats) == 1


async def test_a_fatal_status_ends_the_call_at_once_and_cancels_the_rest(make_servers):
    (stalling,) = make_servers(1, stall_rate=1.0, stall=STALL)
    (failing,) = make_servers(1, fail_rate=1.0, fail_code=grpc.StatusCode.INVALID_ARGUMENT)
    async with lbkit.aio.Balancer([stalling.address, failing.address], retry=hedged()) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(2):
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                await stub.Predict(REQ, timeout=20)
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert time.monotonic() - start < 0.05 + SCHEDULING_MARGIN + 1.0
        servicer = stalling.servicer
        assert servicer is not None and servicer.stalled >= 1
        await async_wait_for(lambda: servicer.abandoned == servicer.stalled)
        await async_wait_for(lambda: lb.stats.total_in_flight == 0)
        assert lb.stats[stalling.address].failures == 0


async def test_a_drained_budget_sends_no_hedge(make_servers):
    (stalling,) = make_servers(1, stall_rate=1.0, stall=0.3)
    (steady,) = make_servers(1)
    async with lbkit.aio.Balancer([stalling.address, steady.address], retry=hedged()) as lb:
        await lb.wait_ready(count=2)
        lb.budget.tokens = 0.0
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        served = [await call(stub, "unary") for _ in range(2)]
        assert sorted(served) == sorted([stalling.address, steady.address])
        assert lb.budget.refused >= 1 and lb.hedges_sent == 0  # due, and refused
        assert steady.calls["Predict"] == 1


async def test_the_hedge_timer_runs_on_the_balancer_clock(make_servers):
    (stalling,) = make_servers(1, stall_rate=1.0, stall=STALL)
    (steady,) = make_servers(1)
    clock = FakeClock()
    async with lbkit.aio.Balancer(
        [stalling.address, steady.address], retry=hedged(1000.0), clock=clock
    ) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())

        async def calls() -> list[str]:
            return [await call(stub, "unary", timeout=None) for _ in range(2)]

        task = asyncio.create_task(calls())
        servicer = stalling.servicer
        assert servicer is not None
        await async_wait_for(lambda: servicer.stalled == 1)
        for _ in range(200):  # the hedge's delay passes on the balancer's clock only
            clock.advance(1000.0)
            done, _ = await asyncio.wait({task}, timeout=0.05)
            if done:
                break
        assert await task == [steady.address, steady.address]
        assert lb.hedges_won == servicer.stalled >= 1


async def test_done_callbacks_fire_once_and_cancel_cancels_every_attempt(make_servers):
    servers = make_servers(2, stall_rate=1.0, stall=STALL)
    async with lbkit.aio.Balancer([s.address for s in servers], retry=hedged(0.0)) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        fired: list[object] = []
        pending = stub.Predict(REQ, timeout=20)
        pending.add_done_callback(fired.append)
        await async_wait_for(lambda: sum(s.servicer.stalled for s in servers) == 2)
        assert pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await async_wait_for(lambda: sum(s.servicer.abandoned for s in servers) == 2)
        await async_wait_for(lambda: lb.stats.total_in_flight == 0)
        assert fired == [pending]
        assert await pending.code() is grpc.StatusCode.CANCELLED
        assert sum(e.failures for e in lb.stats) == 0


async def test_a_cancelled_caller_task_cancels_every_attempt(make_servers):
    servers = make_servers(2, stall_rate=1.0, stall=STALL)
    async with lbkit.aio.Balancer([s.address for s in servers], retry=hedged(0.0)) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        task = asyncio.create_task(call(stub, "stream", timeout=20))
        await async_wait_for(lambda: sum(s.servicer.stalled for s in servers) == 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await async_wait_for(lambda: sum(s.servicer.abandoned for s in servers) == 2)
        await async_wait_for(lambda: lb.stats.total_in_flight == 0)
        assert sum(e.failures for e in lb.stats) == 0


async def test_an_abandoned_hedged_stream_is_cancelled(make_servers):
    servers = make_servers(2, delay=0.05)  # 1000 tokens: 50 s unless cancelled
    async with lbkit.aio.Balancer([s.address for s in servers], retry=hedged(0.0)) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        stream = stub.StreamPredict(pb2.PredictRequest(max_tokens=1000), timeout=50)
        assert (await stream.read()).token == "tok0"
        del stream
        gc.collect()
        await async_wait_for(lambda: lb.stats.total_in_flight == 0)
        assert sum(e.failures for e in lb.stats) == 0


async def test_a_call_the_caller_drops_still_ends_and_calls_back(make_servers):
    (stalling,) = make_servers(1, stall_rate=1.0, stall=STALL)
    (steady,) = make_servers(1)
    async with lbkit.aio.Balancer([stalling.address, steady.address], retry=hedged(0.2)) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        codes: list[object] = []
        for _ in range(2):  # as grpc.aio's calls: kept alive until they end
            stub.Predict(REQ, timeout=10).add_done_callback(lambda call: codes.append(call.done()))
            gc.collect()
        await async_wait_for(lambda: len(codes) == 2)
        assert codes == [True, True]
        await async_wait_for(lambda: lb.stats.total_in_flight == 0)
        assert lb.stats[steady.address].successes == 2
