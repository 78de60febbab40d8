"""lbkit.Balancer with ``subset=``: real grpc servers on 127.0.0.1; channels and calls go to the subset
only, and a subset server going down widens the subset without a failed call."""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc

import lbkit
from lbkit.testing import ModelServer
from tests.integration.conftest import pb2, pb2_grpc, served_counts, wait_for

REQ = pb2.PredictRequest(features=[1.0, 2.0])


def preference(subset: lbkit.Subsetting, servers: list[ModelServer]) -> list[str]:
    return [e.address for e in subset.order(lbkit.Endpoint(s.address) for s in servers)]


def test_only_the_subset_gets_channels_and_calls(make_servers):
    servers = make_servers(8)
    subset = lbkit.Subsetting(3, client_id="client-one")
    chosen = {e.address for e in subset.select(lbkit.Endpoint(s.address) for s in servers)}
    with lbkit.Balancer([s.address for s in servers], subset=subset) as lb:
        lb.wait_ready(count=3)
        assert set(lb.members) == chosen == set(lb.endpoint_states())
        stub = pb2_grpc.ModelServiceStub(lb.channel())
        seen = Counter(stub.Predict(REQ, timeout=5).served_by for _ in range(90))
    assert set(seen) == chosen and sorted(seen.values()) == [30, 30, 30]
    assert sum(served_counts(servers)) == 90


def test_deterministic_clients_share_the_servers_evenly(make_servers):
    servers = make_servers(6)
    served: Counter[str] = Counter()
    for index in range(3):
        subset = lbkit.Subsetting(2, algorithm="deterministic", client_index=index, client_count=3)
        with lbkit.Balancer([s.address for s in servers], subset=subset) as lb:
            lb.wait_ready(count=2)
            stub = pb2_grpc.ModelServiceStub(lb.channel())
            served.update(stub.Predict(REQ, timeout=5).served_by for _ in range(10))
    assert sorted(served.values()) == [5] * 6  # three clients of two servers each cover all six once


def test_a_subset_server_going_down_widens_the_subset_and_its_return_narrows_it(make_servers):
    servers = make_servers(6)
    by_address = {s.address: s for s in servers}
    subset = lbkit.Subsetting(2, client_id="client-two")
    order = preference(subset, servers)
    failures: list[grpc.RpcError] = []
    replies: Counter[str] = Counter()
    stop = threading.Event()
    with lbkit.Balancer([s.address for s in servers], subset=subset) as lb:
        lb.wait_ready(count=2)
        stub = pb2_grpc.ModelServiceStub(lb.channel())

        def load() -> None:
            deadline = time.monotonic() + 30.0
            for _ in range(20_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    replies[stub.Predict(REQ, timeout=5).served_by] += 1
                except grpc.RpcError as err:
                    failures.append(err)

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: replies[order[0]] > 10 and replies[order[1]] > 10)
            down = by_address[order[0]]
            down.stop(0)
            # its channel fails to reconnect: the next server in the subset's order takes its place
            wait_for(lambda: replies[order[2]] > 10, timeout=10)
            assert set(lb.core.members) == set(order[:3])  # the down one stays, reconnecting
            down.start()  # same port
            # back: the subset narrows, the extra server drains and closes
            wait_for(lambda: set(lb.core.members) == set(order[:2]), timeout=15)
            wait_for(lambda: order[2] not in lb.members, timeout=5)
            wait_for(lambda: down.calls["Predict"] > 10, timeout=5)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        after = Counter(stub.Predict(REQ, timeout=5).served_by for _ in range(20))
    assert failures == []
    assert set(after) == set(order[:2])
    assert set(replies) == set(order[:3])
    assert all(by_address[a].calls["Predict"] == 0 for a in order[3:])
