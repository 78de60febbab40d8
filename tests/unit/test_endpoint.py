"""Endpoints (addresses incl. IPv6, weights, sets, diffs) and per-endpoint stats (in-flight, peak EWMA)."""

from __future__ import annotations

import math
import re
import threading

import pytest

from lbkit.endpoint import Endpoint, EndpointSet, parse_address
from lbkit.errors import ConfigError
from lbkit.stats import Stats
from lbkit.testing.clock import FakeClock


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("10.0.0.1:50051", "10.0.0.1", 50051),
        ("localhost:1", "localhost", 1),
        ("model-7.inference.svc.cluster.local:65535", "model-7.inference.svc.cluster.local", 65535),
        ("[::1]:50051", "::1", 50051),
        ("[2001:db8::42]:443", "2001:db8::42", 443),
    ],
)
def test_parse_address(address: str, host: str, port: int) -> None:
    assert parse_address(address) == (host, port)
    endpoint = Endpoint(address)
    assert (endpoint.host, endpoint.port) == (host, port)


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        ":50051",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:port",
        "::1:50051",
        "[::1]50051",
        "[::1",
        "[not-v6]:80",
        " 10.0.0.1:80",
        "bad host:80",
        "",
        42,
        None,
    ],
)
def test_bad_address_names_it(address: object) -> None:
    with pytest.raises(ConfigError) as caught:
        Endpoint(address)  # type: ignore[arg-type]
    assert repr(address) in str(caught.value)


@pytest.mark.parametrize("weight", [0, -1, 1.5, "2", True, None])
def test_bad_weight_names_it(weight: object) -> None:
    with pytest.raises(ConfigError, match="weight") as caught:
        Endpoint("10.0.0.1:80", weight=weight)  # type: ignore[arg-type]
    assert repr(weight) in str(caught.value)


def test_endpoint_fields() -> None:
    endpoint = Endpoint("10.0.0.1:80", weight=3, zone="eu-1", tags=["gpu", "a100"], metadata={"v": "2"})
    assert endpoint.tags == frozenset({"gpu", "a100"})
    assert dict(endpoint.metadata) == {"v": "2"}
    with pytest.raises(TypeError):
        endpoint.metadata["v"] = "3"  # type: ignore[index]
    with pytest.raises(AttributeError):
        endpoint.weight = 4  # type: ignore[misc]
    assert hash(endpoint) == hash(Endpoint("10.0.0.1:80"))  # hashed by address
    assert endpoint != Endpoint("10.0.0.1:80")  # equal only when every field is
    assert repr(endpoint) == "Endpoint('10.0.0.1:80', weight=3, zone='eu-1')"


@pytest.mark.parametrize(
    ("field", "value"),
    [("zone", 1), ("tags", "gpu"), ("tags", [1]), ("metadata", {"k": 1}), ("metadata", [])],
)
def test_bad_fields(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field.rstrip("s")):
        Endpoint("10.0.0.1:80", **{field: value})  # type: ignore[arg-type]


def test_set_keeps_order_and_rejects_duplicates() -> None:
    s = EndpointSet(["10.0.0.2:80", Endpoint("10.0.0.1:80", weight=2)], version=7)
    assert [e.address for e in s] == ["10.0.0.2:80", "10.0.0.1:80"]
    assert s.version == 7 and len(s) == 2
    assert "10.0.0.1:80" in s and Endpoint("10.0.0.1:80", weight=2) in s
    assert Endpoint("10.0.0.1:80") not in s  # same address, other weight
    assert s == EndpointSet(list(reversed(s.endpoints)), version=9)
    assert s.by_address["10.0.0.1:80"].weight == 2
    with pytest.raises(ConfigError, match=re.escape("duplicate endpoint address '10.0.0.2:80'")):
        EndpointSet(["10.0.0.2:80", Endpoint("10.0.0.2:80", weight=5)])
    with pytest.raises(ConfigError, match="str"):
        EndpointSet("10.0.0.1:80")
    with pytest.raises(ConfigError, match="42"):
        EndpointSet([42])  # type: ignore[list-item]
    assert len(EndpointSet()) == 0


