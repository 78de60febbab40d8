"""lbkit.aio.Balancer with real grpc servers on 127.0.0.1: the asyncio twin of test_balancer_sync."""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter

import grpc
import pytest

import lbkit
import lbkit.aio
from lbkit.testing import ModelServer
from tests.integration.conftest import SCHEDULING_MARGIN, async_wait_for, pb2, pb2_grpc, served_counts

REQ = pb2.PredictRequest(features=[1.0, 2.0])


def in_flight(lb: lbkit.aio.Balancer) -> int:
    return sum(e.in_flight for e in lb.stats)


async def test_round_robin_spreads_evenly(make_servers):
    servers = make_servers(3)
    async with lbkit.aio.Balancer([s.address for s in servers], selector="round_robin") as lb:
        await lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        seen = Counter([(await stub.Predict(REQ, timeout=5)).served_by for _ in range(300)])
    assert sorted(seen.values()) == [100, 100, 100]


@pytest.mark.parametrize("selector", ["least_connections", "weighted"])
async def test_every_selector_spreads_concurrent_calls(make_servers, selector):
    servers = make_servers(3, delay=0.002)
    async with lbkit.aio.Balancer([s.address for s in servers], selector=selector) as lb:
        await lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(10):
            await asyncio.gather(*(stub.Predict(REQ, timeout=5) for _ in range(30)))
    counts = served_counts(servers)
    assert sum(counts) == 300 and min(counts) >= 40, counts


async def test_peak_ewma_starves_a_slow_server(make_servers):
    fast = make_servers(2)
    slow = make_servers(1, delay=0.1)[0]
    servers = [*fast, slow]
    async with lbkit.aio.Balancer([s.address for s in servers], selector="peak_ewma") as lb:
        await lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(100):
            await asyncio.gather(*(stub.Predict(REQ, timeout=5) for _ in range(2)))
    assert sum(served_counts(servers)) == 200
    assert slow.calls["Predict"] <= 30, served_counts(servers)  # round robin would send it ~67


async def test_hash_key_pins_user_to_one_server(make_servers):
    servers = make_servers(4)
    async with lbkit.aio.Balancer([s.address for s in servers], selector="consistent_hash") as lb:
        await lb.wait_ready(count=4)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        owners: dict[str, set[str]] = {}
        for i in range(40):
            user = f"user-{i % 10}"
            reply = await stub.Predict(REQ, metadata=[("lb-key", user)], timeout=5)
            owners.setdefault(user, set()).add(reply.served_by)
    assert all(len(v) == 1 for v in owners.values()), owners


async def test_call_object_surface(make_servers):
    servers = make_servers(1)
    async with lbkit.aio.Balancer([s.address for s in servers]) as lb:
        await lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        call = stub.Predict(REQ, metadata=[("x-user", "u1")], timeout=5)
        reply = await call
        assert reply.served_by == servers[0].address
        assert await call.code() is grpc.StatusCode.OK
        assert await call.details() in ("", None)
        assert ("lb-served-by", servers[0].address) in tuple(await call.trailing_metadata())
        assert call.done()
        assert await call == reply  # awaiting twice gives the same reply


async def test_in_flight_returns_to_zero_after_every_kind_of_call(make_servers):
    servers = make_servers(2, tokens=50, delay=0.002)
    async with lbkit.aio.Balancer([s.address for s in servers]) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        await stub.Predict(REQ, timeout=5)
        tokens = [t.token async for t in stub.StreamPredict(pb2.PredictRequest(max_tokens=3), timeout=5)]
        assert tokens == ["tok0", "tok1", "tok2"]
        stream = stub.StreamPredict(REQ, timeout=5)
        assert (await stream.read()).token == "tok0"
        stream.cancel()
        stream = stub.StreamPredict(REQ, timeout=5)
        await stream.read()
        del stream
        gc.collect()
        bidi = stub.UpdateFeatures(timeout=5)
        for i in range(3):
            await bidi.write(pb2.FeatureUpdate(entity_id="e", sequence=i))
        await bidi.done_writing()
        assert [a.sequence async for a in bidi] == [0, 1, 2]
        call = stub.Predict(pb2.PredictRequest(), timeout=5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await async_wait_for(lambda: in_flight(lb) == 0)


async def test_server_killed_with_calls_in_flight_costs_no_failed_calls(make_servers):
    servers = make_servers(3)
    victim = servers[1]
    failures: list[BaseException] = []
    served: Counter[str] = Counter()
    async with lbkit.aio.Balancer([s.address for s in servers], selector="round_robin") as lb:
        await lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())

        async def load() -> None:
            for _ in range(150):
                try:
                    served[(await stub.Predict(REQ, timeout=5)).served_by] += 1
                except grpc.RpcError as err:
                    failures.append(err)

        workers = [asyncio.create_task(load()) for _ in range(4)]
        await async_wait_for(lambda: min(served[s.address] for s in servers) >= 10)  # load on every server
        victim.behavior.hang = True  # from now on the victim holds every call it gets ...
        # ... until all four callers wait on it, their calls received by the server:
        await async_wait_for(
            lambda: (
                lb.stats[victim.address].in_flight == 4
                and victim.calls["Predict"] - served[victim.address] == 4
            )
        )
        held = victim.calls["Predict"] - served[victim.address]
        await asyncio.to_thread(victim.stop, 0)  # killed with those calls in flight
        await asyncio.wait_for(asyncio.gather(*workers), 30)
    assert held == 4  # the server had taken four calls it never answered
    assert failures == []
    assert sum(served.values()) == 600  # each of them was answered elsewhere


