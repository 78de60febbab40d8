"""HealthWatcher against real grpc servers on 127.0.0.1 (the asyncio twin reuses these helpers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lbkit.errors import ConfigError
from lbkit.events import Cause
from lbkit.health.active import Backoff, HealthCheck, HealthTracker, HealthWatcher, interpret

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UP = (True, Cause.HEALTH_SERVING)
"""A report of SERVING."""
DOWN = (False, Cause.HEALTH_NOT_SERVING)
"""A report of NOT_SERVING."""

FAST = HealthCheck(timeout=1.0, interval=0.05, backoff_base=0.05, backoff_max=0.2)
"""Short polling and backoff, so tests stay fast."""

PUSH_ONLY = HealthCheck(timeout=1.0, interval=60.0, backoff_base=0.05, backoff_max=0.2)
"""A minute between polls: a report that comes within a test's wait was pushed by ``Watch``."""

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]
"""Reconnect quickly after a server restart."""


class CheckOnlyServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """A health service with ``Check`` only: ``Watch`` answers UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {"": SERVING}
        self.checks = 0

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.checks += 1
        status = self.statuses.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)


class Server:
    """A grpc server on 127.0.0.1: the reference HealthServicer, a given health servicer, or none.

    The reference servicer runs in its blocking mode: in its default non-blocking mode it holds its lock
    while a response is being sent, and a Watch stream that a client cancels meanwhile deadlocks the
    server (the stream's close callback waits for that lock on the thread that would finish the send).
    Tests here cancel streams on purpose. Blocking mode keeps only the latest status per stream, which is
    all a health watcher needs: tests wait for each report before the next change.
    """

    def __init__(self, *, health_service: bool = True, servicer: Any = None, port: int = 0) -> None:
        self.health: Any = None
        if health_service:
            self.health = (
                servicer if servicer is not None else health.HealthServicer(experimental_non_blocking=False)
            )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        if self.health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        assert self.port, "could not bind"
        self.address = f"127.0.0.1:{self.port}"

    def start(self) -> Server:
        self._server.start()
        return self

    def set(self, service: str, status: int) -> None:
        self.health.set(service, status)

    def stop(self) -> None:
        self._server.stop(None).wait(5.0)


class Reports:
    """An ``on_status`` callback that records (serving, cause) and lets a test wait for them."""

    def __init__(self) -> None:
        self.items: list[tuple[bool, Cause]] = []
        self.reasons: list[str] = []
        self.addresses: set[str] = set()
        self._cond = threading.Condition()

    def __call__(self, address: str, serving: bool, cause: Cause, reason: str) -> None:
        with self._cond:
            self.addresses.add(address)
            self.items.append((serving, cause))
            self.reasons.append(reason)
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = 5.0) -> list[tuple[bool, Cause]]:
        """Block until ``count`` reports arrived (or ``timeout``); return them all."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.items) >= count, timeout)
            return list(self.items)

    async def await_count(self, count: int, timeout: float = 5.0) -> list[tuple[bool, Cause]]:
        """The asyncio form of :meth:`wait`: poll every 5 ms."""
        import asyncio

        deadline = time.monotonic() + timeout
        while len(self.items) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return list(self.items)


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def make(**kwargs: Any) -> Server:
        server = Server(**kwargs).start()
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def watch() -> Iterator[Callable[..., tuple[HealthWatcher, Reports]]]:
    """Start a HealthWatcher on a fresh channel; stopped and closed after the test."""
    made: list[tuple[HealthWatcher, grpc.Channel]] = []

    def make(
        address: str, config: HealthCheck = FAST, channel: grpc.Channel | None = None
    ) -> tuple[HealthWatcher, Reports]:
        if channel is None:
            channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        reports = Reports()
        watcher = HealthWatcher(config, channel, address, reports)
        made.append((watcher, channel))
        watcher.start()
        return watcher, reports

    yield make
    for watcher, channel in made:
        watcher.stop()
        channel.close()


# -- the pure parts -------------------------------------------------------------------------------


def test_interpret_only_serving_is_serving() -> None:
    assert interpret(SERVING) == (True, Cause.HEALTH_SERVING, "SERVING")
    assert interpret(NOT_SERVING) == (False, Cause.HEALTH_NOT_SERVING, "NOT_SERVING")
    unknown_service = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    assert interpret(unknown_service) == (False, Cause.HEALTH_SERVICE_UNKNOWN, "SERVICE_UNKNOWN")
    assert interpret(health_pb2.HealthCheckResponse.UNKNOWN) == (False, Cause.HEALTH_UNKNOWN, "UNKNOWN")
    assert interpret(42) == (False, Cause.HEALTH_UNKNOWN, "status 42")


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    import random

    backoff = Backoff(1.0, 5.0, random.Random(7))
    delays = [backoff.next() for _ in range(6)]
    for delay, nominal in zip(delays, [1.0, 2.0, 4.0, 5.0, 5.0, 5.0], strict=True):
        assert 0.8 * nominal <= delay <= min(5.0, 1.2 * nominal)
    backoff.reset()
    assert backoff.next() <= 1.2


def test_tracker_keeps_last_status_through_errors_and_backs_off() -> None:
    reports = Reports()
    tracker = HealthTracker(HealthCheck(backoff_base=1.0, backoff_max=8.0), "a:1", reports)
    tracker.on_message(SERVING)
    first = tracker.on_watch_end(grpc.StatusCode.UNAVAILABLE)
    second = tracker.on_watch_end(grpc.StatusCode.UNAVAILABLE)
    assert 0.8 <= first <= 1.2 and 1.6 <= second <= 2.4
    tracker.on_message(SERVING)  # an answer resets the backoff
    assert tracker.on_watch_end(None) <= 1.2
    assert tracker.on_watch_end(grpc.StatusCode.UNIMPLEMENTED) == 0.0 and tracker.polling
    assert tracker.on_check(None, grpc.StatusCode.DEADLINE_EXCEEDED) == tracker.config.interval
    assert reports.items == [UP]
    tracker.on_check(None, grpc.StatusCode.NOT_FOUND)
    assert reports.items[-1] == (False, Cause.HEALTH_SERVICE_UNKNOWN)


def test_tracker_survives_a_failing_callback_and_goes_quiet_when_disabled(caplog: Any) -> None:
    def boom(address: str, serving: bool, cause: Cause, reason: str) -> None:
        raise RuntimeError("callback broke")

    tracker = HealthTracker(HealthCheck(), "a:1", boom)
    tracker.on_message(SERVING)
    assert "callback failed for a:1" in caplog.text
    reports = Reports()
    quiet = HealthTracker(HealthCheck(), "a:1", reports)
    quiet.enabled = False
    quiet.on_message(NOT_SERVING)
    assert reports.items == []


def test_health_check_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="unimplemented"):
        HealthCheck(unimplemented="maybe")
    with pytest.raises(ConfigError, match="backoff_max"):
        HealthCheck(backoff_base=2.0, backoff_max=1.0)
    with pytest.raises(ConfigError, match="timeout"):
        HealthCheck(timeout=0)


