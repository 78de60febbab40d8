"""lbkit.Balancer with real grpc servers on 127.0.0.1 and the generated ModelService stub."""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter

import grpc
import pytest

import lbkit
from lbkit.testing import ModelServer
from tests.integration.conftest import SCHEDULING_MARGIN, pb2, pb2_grpc, served_counts, wait_for

REQ = pb2.PredictRequest(features=[1.0, 2.0])


def in_flight(lb: lbkit.Balancer) -> int:
    return sum(e.in_flight for e in lb.stats)


def test_round_robin_spreads_evenly(make_servers):
    servers = make_servers(3)
    with lbkit.Balancer([s.address for s in servers], selector="round_robin") as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        seen = Counter(stub.Predict(REQ, timeout=5).served_by for _ in range(300))
    assert sorted(seen.values()) == [100, 100, 100]
    assert served_counts(servers) == [100, 100, 100]


@pytest.mark.parametrize("selector", ["least_connections", "weighted"])
def test_every_selector_spreads(make_servers, selector):
    servers = make_servers(3)
    with lbkit.Balancer([s.address for s in servers], selector=selector) as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(300):
            stub.Predict(REQ, timeout=5)
    counts = served_counts(servers)
    assert sum(counts) == 300
    assert min(counts) >= 40, counts


def test_peak_ewma_starves_a_slow_server(make_servers):
    fast = make_servers(2)
    # 200 ms: well clear of what a busy 2-core machine adds to the fast servers' own latency (50 ms was not)
    slow = make_servers(1, delay=0.2)[0]
    servers = [*fast, slow]
    with lbkit.Balancer([s.address for s in servers], selector="peak_ewma") as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(200):
            stub.Predict(REQ, timeout=5)
    assert sum(served_counts(servers)) == 200
    assert slow.calls["Predict"] <= 10, served_counts(servers)  # round robin would send it ~67


def test_least_connections_avoids_a_busy_server(make_servers):
    fast = make_servers(2)
    slow = make_servers(1, delay=0.1)[0]
    servers = [*fast, slow]
    with lbkit.Balancer([s.address for s in servers], selector="least_connections") as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())

        def load() -> None:
            for _ in range(40):
                stub.Predict(REQ, timeout=5)

        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert sum(served_counts(servers)) == 240
    assert slow.calls["Predict"] < 240 / 3 / 2, served_counts(servers)  # under half of round robin's share


def test_hash_key_pins_user_to_one_server(make_servers):
    servers = make_servers(4)
    with lbkit.Balancer([s.address for s in servers], selector="consistent_hash") as lb:
        lb.wait_ready(count=4)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        owners: dict[str, set[str]] = {}
        for i in range(40):
            user = f"user-{i % 10}"
            reply = stub.Predict(REQ, metadata=[("lb-key", user)], timeout=5)
            owners.setdefault(user, set()).add(reply.served_by)
    assert all(len(v) == 1 for v in owners.values()), owners
    assert len({next(iter(v)) for v in owners.values()}) >= 2  # ten users do not all land on one server


def test_key_function_pins_by_request_field(make_servers):
    servers = make_servers(3)
    with lbkit.Balancer([s.address for s in servers], selector="consistent_hash") as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel(key=lambda method, req: req.model_version or None))
        a = {stub.Predict(pb2.PredictRequest(model_version="a"), timeout=5).served_by for _ in range(10)}
        b = {stub.Predict(pb2.PredictRequest(model_version="b"), timeout=5).served_by for _ in range(10)}
    assert len(a) == 1 and len(b) == 1


def test_in_flight_returns_to_zero_after_every_kind_of_call(make_servers):
    servers = make_servers(2, tokens=50, delay=0.002)
    with lbkit.Balancer([s.address for s in servers]) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        stub.Predict(REQ, timeout=5)
        stub.Predict.with_call(REQ, timeout=5)
        stub.Predict.future(REQ, timeout=5).result()
        assert len(list(stub.StreamPredict(pb2.PredictRequest(max_tokens=3), timeout=5))) == 3
        # cancelled stream
        stream = stub.StreamPredict(REQ, timeout=5)
        next(stream)
        stream.cancel()
        # abandoned iterator
        stream = stub.StreamPredict(REQ, timeout=5)
        next(stream)
        del stream
        gc.collect()
        # bidirectional
        updates = (pb2.FeatureUpdate(entity_id="e", sequence=i) for i in range(5))
        acks = list(stub.UpdateFeatures(updates, timeout=5))
        assert [a.sequence for a in acks] == list(range(5))
        # abandoned bidirectional stream
        bidi = stub.UpdateFeatures(iter([pb2.FeatureUpdate(entity_id="x")] * 3), timeout=5)
        next(bidi)
        del bidi
        gc.collect()
        wait_for(lambda: in_flight(lb) == 0)
        assert lb.stats.total_in_flight == 0