async def test_no_ready_endpoint_fails_unavailable_at_deadline():
    dead = ModelServer().start()
    address = dead.address
    dead.stop(0)
    async with lbkit.aio.Balancer([address], service="inference") as lb:
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            await stub.Predict(REQ, timeout=0.5)
        elapsed = time.monotonic() - start
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "inference" in info.value.details()
    assert 0.5 <= elapsed <= 0.5 + SCHEDULING_MARGIN  # at the deadline, not before, not much later


async def test_call_without_deadline_waits_default_wait_then_fails():
    dead = ModelServer().start()
    address = dead.address
    dead.stop(0)
    async with lbkit.aio.Balancer([address], wait_timeout=0.3) as lb:
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        start = time.monotonic()
        with pytest.raises(lbkit.NoReadyEndpointError):
            await stub.Predict(REQ)
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed <= 0.3 + SCHEDULING_MARGIN


async def test_removed_endpoint_in_flight_calls_complete(make_servers):
    slow = make_servers(1, delay=0.4)[0]
    fast = make_servers(1)[0]
    discovery = lbkit.StaticDiscovery([slow.address])
    async with lbkit.aio.Balancer(discovery) as lb:
        await lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        pending = asyncio.ensure_future(stub.Predict(REQ, timeout=5))
        await async_wait_for(lambda: in_flight(lb) == 1)
        discovery.update([fast.address])
        reply = await pending
        assert reply.served_by == slow.address
        await async_wait_for(lambda: slow.address not in lb.members)
        assert (await stub.Predict(REQ, timeout=5)).served_by == fast.address


async def test_unavailable_from_a_server_is_retried_elsewhere(make_servers):
    bad = make_servers(1, fail_rate=1.0)[0]
    good = make_servers(1)[0]
    async with lbkit.aio.Balancer([bad.address, good.address], selector="round_robin") as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        replies = [(await stub.Predict(REQ, timeout=5)).served_by for _ in range(4)]
        tokens = [t async for t in stub.StreamPredict(pb2.PredictRequest(max_tokens=2), timeout=5)]
    assert set(replies) == {good.address}
    assert {t.served_by for t in tokens} == {good.address}


async def test_application_errors_are_not_retried(make_servers):
    servers = make_servers(2, fail_rate=1.0, fail_code=grpc.StatusCode.NOT_FOUND)
    async with lbkit.aio.Balancer([s.address for s in servers]) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Predict(REQ, timeout=5)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert sum(served_counts(servers)) == 1


async def test_pick_returns_a_ready_aio_channel(make_servers):
    servers = make_servers(2)
    async with lbkit.aio.Balancer([s.address for s in servers]) as lb:
        channel = await lb.pick(timeout=5)
        reply = await pb2_grpc.ModelServiceStub(channel).Predict(REQ, timeout=5)
    assert reply.served_by in {s.address for s in servers}


async def test_a_stream_reset_by_the_server_is_retried_like_unavailable(make_servers):
    bad = make_servers(1, fail_rate=1.0, fail_code=grpc.StatusCode.CANCELLED)[0]
    good = make_servers(1)[0]
    async with lbkit.aio.Balancer([bad.address, good.address], selector="round_robin") as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        replies = [(await stub.Predict(REQ, timeout=5)).served_by for _ in range(4)]
    assert set(replies) == {good.address}
    assert bad.calls["Predict"] >= 1


async def test_a_call_on_a_balancer_never_started_fails_at_once_saying_so():
    lb = lbkit.aio.Balancer(["127.0.0.1:1"], service="models")
    stub = pb2_grpc.ModelServiceStub(lb.channel())
    with pytest.raises(RuntimeError, match="models: the Balancer is not started"):
        await stub.Predict(REQ, timeout=5)


async def test_calls_that_pick_a_channel_closed_under_them_go_elsewhere(make_servers):
    servers = make_servers(2)
    async with lbkit.aio.Balancer([s.address for s in servers], selector="round_robin") as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        await lb._close_member(lb.members[servers[0].address], "closed by the test")
        replies = {(await stub.Predict(REQ, timeout=5)).served_by for _ in range(4)}
        tokens = {t.served_by async for t in stub.StreamPredict(pb2.PredictRequest(max_tokens=2), timeout=5)}
        assert replies == tokens == {servers[1].address}
        await async_wait_for(lambda: lb.stats.total_in_flight == 0)