# -- against servers ------------------------------------------------------------------------------


def test_tracker_reports_only_flips() -> None:
    reports = Reports()
    tracker = HealthTracker(HealthCheck(), "a:1", reports)
    for status in (SERVING, SERVING, NOT_SERVING, NOT_SERVING, health_pb2.HealthCheckResponse.UNKNOWN):
        tracker.on_message(status)
    tracker.on_message(SERVING)
    assert reports.items == [UP, DOWN, UP]  # UNKNOWN after NOT_SERVING is no flip: still not serving


def test_watch_reports_flips_as_they_are_pushed(servers: Any, watch: Any) -> None:
    server = servers()
    _, reports = watch(server.address, PUSH_ONLY)  # no poll in a minute: every report below was pushed
    assert reports.wait(1) == [UP]
    server.set("", NOT_SERVING)
    assert reports.wait(2) == [UP, DOWN]
    server.set("", SERVING)
    assert reports.wait(3) == [UP, DOWN, UP]
    assert reports.addresses == {server.address}


def test_named_service_unknown_then_known(servers: Any, watch: Any) -> None:
    server = servers()
    _, reports = watch(server.address, HealthCheck(service="lbkit.Model", backoff_base=0.05))
    assert reports.wait(1) == [(False, Cause.HEALTH_SERVICE_UNKNOWN)]
    server.set("lbkit.Model", SERVING)
    assert reports.wait(2)[1] == UP


