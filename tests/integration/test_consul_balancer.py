"""lbkit.Balancer fed by ConsulDiscovery, end to end: real model servers, lbkit's test Consul server (or a
real agent at CONSUL_HTTP_ADDR), and calls through the generated stub, as an application makes them.

Registrations, checks and weights in Consul reach the picker; outages, errors and a flapping instance
cost no call; the ACL token never shows in logs or reprs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import lbkit
from lbkit.discovery.consul_connection import resolve_connection
from lbkit.events import Event, EventKind
from lbkit.registration import GrpcCheck, Registration, TtlCheck
from lbkit.registration import register as consul_register
from lbkit.testing import ConsulServer, ConsulTimings, ModelServer
from tests.integration.conftest import pb2, pb2_grpc

REQ = pb2.PredictRequest(features=[1.0, 2.0])
TOKEN = "b7e2c9d4-e2e-acl-secret"
AGENT = os.environ.get("CONSUL_HTTP_ADDR", "")
FAST_TIMINGS = ConsulTimings(min_check_interval=0.05)
"""The test server runs gRPC checks at intervals down to 50 ms (Consul's own floor is 1 s)."""
DISCOVERY = {"wait": 2.0, "min_interval": 0.01, "backoff_initial": 0.05, "backoff_max": 0.2}
"""Short blocking waits and backoffs, so outages and recoveries play out in tens of ms."""
SETTLE = 5.0
"""Seconds a change in Consul may take to reach the picker (it takes tens of ms here)."""

MakeServers = Callable[..., list[ModelServer]]


class Consul:
    """Where a test registers instances: the embedded ConsulServer or a real agent.

    Every registration goes under ``service``; :meth:`cleanup` removes what is left of them.
    """

    def __init__(self, address: str, token: str | None, server: ConsulServer | None) -> None:
        import consul

        conn = resolve_connection(address=address, token=token, env={} if server else os.environ)
        self.connection = conn
        self.address = address
        self.token = conn.token
        self.server = server
        self.service = "model" if server else f"lbkit-e2e-{uuid.uuid4().hex[:8]}"
        self.client: Any = consul.Consul(
            host=conn.host, port=conn.port, scheme=conn.scheme, verify=conn.http_verify, cert=conn.http_cert
        )
        self.client.token = conn.token  # py-consul prefers CONSUL_HTTP_TOKEN over its argument
        self._ids: set[str] = set()
        self._registrations: list[Registration] = []

    @property
    def hooks(self) -> ConsulServer:
        """The embedded server, for its test hooks; skips the test against a real agent."""
        if self.server is None:
            pytest.skip("needs the test hooks of lbkit's ConsulServer")
        return self.server

    @property
    def local(self) -> bool:
        """Whether the agent runs on this machine (it can then probe the model servers)."""
        return self.connection.host in ("127.0.0.1", "localhost", "::1")

    def discovery(self, **options: Any) -> lbkit.ConsulDiscovery:
        """A ConsulDiscovery of ``service`` with short waits and backoffs (``options`` win)."""
        merged: dict[str, Any] = {**DISCOVERY, **options}
        env: dict[str, str] | None = {} if self.server else None
        return lbkit.ConsulDiscovery(
            self.service, address=self.address, token=merged.pop("token", self.token), env=env, **merged
        )

    def register(
        self, sid: str, server: ModelServer, *, ttl: bool = False, weight: int | None = None
    ) -> None:
        """Register ``server`` with py-consul's ``agent.service.register`` (a passing TTL check if asked)."""
        check = {"CheckID": f"service:{sid}", "Name": "ttl", "TTL": "30s"} if ttl else None
        weights = {"Passing": weight, "Warning": 1} if weight is not None else None
        self._ids.add(sid)
        self.client.agent.service.register(
            self.service,
            service_id=sid,
            address=server.host,
            port=server.port,
            check=check,
            weights=weights,
        )
        if ttl:
            self.client.agent.check.ttl_pass(f"service:{sid}")

    def deregister(self, sid: str) -> None:
        """Deregister with py-consul."""
        self.client.agent.service.deregister(sid)

    def agent_options(self, sid: str) -> dict[str, Any]:
        """Keyword options of lbkit.registration's registrations for instance ``sid`` of ``service`` here."""
        self._ids.add(sid)
        env: dict[str, str] | None = {} if self.server else None
        return {"service_id": sid, "consul_address": self.address, "token": self.token, "env": env}

    def registration(self, sid: str, server: ModelServer, **kwargs: Any) -> Registration:
        """Register ``server`` with lbkit.registration's helper."""
        reg = consul_register(self.service, server.address, **self.agent_options(sid), **kwargs)
        self._registrations.append(reg)
        return reg

    def catalog(self) -> set[str]:
        """Addresses of the service's passing instances, as Consul reports them now."""
        _, entries = self.client.health.service(self.service, passing=True)
        return {f"{e['Service']['Address']}:{e['Service']['Port']}" for e in entries}

    def cleanup(self) -> None:
        for reg in self._registrations:
            reg.close()
        if self.server is not None and not self.server.running:
            return
        for sid in self._ids:
            with contextlib.suppress(Exception):
                self.deregister(sid)


needs_agent = [
    pytest.mark.consul_agent,
    pytest.mark.skipif(not AGENT, reason="needs a real Consul agent at CONSUL_HTTP_ADDR"),
]
TARGETS = ["embedded", pytest.param("agent", marks=needs_agent)]


@contextlib.contextmanager
def open_consul(kind: str, *, acl: bool = False) -> Iterator[Consul]:
    """lbkit's ConsulServer (with TOKEN required if ``acl``), or the real agent at CONSUL_HTTP_ADDR."""
    if kind == "agent":
        if acl and not os.environ.get("CONSUL_HTTP_TOKEN"):
            pytest.skip("needs CONSUL_HTTP_TOKEN for the real agent")
        target = Consul(AGENT, None, None)
        try:
            yield target
        finally:
            target.cleanup()
        return
    with ConsulServer(acl_token=TOKEN if acl else None, timings=FAST_TIMINGS) as server:
        target = Consul(server.address, TOKEN if acl else None, server)
        try:
            yield target
        finally:
            target.cleanup()


@pytest.fixture(params=TARGETS)
def consul(request: pytest.FixtureRequest) -> Iterator[Consul]:
    """lbkit's ConsulServer, or the real agent at CONSUL_HTTP_ADDR."""
    with open_consul(request.param) as target:
        yield target


@pytest.fixture(params=TARGETS)
def acl_consul(request: pytest.FixtureRequest) -> Iterator[Consul]:
    """An ACL-enforcing ConsulServer with TOKEN, or the real agent when CONSUL_HTTP_TOKEN is set."""
    with open_consul(request.param, acl=True) as target:
        yield target


# --- helpers ---------------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], bool],
    timeout: float = SETTLE,
    what: str = "condition",
    show: Callable[[], object] | None = None,
) -> None:
    """Poll ``condition`` every 5 ms until it holds; fail after ``timeout`` seconds (with ``show()``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s" + (f": {show()}" if show else ""))
        time.sleep(0.005)


def picker_addresses(lb: lbkit.Balancer) -> set[str]:
    """Addresses the balancer's current picker chooses from."""
    return {e.address for e in lb.core.picker.endpoints}


