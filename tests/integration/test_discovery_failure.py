"""A discovery loop that dies at start is loud: in its status, as an event, and in the errors of calls and
of wait_ready, which fails at once instead of waiting out its timeout (sync and asyncio alike).

The failing discovery raises what py-consul 1.7 raised for an argument it did not know: a dependency older
than lbkit needs kills the loop the same way.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
import pytest

import lbkit
import lbkit.aio
from lbkit.discovery.base import Discovery, DiscoveryStatus, OnUpdate
from lbkit.errors import DiscoveryError, NoEndpointsError
from lbkit.events import Event, EventKind
from lbkit.testing import FakeClock
from tests.integration.conftest import pb2, pb2_grpc

CAUSE = "Consul.__init__() got an unexpected keyword argument 'connections_timeout'"


class BrokenDiscovery(Discovery):
    """A discovery whose loop raises as soon as it starts."""

    def __init__(self) -> None:
        self.service = "models"
        self.status = DiscoveryStatus()
        self.runs = 0

    def run(self, on_update: OnUpdate, stop: threading.Event) -> None:
        self.runs += 1
        raise TypeError(CAUSE)

    async def arun(self, on_update: OnUpdate) -> None:
        self.runs += 1
        raise TypeError(CAUSE)


def _check_status_and_events(discovery: BrokenDiscovery, events: list[Event]) -> None:
    assert discovery.runs == 1
    assert discovery.status.stopped == f"discovery stopped: TypeError: {CAUSE}"
    assert discovery.status.stale and discovery.status.last_error == discovery.status.stopped
    errors = [e for e in events if e.kind is EventKind.DISCOVERY_ERROR]
    assert len(errors) == 1
    assert f"discovery stopped: TypeError: {CAUSE}" in errors[0].reason


def _check_call_error(exc: BaseException) -> None:
    assert isinstance(exc, NoEndpointsError) and isinstance(exc, grpc.RpcError)
    assert exc.code() is grpc.StatusCode.UNAVAILABLE
    assert "no endpoints known" in exc.details() and f"TypeError: {CAUSE}" in exc.details()


def test_a_dead_discovery_thread_is_loud() -> None:
    discovery, events = BrokenDiscovery(), []
    # On a clock that never moves, wait_ready could only end by seeing that discovery is dead.
    with lbkit.Balancer(discovery, on_event=events.append, clock=FakeClock()) as lb:
        raised: list[BaseException] = []

        def wait() -> None:
            try:
                lb.wait_ready(timeout=30.0)
            except BaseException as exc:
                raised.append(exc)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(timeout=10.0)
        assert not waiter.is_alive(), "wait_ready kept waiting for a discovery that had died"
        _check_call_error(raised[0])
        assert isinstance(raised[0].__cause__, DiscoveryError)
        assert isinstance(raised[0].__cause__.__cause__, TypeError)
        _check_status_and_events(discovery, events)
        assert discovery.status.error is raised[0].__cause__

    with lbkit.Balancer(BrokenDiscovery(), wait_timeout=0.2) as lb:
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb2.PredictRequest(), timeout=0.2)
        _check_call_error(info.value)


async def test_a_dead_discovery_task_is_loud() -> None:
    discovery, events = BrokenDiscovery(), []
    async with lbkit.aio.Balancer(discovery, on_event=events.append, clock=FakeClock()) as lb:
        with pytest.raises(NoEndpointsError) as info:
            await asyncio.wait_for(lb.wait_ready(timeout=30.0), 10.0)
        _check_call_error(info.value)
        assert isinstance(info.value.__cause__, DiscoveryError)
        _check_status_and_events(discovery, events)

    async with lbkit.aio.Balancer(BrokenDiscovery(), wait_timeout=0.2) as lb:
        stub: Any = pb2_grpc.ModelServiceStub(lb.channel())
        with pytest.raises(grpc.RpcError) as call_info:
            await stub.Predict(pb2.PredictRequest(), timeout=0.2)
        _check_call_error(call_info.value)
