"""Zone-aware routing with lbkit.aio.Balancer: the asyncio twin of test_zones."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import pytest

import lbkit
import lbkit.aio
from lbkit.testing import ModelServer
from lbkit.zones import ZoneMode
from tests.integration.conftest import async_wait_for, pb2_grpc
from tests.integration.test_zones import REQ, ROUTING, SELECTORS, ZONE_OF, by_zone, shares


@pytest.fixture
def zoned(make_servers: Callable[..., list[ModelServer]]) -> tuple[list[ModelServer], list[lbkit.Endpoint]]:
    servers = make_servers(len(ZONE_OF), delay=0.002)
    return servers, [lbkit.Endpoint(s.address, zone=z) for s, z in zip(servers, ZONE_OF, strict=True)]


async def load(
    stub: object, rounds: int, width: int, at: int = -1, action: Callable[[], object] = lambda: None
) -> list[BaseException]:
    """``rounds`` rounds of ``width`` concurrent calls, ``action`` run before round ``at``; the failures."""
    results: list[object] = []
    for i in range(rounds):
        if i == at:
            action()
        results += await asyncio.gather(
            *(stub.Predict(REQ, timeout=5) for _ in range(width)),  # type: ignore[attr-defined]
            return_exceptions=True,
        )
    assert len(results) == rounds * width
    return [r for r in results if isinstance(r, BaseException)]


@pytest.mark.parametrize("selector", SELECTORS)
async def test_calls_stay_in_the_local_zone_for_every_selector(zoned, selector):
    servers, endpoints = zoned
    async with lbkit.aio.Balancer(endpoints, selector=selector, zone="a", zone_routing=ROUTING) as lb:
        await lb.wait_ready(count=len(endpoints))
        await async_wait_for(lambda: lb.core.zone_plan.mode is ZoneMode.DIRECT)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for i in range(12):
            await asyncio.gather(
                *(stub.Predict(REQ, timeout=5, metadata=[("lb-key", f"user-{i}-{j}")]) for j in range(10))
            )
    assert by_zone(servers) == {"a": 120, "b": 0, "c": 0}


async def test_spill_follows_envoys_formula_as_local_servers_stop_and_no_call_fails(zoned):
    servers, endpoints = zoned
    async with lbkit.aio.Balancer(endpoints, selector="round_robin", zone="a", zone_routing=ROUTING) as lb:
        await lb.wait_ready(count=len(endpoints))
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        assert await load(stub, 10, 20, at=3, action=lambda: servers[0].stop(0)) == []
        await async_wait_for(lambda: lb.core.zone_plan.local == pytest.approx(0.6))
        before = by_zone(servers)
        assert await load(stub, 40, 30) == []
        seen = shares(by_zone(servers), before)
        assert seen["a"] == pytest.approx(0.6, abs=0.06), seen
        assert seen["b"] == pytest.approx(0.2, abs=0.05) and seen["c"] == pytest.approx(0.2, abs=0.05), seen

        assert await load(stub, 10, 20, at=3, action=lambda: servers[1].stop(0)) == []
        await async_wait_for(lambda: lb.core.zone_plan.local == 0.0)
        before = by_zone(servers)
        assert await load(stub, 20, 30) == []
        seen = shares(by_zone(servers), before)
        assert seen["a"] == 0.0 and seen["b"] == pytest.approx(0.5, abs=0.07), seen


async def test_a_retry_leaves_the_zone_when_every_local_server_fails(zoned):
    servers, endpoints = zoned
    for s in servers[:2]:
        s.behavior.fail_rate = 1.0
    no_ejection = lbkit.OutlierDetection(consecutive_failures=None)
    async with lbkit.aio.Balancer(
        endpoints, zone="a", zone_routing=ROUTING, outlier_detection=no_ejection, wait_timeout=2.0
    ) as lb:
        await lb.wait_ready(count=len(endpoints))
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        start = time.monotonic()
        served = Counter([(await stub.Predict(REQ, timeout=2)).served_by for _ in range(20)])
        elapsed = time.monotonic() - start
        assert lb.core.zone_plan.mode is ZoneMode.DIRECT
    assert sum(served.values()) == 20 and all(s.calls["Predict"] > 0 for s in servers[:2])
    assert by_zone(servers)["b"] + by_zone(servers)["c"] == 20
    assert elapsed < 5.0
