"""What every selector promises: single endpoint, fair distribution, empty input, safe concurrent rebuilds."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import Counter

import grpc
import pytest

from lbkit.endpoint import Endpoint
from lbkit.errors import ConfigError, NoEndpointsError
from lbkit.selectors import (
    SELECTORS,
    ConsistentHash,
    EmptyPicker,
    LeastConnections,
    PeakEwma,
    Picker,
    RoundRobin,
    Selector,
    Weighted,
    by_name,
)
from lbkit.stats import Stats

ALL: list[Selector] = [*SELECTORS.values(), ConsistentHash(algorithm="ring")]
IDS = [repr(s) for s in ALL]
EPS = [Endpoint(f"10.0.0.{i}:50051", weight=i) for i in range(1, 11)]


@pytest.mark.parametrize("selector", ALL, ids=IDS)
def test_single_endpoint_is_always_chosen(selector: Selector) -> None:
    only = Endpoint("[::1]:50051")
    picker = selector.build([only])
    assert isinstance(picker, Picker)
    assert picker.endpoints == (only,)
    assert {picker.pick() for _ in range(50)} == {only}
    assert {picker.pick(key=f"k{i}") for i in range(50)} == {only}


@pytest.mark.parametrize("selector", ALL, ids=IDS)
def test_empty_input_raises_unavailable(selector: Selector) -> None:
    picker = selector.build([])
    assert isinstance(picker, EmptyPicker)
    with pytest.raises(NoEndpointsError) as caught:
        picker.pick()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("selector", ALL, ids=IDS)
def test_picker_is_a_slotted_snapshot(selector: Selector) -> None:
    picker = selector.build(EPS)
    assert picker.endpoints == tuple(EPS)
    assert not hasattr(picker, "__dict__")
    with pytest.raises(AttributeError):
        picker.extra = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("selector", ALL, ids=IDS)
def test_distribution_over_100k_picks(selector: Selector) -> None:
    picker = selector.build(EPS)
    picks = 100_000
    if isinstance(selector, ConsistentHash):
        rng = random.Random(7)
        counts = Counter(picker.pick(key=rng.randbytes(16)) for _ in range(picks))
        shares = {e: counts[e] / (picks * e.weight / 55) for e in EPS}
        bound = 1.08 if selector.algorithm == "maglev" else 1.5  # weights 1..10: 100..1,000 ring points
        assert max(shares.values()) <= bound and min(shares.values()) >= 2 - bound
        return
    counts = Counter(picker.pick() for _ in range(picks))
    for endpoint in EPS:
        expected = picks * endpoint.weight / 55 if isinstance(selector, Weighted) else picks / len(EPS)
        assert abs(counts[endpoint] - expected) <= 0.05 * expected, (endpoint, counts[endpoint], expected)


@pytest.mark.parametrize("selector", ALL, ids=IDS)
def test_concurrent_picks_during_rebuilds(selector: Selector) -> None:
    if isinstance(selector, ConsistentHash):  # a smaller table keeps rebuilds quick while 8 threads pick
        selector = dataclasses.replace(selector, table_size=1021)
    stats = Stats()
    sets = [EPS[:6], EPS[4:]]
    current: list[Picker] = [selector.build(sets[0], stats)]
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: Counter[Endpoint] = Counter()
    lock = threading.Lock()

    def picker_thread(seed: int) -> None:
        rng = random.Random(seed)
        local: Counter[Endpoint] = Counter()
        try:
            for _ in range(200_000):
                if stop.is_set():
                    break
                picker = current[0]
                endpoint = picker.pick(key=str(rng.random()) if rng.random() < 0.5 else None)
                assert endpoint in picker.endpoints
                entry = stats[endpoint.address]
                entry.finish(entry.start(), ok=True)
                local[endpoint] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        with lock:
            seen.update(local)

    threads = [threading.Thread(target=picker_thread, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for rebuilds in range(1, 11):  # bounded by count, not time: a busy machine makes fewer, slower ones
        current[0] = selector.build(sets[rebuilds % 2], stats)
        time.sleep(0.005)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    assert rebuilds == 10
    assert set(seen) == set(EPS)  # no endpoint of either set lost
    assert stats.total_in_flight == 0


def test_registry() -> None:
    assert set(SELECTORS) == {
        "round_robin",
        "least_connections",
        "weighted",
        "consistent_hash",
        "peak_ewma",
        "weighted_round_robin",
    }
    assert by_name("round_robin") == RoundRobin()
    assert by_name("least_connections") == LeastConnections()
    assert by_name("peak_ewma") == PeakEwma()
    assert by_name("weighted") == Weighted()
    assert by_name("consistent_hash") == ConsistentHash()
    for name, selector in SELECTORS.items():
        assert selector.name == name


@pytest.mark.parametrize("bad", ["roundrobin", "", 3, None])
def test_unknown_name(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"valid names are .*round_robin") as caught:
        by_name(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(caught.value)


def test_flags() -> None:
    assert not RoundRobin.uses_stats and RoundRobin.slow_start
    assert not Weighted.uses_stats and Weighted.slow_start
    assert LeastConnections.uses_stats and LeastConnections.slow_start
    assert PeakEwma.uses_stats and PeakEwma.slow_start
    assert ConsistentHash.uses_stats and not ConsistentHash.slow_start


@pytest.mark.parametrize("cls", [RoundRobin, Weighted, LeastConnections, PeakEwma, ConsistentHash])
def test_options_are_frozen_and_checked(cls: type[Selector]) -> None:
    selector = cls()
    with pytest.raises(AttributeError):
        selector.name = "x"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="bogus"):
        cls(bogus=1)  # type: ignore[call-arg]
    assert cls() == selector and hash(cls()) == hash(selector)
