"""AsyncHealthWatcher against real grpc servers on 127.0.0.1: the twin of test_active_health."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from lbkit.events import Cause
from lbkit.health.active import HealthCheck
from lbkit.health.active_aio import AsyncHealthWatcher
from tests.integration.test_active_health import (
    CHANNEL_OPTIONS,
    DOWN,
    FAST,
    NOT_SERVING,
    PUSH_ONLY,
    SERVING,
    UP,
    CheckOnlyServicer,
    Reports,
    Server,
    servers,
)

__all__ = ["servers"]  # the fixture, shared with the sync tests


@pytest.fixture
async def watch() -> AsyncIterator[Callable[..., tuple[AsyncHealthWatcher, Reports]]]:
    """Start an AsyncHealthWatcher on a fresh aio channel; stopped and closed after the test."""
    made: list[tuple[AsyncHealthWatcher, grpc.aio.Channel]] = []

    def make(
        address: str, config: HealthCheck = FAST, channel: grpc.aio.Channel | None = None
    ) -> tuple[AsyncHealthWatcher, Reports]:
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        reports = Reports()
        watcher = AsyncHealthWatcher(config, channel, address, reports)
        made.append((watcher, channel))
        watcher.start()
        return watcher, reports

    yield make
    for watcher, channel in made:
        await watcher.stop()
        await channel.close()


async def test_watch_reports_flips_as_they_are_pushed(servers: Any, watch: Any) -> None:
    server = servers()
    _, reports = watch(server.address, PUSH_ONLY)  # no poll in a minute: every report below was pushed
    assert await reports.await_count(1) == [UP]
    server.set("", NOT_SERVING)
    assert await reports.await_count(2) == [UP, DOWN]
    server.set("", SERVING)
    assert await reports.await_count(3) == [UP, DOWN, UP]
    assert reports.addresses == {server.address}


async def test_named_service_unknown_then_known(servers: Any, watch: Any) -> None:
    server = servers()
    _, reports = watch(server.address, HealthCheck(service="lbkit.Model", backoff_base=0.05))
    assert await reports.await_count(1) == [(False, Cause.HEALTH_SERVICE_UNKNOWN)]
    server.set("lbkit.Model", SERVING)
    assert (await reports.await_count(2))[1] == UP


@pytest.mark.parametrize(("unimplemented", "serving"), [("healthy", True), ("unhealthy", False)])
async def test_server_without_health_service(
    servers: Any, watch: Any, unimplemented: str, serving: bool
) -> None:
    server = servers(health_service=False)
    _, reports = watch(server.address, HealthCheck(interval=0.05, unimplemented=unimplemented))
    assert await reports.await_count(1) == [(serving, Cause.HEALTH_UNIMPLEMENTED)]


async def test_polls_check_when_watch_is_unimplemented(servers: Any, watch: Any) -> None:
    servicer = CheckOnlyServicer()
    server = servers(servicer=servicer)
    _, reports = watch(server.address)
    assert await reports.await_count(1) == [UP]
    servicer.statuses[""] = NOT_SERVING
    assert (await reports.await_count(2))[1] == DOWN
    servicer.statuses[""] = SERVING
    assert (await reports.await_count(3))[2] == UP
    assert servicer.checks >= 3


async def test_check_not_found_means_service_unknown(servers: Any, watch: Any) -> None:
    server = servers(servicer=CheckOnlyServicer())
    _, reports = watch(server.address, HealthCheck(service="nope", interval=0.05))
    assert await reports.await_count(1) == [(False, Cause.HEALTH_SERVICE_UNKNOWN)]


async def test_reconnects_after_server_restart(servers: Any, watch: Any) -> None:
    first = servers()
    _, reports = watch(first.address)
    assert await reports.await_count(1) == [UP]
    await asyncio.to_thread(first.stop)
    second = Server(port=first.port)
    second.set("", NOT_SERVING)
    second.start()
    try:
        assert await reports.await_count(2) == [UP, DOWN]
        second.set("", SERVING)
        assert (await reports.await_count(3))[2] == UP
    finally:
        await asyncio.to_thread(second.stop)


async def test_stop_returns_promptly_and_reports_nothing_after(servers: Any, watch: Any) -> None:
    server = servers()
    watcher, reports = watch(server.address, PUSH_ONLY)
    control, heard = watch(server.address, PUSH_ONLY)  # a twin left running: it hears what it would have
    assert await reports.await_count(1) == [UP] and await heard.await_count(1) == [UP]
    started = time.monotonic()
    await watcher.stop()
    assert time.monotonic() - started < 0.5
    assert not watcher.running  # its task, the only thing that reports, has ended
    server.set("", NOT_SERVING)
    assert await heard.await_count(2) == [UP, DOWN]
    server.set("", SERVING)
    assert await heard.await_count(3) == [UP, DOWN, UP]  # both flips were pushed to every open Watch ...
    assert control.running and reports.items == [UP]  # ... and the stopped watcher reported neither


async def test_stop_returns_promptly_while_waiting_for_a_dead_server(servers: Any, watch: Any) -> None:
    server = servers()
    address = server.address
    server.stop()
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    watcher, reports = watch(address, channel=channel)
    # The watcher's Watch call waits for the server (wait_for_ready): the channel leaves IDLE for it.
    await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.IDLE), 5.0)
    assert watcher.running
    started = time.monotonic()
    await watcher.stop()
    assert time.monotonic() - started < 0.5
    assert not watcher.running
    assert reports.items == []
