"""ConsulDiscovery against lbkit's test Consul server (and a real agent when CONSUL_HTTP_ADDR is set):
changes wake the blocking query and reach on_update, outages keep the last set, the rate limit holds,
the token travels only as a header, and both loops stop promptly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from lbkit.discovery.consul import ConsulDiscovery
from lbkit.endpoint import EndpointHealth, EndpointSet
from lbkit.testing.consul import ConsulServer, RecordedRequest

TOKEN = "3d1f0c7e-acl-secret-value"
# A change must wake the pending blocking query, not wait for it to time out: the watcher blocks for
# BLOCK seconds, and a change that arrives within WOKE seconds was delivered by the wake-up. How fast
# (tens of ms) is a benchmark goal: python -m benchmarks --only consul_propagation.
BLOCK = 30.0
WOKE = 3.0
SERVICE = "model"
PASSING, CRITICAL = EndpointHealth.PASSING, EndpointHealth.CRITICAL


class Recorder:
    """The on_update callback: every published set with its arrival time."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.sets: list[EndpointSet] = []
        self.times: list[float] = []

    def __call__(self, snapshot: EndpointSet) -> None:
        with self.cond:
            self.sets.append(snapshot)
            self.times.append(time.monotonic())
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[EndpointSet], bool], timeout: float = 3.0) -> float:
        """Block until the latest published set matches; return when it was published."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (self.sets and predicate(self.sets[-1])):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching publish within {timeout}s; last: {self.sets[-1:]}")
                self.cond.wait(left)
            return self.times[-1]

    async def await_for(self, predicate: Callable[[EndpointSet], bool], timeout: float = 3.0) -> float:
        deadline = time.monotonic() + timeout
        while not (self.sets and predicate(self.sets[-1])):
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching publish within {timeout}s; last: {self.sets[-1:]}")
            await asyncio.sleep(0.002)
        return self.times[-1]


def addresses(s: EndpointSet) -> set[str]:
    return set(s.by_address)


def health_of(s: EndpointSet, address: str) -> EndpointHealth | None:
    endpoint = s.by_address.get(address)
    return endpoint.health if endpoint is not None else None


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def server() -> Iterator[ConsulServer]:
    with ConsulServer() as s:
        yield s


@contextlib.contextmanager
def watching(discovery: ConsulDiscovery) -> Iterator[Recorder]:
    """Run ``discovery.run`` in a thread; on exit, stop it and check it returned within a second."""
    recorder = Recorder()
    stop = threading.Event()
    thread = threading.Thread(target=discovery.run, args=(recorder, stop), daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        stop.set()
        thread.join(1.5)
        assert not thread.is_alive(), "run() did not return after stop"


@contextlib.asynccontextmanager
async def awatching(discovery: ConsulDiscovery) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    task = asyncio.create_task(discovery.arun(recorder))
    try:
        yield recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 1.5)


def register(client: Any, sid: str, port: int, *, ttl: bool = False, **kwargs: Any) -> None:
    check = {"CheckID": f"service:{sid}", "Name": "ttl", "TTL": "30s"} if ttl else None
    client.agent.service.register(
        SERVICE, service_id=sid, address="127.0.0.1", port=port, check=check, **kwargs
    )
    if ttl:
        client.agent.check.ttl_pass(f"service:{sid}")


def assert_one_publish_per_change(rec: Recorder) -> None:
    """Each state the test waited for was published once, and nothing in between repeats a set.

    Empty, registered, critical, passing, empty: five changes, and a sixth when the registration was
    seen critical before its first TTL pass. A change undone within the watcher's rate limit is not a
    change (the registration's pass then the test's fail can read as one critical), so four is right too.
    """
    assert 4 <= len(rec.sets) <= 6, rec.sets
    assert all(a != b for a, b in zip(rec.sets, rec.sets[1:], strict=False)), rec.sets
    assert [s.version for s in rec.sets] == sorted(s.version for s in rec.sets)


def discovery(server: ConsulServer, **kwargs: Any) -> ConsulDiscovery:
    options: dict[str, Any] = {"wait": 5.0, "min_interval": 0.01, "backoff_initial": 0.05, "backoff_max": 0.2}
    options.update(kwargs)
    return ConsulDiscovery(SERVICE, address=server.address, env={}, **options)


def health_gets(server: ConsulServer, service: str = SERVICE) -> list[RecordedRequest]:
    return [
        r for r in list(server.requests) if r.method == "GET" and r.path == f"/v1/health/service/{service}"
    ]


# --- sync ------------------------------------------------------------------------------------------


def test_register_ttl_fail_and_deregister_wake_the_watcher(server: ConsulServer) -> None:
    client = server.client()
    with watching(discovery(server, wait=BLOCK)) as rec:
        first = rec.wait_for(lambda s: True)
        assert len(rec.sets[0]) == 0  # the first answer is published even when empty
        assert rec.sets[0].version >= 1
        wait_until(lambda: any("index" in r.query for r in health_gets(server)))  # blocked on the index

        t0 = time.monotonic()
        register(
            client,
            "a",
            7001,
            ttl=True,
            tags=["v1"],
            meta={"zone": "z1"},
            weights={"Passing": 3, "Warning": 1},
        )
        seen = rec.wait_for(lambda s: "127.0.0.1:7001" in s.by_address)
        assert seen - t0 < WOKE and seen > first
        endpoint = rec.sets[-1].by_address["127.0.0.1:7001"]
        assert (endpoint.weight, endpoint.zone, endpoint.tags) == (3, "z1", frozenset({"v1"}))

        # a critical instance stays in the set, marked critical (the balancer leaves it out, or uses it
        # in panic mode)
        t0 = time.monotonic()
        client.agent.check.ttl_fail("service:a")
        assert rec.wait_for(lambda s: health_of(s, "127.0.0.1:7001") is CRITICAL) - t0 < WOKE

        t0 = time.monotonic()
        client.agent.check.ttl_pass("service:a")
        assert rec.wait_for(lambda s: health_of(s, "127.0.0.1:7001") is PASSING) - t0 < WOKE

        t0 = time.monotonic()
        client.agent.service.deregister("a")
        assert rec.wait_for(lambda s: len(s) == 0) - t0 < WOKE
        versions = [s.version for s in rec.sets]
        assert versions == sorted(versions)
        assert_one_publish_per_change(rec)


def test_no_publish_before_wait_without_a_change(server: ConsulServer) -> None:
    register(server.client(), "a", 7001)
    with watching(discovery(server, wait=0.3)) as rec:
        rec.wait_for(lambda s: len(s) == 1)
        before = len(health_gets(server))
        # Three waits run out without a change: each query returned and was re-sent. The watcher
        # publishes an answer before it sends the next query, so a wrong publish would be in by now ...
        wait_until(lambda: len(health_gets(server)) - before >= 3, timeout=5.0)
        assert len(rec.sets) == 1  # ... yet nothing was published again
    blocking = [r for r in health_gets(server) if "index" in r.query]
    assert blocking, "the watcher never sent a blocking query"


def test_consul_restart_keeps_the_last_set_then_recovers(
    server: ConsulServer, caplog: pytest.LogCaptureFixture
) -> None:
    register(server.client(), "a", 7001)
    d = discovery(server)
    with caplog.at_level(logging.INFO, logger="lbkit.discovery"), watching(d) as rec:
        rec.wait_for(lambda s: len(s) == 1)
        server.stop()
        wait_until(lambda: d.status.consecutive_errors >= 2)
        assert d.status.stale and d.status.last_error
        assert all(len(s) == 1 for s in rec.sets)  # never emptied by the outage
        server.start()
        register(server.client(), "b", 7002)
        rec.wait_for(lambda s: addresses(s) == {"127.0.0.1:7001", "127.0.0.1:7002"})
        assert not d.status.stale and d.status.last_success is not None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keeping 1 endpoints" in warnings[0].getMessage()
    assert any("recovered" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


@pytest.mark.parametrize("fault", ["500", "garbage"])
def test_errors_and_garbage_keep_the_last_set(server: ConsulServer, fault: str) -> None:
    client = server.client()
    register(client, "a", 7001)
    d = discovery(server, wait=0.2)
    with watching(d) as rec:
        rec.wait_for(lambda s: len(s) == 1)
        if fault == "500":
            server.fail_next(3, status=500, body="rpc error: No cluster leader")
        else:
            server.garbage_next(3)
        wait_until(lambda: d.status.errors >= 3)
        assert all(addresses(s) == {"127.0.0.1:7001"} for s in rec.sets)
        register(client, "b", 7002)
        rec.wait_for(lambda s: len(s) == 2)
        assert not d.status.stale


def test_a_slow_consul_times_out_keeps_the_last_set_then_recovers(server: ConsulServer) -> None:
    register(server.client(), "a", 7001)
    d = discovery(server, wait=0.2, request_timeout=0.2)
    with watching(d) as rec:
        rec.wait_for(lambda s: len(s) == 1)
        server.set_delay(0.6)  # longer than request_timeout + wait + wait/16
        wait_until(lambda: d.status.consecutive_errors >= 2, timeout=5.0)
        assert "Timeout" in d.status.last_error or "timed out" in d.status.last_error
        assert all(len(s) == 1 for s in rec.sets)
        server.set_delay(0.0)
        register(server.client(), "b", 7002)
        rec.wait_for(lambda s: len(s) == 2, timeout=5.0)
        assert not d.status.stale


def test_a_vanished_service_empties_the_set(server: ConsulServer) -> None:
    client = server.client()
    register(client, "a", 7001)
    with watching(discovery(server)) as rec:
        rec.wait_for(lambda s: len(s) == 1)
        client.agent.service.deregister("a")
        rec.wait_for(lambda s: len(s) == 0)


def test_a_flapping_service_cannot_make_the_watcher_exceed_the_rate_limit(server: ConsulServer) -> None:
    client = server.client()
    min_interval = 0.05
    with watching(discovery(server, min_interval=min_interval)) as rec:
        rec.wait_for(lambda s: True)
        before = len(health_gets(server))
        start = time.monotonic()
        flaps = 0
        while flaps < 300 and (
            time.monotonic() - start < 1.0 or (flaps < 20 and time.monotonic() - start < 10.0)
        ):
            register(client, "flap", 7100)
            client.agent.service.deregister("flap")
            flaps += 1
        register(client, "flap", 7100)
        elapsed = time.monotonic() - start
        queries = len(health_gets(server)) - before
        assert flaps >= 20, "the churn loop was too slow to test anything"
        assert queries <= elapsed / min_interval + 2, (queries, elapsed)
        rec.wait_for(lambda s: addresses(s) == {"127.0.0.1:7100"})  # and it still converges


def test_acl_token_is_sent_as_a_header_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    with ConsulServer(acl_token=TOKEN) as server:
        register(server.client(token=TOKEN), "a", 7001)
        d = ConsulDiscovery(SERVICE, address=server.address, wait=1.0, env={"CONSUL_HTTP_TOKEN": TOKEN})
        with caplog.at_level(logging.DEBUG), watching(d) as rec:
            rec.wait_for(lambda s: len(s) == 1)
        gets = health_gets(server)
        assert gets and all(r.headers.get("X-Consul-Token") == TOKEN for r in gets)
        assert all(TOKEN not in str(r.query) for r in gets)  # never in the query string

        bad = ConsulDiscovery(
            SERVICE, address=server.address, token="wrong-" + TOKEN, backoff_initial=0.05, env={}
        )
        with caplog.at_level(logging.DEBUG), watching(bad) as rec:
            wait_until(lambda: bad.status.errors >= 2)
            assert rec.sets == []
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "lbkit.discovery"]
        assert len(errors) == 1 and "ACL token refused" in errors[0].getMessage()
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(d) and TOKEN not in bad.status.last_error


def test_stop_returns_promptly_while_a_blocking_query_is_pending(server: ConsulServer) -> None:
    d = discovery(server, wait=60.0)
    rec = Recorder()
    stop = threading.Event()
    thread = threading.Thread(target=d.run, args=(rec, stop))
    thread.start()
    rec.wait_for(lambda s: True)
    wait_until(lambda: any("index" in r.query for r in health_gets(server)))
    time.sleep(0.05)
    t0 = time.monotonic()
    stop.set()
    thread.join(2.0)
    assert not thread.is_alive() and time.monotonic() - t0 < 1.0
    assert d.status.errors == 0  # stopping is not an outage


# --- asyncio ---------------------------------------------------------------------------------------


async def blocked_on_the_index(server: ConsulServer) -> None:
    """Return once the watcher has sent a blocking query (one with an index)."""
    while not any("index" in r.query for r in health_gets(server)):
        await asyncio.sleep(0.005)


async def test_async_changes_wake_the_watcher(server: ConsulServer) -> None:
    client = server.client()
    async with awatching(discovery(server, wait=BLOCK)) as rec:
        await rec.await_for(lambda s: True)
        await asyncio.wait_for(blocked_on_the_index(server), 3.0)
        t0 = time.monotonic()
        await asyncio.to_thread(register, client, "a", 7001, ttl=True)
        assert await rec.await_for(lambda s: len(s) == 1) - t0 < WOKE
        t0 = time.monotonic()
        await asyncio.to_thread(client.agent.check.ttl_fail, "service:a")
        assert await rec.await_for(lambda s: health_of(s, "127.0.0.1:7001") is CRITICAL) - t0 < WOKE
        t0 = time.monotonic()
        await asyncio.to_thread(client.agent.check.ttl_pass, "service:a")
        await rec.await_for(lambda s: health_of(s, "127.0.0.1:7001") is PASSING)
        await asyncio.to_thread(client.agent.service.deregister, "a")
        assert await rec.await_for(lambda s: len(s) == 0) - t0 < WOKE
        assert_one_publish_per_change(rec)


async def test_async_consul_restart_keeps_the_last_set_then_recovers(server: ConsulServer) -> None:
    await asyncio.to_thread(register, server.client(), "a", 7001)
    d = discovery(server)
    async with awatching(d) as rec:
        await rec.await_for(lambda s: len(s) == 1)
        await asyncio.to_thread(server.stop)
        for _ in range(300):
            if d.status.consecutive_errors >= 2:
                break
            await asyncio.sleep(0.01)
        assert d.status.stale
        assert all(len(s) == 1 for s in rec.sets)
        await asyncio.to_thread(server.start)
        await asyncio.to_thread(register, server.client(), "b", 7002)
        await rec.await_for(lambda s: len(s) == 2)
        assert not d.status.stale


async def test_async_garbage_keeps_the_last_set(server: ConsulServer) -> None:
    await asyncio.to_thread(register, server.client(), "a", 7001)
    d = discovery(server, wait=0.2)
    async with awatching(d) as rec:
        await rec.await_for(lambda s: len(s) == 1)
        server.garbage_next(2)
        server.fail_next(1, status=503)
        for _ in range(300):
            if d.status.errors >= 3:
                break
            await asyncio.sleep(0.01)
        assert d.status.errors >= 3
        assert all(len(s) == 1 for s in rec.sets)


async def test_async_cancel_while_blocking_closes_the_session(
    server: ConsulServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lbkit.discovery.consul as consul_watch

    sessions: list[Any] = []
    make_session = consul_watch.async_session

    def recording_session(connection: Any) -> Any:
        sessions.append(make_session(connection))
        return sessions[-1]

    monkeypatch.setattr(consul_watch, "async_session", recording_session)
    d = discovery(server, wait=60.0, token=TOKEN)
    rec = Recorder()
    task = asyncio.create_task(d.arun(rec))
    await rec.await_for(lambda s: True)
    for _ in range(200):
        if any("index" in r.query for r in health_gets(server)):
            break
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.02)
    (session,) = sessions
    assert not session.closed
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 1.0
    assert session.closed
    assert d.status.errors == 0
    assert all(r.headers.get("X-Consul-Token") == TOKEN for r in health_gets(server))


# --- a real agent ----------------------------------------------------------------------------------


@pytest.mark.consul_agent
@pytest.mark.skipif(
    not os.environ.get("CONSUL_HTTP_ADDR"), reason="needs a real Consul agent at CONSUL_HTTP_ADDR"
)
def test_real_agent_register_and_deregister_reach_the_watcher() -> None:
    import consul

    service = f"lbkit-test-{uuid.uuid4().hex[:8]}"
    d = ConsulDiscovery(service, wait=5.0, min_interval=0.01)
    client = consul.Consul(host=d.connection.host, port=d.connection.port, scheme=d.connection.scheme)
    client.token = d.connection.token
    try:
        with watching(d) as rec:
            rec.wait_for(lambda s: len(s) == 0, timeout=5.0)
            client.agent.service.register(service, service_id=f"{service}-1", address="127.0.0.1", port=7001)
            rec.wait_for(lambda s: addresses(s) == {"127.0.0.1:7001"}, timeout=5.0)
            client.agent.service.deregister(f"{service}-1")
            rec.wait_for(lambda s: len(s) == 0, timeout=5.0)
    finally:
        client.agent.service.deregister(f"{service}-1")
