"""Objects CPython's cyclic collector tracks per endpoint in lbkit's own per-endpoint structures.

A full collection walks every tracked object of the process: with ten thousand endpoints, each object an
endpoint keeps is ten thousand more for every full collection (the event loop's longest stalls). These
count ``gc.get_objects()`` after ``gc.collect()`` (which also untracks tuples of atoms), so they are exact.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from lbkit._connectivity import PollSchedule
from lbkit.core import BalancerCore
from lbkit.discovery.consul_parse import HealthDecoder
from lbkit.endpoint import Endpoint, EndpointSet
from lbkit.selectors.round_robin import RoundRobin
from lbkit.stats import Stats
from lbkit.testing.clock import FakeClock

N = 2_000
ADDRESSES = [f"10.0.{i // 250}.{i % 250 + 1}:50051" for i in range(N)]
SLACK = 0.02
"""Objects per endpoint allowed above the count (fixed ones: a dict, a list, a picker's tuples)."""


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """No log records kept by a capturing handler while counting (the core logs each endpoint's events)."""
    logger = logging.getLogger("lbkit")
    was = logger.disabled
    logger.disabled = True
    yield
    logger.disabled = was


def tracked_per_endpoint(make: Callable[[], object]) -> float:
    """Tracked objects that ``make()`` leaves alive (what it returns, kept meanwhile), per endpoint."""
    gc.collect()
    before = len(gc.get_objects())
    kept = make()
    gc.collect()
    after = len(gc.get_objects())
    del kept
    return (after - before) / N


def test_a_watched_channel_costs_the_poll_schedule_its_watch_only() -> None:
    channel = object()  # one for all: the channels are grpc's cost, not the schedule's

    def on_state(key: Any, state: grpc.ChannelConnectivity) -> None:
        pass

    def watch_all() -> PollSchedule:
        schedule = PollSchedule(read=lambda _channel, _connect: grpc.ChannelConnectivity.READY)
        for address in ADDRESSES:
            schedule.watch(address, channel, on_state, 0.0, trusted=True)
        schedule.hint(ADDRESSES[0], 0.0)  # a stale heap entry, as a failed call leaves
        for now in (0.0, 0.5, 30.0):  # the first reads, then reads rescheduled
            due = schedule.take_due(now)
            for entry in due:
                schedule.read(entry)
            schedule.reschedule(due, now)
        assert len(schedule) == N and schedule.next_due() is not None
        return schedule

    # The watch; its heap entries are tuples of atoms, and a round's due list holds the watches.
    assert tracked_per_endpoint(watch_all) <= 1 + SLACK


def test_an_endpoints_stats_entry_is_one_object() -> None:
    def entries() -> Stats:
        stats = Stats()
        for address in ADDRESSES:
            stats[address]
        return stats

    assert tracked_per_endpoint(entries) <= 1 + SLACK  # its latency histogram is a slot of the group's


def test_endpoints_with_equal_tags_and_metadata_share_them() -> None:
    def endpoints() -> list[Endpoint]:
        return [
            Endpoint(a, tags=["v1", "gpu"], metadata={"node.consul-version": "1.21.0", "model": "m"})
            for a in ADDRESSES
        ]

    assert tracked_per_endpoint(endpoints) <= 1 + SLACK
    a, b = endpoints()[:2]
    assert a.tags is b.tags and a.metadata is b.metadata
    assert dict(a.metadata) == {"node.consul-version": "1.21.0", "model": "m"}
    reordered = Endpoint(ADDRESSES[0], metadata={"model": "m", "node.consul-version": "1.21.0"})
    assert reordered.metadata == a.metadata and list(reordered.metadata) == ["model", "node.consul-version"]
    other = Endpoint(ADDRESSES[0], tags=["v2"], metadata={"model": "n"})
    assert other.tags == {"v2"} and dict(other.metadata) == {"model": "n"}


def consul_entry(i: int) -> dict[str, Any]:
    """A /v1/health/service entry as Consul writes it, with its node's metadata and a tag."""
    host, port = ADDRESSES[i].rsplit(":", 1)
    return {
        "Node": {"Node": "node-a", "Address": "10.1.0.1", "Meta": {"consul-network-segment": ""}},
        "Service": {"ID": f"s{i}", "Service": "model", "Tags": ["v1"], "Address": host, "Port": int(port)},
        "Checks": [{"CheckID": f"service:s{i}", "Status": "passing"}],
    }


def test_the_consul_decoder_keeps_each_endpoint_and_no_wrapper() -> None:
    body = json.dumps([consul_entry(i) for i in range(N)], separators=(",", ":")).encode()

    def decoded() -> tuple[HealthDecoder, list[Endpoint]]:
        decoder = HealthDecoder("model")
        endpoints = decoder.decode(body)
        assert len(endpoints) == N and decoder.decoded == N
        return decoder, endpoints

    assert tracked_per_endpoint(decoded) <= 1 + SLACK  # the endpoint: tags and metadata shared


def test_the_cores_member_table_costs_three_objects_per_endpoint() -> None:
    endpoints = [Endpoint(a) for a in ADDRESSES]  # made before counting: discovery's, not the core's

    def members() -> BalancerCore:
        core = BalancerCore(RoundRobin(), clock=FakeClock(0.0))
        core.set_endpoints(EndpointSet(endpoints))
        for address in ADDRESSES:
            core.set_ready(address, True)
        assert len(core.picker.endpoints) == N
        return core

    # EndpointState and EndpointStats, and the picker's tables (a few objects in all).
    assert tracked_per_endpoint(members) <= 2 + SLACK
