"""lbkit.aio.Balancer with ``subset=``: the asyncio twin of test_subsetting."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc

import lbkit
import lbkit.aio
from lbkit.testing import ModelServer
from tests.integration.conftest import async_wait_for, pb2, pb2_grpc, served_counts

REQ = pb2.PredictRequest(features=[1.0, 2.0])


def preference(subset: lbkit.Subsetting, servers: list[ModelServer]) -> list[str]:
    return [e.address for e in subset.order(lbkit.Endpoint(s.address) for s in servers)]


async def test_only_the_subset_gets_channels_and_calls(make_servers):
    servers = make_servers(8)
    subset = lbkit.Subsetting(3, client_id="client-one")
    chosen = {e.address for e in subset.select(lbkit.Endpoint(s.address) for s in servers)}
    async with lbkit.aio.Balancer([s.address for s in servers], subset=subset) as lb:
        await lb.wait_ready(count=3)
        assert set(lb.members) == chosen == set(lb.endpoint_states())
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        seen = Counter([(await stub.Predict(REQ, timeout=5)).served_by for _ in range(90)])
    assert set(seen) == chosen and sorted(seen.values()) == [30, 30, 30]
    assert sum(served_counts(servers)) == 90


async def test_a_subset_server_going_down_widens_the_subset_and_its_return_narrows_it(make_servers):
    servers = make_servers(6)
    by_address = {s.address: s for s in servers}
    subset = lbkit.Subsetting(2, client_id="client-two")
    order = preference(subset, servers)
    failures: list[grpc.RpcError] = []
    replies: Counter[str] = Counter()
    stop = asyncio.Event()
    async with lbkit.aio.Balancer([s.address for s in servers], subset=subset) as lb:
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())

        async def load() -> None:
            deadline = time.monotonic() + 30.0
            for _ in range(20_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    replies[(await stub.Predict(REQ, timeout=5)).served_by] += 1
                except grpc.RpcError as err:
                    failures.append(err)

        tasks = [asyncio.create_task(load()) for _ in range(4)]
        try:
            await async_wait_for(lambda: replies[order[0]] > 10 and replies[order[1]] > 10)
            down = by_address[order[0]]
            await asyncio.to_thread(down.stop, 0)
            await async_wait_for(lambda: replies[order[2]] > 10, timeout=10)
            assert set(lb.core.members) == set(order[:3])
            await asyncio.to_thread(down.start)
            await async_wait_for(lambda: set(lb.core.members) == set(order[:2]), timeout=15)
            await async_wait_for(lambda: order[2] not in lb.members, timeout=5)
            await async_wait_for(lambda: down.calls["Predict"] > 10, timeout=5)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        after = Counter([(await stub.Predict(REQ, timeout=5)).served_by for _ in range(20)])
    assert failures == []
    assert set(after) == set(order[:2])
    assert set(replies) == set(order[:3])
    assert all(by_address[a].calls["Predict"] == 0 for a in order[3:])
