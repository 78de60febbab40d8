"""Zone-aware routing with lbkit.Balancer over real grpc servers in three zones (two servers each)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import grpc
import pytest
from prometheus_client import CollectorRegistry

import lbkit
import lbkit.selectors
from lbkit.metrics import instrument
from lbkit.testing import ModelServer
from lbkit.zones import ZoneMode, ZoneRouting
from tests.integration.conftest import pb2, pb2_grpc, wait_for

REQ = pb2.PredictRequest(features=[1.0, 2.0])
ZONE_OF = ("a", "a", "b", "b", "c", "c")
ROUTING = ZoneRouting(min_cluster_size=3)
SELECTORS = tuple(lbkit.selectors.SELECTORS)


@pytest.fixture
def zoned(make_servers: Callable[..., list[ModelServer]]) -> tuple[list[ModelServer], list[lbkit.Endpoint]]:
    servers = make_servers(len(ZONE_OF), delay=0.002)
    return servers, [lbkit.Endpoint(s.address, zone=z) for s, z in zip(servers, ZONE_OF, strict=True)]


def by_zone(servers: list[ModelServer]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for s, z in zip(servers, ZONE_OF, strict=True):
        counts[z] += s.calls["Predict"]
    return counts


def shares(after: Counter[str], before: Counter[str]) -> dict[str, float]:
    total = sum(after.values()) - sum(before.values())
    return {z: (after[z] - before[z]) / total for z in "abc"}


class Load:
    """``threads`` threads making ``calls`` calls each, started at once; ``started`` is set after a tenth."""

    def __init__(self, stub: object, calls: int, threads: int) -> None:
        self.failures: list[grpc.RpcError] = []
        self.started = threading.Event()
        self._done = 0
        self._lock = threading.Lock()
        self._mark = calls * threads // 10
        self._pool = [threading.Thread(target=self._work, args=(stub, calls)) for _ in range(threads)]
        for t in self._pool:
            t.start()

    def _work(self, stub: object, calls: int) -> None:
        for _ in range(calls):
            try:
                stub.Predict(REQ, timeout=5)  # type: ignore[attr-defined]
            except grpc.RpcError as err:
                self.failures.append(err)
            with self._lock:
                self._done += 1
                if self._done == self._mark:
                    self.started.set()

    def join(self) -> list[grpc.RpcError]:
        """Wait for every call; the failed ones."""
        for t in self._pool:
            t.join(60)
        assert not any(t.is_alive() for t in self._pool)
        return self.failures


@pytest.mark.parametrize("selector", SELECTORS)
def test_calls_stay_in_the_local_zone_for_every_selector(zoned, selector):
    servers, endpoints = zoned
    with lbkit.Balancer(endpoints, selector=selector, zone="a", zone_routing=ROUTING) as lb:
        lb.wait_ready(count=len(endpoints))
        wait_for(lambda: lb.core.zone_plan.mode is ZoneMode.DIRECT)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for i in range(120):
            stub.Predict(REQ, timeout=5, metadata=[("lb-key", f"user-{i}")])
    assert by_zone(servers) == {"a": 120, "b": 0, "c": 0}
    if selector != "consistent_hash":
        assert min(s.calls["Predict"] for s in servers[:2]) > 0  # both local servers share the zone's calls


def test_spill_follows_envoys_formula_as_local_servers_stop_and_no_call_fails(zoned):
    servers, endpoints = zoned
    with lbkit.Balancer(endpoints, selector="round_robin", zone="a", zone_routing=ROUTING) as lb:
        lb.wait_ready(count=len(endpoints))
        stub = pb2_grpc.ModelServiceStub(lb.channel())

        # One local server of two stops while calls are in flight.
        load = Load(stub, 100, 4)
        assert load.started.wait(30)
        servers[0].stop(0)
        assert load.join() == []
        # up[a] = 1/5, lo[a] = 1/3: 60 % stay, b and c take 20 % each.
        wait_for(lambda: lb.core.zone_plan.local == pytest.approx(0.6))
        registry = CollectorRegistry()
        instrument(lb, registry)
        share = {
            z: registry.get_sample_value("lbkit_zone_share", {"service": lb.service, "zone": z})
            for z in "abc"
        }
        assert share == pytest.approx({"a": 0.6, "b": 0.2, "c": 0.2})  # the plan, as the metric shows it
        before = by_zone(servers)
        assert Load(stub, 300, 4).join() == []
        seen = shares(by_zone(servers), before)
        assert seen["a"] == pytest.approx(0.6, abs=0.06), seen
        assert seen["b"] == pytest.approx(0.2, abs=0.05) and seen["c"] == pytest.approx(0.2, abs=0.05), seen

        # The other local server stops too: everything spills, evenly over b and c.
        load = Load(stub, 100, 4)
        assert load.started.wait(30)
        servers[1].stop(0)
        assert load.join() == []
        wait_for(lambda: lb.core.zone_plan.local == 0.0)
        assert registry.get_sample_value("lbkit_zone_share", {"service": lb.service, "zone": "a"}) is None
        before = by_zone(servers)
        assert Load(stub, 150, 4).join() == []
        seen = shares(by_zone(servers), before)
        assert seen["a"] == 0.0 and seen["b"] == pytest.approx(0.5, abs=0.07), seen


def test_a_local_server_coming_back_takes_its_zones_calls_again(zoned):
    servers, endpoints = zoned
    with lbkit.Balancer(endpoints, selector="least_connections", zone="b", zone_routing=ROUTING) as lb:
        lb.wait_ready(count=len(endpoints))
        port = servers[2].port
        servers[2].stop(0)
        wait_for(lambda: lb.core.zone_plan.mode is ZoneMode.RESIDUAL)
        back = ModelServer(port=port).start()
        try:
            wait_for(lambda: lb.core.zone_plan.mode is ZoneMode.DIRECT, timeout=15)
            stub = pb2_grpc.ModelServiceStub(lb.channel())
            for _ in range(60):
                stub.Predict(REQ, timeout=5)
            assert back.calls["Predict"] > 0 and servers[3].calls["Predict"] > 0
            assert sum(s.calls["Predict"] for s in (*servers[:2], *servers[4:])) == 0
        finally:
            back.stop(0)


def test_a_retry_leaves_the_zone_when_every_local_server_fails(zoned):
    servers, endpoints = zoned
    for s in servers[:2]:
        s.behavior.fail_rate = 1.0  # READY, but every call fails UNAVAILABLE
    no_ejection = lbkit.OutlierDetection(consecutive_failures=None)
    with lbkit.Balancer(
        endpoints, zone="a", zone_routing=ROUTING, outlier_detection=no_ejection, wait_timeout=2.0
    ) as lb:
        lb.wait_ready(count=len(endpoints))
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        start = time.monotonic()
        served = Counter(stub.Predict(REQ, timeout=2).served_by for _ in range(20))
        elapsed = time.monotonic() - start
    assert lb.core.zone_plan.mode is ZoneMode.DIRECT  # the local servers look fine to the balancer
    assert sum(served.values()) == 20 and all(s.calls["Predict"] > 0 for s in servers[:2])
    assert by_zone(servers)["b"] + by_zone(servers)["c"] == 20
    assert elapsed < 5.0  # no attempt waited for a local endpoint that would never do


def test_ejected_local_server_spills_and_calls_still_succeed(zoned):
    servers, endpoints = zoned
    servers[0].behavior.fail_rate = 1.0
    od = lbkit.OutlierDetection(consecutive_failures=3, max_ejection_percent=20.0)
    with lbkit.Balancer(endpoints, zone="a", zone_routing=ROUTING, outlier_detection=od) as lb:
        lb.wait_ready(count=len(endpoints))
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(40):
            stub.Predict(REQ, timeout=5)
        assert lb.endpoint_states()[servers[0].address] == "ejected"
        assert lb.core.zone_plan.local == pytest.approx(0.6)
        before = by_zone(servers)
        for _ in range(200):
            stub.Predict(REQ, timeout=5)
        seen = shares(by_zone(servers), before)
    assert seen["a"] == pytest.approx(0.6, abs=0.1) and seen["b"] + seen["c"] == pytest.approx(0.4, abs=0.1)


# ------------------------------------------------------------------------------------------------
# Through Consul: zones registered in Service.Meta (and Locality), found by ConsulDiscovery


@pytest.fixture
def consul_zoned(zoned):
    import consul as pyconsul

    from lbkit.testing import ConsulServer

    servers, _ = zoned
    with ConsulServer() as agent:
        host, port = agent.address.rsplit(":", 1)
        client = pyconsul.Consul(host=host, port=int(port))
        for i, (s, z) in enumerate(zip(servers, ZONE_OF, strict=True)):
            # Half declare the zone in Meta, half as Consul 1.17's Service.Locality.
            zone_of = {"meta": {"zone": z}} if i % 2 else {"locality": {"Region": "eu", "Zone": z}}
            client.agent.service.register("model", service_id=f"m{i}", address=s.host, port=s.port, **zone_of)
        yield servers, client, agent


def consul_discovery(agent: object, **options: object) -> lbkit.ConsulDiscovery:
    return lbkit.ConsulDiscovery(
        "model",
        address=agent.address,
        env={},
        wait=2.0,
        min_interval=0.01,
        **options,  # type: ignore[attr-defined]
    )


def test_zones_from_consul_keep_calls_local_and_a_deregistered_local_instance_spills(consul_zoned):
    servers, client, agent = consul_zoned
    with lbkit.Balancer(consul_discovery(agent), zone="a", zone_routing=ROUTING) as lb:
        lb.wait_ready(count=len(servers))
        assert sorted(e.zone for e in lb.core.endpoints()) == sorted(ZONE_OF)
        wait_for(lambda: lb.zone_plan.mode is ZoneMode.DIRECT)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        assert Load(stub, 30, 2).join() == []
        assert by_zone(servers) == {"a": 60, "b": 0, "c": 0}
        client.agent.service.deregister("m0")  # one of zone a's two instances leaves
        wait_for(lambda: lb.zone_plan.local == pytest.approx(0.6))  # up[a] = 1/5, lo[a] = 1/3
        before = by_zone(servers)
        assert Load(stub, 150, 4).join() == []
        seen = shares(by_zone(servers), before)
    assert seen["a"] == pytest.approx(0.6, abs=0.07), seen


def test_near_names_the_clients_zone_when_none_is_set(consul_zoned, monkeypatch):
    monkeypatch.delenv("CONSUL_ZONE", raising=False)
    servers, client, agent = consul_zoned
    _, answer = client.health.service("model", near="_agent")
    nearest = answer[0]["Service"]
    nearest_zone = nearest["Meta"].get("zone") if nearest.get("Meta") else nearest["Locality"]["Zone"]
    with lbkit.Balancer(consul_discovery(agent, near="_agent"), zone_routing=ROUTING) as lb:
        lb.wait_ready(count=len(servers))
        wait_for(lambda: lb.zone_plan.mode is ZoneMode.DIRECT)
        assert lb.zone_plan.zone == nearest_zone
        ranks = {e.address: e.rank for e in lb.core.endpoints()}
        assert sorted(ranks.values()) == list(range(len(servers)))
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(40):
            stub.Predict(REQ, timeout=5)
    assert by_zone(servers)[nearest_zone] == 40