def test_diff() -> None:
    old = EndpointSet(["10.0.0.1:80", "10.0.0.2:80", Endpoint("10.0.0.3:80", weight=1)])
    new = EndpointSet(["10.0.0.2:80", Endpoint("10.0.0.3:80", weight=4), "10.0.0.4:80"])
    diff = old.diff(new)
    assert [e.address for e in diff.added] == ["10.0.0.4:80"]
    assert [e.address for e in diff.removed] == ["10.0.0.1:80"]
    assert diff.changed == (Endpoint("10.0.0.3:80", weight=4),)
    assert diff and not new.diff(EndpointSet(list(new)))


def test_in_flight_counts() -> None:
    clock = FakeClock(100.0)
    stats = Stats(clock=clock)
    a, b = stats["10.0.0.1:80"], stats["10.0.0.2:80"]
    assert stats["10.0.0.1:80"] is a and "10.0.0.1:80" in stats and stats.get("x:1") is None
    t1, t2 = a.start(), a.start()
    b.start()
    assert (a.in_flight, b.in_flight, stats.total_in_flight) == (2, 1, 3)
    clock.now += 0.5
    a.finish(t1, ok=True)
    a.finish(t2, ok=False)
    assert (a.in_flight, a.successes, a.failures, a.consecutive_failures) == (0, 1, 1, 1)
    assert stats.total_in_flight == 1
    assert a.take_interval() == (1, 1) and a.take_interval() == (0, 0)
    stats.discard("10.0.0.2:80")
    assert stats.total_in_flight == 0 and len(stats) == 1


def test_in_flight_is_exact_under_threads() -> None:
    stats = Stats()
    entry = stats["10.0.0.1:80"]

    def work() -> None:
        for _ in range(2000):
            entry.finish(entry.start(), ok=True)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert entry.in_flight == 0 and stats.total_in_flight == 0 and entry.successes == 16_000


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    clock = FakeClock(100.0)
    stats = Stats(clock=clock, decay=10.0)
    entry = stats["10.0.0.1:80"]
    assert entry.latency() == 0.0
    entry.observe(0.100)
    assert entry.latency() == pytest.approx(0.100)
    entry.observe(0.500)  # a higher sample is taken at once
    assert entry.latency() == pytest.approx(0.500)
    clock.now += 10.0
    assert entry.latency() == pytest.approx(0.500 * math.exp(-1.0))
    entry.observe(0.100)  # a lower one is blended in by the time elapsed
    w = math.exp(-1.0)
    assert entry.latency() == pytest.approx(0.500 * w + 0.100 * (1 - w))
    assert entry.latency(clock.now + 20.0) == pytest.approx(entry.latency() * math.exp(-2.0))


def test_finish_observes_round_trip() -> None:
    clock = FakeClock(100.0)
    stats = Stats(clock=clock)
    entry = stats["10.0.0.1:80"]
    started = entry.start()
    clock.now += 0.250
    entry.finish(started, ok=True)
    assert entry.latency() == pytest.approx(0.250)
    started = entry.start()
    clock.now += 5.0
    entry.finish(started, ok=False, observe_latency=False)
    assert entry.latency() == pytest.approx(0.250 * math.exp(-0.5))  # only decayed: no 5 s sample


@pytest.mark.parametrize("decay", [0, -1.0, float("inf"), "10"])
def test_bad_decay(decay: object) -> None:
    with pytest.raises(ConfigError, match="decay"):
        Stats(decay=decay)  # type: ignore[arg-type]


def test_failure_streak_callback() -> None:
    stats = Stats()
    fired: list[str] = []
    stats.streak_threshold = 3
    stats.on_failure_streak = lambda entry: fired.append(entry.address)
    entry = stats["10.0.0.1:80"]
    for _ in range(5):
        entry.finish(entry.start(), ok=False)
    assert fired == ["10.0.0.1:80"]  # once, when the streak reaches the threshold
