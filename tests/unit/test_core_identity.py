"""An endpoint set from discovery hands unchanged instances back as the same objects (the Consul decoder
reuses them); the core then finds them unchanged by identity, without comparing fields, and adopts an
equal new object so the next set's is found by identity too."""

from __future__ import annotations

from typing import Any

import pytest

from lbkit.core import BalancerCore
from lbkit.endpoint import Endpoint, EndpointHealth, EndpointSet
from lbkit.events import EventKind
from lbkit.selectors import RoundRobin
from lbkit.testing.clock import FakeClock

N = 200


def endpoints(**fields: Any) -> list[Endpoint]:
    return [Endpoint(f"10.0.{i // 256}.{i % 256}:50051", zone="a", tags={"gpu"}, **fields) for i in range(N)]


@pytest.fixture
def field_compares(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts Endpoint.__eq__ calls made while the test runs."""
    count = [0]
    original = Endpoint.__eq__

    def counting(self: Endpoint, other: object) -> bool:
        count[0] += 1
        return original(self, other)  # type: ignore[no-any-return]

    monkeypatch.setattr(Endpoint, "__eq__", counting)
    return count


def test_an_update_with_the_same_objects_compares_no_fields(field_compares: list[int]) -> None:
    core = BalancerCore(RoundRobin(), clock=FakeClock())
    same = endpoints()
    core.set_endpoints(EndpointSet(same, 1))
    field_compares[0] = 0
    core.set_endpoints(EndpointSet(same, 2))
    assert field_compares[0] == 0


def test_an_equal_new_object_is_adopted_and_found_by_identity_next_time(field_compares: list[int]) -> None:
    core = BalancerCore(RoundRobin(), clock=FakeClock())
    events: list[Any] = []
    core.add_listener(events.append)
    core.set_endpoints(EndpointSet(endpoints(), 1))
    events.clear()
    fresh = endpoints()  # equal, but new objects (a decoder that decoded the answer whole)
    field_compares[0] = 0
    core.set_endpoints(EndpointSet(fresh, 2))
    assert field_compares[0] == N and events == []  # compared once each, nothing changed
    assert all(core.members[e.address].endpoint is e for e in fresh)
    field_compares[0] = 0
    core.set_endpoints(EndpointSet(fresh, 3))
    assert field_compares[0] == 0


def test_a_changed_instance_is_still_seen() -> None:
    core = BalancerCore(RoundRobin(), clock=FakeClock())
    events: list[Any] = []
    core.add_listener(events.append)
    first = endpoints()
    core.set_endpoints(EndpointSet(first, 1))
    events.clear()
    second = list(first)
    second[7] = Endpoint(first[7].address, zone="a", tags={"gpu"}, health=EndpointHealth.CRITICAL)
    core.set_endpoints(EndpointSet(second, 2))
    assert [(e.kind, e.address) for e in events] == [(EventKind.UNHEALTHY, first[7].address)]
    assert core.members[first[7].address].endpoint is second[7]


def test_endpoints_without_tags_share_one_empty_tag_set() -> None:
    a, b = Endpoint("10.0.0.1:1"), Endpoint("10.0.0.2:1", tags=[])
    assert a.tags is b.tags and a.metadata is b.metadata


def test_equal_sets_in_the_same_order_compare_without_field_compares(field_compares: list[int]) -> None:
    same = endpoints()
    assert EndpointSet(same, 1) == EndpointSet(same, 2)
    assert field_compares[0] == 0
    assert EndpointSet(same, 1) == EndpointSet(list(reversed(same)), 2)  # any order is still equal
    assert EndpointSet(same, 1) != EndpointSet(same[1:], 2)
