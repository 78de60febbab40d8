"""lbkit.metrics over real HTTP: real grpc servers, real balancers, scraped with urllib and parsed."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import lbkit
import lbkit.aio
from lbkit.errors import ConfigError
from lbkit.events import KIND_CAUSES, Cause, Event, EventKind
from lbkit.metrics import (
    EJECTION_REASONS,
    ENDPOINT_STATES,
    EVENT_CAUSES,
    BalancerCollector,
    instrument,
    start_http_server,
)
from lbkit.stats import LATENCY_BUCKETS
from tests.integration.conftest import pb2, pb2_grpc

REQ = pb2.PredictRequest(features=[1.0, 2.0])
TOKEN = "b1f2c3d4-5e6f-4a7b-8c9d-0e1f2a3b4c5d"  # shaped like a Consul ACL token

Sample = tuple[str, dict[str, str], float]


class Scrape:
    """One scrape of /metrics: the raw text and its samples."""

    def __init__(self, port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            self.text = resp.read().decode("utf-8")
        self.samples: list[Sample] = [
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(self.text)
            for s in family.samples
        ]

    def values(self, name: str, **labels: str) -> list[float]:
        return [v for n, lab, v in self.samples if n == name and labels.items() <= lab.items()]

    def one(self, name: str, **labels: str) -> float:
        found = self.values(name, **labels)
        assert len(found) == 1, (name, labels, found)
        return found[0]

    def total(self, name: str, **labels: str) -> float:
        return sum(self.values(name, **labels))

    def series(self) -> set[tuple[str, frozenset[tuple[str, str]]]]:
        return {(n, frozenset(lab.items())) for n, lab, _ in self.samples}


@pytest.fixture
def exposition() -> Iterator[tuple[CollectorRegistry, int]]:
    """A fresh registry served over real HTTP on 127.0.0.1 (an ephemeral port)."""
    registry = CollectorRegistry()
    server, port = start_http_server(0, registry=registry)
    yield registry, port
    server.shutdown()
    server.server_close()


def poll(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_counts_match_calls_and_in_flight_returns_to_zero(make_servers, exposition):
    registry, port = exposition
    servers = make_servers(3)
    lb = lbkit.Balancer([s.address for s in servers], selector="round_robin", service="models")
    instrument(lb, registry)  # before start: events from the first on are counted
    with lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(150):
            stub.Predict(REQ, timeout=5)
        for s in servers:
            s.behavior.delay = 0.5
        futures = [stub.Predict.future(REQ, timeout=5) for _ in range(6)]
        busy = Scrape(port)
        for f in futures:
            f.result()
        poll(lambda: Scrape(port).total("lbkit_endpoint_in_flight") == 0)
        m = Scrape(port)

    assert busy.total("lbkit_endpoint_in_flight", service="models") == 6
    for s in servers:
        served = s.calls["Predict"]
        labels = {"service": "models", "endpoint": s.address}
        assert served == 52  # 156 calls round robin over 3
        assert m.one("lbkit_endpoint_calls_total", outcome="ok", **labels) == served
        assert m.one("lbkit_endpoint_calls_total", outcome="failed", **labels) == 0
        assert m.one("lbkit_endpoint_picks_total", **labels) == served
        assert m.one("lbkit_endpoint_call_latency_seconds_count", **labels) == served
        assert m.one("lbkit_endpoint_call_latency_seconds_bucket", le="+Inf", **labels) == served
        # the two slow calls took over 0.5 s: they sit above the 0.5 s bound, the fast ones below it
        assert m.one("lbkit_endpoint_call_latency_seconds_bucket", le="0.5", **labels) == served - 2
        assert m.one("lbkit_endpoint_call_latency_seconds_sum", **labels) >= 2 * 0.5
        assert m.one("lbkit_endpoint_in_flight", **labels) == 0
        assert m.one("lbkit_endpoint_state", state="ready", **labels) == 1
        assert m.one("lbkit_endpoint_latency_ewma_seconds", **labels) > 0
    buckets = m.values("lbkit_endpoint_call_latency_seconds_bucket", endpoint=servers[0].address)
    assert len(buckets) == len(LATENCY_BUCKETS) + 1 and buckets == sorted(buckets)
    assert m.total("lbkit_endpoint_calls_total", service="models") == 156
    assert m.one("lbkit_endpoints", service="models", state="ready") == 3
    assert sum(m.one("lbkit_endpoints", service="models", state=s) for s in ENDPOINT_STATES) == 3
    assert m.one("lbkit_events_total", service="models", kind="added", cause="discovered") == 3
    assert m.one("lbkit_panic", service="models") == 0
    assert m.one("lbkit_discovery_updates_total", service="models") == 1
    assert m.one("lbkit_discovery_errors_total", service="models") == 0
    assert m.one("lbkit_discovery_staleness_seconds", service="models") == 0
    assert m.text.count("# TYPE lbkit_endpoint_calls_total counter") == 1


def test_failing_server_shows_failures_ejection_and_panic(make_servers, exposition):
    registry, port = exposition
    good, bad = make_servers(2)
    bad.behavior.fail_rate = 1.0
    lb = lbkit.Balancer(
        [good.address, bad.address],
        selector="round_robin",
        service="models",
        outlier_detection=lbkit.OutlierDetection(consecutive_failures=3),
        panic_threshold=60.0,  # one of two ejected: 50% healthy is below 60%
        retry=lbkit.RetryPolicy(max_attempts=1),
    )
    instrument(lb, registry)
    errors = 0
    with lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(40):
            try:
                stub.Predict(REQ, timeout=5)
            except grpc.RpcError as err:
                assert err.code() is grpc.StatusCode.UNAVAILABLE
                errors += 1
        m = Scrape(port)

    g = {"service": "models", "endpoint": good.address}
    b = {"service": "models", "endpoint": bad.address}
    assert errors == bad.calls["Predict"] > 3
    assert m.one("lbkit_endpoint_calls_total", outcome="failed", **b) == errors
    assert m.one("lbkit_endpoint_calls_total", outcome="ok", **b) == 0
    assert m.one("lbkit_endpoint_calls_total", outcome="ok", **g) == good.calls["Predict"] == 40 - errors
    assert m.one("lbkit_endpoint_calls_total", outcome="failed", **g) == 0
    assert m.one("lbkit_endpoint_ejections_total", reason="consecutive_failures", **b) == 1
    assert m.total("lbkit_endpoint_ejections_total", service="models") == 1
    assert {lab["reason"] for n, lab, _ in m.samples if "reason" in lab} == set(EJECTION_REASONS)
    assert m.one("lbkit_endpoint_state", state="ejected", **b) == 1
    assert m.one("lbkit_endpoint_state", state="ready", **g) == 1
    assert m.one("lbkit_endpoints", service="models", state="ejected") == 1
    assert m.one("lbkit_events_total", service="models", kind="ejected", cause="consecutive_failures") == 1
    assert m.total("lbkit_events_total", service="models", kind="ejected") == 1
    assert m.one("lbkit_events_total", service="models", kind="panic_start", cause="panic_threshold") == 1
    assert m.one("lbkit_panic", service="models") == 1
    assert m.one("lbkit_panic_starts_total", service="models") == 1
    assert "injected failure" not in m.text and "consecutive failures" not in m.text


def test_retries_and_budget_refusals(make_servers, exposition):
    registry, port = exposition
    servers = make_servers(2, fail_rate=1.0)
    lb = lbkit.Balancer(
        [s.address for s in servers],
        service="models",
        outlier_detection=lbkit.OutlierDetection(consecutive_failures=None),
        retry=lbkit.RetryPolicy(max_attempts=2, budget_max_tokens=4.0, initial_backoff=0.001),
    )
    instrument(lb, registry)
    with lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(6):
            with pytest.raises(grpc.RpcError):
                stub.Predict(REQ, timeout=5)
        m = Scrape(port)
        retried, refused, tokens = lb.calls_retried, lb.budget.refused, lb.budget.tokens

    assert retried >= 1 and refused >= 1
    assert m.one("lbkit_calls_retried_total", service="models") == retried
    assert m.one("lbkit_retry_budget_refused_total", service="models") == refused
    assert m.one("lbkit_retry_budget_tokens", service="models") == pytest.approx(tokens)
    attempts = sum(s.calls["Predict"] for s in servers)
    assert attempts == 6 + retried
    assert m.total("lbkit_endpoint_calls_total", service="models", outcome="failed") == attempts


def test_hash_keys_never_become_labels(make_servers, exposition):
    registry, port = exposition
    servers = make_servers(3)
    with lbkit.Balancer([s.address for s in servers], selector="consistent_hash", service="models") as lb:
        instrument(lb, registry)
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        stub.Predict(REQ, metadata=[("lb-key", "warm-up")], timeout=5)
        before = Scrape(port)
        for i in range(1000):
            stub.Predict(REQ, metadata=[("lb-key", f"user-{i:04d}-7f3a")], timeout=5)
        after = Scrape(port)

    assert after.series() == before.series()  # a thousand keys added no series
    assert len(after.series()) < 250
    assert "user-" not in after.text and "7f3a" not in after.text
    assert after.total("lbkit_endpoint_calls_total", service="models") == 1001
    allowed = {
        "state": set(ENDPOINT_STATES),
        "outcome": {"ok", "failed"},
        "reason": set(EJECTION_REASONS),
        "kind": {k.value for k in lbkit.EventKind},
        "cause": {c.value for c in lbkit.Cause},
        "endpoint": {s.address for s in servers},
        "service": {"models"},
    }
    for name, labels, _ in after.samples:
        assert name.startswith("lbkit_")
        for key, value in labels.items():
            if key == "le":
                assert value == "+Inf" or float(value) in LATENCY_BUCKETS
            else:
                assert value in allowed[key], (name, key, value)


class FakeConsul:
    """A Consul-compatible /v1/health/service endpoint that wants TOKEN and echoes it once in an error."""

    def __init__(self, service: str, addresses: list[str]) -> None:
        self.requests = 0
        self.refused = 0
        entries = [
            {
                "Node": {"Node": f"node-{i}", "Address": "127.0.0.1"},
                "Service": {
                    "ID": f"{service}-{i}",
                    "Service": service,
                    "Address": a.rsplit(":", 1)[0],
                    "Port": int(a.rsplit(":", 1)[1]),
                },
                "Checks": [{"Status": "passing"}],
            }
            for i, a in enumerate(addresses)
        ]
        body = json.dumps(entries).encode()
        owner = self

        class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: one request per connection, so stop() cuts all
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                owner.requests += 1
                if self.headers.get("X-Consul-Token") != TOKEN:
                    owner.refused += 1
                    self._reply(403, b"ACL not found")
                elif owner.requests == 1:  # a broken agent that puts the token in its error text
                    self._reply(500, f"rpc error: lookup of token {TOKEN} failed".encode())
                elif url.path != f"/v1/health/service/{service}":
                    self._reply(404, b"not found")
                else:
                    if "index" in query:
                        time.sleep(0.2)  # a blocking query with nothing new, cut short
                    self._reply(200, body, {"X-Consul-Index": "7", "Content-Type": "application/json"})

            def _reply(self, code: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=2)


def test_acl_token_never_exposed_and_staleness_grows_when_discovery_fails(make_servers, exposition):
    registry, port = exposition
    servers = make_servers(2)
    consul = FakeConsul("models", [s.address for s in servers])
    try:
        discovery = lbkit.ConsulDiscovery(
            "models", address=consul.address, token=TOKEN, env={}, backoff_initial=0.05, backoff_max=0.1
        )
        with lbkit.Balancer(discovery) as lb:
            instrument(lb, registry)
            lb.wait_ready(count=2)
            stub = pb2_grpc.ModelServiceStub(lb.channel())
            for _ in range(10):
                stub.Predict(REQ, timeout=5)
            healthy = Scrape(port)
            consul.stop()
            poll(lambda: Scrape(port).one("lbkit_discovery_staleness_seconds", service="models") > 0)
            stale = Scrape(port)
            calls_after = stub.Predict(REQ, timeout=5)  # the last good endpoint set stays in force
    finally:
        consul.stop()

    assert calls_after.served_by
    assert consul.refused == 0
    for m in (healthy, stale):
        assert TOKEN not in m.text
        assert TOKEN[:8] not in m.text
    assert healthy.one("lbkit_discovery_errors_total", service="models") == 1  # the 500 holding the token
    assert healthy.one("lbkit_discovery_updates_total", service="models") == 1
    assert healthy.one("lbkit_discovery_consecutive_errors", service="models") == 0
    assert healthy.one("lbkit_discovery_staleness_seconds", service="models") == 0
    assert healthy.total("lbkit_endpoint_calls_total", service="models", outcome="ok") == 10
    assert stale.one("lbkit_discovery_consecutive_errors", service="models") >= 1
    assert stale.one("lbkit_discovery_errors_total", service="models") >= 2
    assert stale.one("lbkit_endpoints", service="models", state="ready") == 2


def test_several_balancers_share_a_registry_and_closed_ones_leave(make_servers, exposition):
    registry, port = exposition
    a_servers, b_servers = make_servers(2), make_servers(1)
    lb_a = lbkit.Balancer([s.address for s in a_servers], service="svc-a").start()
    lb_b = lbkit.Balancer([s.address for s in b_servers], service="svc-b").start()
    try:
        collector = instrument(lb_a, registry)
        assert instrument(lb_a, registry) is collector  # once per registry
        instrument(lb_b, registry)
        lb_a.wait_ready(count=2)
        lb_b.wait_ready(count=1)
        pb2_grpc.ModelServiceStub(lb_a.channel()).Predict(REQ, timeout=5)
        for _ in range(3):
            pb2_grpc.ModelServiceStub(lb_b.channel()).Predict(REQ, timeout=5)
        both = Scrape(port)
        lb_a.close()
        only_b = Scrape(port)
    finally:
        lb_a.close()
        lb_b.close()

    assert both.text.count("# TYPE lbkit_endpoint_calls_total counter") == 1
    assert both.text.count("# TYPE lbkit_endpoint_call_latency_seconds histogram") == 1
    assert both.total("lbkit_endpoint_calls_total", service="svc-a") == 1
    assert both.total("lbkit_endpoint_calls_total", service="svc-b") == 3
    assert both.one("lbkit_endpoints", service="svc-a", state="ready") == 2
    assert both.one("lbkit_endpoints", service="svc-b", state="ready") == 1
    assert not only_b.values("lbkit_endpoints", service="svc-a")
    assert only_b.total("lbkit_endpoint_calls_total", service="svc-b") == 3


def test_default_registry(make_servers):
    servers = make_servers(1)
    server, port = start_http_server(0)
    try:
        with lbkit.Balancer([servers[0].address], service="default-registry-svc") as lb:
            instrument(lb)
            lb.wait_ready()
            pb2_grpc.ModelServiceStub(lb.channel()).Predict(REQ, timeout=5)
            m = Scrape(port)
            assert m.one("lbkit_endpoint_calls_total", service="default-registry-svc", outcome="ok") == 1
            assert "process_cpu_seconds_total" in m.text or "python_info" in m.text  # the default one
    finally:
        server.shutdown()
        server.server_close()


def test_registry_with_other_lbkit_collector_is_refused():
    # No sockets: the balancers are never started.
    registry = CollectorRegistry()
    registry.register(BalancerCollector(lbkit.Balancer(["127.0.0.1:1"], service="alone")))
    with pytest.raises(ConfigError, match="lbkit metrics"):
        instrument(lbkit.Balancer(["127.0.0.1:2"], service="other"), registry)
    with pytest.raises(ConfigError, match="expected an lbkit Balancer"):
        instrument(object(), CollectorRegistry())  # type: ignore[arg-type]


def test_labels_come_from_the_typed_cause_never_the_text():
    # No sockets: the balancer is never started; its listeners are fed events directly.
    lb = lbkit.Balancer(["127.0.0.1:1"], service="models")
    collector = BalancerCollector(lb)
    lb.core.set_endpoints(lbkit.EndpointSet(["127.0.0.1:1"]))  # known to the core: its series exist
    misleading = "5 consecutive failures; success rate 1% (user-42)"  # the text names other causes
    for listener in lb.core.listeners:
        listener(Event(EventKind.EJECTED, "127.0.0.1:1", misleading, 0.0, Cause.FAILURE_PERCENTAGE))
        listener(Event(EventKind.UNHEALTHY, "127.0.0.1:1", "check 'db' critical", 0.0, Cause.CONSUL_CRITICAL))
    samples = [(s.name, s.labels, s.value) for family in collector.collect() for s in family.samples]
    ejections = {lab["reason"]: v for n, lab, v in samples if n == "lbkit_endpoint_ejections_total"}
    assert ejections == {"consecutive_failures": 0, "success_rate": 0, "failure_percentage": 1}
    events = {(lab["kind"], lab["cause"]): v for n, lab, v in samples if n == "lbkit_events_total"}
    assert set(events) == set(EVENT_CAUSES)  # every pair the table allows is exported, from 0
    assert {pair for pair, v in events.items() if v} == {
        ("added", "discovered"),
        ("ejected", "failure_percentage"),
        ("unhealthy", "consul_critical"),
    }
    assert tuple(c.value for c in KIND_CAUSES[EventKind.EJECTED]) == EJECTION_REASONS
    assert all("user-42" not in str(lab) for _, lab, _ in samples)


async def test_asyncio_balancer(make_servers, exposition):
    registry, port = exposition
    servers = make_servers(2)
    async with lbkit.aio.Balancer([s.address for s in servers], service="aio-models") as lb:
        instrument(lb, registry)
        await lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(40):
            await stub.Predict(REQ, timeout=5)
        replies = [r async for r in stub.StreamPredict(pb2.PredictRequest(max_tokens=3), timeout=5)]
        m = await asyncio.to_thread(Scrape, port)

    assert len(replies) == 3
    for s in servers:
        labels = {"service": "aio-models", "endpoint": s.address}
        served = s.calls["Predict"] + s.calls["StreamPredict"]
        assert m.one("lbkit_endpoint_calls_total", outcome="ok", **labels) == served
        # response streams are counted as calls but their length is no latency: the histogram leaves them out
        assert m.one("lbkit_endpoint_call_latency_seconds_count", **labels) == s.calls["Predict"]
        assert m.one("lbkit_endpoint_in_flight", **labels) == 0
    assert m.total("lbkit_endpoint_calls_total", service="aio-models") == 41
    assert m.one("lbkit_endpoints", service="aio-models", state="ready") == 2


def test_hedges_are_exported_and_a_hedged_call_counts_once(exposition, make_servers) -> None:
    registry, port = exposition
    (stalling,) = make_servers(1, stall_rate=1.0, stall=30.0)
    (steady,) = make_servers(1)
    policy = lbkit.HedgingPolicy(hedging_delay=0.02)
    lb = lbkit.Balancer([stalling.address, steady.address], service="models", retry={"*": policy})
    instrument(lb, registry)
    with lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(4):
            assert stub.Predict(REQ, timeout=10).served_by == steady.address
        servicer = stalling.servicer
        assert servicer is not None
        deadline = time.monotonic() + 5
        while (
            servicer.abandoned < servicer.stalled or lb.stats.total_in_flight
        ) and time.monotonic() < deadline:
            time.sleep(0.01)
        m = Scrape(port)
        sent, won, cancelled = lb.hedges_sent, lb.hedges_won, lb.hedges_cancelled
    assert won >= 1 and sent == cancelled == servicer.stalled
    assert m.one("lbkit_hedges_total", service="models") == sent
    assert m.one("lbkit_hedges_won_total", service="models") == won
    assert m.one("lbkit_hedge_attempts_cancelled_total", service="models") == cancelled
    # Four calls, four finished calls in the endpoint counts: the cancelled losers count nowhere.
    assert m.total("lbkit_endpoint_calls_total", service="models") == 4
    assert m.total("lbkit_endpoint_call_latency_seconds_count", service="models") == 4