@pytest.mark.parametrize(("unimplemented", "serving"), [("healthy", True), ("unhealthy", False)])
def test_server_without_health_service(servers: Any, watch: Any, unimplemented: str, serving: bool) -> None:
    server = servers(health_service=False)
    _, reports = watch(server.address, HealthCheck(interval=0.05, unimplemented=unimplemented))
    assert reports.wait(1) == [(serving, Cause.HEALTH_UNIMPLEMENTED)]


def test_polls_check_when_watch_is_unimplemented(servers: Any, watch: Any) -> None:
    servicer = CheckOnlyServicer()
    server = servers(servicer=servicer)
    _, reports = watch(server.address)
    assert reports.wait(1) == [UP]
    servicer.statuses[""] = NOT_SERVING
    assert reports.wait(2)[1] == DOWN
    servicer.statuses[""] = SERVING
    assert reports.wait(3)[2] == UP
    assert servicer.checks >= 3


def test_check_not_found_means_service_unknown(servers: Any, watch: Any) -> None:
    server = servers(servicer=CheckOnlyServicer())
    _, reports = watch(server.address, HealthCheck(service="nope", interval=0.05))
    assert reports.wait(1) == [(False, Cause.HEALTH_SERVICE_UNKNOWN)]


def test_reconnects_after_server_restart(servers: Any, watch: Any) -> None:
    first = servers()
    _, reports = watch(first.address)
    assert reports.wait(1) == [UP]
    first.stop()
    second = Server(port=first.port)
    second.set("", NOT_SERVING)
    second.start()
    try:
        assert reports.wait(2) == [UP, DOWN]
        second.set("", SERVING)
        assert reports.wait(3)[2] == UP
    finally:
        second.stop()


def test_stop_returns_promptly_and_reports_nothing_after(servers: Any, watch: Any) -> None:
    server = servers()
    watcher, reports = watch(server.address, PUSH_ONLY)
    control, heard = watch(server.address, PUSH_ONLY)  # a twin left running: it hears what it would have
    assert reports.wait(1) == [UP] and heard.wait(1) == [UP]
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 0.5
    assert not watcher.running  # its thread, the only one that reports, has ended
    server.set("", NOT_SERVING)
    assert heard.wait(2) == [UP, DOWN]
    server.set("", SERVING)
    assert heard.wait(3) == [UP, DOWN, UP]  # both flips were pushed to every open Watch ...
    assert control.running and reports.items == [UP]  # ... and the stopped watcher reported neither


def wait_connecting(channel: grpc.Channel) -> None:
    """Block until ``channel`` has left IDLE: a call on it is waiting for the server."""
    left = threading.Event()

    def seen(state: grpc.ChannelConnectivity) -> None:
        if state is not grpc.ChannelConnectivity.IDLE:
            left.set()

    channel.subscribe(seen)
    try:
        assert left.wait(5.0), "the channel never tried to connect"
    finally:
        channel.unsubscribe(seen)


def test_stop_returns_promptly_while_waiting_for_a_dead_server(servers: Any, watch: Any) -> None:
    server = servers()
    address = server.address
    server.stop()
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    watcher, reports = watch(address, channel=channel)
    wait_connecting(channel)  # the watcher's Watch call waits for the server (wait_for_ready)
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 0.5
    assert not watcher.running
    assert reports.items == []