def test_server_killed_with_calls_in_flight_costs_no_failed_calls(make_servers):
    servers = make_servers(3)
    victim = servers[1]
    failures: list[BaseException] = []
    served: Counter[str] = Counter()
    lock = threading.Lock()
    with lbkit.Balancer([s.address for s in servers], selector="round_robin") as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())

        def load() -> None:
            for _ in range(150):
                try:
                    reply = stub.Predict(REQ, timeout=5)
                    with lock:
                        served[reply.served_by] += 1
                except grpc.RpcError as err:
                    failures.append(err)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: min(served[s.address] for s in servers) >= 10)  # load on every server
        victim.behavior.hang = True  # from now on the victim holds every call it gets ...
        # ... until all four callers wait on it, their calls received by the server:
        wait_for(
            lambda: (
                lb.stats[victim.address].in_flight == 4
                and victim.calls["Predict"] - served[victim.address] == 4
            )
        )
        held = victim.calls["Predict"] - served[victim.address]
        victim.stop(0)  # killed with those calls in flight
        for t in threads:
            t.join(30)
    assert held == 4  # the server had taken four calls it never answered
    assert failures == []
    assert sum(served.values()) == 600  # each of them was answered elsewhere


def test_no_ready_endpoint_fails_unavailable_at_deadline():
    # Fails at its deadline: not before it (giving up early), nor later than scheduling delays allow.
    # A port nothing listens on: bind-and-close to get one.
    dead = ModelServer().start()
    address = dead.address
    dead.stop(0)
    with lbkit.Balancer([address], service="inference") as lb:
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(REQ, timeout=0.5)
        elapsed = time.monotonic() - start
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "inference" in info.value.details()
    assert 0.5 <= elapsed <= 0.5 + SCHEDULING_MARGIN


def test_call_without_deadline_waits_default_wait_then_fails():
    dead = ModelServer().start()
    address = dead.address
    dead.stop(0)
    with lbkit.Balancer([address], wait_timeout=0.3) as lb:
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        start = time.monotonic()
        with pytest.raises(lbkit.NoReadyEndpointError):
            stub.Predict(REQ)
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed <= 0.3 + SCHEDULING_MARGIN


def test_removed_endpoint_in_flight_calls_complete(make_servers):
    slow = make_servers(1, delay=0.4)[0]
    fast = make_servers(1)[0]
    discovery = lbkit.StaticDiscovery([slow.address])
    with lbkit.Balancer(discovery) as lb:
        lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        result: dict[str, object] = {}

        def call() -> None:
            result["reply"] = stub.Predict(REQ, timeout=5)

        t = threading.Thread(target=call)
        t.start()
        wait_for(lambda: in_flight(lb) == 1)
        discovery.update([fast.address])
        t.join(5)
        assert result["reply"].served_by == slow.address  # type: ignore[attr-defined]
        wait_for(lambda: slow.address not in lb.members)
        assert stub.Predict(REQ, timeout=5).served_by == fast.address


def test_application_errors_are_not_retried(make_servers):
    servers = make_servers(2, fail_rate=1.0, fail_code=grpc.StatusCode.INVALID_ARGUMENT)
    with lbkit.Balancer([s.address for s in servers]) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(REQ, timeout=5)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert sum(served_counts(servers)) == 1


def test_unavailable_from_a_server_is_retried_elsewhere(make_servers):
    bad = make_servers(1, fail_rate=1.0)[0]
    good = make_servers(1)[0]
    with lbkit.Balancer([bad.address, good.address], selector="round_robin") as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        replies = [stub.Predict(REQ, timeout=5).served_by for _ in range(4)]
    assert set(replies) == {good.address}
    assert bad.calls["Predict"] >= 1