def stub_of(lb: lbkit.Balancer) -> Any:
    return pb2_grpc.ModelServiceStub(lb.channel())  # type: ignore[no-untyped-call]


def served_by(stub: Any, n: int) -> Counter[str]:
    """Make ``n`` Predict calls; count which endpoint answered each."""
    return Counter(stub.Predict(REQ, timeout=5).served_by for _ in range(n))


class Load:
    """Predict calls from ``threads`` threads, each pausing ``pause`` s between calls, until stopped or
    ``max_calls`` / ``max_seconds`` run out. Counts where calls landed and keeps every failure."""

    def __init__(
        self,
        stub: Any,
        *,
        threads: int = 2,
        pause: float = 0.001,
        max_calls: int = 40_000,
        max_seconds: float = 20.0,
    ) -> None:
        self.stub = stub
        self.pause = pause
        self.max_calls = max_calls
        self.max_seconds = max_seconds
        self.served: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self.calls = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        end = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < end:
            with self._lock:
                if self.calls >= self.max_calls:
                    return
                self.calls += 1
            try:
                reply = self.stub.Predict(REQ, timeout=5)
            except Exception as exc:
                with self._lock:
                    self.errors.append(exc)
            else:
                with self._lock:
                    self.served[reply.served_by] += 1
            self._stop.wait(self.pause)

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.served)

    def wait_for_calls(self, n: int, timeout: float = SETTLE) -> None:
        """Wait until ``n`` more calls have been answered."""
        target = sum(self.snapshot().values()) + n
        wait_until(lambda: sum(self.snapshot().values()) >= target, timeout, f"{n} more calls")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10.0)
        assert not any(t.is_alive() for t in self._threads), "a load thread did not stop"


