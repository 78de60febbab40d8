"""Health with real servers: active checks, outlier ejection, panic mode, slow start (sync balancer)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc

import lbkit
from lbkit.events import Event, EventKind
from lbkit.testing import FakeClock
from tests.integration.conftest import pb2, pb2_grpc, served_counts, wait_for

REQ = pb2.PredictRequest(features=[1.0])


def run_calls(
    stub: object, n: int, threads: int = 1, timeout: float = 5.0
) -> tuple[Counter[str], list[grpc.RpcError]]:
    """Make ``n`` Predict calls over ``threads`` threads; where they landed, and the failures."""
    seen: Counter[str] = Counter()
    failures: list[grpc.RpcError] = []
    lock = threading.Lock()

    def work(count: int) -> None:
        for _ in range(count):
            try:
                reply = stub.Predict(REQ, timeout=timeout)  # type: ignore[attr-defined]
                with lock:
                    seen[reply.served_by] += 1
            except grpc.RpcError as err:
                with lock:
                    failures.append(err)

    ts = [threading.Thread(target=work, args=(n // threads,)) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return seen, failures


def test_not_serving_leaves_the_picker_and_serving_returns():
    events: list[Event] = []
    from lbkit.testing import ModelServer

    servers = [ModelServer().start() for _ in range(3)]
    try:
        with lbkit.Balancer(
            [s.address for s in servers], health_check=lbkit.HealthCheck(), on_event=events.append
        ) as lb:
            lb.wait_ready(count=3)
            stub = pb2_grpc.ModelServiceStub(lb.channel())
            servers[0].set_serving(False)
            wait_for(lambda: servers[0].address not in {e.address for e in lb.core.picker.endpoints})
            before = servers[0].calls["Predict"]
            seen, failures = run_calls(stub, 60)
            assert failures == [] and servers[0].calls["Predict"] == before
            assert any(e.kind is EventKind.UNHEALTHY and e.address == servers[0].address for e in events)
            servers[0].set_serving(True)
            wait_for(lambda: len(lb.core.picker.endpoints) == 3)
            seen, _ = run_calls(stub, 60)
            assert seen[servers[0].address] > 0
    finally:
        for s in servers:
            s.stop(0)


def test_failing_server_is_ejected_and_costs_no_failed_call(make_servers):
    good = make_servers(3)
    bad = make_servers(1, fail_rate=1.0)[0]
    servers = [*good, bad]
    events: list[Event] = []
    od = lbkit.OutlierDetection(consecutive_failures=5, base_ejection_time=30.0, max_ejection_percent=25.0)
    with lbkit.Balancer([s.address for s in servers], outlier_detection=od, on_event=events.append) as lb:
        lb.wait_ready(count=4)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        seen, failures = run_calls(stub, 200, threads=4)
        assert failures == []
        assert bad.address not in seen
        assert lb.endpoint_states()[bad.address] == "ejected"
    ejected = [e for e in events if e.kind is EventKind.EJECTED]
    assert [e.address for e in ejected] == [bad.address]
    assert "consecutive failures" in ejected[0].reason
    assert bad.calls["Predict"] <= 5 + 4  # the streak, plus calls already on their way (4 threads)


def test_partially_failing_server_is_ejected_by_failure_percentage(make_servers):
    good = make_servers(3)
    flaky = make_servers(1, fail_rate=0.3)[0]
    servers = [*good, flaky]
    od = lbkit.OutlierDetection(
        consecutive_failures=None,
        interval=0.3,
        max_ejection_percent=25.0,
        failure_percentage=lbkit.FailurePercentageEjection(
            threshold=15.0, minimum_hosts=4, request_volume=10
        ),
    )
    with lbkit.Balancer([s.address for s in servers], outlier_detection=od) as lb:
        lb.wait_ready(count=4)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        deadline = time.monotonic() + 10
        failures: list[grpc.RpcError] = []
        while lb.endpoint_states()[flaky.address] != "ejected" and time.monotonic() < deadline:
            _, f = run_calls(stub, 20)
            failures += f
        assert lb.endpoint_states()[flaky.address] == "ejected"
        assert failures == []  # its UNAVAILABLE answers were retried elsewhere
        before = flaky.calls["Predict"]
        run_calls(stub, 40)
        assert flaky.calls["Predict"] == before


def test_hanging_server_costs_no_failed_call_with_attempt_timeout(make_servers):
    good = make_servers(2)
    hung = make_servers(1, hang=True)[0]
    servers = [*good, hung]
    policy = lbkit.RetryPolicy(attempt_timeout=0.2)
    with lbkit.Balancer([s.address for s in servers], selector="round_robin", retry=policy) as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        seen, failures = run_calls(stub, 30, threads=3, timeout=3.0)
        assert failures == []
        assert hung.address not in seen
        assert lb.endpoint_states()[hung.address] == "ejected"  # 5 attempts ran out in a row
        assert hung.calls["Predict"] <= 5 + 3


def test_ejected_server_returns_after_its_ejection_time(make_servers):
    good = make_servers(2)
    bad = make_servers(1, fail_rate=1.0)[0]
    servers = [*good, bad]
    events: list[Event] = []
    od = lbkit.OutlierDetection(base_ejection_time=0.5, jitter=0.0, max_ejection_percent=50.0)
    with lbkit.Balancer([s.address for s in servers], outlier_detection=od, on_event=events.append) as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        run_calls(stub, 30)
        assert lb.endpoint_states()[bad.address] == "ejected"
        bad.behavior.fail_rate = 0.0  # it recovers
        wait_for(lambda: lb.endpoint_states()[bad.address] == "ready", timeout=3)
        seen, failures = run_calls(stub, 30)
        assert failures == [] and seen[bad.address] > 0
    assert any(e.kind is EventKind.RETURNED and e.address == bad.address for e in events)


def test_killed_and_restarted_server_comes_back(make_servers):
    servers = make_servers(3)
    with lbkit.Balancer([s.address for s in servers]) as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        servers[1].stop(0)
        seen, failures = run_calls(stub, 60, threads=2)
        assert failures == []
        wait_for(lambda: lb.endpoint_states()[servers[1].address] == "connecting")
        servers[1].start()  # same port
        wait_for(lambda: len(lb.core.picker.endpoints) == 3, timeout=8)
        seen, failures = run_calls(stub, 60)
        assert failures == [] and seen[servers[1].address] > 0


def test_panic_mode_spreads_over_all_when_most_are_unhealthy(make_servers):
    servers = make_servers(4)
    events: list[Event] = []
    with lbkit.Balancer(
        [s.address for s in servers], health_check=lbkit.HealthCheck(), on_event=events.append
    ) as lb:
        lb.wait_ready(count=4)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        for s in servers[:3]:
            s.set_serving(False)
        wait_for(lambda: lb.panic)
        seen, failures = run_calls(stub, 80)
        assert failures == []
        assert len(seen) == 4  # balanced over all four, not piled on the one healthy server
        for s in servers[:3]:
            s.set_serving(True)
        wait_for(lambda: not lb.panic)
    kinds = [e.kind for e in events]
    assert EventKind.PANIC_START in kinds and EventKind.PANIC_END in kinds


def test_slow_start_ramps_a_new_endpoint(make_servers):
    old = make_servers(2)
    new = make_servers(1)[0]
    discovery = lbkit.StaticDiscovery([s.address for s in old])
    clock = FakeClock()  # the ramp runs on the balancer's clock: time passes only when the test says
    slow_start = lbkit.SlowStart(window=3.0)
    with lbkit.Balancer(discovery, selector="weighted", slow_start=slow_start, clock=clock) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        discovery.update([*(s.address for s in old), new.address])
        lb.wait_ready(count=3)
        early, _ = run_calls(stub, 120)  # at the start of its window
        clock.advance(3.2)
        wait_for(lambda: lb.stats[new.address].weight_factor == 1.0)  # the timer ended the ramp
        late, _ = run_calls(stub, 120)
    assert early[new.address] < 120 / 3 / 2  # well under its full share at first
    assert late[new.address] >= 120 / 3 * 0.8  # its full share once the window is over
    assert served_counts([new]) == [early[new.address] + late[new.address]]


def test_health_flips_under_calls_lose_no_call_with_retries_off(make_servers):
    # A server flipping NOT_SERVING still serves: a call picked for it just before the balancer hears
    # the flip must reach it (calls never go on the health-checked channel, which fails them at once).
    servers = make_servers(3)
    addresses = [s.address for s in servers]
    stop = threading.Event()
    failures: list[grpc.RpcError] = []
    served = [0]
    with lbkit.Balancer(
        addresses, health_check=lbkit.HealthCheck(), retry=lbkit.RetryPolicy(max_attempts=1)
    ) as lb:
        lb.wait_ready(count=3)
        stub = pb2_grpc.ModelServiceStub(lb.channel())

        def call() -> None:
            deadline = time.monotonic() + 60  # bounded: the flips below end it sooner
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    stub.Predict(REQ, timeout=5)
                    served[0] += 1
                except grpc.RpcError as err:
                    failures.append(err)

        callers = [threading.Thread(target=call) for _ in range(4)]
        for t in callers:
            t.start()
        try:
            for i in range(12):
                server = servers[i % 3]
                server.set_serving(False)
                wait_for(lambda s=server: lb.endpoint_states()[s.address] == "unhealthy")
                server.set_serving(True)
                wait_for(lambda s=server: lb.endpoint_states()[s.address] == "ready")
        finally:
            stop.set()
            for t in callers:
                t.join(10)
    assert failures == [] and served[0] > 0
