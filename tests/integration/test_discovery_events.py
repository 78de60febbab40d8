"""A Balancer turns discovery outages into events (and stops listening when closed)."""

from __future__ import annotations

import socket

import grpc
import pytest

import lbkit
from lbkit.events import Event, EventKind
from lbkit.testing import ConsulServer
from tests.integration.conftest import pb2, pb2_grpc, wait_for


def test_consul_outage_is_an_event_and_calls_go_on(make_servers):
    server = make_servers(1)[0]
    events: list[Event] = []
    with ConsulServer() as consul:
        consul.client().agent.service.register("models", address="127.0.0.1", port=server.port)
        discovery = lbkit.ConsulDiscovery(
            "models", address=consul.address, wait=1.0, backoff_initial=0.05, backoff_max=0.2
        )
        with lbkit.Balancer(discovery, on_event=events.append) as lb:
            lb.wait_ready()
            stub = pb2_grpc.ModelServiceStub(lb.channel())
            consul.stop()
            wait_for(lambda: any(e.kind is EventKind.DISCOVERY_ERROR for e in events))
            assert stub.Predict(pb2.PredictRequest(), timeout=5).served_by == server.address
            consul.start()
            wait_for(lambda: any(e.kind is EventKind.DISCOVERY_RECOVERED for e in events))
        assert discovery.status.listeners == []  # detached on close
    error = next(e for e in events if e.kind is EventKind.DISCOVERY_ERROR)
    assert "keeping the last 1 endpoints" in error.reason


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed on return: nothing listens there


def test_no_endpoint_because_consul_never_answered_says_so_with_a_typed_cause():
    discovery = lbkit.ConsulDiscovery(
        "models", address=f"127.0.0.1:{_closed_port()}", backoff_initial=0.05, backoff_max=0.2, env={}
    )
    with lbkit.Balancer(discovery, wait_timeout=0.2) as lb:
        wait_for(lambda: discovery.status.error is not None)
        with pytest.raises(lbkit.NoEndpointsError) as info:
            lb.pick(timeout=0.05)
        with pytest.raises(lbkit.NoEndpointsError) as waited:
            lb.wait_ready(timeout=0.05)
        with pytest.raises(grpc.RpcError) as called:
            pb2_grpc.ModelServiceStub(lb.channel()).Predict(pb2.PredictRequest(), timeout=0.2)
    for error in (info.value, waited.value):
        assert type(error) is lbkit.NoEndpointsError
        cause = error.__cause__
        assert isinstance(cause, lbkit.DiscoveryError) and cause.status == 0
        assert "no endpoints known; discovery is failing: ConnectionError" in str(error)
        assert any(isinstance(c, ConnectionRefusedError) for c in _causes(cause))
    assert called.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "discovery is failing" in called.value.details()


def test_a_refused_query_is_a_discovery_error_with_its_http_status_until_consul_answers(make_servers):
    server = make_servers(1)[0]
    with ConsulServer() as consul:
        consul.client().agent.service.register("models", address="127.0.0.1", port=server.port)
        consul.fail_next(3, status=403, body="ACL not found")
        discovery = lbkit.ConsulDiscovery(
            "models", address=consul.address, backoff_initial=0.05, backoff_max=0.1, env={}
        )
        heard: list[tuple[bool, lbkit.DiscoveryError | None]] = []
        discovery.status.listeners.append(lambda s: heard.append((s.stale, s.error)))
        with lbkit.Balancer(discovery) as lb:
            lb.wait_ready()  # after three refusals, the fourth query answers
            assert discovery.status.error is None and discovery.status.errors == 3
    (stale, error), (recovered, cleared) = heard
    assert stale and isinstance(error, lbkit.DiscoveryError)
    assert error.status == 403 and error.__cause__ is None and "ACL not found" in str(error)
    assert not recovered and cleared is None


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain
