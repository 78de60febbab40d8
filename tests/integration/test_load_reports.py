"""Load reports end to end with real grpc servers: lbkit.server attaches them, the sync balancer reads them,
weighted_round_robin follows them; malformed ones never fail a call."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import lbkit
import lbkit.server
from lbkit.metrics import instrument
from lbkit.orca import MIRROR_TRAILER, TRAILER, decode
from lbkit.server import LoadReportInterceptor, ServerLoad, report_load
from lbkit.testing import Behavior, ModelServer
from lbkit.testing.model_server import ModelServicer
from tests.integration.conftest import pb2, pb2_grpc, wait_for

REQ = pb2.PredictRequest(features=[1.0])
FAST = lbkit.WeightedRoundRobin(blackout_period=0.3, weight_update_period=0.1)
"""Periods short enough for a test: weights count 0.3 s after the first report, refreshed every 0.1 s."""


@pytest.fixture
def reporting_servers() -> Iterator[Callable[..., list[ModelServer]]]:
    """Model servers that report load (capacity 4, measured over 0.2 s windows); stopped after the test."""
    started: list[ModelServer] = []

    def make(*delays: float) -> list[ModelServer]:
        for delay in delays:
            load = ServerLoad(capacity=4, window=0.2)
            server = ModelServer(behavior=Behavior(delay=delay), interceptors=[LoadReportInterceptor(load)])
            started.append(server.start())
        return started[-len(delays) :]

    yield make
    for s in started:
        s.stop(0)


def shares_of(stub: Any, seconds: float, threads: int = 4) -> Counter[str]:
    """Calls per server over ``seconds`` of load from ``threads`` threads (each call's served_by)."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker() -> None:
        mine: Counter[str] = Counter()
        for _ in range(5000):
            if time.monotonic() >= end:
                break
            mine[stub.Predict(REQ, timeout=5).served_by] += 1
        with lock:
            counts.update(mine)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return counts


def test_shares_follow_reported_capacity(reporting_servers):
    fast1, fast2, slow = reporting_servers(0.003, 0.003, 0.030)
    registry = CollectorRegistry()
    with lbkit.Balancer([fast1.address, fast2.address, slow.address], selector=FAST) as lb:
        instrument(lb, registry)
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        shares_of(stub, 1.0)  # reports arrive, blackouts pass
        counts = shares_of(stub, 1.5)
        picker = lb.core.picker
        weights = dict(zip((e.address for e in picker.endpoints), picker.weights, strict=True))
        gauges = {
            (family.name, s.labels["endpoint"]): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            if family.name in ("lbkit_endpoint_load_utilization", "lbkit_endpoint_load_qps")
            for s in family.samples
        }
    for address in (fast1.address, fast2.address, slow.address):
        assert gauges[("lbkit_endpoint_load_qps", address)] > 0
        assert 0 < gauges[("lbkit_endpoint_load_utilization", address)] <= 1
    total = sum(counts.values())
    # Round robin would give the slow server a third; it has about a tenth of a fast one's capacity.
    assert counts[slow.address] / total < 0.2, (counts, weights)
    assert weights[slow.address] < 0.5 * min(weights[fast1.address], weights[fast2.address]), weights
    assert abs(counts[fast1.address] - counts[fast2.address]) / total < 0.15, counts


def test_a_server_that_slows_down_loses_its_share(reporting_servers):
    a, b = reporting_servers(0.003, 0.003)
    with lbkit.Balancer([a.address, b.address], selector=FAST) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        before = shares_of(stub, 1.0)
        assert before[b.address] / sum(before.values()) > 0.35, before
        b.behavior.delay = 0.012  # b now has a quarter of its capacity
        shares: list[float] = []

        def b_share_dropped() -> bool:
            window = shares_of(stub, 0.3)
            shares.append(window[b.address] / sum(window.values()))
            return shares[-1] < 0.3

        wait_for(b_share_dropped, timeout=6.0)


class ReportingServicer(ModelServicer):
    """Predict reports named metrics, then overwrites the trailing metadata; "fail" requests abort."""

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        report_load(context, named_metrics={"queue_depth": 3, "kv_cache_utilization": 0.5})
        if request.model_version == "fail":
            context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded")
        context.set_trailing_metadata((("lb-served-by", self.name),))  # drops what report_load attached
        report = super().Predict(request, context)
        context.set_trailing_metadata((("lb-served-by", self.name),))  # and once more
        return report


def serve(servicer_factory: Callable[[str], Any], interceptors: Any = ()) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(8), interceptors=interceptors)
    port = server.add_insecure_port("127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    pb2_grpc.add_ModelServiceServicer_to_server(servicer_factory(address), server)  # type: ignore[no-untyped-call]
    server.start()
    return server, address


@pytest.fixture
def servers() -> Iterator[Callable[..., tuple[grpc.Server, str]]]:
    started: list[grpc.Server] = []

    def make(servicer_factory: Callable[[str], Any], interceptors: Any = ()) -> tuple[grpc.Server, str]:
        server, address = serve(servicer_factory, interceptors)
        started.append(server)
        return server, address

    yield make
    for s in started:
        s.stop(0)


def test_call_figures_over_server_figures_and_the_handler_s_own_trailers_kept(servers):
    load = ServerLoad(window=0.2)
    load.set(cpu_utilization=0.4, named_metrics={"gpu_utilization": 0.7, "queue_depth": 0})
    _, address = servers(lambda a: ReportingServicer(a, Behavior()), [LoadReportInterceptor(load)])
    with lbkit.Balancer([address], selector="weighted_round_robin") as lb:
        lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        reply, call = stub.Predict.with_call(REQ, timeout=5)
        entry = lb.stats[address]
    assert reply.served_by == address
    trailers = dict(call.trailing_metadata())
    assert trailers["lb-served-by"] == address
    assert TRAILER not in trailers  # grpcio keeps the standard key from Python clients
    assert decode(trailers[MIRROR_TRAILER]) == entry.load_report
    assert entry.load_reports == 1
    report = entry.load_report
    assert report is not None and report.cpu_utilization == 0.4
    assert dict(report.named_metrics) == {
        "gpu_utilization": 0.7,
        "queue_depth": 3.0,
        "kv_cache_utilization": 0.5,
    }


def test_an_aborted_call_carries_its_report_and_counts_as_an_error(servers):
    now = [0.0]
    server_load = ServerLoad(window=10.0, clock=lambda: now[0])
    _, address = servers(lambda a: ReportingServicer(a, Behavior()), [LoadReportInterceptor(server_load)])
    with lbkit.Balancer(
        [address], selector="weighted_round_robin", retry=lbkit.RetryPolicy(max_attempts=1)
    ) as lb:
        lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(pb2.PredictRequest(model_version="fail"), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        report = lb.stats[address].load_report
        assert report is not None and report.named_metrics["queue_depth"] == 3.0
        assert lb.stats[address].load_reports == 1
    now[0] = 10.0  # the measuring window ends
    assert server_load.figures() == {"qps": 0.1, "eps": 0.1}  # one call, failed, in 10 s


def test_report_load_without_an_interceptor(servers):
    class Plain(ModelServicer):
        def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
            reply = super().Predict(request, context)  # sets lb-served-by first
            report_load(context, application_utilization=0.5, qps=10.0)
            report_load(context, named_metrics={"queue_depth": 2})  # merged with the first
            return reply

    _, address = servers(lambda a: Plain(a, Behavior()))
    with lbkit.Balancer([address], selector="weighted_round_robin") as lb:
        lb.wait_ready()
        _, call = pb2_grpc.ModelServiceStub(lb.channel()).Predict.with_call(REQ, timeout=5)
        report = lb.stats[address].load_report
    assert dict(call.trailing_metadata())["lb-served-by"] == address
    assert report is not None
    assert (report.application_utilization, report.qps, dict(report.named_metrics)) == (
        0.5,
        10.0,
        {"queue_depth": 2},
    )


def test_report_load_refuses_bad_figures(servers):
    errors: list[BaseException] = []

    class Bad(ModelServicer):
        def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
            for bad in ({"cpu_utilization": -0.5}, {"qps": float("nan")}):
                try:
                    report_load(context, **bad)
                except lbkit.ConfigError as err:
                    errors.append(err)
            return super().Predict(request, context)

    _, address = servers(lambda a: Bad(a, Behavior()), [LoadReportInterceptor()])
    with grpc.insecure_channel(address) as channel:
        pb2_grpc.ModelServiceStub(channel).Predict(REQ, timeout=5)
    assert [type(e) for e in errors] == [lbkit.ConfigError, lbkit.ConfigError]
    assert "cpu_utilization" in str(errors[0]) and "qps" in str(errors[1])


def test_malformed_reports_never_fail_a_call(servers, caplog):
    class Garbage(ModelServicer):
        def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
            reply = super().Predict(request, context)
            context.set_trailing_metadata(((MIRROR_TRAILER, b"\x09\x00\x01"), ("lb-served-by", self.name)))
            return reply

    _, bad = servers(lambda a: Garbage(a, Behavior()))
    _, good = servers(lambda a: ReportingServicer(a, Behavior()), [LoadReportInterceptor()])
    registry = CollectorRegistry()
    with (
        caplog.at_level(logging.WARNING, logger="lbkit"),
        lbkit.Balancer([bad, good], selector="weighted_round_robin", service="models") as lb,
    ):
        instrument(lb, registry)
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        (bad_stats, good_stats) = lb.stats[bad], lb.stats[good]
        served: Counter[str] = Counter()
        for _ in range(20):
            served[stub.Predict(REQ, timeout=5).served_by] += 1
            for entry in (bad_stats, good_stats):  # a reader after every call (the picker: once a second)
                entry.take_load_report()
                entry.load_wanted = True
        samples = {
            (s.labels["endpoint"], s.labels["outcome"]): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            if family.name == "lbkit_endpoint_load_reports"
            for s in family.samples
            if s.name.endswith("_total")
        }
    assert served == {bad: 10, good: 10}
    assert (bad_stats.load_reports_malformed, bad_stats.load_reports) == (10, 0)
    assert (good_stats.load_reports_malformed, good_stats.load_reports) == (0, 10)
    assert samples[(bad, "malformed")] == 10 and samples[(good, "ok")] == 10
    warnings = [r.getMessage() for r in caplog.records if "malformed load report" in r.getMessage()]
    assert len(warnings) == 1 and bad in warnings[0]


def test_other_selectors_leave_reports_unread(reporting_servers):
    servers = reporting_servers(0.0, 0.0)
    with lbkit.Balancer([s.address for s in servers], selector="round_robin") as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(10):
            stub.Predict(REQ, timeout=5)
        assert [lb.stats[s.address].load_reports for s in servers] == [0, 0]


def test_futures_and_streams_report_too():
    server_load = ServerLoad()
    server_load.set(cpu_utilization=0.5)
    server = ModelServer(interceptors=[LoadReportInterceptor(server_load)]).start()
    try:
        with lbkit.Balancer([server.address], selector="weighted_round_robin") as lb:
            lb.wait_ready()
            stub = pb2_grpc.ModelServiceStub(lb.channel())
            entry = lb.stats[server.address]
            features = [pb2.FeatureUpdate(entity_id="e", sequence=1)]
            calls: list[Callable[[], object]] = [
                lambda: stub.Predict.future(REQ, timeout=5).result(),
                lambda: list(stub.StreamPredict(pb2.PredictRequest(max_tokens=3), timeout=5)),
                lambda: list(stub.UpdateFeatures(iter(features), timeout=5)),
            ]
            for call in calls:
                entry.load_wanted = True  # a reader wants the next report
                before = entry.load_raw
                call()
                wait_for(lambda before=before: entry.load_raw is not before)  # done callbacks: grpc's thread
            assert entry.load_report is not None and entry.load_report.cpu_utilization == 0.5
    finally:
        server.stop(0)


def test_grpcio_s_own_weighted_round_robin_reads_lbkit_reports():
    servers = []
    for utilization in (0.2, 0.8):
        server_load = ServerLoad()
        server_load.set(application_utilization=utilization, qps=100.0)  # weights 500 and 125
        servers.append(ModelServer(interceptors=[LoadReportInterceptor(server_load)]).start())
    light, heavy = servers
    config = {
        "loadBalancingConfig": [
            {"weighted_round_robin": {"blackoutPeriod": "0s", "weightUpdatePeriod": "0.1s"}}
        ]
    }
    target = f"ipv4:{light.address},{heavy.address}"
    try:
        with grpc.insecure_channel(target, options=[("grpc.service_config", json.dumps(config))]) as channel:
            stub = pb2_grpc.ModelServiceStub(channel)
            for _ in range(300):
                stub.Predict(REQ, timeout=5)
            served = Counter(stub.Predict(REQ, timeout=5).served_by for _ in range(1000))
    finally:
        for server in servers:
            server.stop(0)
    assert served[light.address] == pytest.approx(800, abs=40), served
