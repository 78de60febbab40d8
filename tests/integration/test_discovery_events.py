"""A Balancer turns discovery outages into events (and stops listening when closed)."""

from __future__ import annotations

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