class Events:
    """A balancer listener keeping every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, kind: EventKind) -> list[str]:
        with self._lock:
            return [e.address for e in self.events if e.kind is kind]


# --- registration, checks, weights ------------------------------------------------------------------


def test_registration_reaches_the_balancer_and_deregistration_drains(
    consul: Consul, make_servers: MakeServers
) -> None:
    a, b = make_servers(2)
    consul.register("a", a)  # py-consul
    with lbkit.Balancer(consul.discovery()) as lb:
        lb.wait_ready(timeout=SETTLE)
        stub = stub_of(lb)
        assert served_by(stub, 10) == {a.address: 10}

        reg = consul.registration("b", b)  # lbkit.registration.register
        wait_until(lambda: picker_addresses(lb) == {a.address, b.address}, what="b in the picker")
        assert served_by(stub, 20) == {a.address: 10, b.address: 10}  # round robin over both

        # Calls in flight on b when it leaves Consul still complete on b.
        b.behavior.delay = 0.5
        a0, b0 = a.calls["Predict"], b.calls["Predict"]
        replies: list[str] = []
        failures: list[BaseException] = []

        def call() -> None:
            try:
                replies.append(stub.Predict(REQ, timeout=5).served_by)
            except Exception as exc:
                failures.append(exc)

        callers = [threading.Thread(target=call) for _ in range(4)]
        for t in callers:
            t.start()

        def reached() -> int:
            return a.calls["Predict"] - a0 + b.calls["Predict"] - b0

        wait_until(lambda: reached() == 4, what="all four calls at a server")
        in_flight = b.calls["Predict"] - b0
        assert in_flight >= 1 and lb.stats[b.address].in_flight == in_flight
        assert reg.deregister()
        wait_until(lambda: b.address not in picker_addresses(lb), what="b out of the picker")
        assert lb.endpoint_states()[b.address] == "draining"
        assert served_by(stub, 20) == {a.address: 20}  # no new call lands on b
        for t in callers:
            t.join(5.0)
        assert not failures
        assert Counter(replies)[b.address] == in_flight  # the drained calls finished, on b
        assert b.calls["Predict"] - b0 == in_flight  # and b saw no other call
        wait_until(lambda: b.address not in lb.members, what="b's channel closed after draining")


def test_an_instance_registered_again_while_draining_is_picked_again(
    consul: Consul, make_servers: MakeServers
) -> None:
    a, b = make_servers(2)
    consul.register("a", a)
    consul.register("b", b)
    with lbkit.Balancer(consul.discovery()) as lb:
        lb.wait_ready(timeout=SETTLE, count=2)
        stub = stub_of(lb)
        b.behavior.delay = 1.0
        callers = [
            threading.Thread(target=stub.Predict, args=(REQ,), kwargs={"timeout": 5}) for _ in range(4)
        ]
        for t in callers:
            t.start()
        b_stats = lb.stats.get(b.address)
        assert b_stats is not None
        wait_until(lambda: b_stats.in_flight >= 1, what="a call in flight on b")
        consul.deregister("b")
        wait_until(lambda: lb.endpoint_states().get(b.address) == "draining", what="b draining")
        b.behavior.delay = 0.0
        consul.register("b", b)  # back before its calls in flight finished
        wait_until(
            lambda: picker_addresses(lb) == {a.address, b.address},
            3.0,
            "b pickable again",
            lb.endpoint_states,
        )
        assert served_by(stub, 20)[b.address] == 10
        for t in callers:
            t.join(5.0)


def test_ttl_check_critical_takes_the_endpoint_out_and_passing_puts_it_back(
    consul: Consul, make_servers: MakeServers
) -> None:
    servers = make_servers(3)
    for i, s in enumerate(servers):
        consul.register(f"m{i}", s, ttl=True)
    every = {s.address for s in servers}
    sick = servers[2]
    with lbkit.Balancer(consul.discovery()) as lb:
        lb.wait_ready(timeout=SETTLE, count=3)
        stub = stub_of(lb)
        consul.client.agent.check.ttl_fail("service:m2")
        wait_until(lambda: picker_addresses(lb) == every - {sick.address}, what="m2 out")
        before = sick.calls["Predict"]
        assert sick.address not in served_by(stub, 30)
        assert sick.calls["Predict"] == before

        consul.client.agent.check.ttl_pass("service:m2")
        wait_until(lambda: picker_addresses(lb) == every, what="m2 back")
        assert served_by(stub, 30)[sick.address] == 10


def test_grpc_check_not_serving_takes_the_endpoint_out(consul: Consul, make_servers: MakeServers) -> None:
    if not consul.local:
        pytest.skip("the agent must run here to probe 127.0.0.1")
    servers = make_servers(2)
    check = GrpcCheck(interval=0.1, timeout=1.0, deregister_after=None)
    for i, s in enumerate(servers):
        consul.registration(f"g{i}", s, check=check)
    every = {s.address for s in servers}
    sick = servers[1]
    settle = SETTLE if consul.server else 10.0  # a real agent checks at most once a second
    with lbkit.Balancer(consul.discovery()) as lb:
        lb.wait_ready(timeout=settle, count=2)  # checks start critical: both passed a probe
        stub = stub_of(lb)
        sick.set_serving(False)
        wait_until(lambda: picker_addresses(lb) == every - {sick.address}, settle, "NOT_SERVING out")
        assert sick.address not in served_by(stub, 20)
        sick.set_serving(True)
        wait_until(lambda: picker_addresses(lb) == every, settle, "SERVING back")
        assert served_by(stub, 20)[sick.address] == 10


def test_consul_weights_reach_endpoints_and_split_weighted_calls(
    consul: Consul, make_servers: MakeServers
) -> None:
    heavy, light = make_servers(2)
    consul.register("heavy", heavy, weight=8)
    consul.registration("light", light, weight=4)
    with lbkit.Balancer(consul.discovery(), selector="weighted") as lb:
        lb.wait_ready(timeout=SETTLE, count=2)
        weights = {e.address: e.weight for e in lb.core.picker.endpoints}
        assert weights == {heavy.address: 8, light.address: 4}
        seen = served_by(stub_of(lb), 300)
        assert abs(seen[heavy.address] - 200) <= 6 and abs(seen[light.address] - 100) <= 6, seen

        consul.register("heavy", heavy, weight=4)  # a re-registration changes the weight in place
        wait_until(lambda: {e.weight for e in lb.core.picker.endpoints} == {4}, what="weights 4:4")
        seen = served_by(stub_of(lb), 100)
        assert abs(seen[heavy.address] - 50) <= 3, seen


# --- Consul failures ----------------------------------------------------------------------------------


def test_consul_killed_and_restarted_costs_no_call(consul: Consul, make_servers: MakeServers) -> None:
    server = consul.hooks
    a, b, c = make_servers(3)
    consul.register("a", a)
    consul.register("b", b)
    discovery = consul.discovery()
    events = Events()
    with lbkit.Balancer(discovery, on_event=events) as lb:
        lb.wait_ready(timeout=SETTLE, count=2)
        with Load(stub_of(lb)) as load:
            load.wait_for_calls(50)
            server.stop()
            wait_until(lambda: discovery.status.consecutive_errors >= 2, what="failed queries")
            assert discovery.status.stale
            load.wait_for_calls(200)  # calls go on while Consul is down ...
            assert picker_addresses(lb) == {a.address, b.address}  # ... over the last set
            down = load.snapshot()
            assert down[a.address] > 50 and down[b.address] > 50

            server.start()
            consul.register("c", c)
            wait_until(lambda: c.address in picker_addresses(lb), what="c after the restart")
            load.wait_for_calls(100)
            assert not discovery.status.stale
        assert load.errors == []
        assert load.served[c.address] > 0
        assert picker_addresses(lb) == {a.address, b.address, c.address}
        assert events.of(EventKind.REMOVED) == []
        assert lb.calls_retried == 0


@pytest.mark.parametrize("fault", ["500", "garbage"])
def test_consul_errors_under_load_change_nothing(
    consul: Consul, make_servers: MakeServers, fault: str
) -> None:
    server = consul.hooks
    servers = make_servers(2)
    for i, s in enumerate(servers):
        consul.register(f"m{i}", s)
    every = {s.address for s in servers}
    discovery = consul.discovery(wait=0.2)  # answers come every 0.2 s, so faults meet many queries
    events = Events()
    with lbkit.Balancer(discovery, on_event=events) as lb:
        lb.wait_ready(timeout=SETTLE, count=2)
        version = lb.core.endpoint_set.version
        with Load(stub_of(lb)) as load:
            load.wait_for_calls(50)
            errors = discovery.status.errors
            if fault == "500":
                server.fail_next(6, status=500, body="rpc error making call: No cluster leader")
            else:
                server.garbage_next(6)
            wait_until(lambda: discovery.status.errors >= errors + 6, what="six failed queries")
            assert picker_addresses(lb) == every
            wait_until(lambda: not discovery.status.stale, what="a good answer again")
            load.wait_for_calls(100)
        assert load.errors == []
        assert {a for a, n in load.served.items() if n > 0} == every
        assert lb.core.endpoint_set.version == version  # no set was published by the faults
        assert events.of(EventKind.REMOVED) == [] and set(events.of(EventKind.ADDED)) == every
        assert lb.calls_retried == 0


def test_a_flapping_instance_costs_the_others_no_call(consul: Consul, make_servers: MakeServers) -> None:
    stable = make_servers(3)
    flapper = make_servers(1)[0]
    for i, s in enumerate(stable):
        consul.register(f"s{i}", s)
    with lbkit.Balancer(consul.discovery()) as lb:
        lb.wait_ready(timeout=SETTLE, count=3)
        with Load(stub_of(lb), threads=3) as load:
            load.wait_for_calls(50)
            start = time.monotonic()
            flaps = 0
            while flaps < 60 and time.monotonic() - start < 3.0:
                consul.register("flap", flapper)
                time.sleep(0.01)
                consul.deregister("flap")
                time.sleep(0.01)
                flaps += 1
            consul.register("flap", flapper)  # the final state: registered
            every = {s.address for s in [*stable, flapper]}
            wait_until(lambda: picker_addresses(lb) == every, 3.0, "the final set", lb.endpoint_states)
            load.wait_for_calls(100)
        assert flaps >= 10, "the flapping loop was too slow to test anything"
        assert load.errors == []
        assert all(load.served[s.address] > 100 for s in stable)
        assert set(lb.core.endpoint_set.by_address) == every == consul.catalog()
        assert served_by(stub_of(lb), 40) == dict.fromkeys(every, 10)

        consul.deregister("flap")
        wait_until(lambda: picker_addresses(lb) == every - {flapper.address}, what="flapper gone")
        wait_until(lambda: flapper.address not in lb.members, what="flapper's channel closed")
        assert set(lb.members) == {s.address for s in stable}


# --- ACL token ------------------------------------------------------------------------------------------


def test_acl_token_works_and_never_shows(
    acl_consul: Consul, make_servers: MakeServers, caplog: pytest.LogCaptureFixture
) -> None:
    token = acl_consul.token
    assert token
    a, b = make_servers(2)
    with caplog.at_level(logging.DEBUG):
        acl_consul.register("a", a)
        reg = acl_consul.registration("b", b, check=TtlCheck(ttl=30.0))
        discovery = acl_consul.discovery()
        with lbkit.Balancer(discovery) as lb:
            lb.wait_ready(timeout=SETTLE, count=2)
            assert set(served_by(stub_of(lb), 10)) == {a.address, b.address}
            shown = [repr(discovery), repr(lb), repr(discovery.options), repr(reg), str(discovery.status)]
            shown += [repr(lb.options), repr(discovery.connection)]

        # A wrong token: refused, logged as such, without either token.
        wrong = acl_consul.discovery(token="wrong-" + token)
        with lbkit.Balancer(wrong, wait_timeout=0.2) as bad:
            wait_until(lambda: wrong.status.errors >= 2, what="refused queries")
            with pytest.raises(lbkit.NoEndpointsError):
                stub_of(bad).Predict(REQ, timeout=1)
            shown += [repr(wrong), repr(bad), wrong.status.last_error]
    refused = [
        r for r in caplog.records if r.levelno == logging.ERROR and "ACL token refused" in r.getMessage()
    ]
    assert refused
    for text in [caplog.text, *shown]:
        assert token not in text
    for record in caplog.records:  # the arguments too, should a handler format them otherwise
        assert token not in repr(record.args) and token not in str(record.msg)
    if acl_consul.server is not None:
        gets = [r for r in acl_consul.server.requests if r.path == f"/v1/health/service/{acl_consul.service}"]
        assert gets and all(token not in str(r.query) for r in gets)  # only ever a header