def test_empty_retryable_set_keeps_only_safe_retries(make_servers):
    bad = make_servers(1, fail_rate=1.0)[0]
    good = make_servers(1)[0]
    policy = lbkit.RetryPolicy(retryable_codes=())
    with lbkit.Balancer([bad.address, good.address], selector="round_robin", retry=policy) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        codes = []
        for _ in range(4):
            try:
                stub.Predict(REQ, timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
    assert codes.count(grpc.StatusCode.UNAVAILABLE) == 2  # the server's own UNAVAILABLE is not retried


def test_retry_budget_stops_a_retry_storm(make_servers):
    servers = make_servers(3, fail_rate=1.0)
    outlier = lbkit.OutlierDetection(consecutive_failures=None)
    policy = lbkit.RetryPolicy(budget_max_tokens=10.0)
    with lbkit.Balancer([s.address for s in servers], outlier_detection=outlier, retry=policy) as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(50):
            with pytest.raises(grpc.RpcError):
                stub.Predict(REQ, timeout=5)
        assert lb.budget.refused > 0
    # Without a budget 50 calls x 3 attempts would reach the servers 150 times.
    assert sum(served_counts(servers)) < 80


def test_server_streaming_retries_before_first_response(make_servers):
    bad = make_servers(1, fail_rate=1.0)[0]
    good = make_servers(1)[0]
    with lbkit.Balancer([bad.address, good.address], selector="round_robin") as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(3):
            tokens = list(stub.StreamPredict(pb2.PredictRequest(max_tokens=4), timeout=5))
            assert [t.served_by for t in tokens] == [good.address] * 4


def test_bidi_stream_replays_requests_on_retry(make_servers):
    bad = make_servers(1, fail_rate=1.0)[0]
    good = make_servers(1)[0]
    with lbkit.Balancer([bad.address, good.address], selector="round_robin") as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for _ in range(2):
            updates = [pb2.FeatureUpdate(entity_id="e", sequence=i) for i in range(6)]
            acks = list(stub.UpdateFeatures(iter(updates), timeout=5))
            assert [a.sequence for a in acks] == list(range(6))
            assert {a.served_by for a in acks} == {good.address}


def test_pick_returns_a_ready_channel(make_servers):
    servers = make_servers(2)
    with lbkit.Balancer([s.address for s in servers]) as lb:
        channel = lb.pick(timeout=5)
        reply = pb2_grpc.ModelServiceStub(channel).Predict(REQ, timeout=5)
    assert reply.served_by in {s.address for s in servers}


def test_metadata_and_trailers_pass_through(make_servers):
    servers = make_servers(1)
    with lbkit.Balancer([s.address for s in servers]) as lb:
        lb.wait_ready()
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        reply, call = stub.Predict.with_call(REQ, metadata=[("x-user", "u1")], timeout=5)
    assert reply.served_by == servers[0].address
    assert ("lb-served-by", servers[0].address) in tuple(call.trailing_metadata())
    assert call.code() is grpc.StatusCode.OK


def test_endpoint_back_while_draining_is_picked_again_with_health_checks(make_servers):
    slow = make_servers(1, delay=0.5)[0]
    other = make_servers(1)[0]
    discovery = lbkit.StaticDiscovery([slow.address, other.address])
    with lbkit.Balancer(discovery, selector="round_robin", health_check=lbkit.HealthCheck()) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        t = threading.Thread(target=lambda: [stub.Predict(REQ, timeout=5) for _ in range(2)])
        t.start()
        wait_for(lambda: lb.stats[slow.address].in_flight == 1)
        discovery.update([other.address])  # slow leaves: its channel drains
        assert lb.endpoint_states()[slow.address] == "draining"
        discovery.update([slow.address, other.address])  # and comes back before the drain ends
        wait_for(lambda: len(lb.core.picker.endpoints) == 2, timeout=3)
        t.join(10)
        slow.behavior.delay = 0.0
        seen = Counter(stub.Predict(REQ, timeout=5).served_by for _ in range(10))
    assert seen[slow.address] == 5


def test_a_stream_reset_by_the_server_is_retried_like_unavailable(make_servers):
    # A server stopped without grace resets its calls: the client sees CANCELLED it never asked for.
    bad = make_servers(1, fail_rate=1.0, fail_code=grpc.StatusCode.CANCELLED)[0]
    good = make_servers(1)[0]
    with lbkit.Balancer([bad.address, good.address], selector="round_robin") as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        replies = [stub.Predict(REQ, timeout=5).served_by for _ in range(4)]
        tokens = list(stub.StreamPredict(pb2.PredictRequest(max_tokens=2), timeout=5))
    assert set(replies) == {good.address} and {t.served_by for t in tokens} == {good.address}
    assert bad.calls["Predict"] >= 1


def test_a_call_on_a_balancer_never_started_fails_at_once_saying_so():
    lb = lbkit.Balancer(["127.0.0.1:1"], service="models")
    stub = pb2_grpc.ModelServiceStub(lb.channel())
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="models: the Balancer is not started"):
        stub.Predict(REQ, timeout=5)
    assert time.monotonic() - start < 1.0


def test_calls_that_pick_a_channel_closed_under_them_go_elsewhere(make_servers):
    servers = make_servers(2)
    with lbkit.Balancer([s.address for s in servers], selector="round_robin") as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        # A drain finishing between pick and call: the picker still holds the closed endpoint.
        lb._close_member(lb.members[servers[0].address], "closed by the test")
        replies = {stub.Predict(REQ, timeout=5).served_by for _ in range(4)}
        replies |= {stub.Predict.future(REQ, timeout=5).result().served_by for _ in range(4)}
        tokens = {t.served_by for _ in range(2) for t in stub.StreamPredict(pb2.PredictRequest(max_tokens=2))}
        acks = {a.served_by for a in stub.UpdateFeatures(iter([pb2.FeatureUpdate(sequence=1)]), timeout=5)}
        assert replies == tokens == acks == {servers[1].address}
        assert lb.stats.total_in_flight == 0
