"""LeastConnections: P2C over in-flight counts, exact minimum on small sets, random tie-break."""

from __future__ import annotations

from collections import Counter

import pytest

from lbkit.endpoint import Endpoint
from lbkit.errors import ConfigError
from lbkit.selectors import LeastConnections
from lbkit.stats import Stats


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.{i // 250}.{i % 250 + 1}:50051") for i in range(n)]


def load(stats: Stats, endpoint: Endpoint, calls: int) -> None:
    for _ in range(calls):
        stats[endpoint.address].start()


def test_exact_minimum_on_small_set() -> None:
    eps = endpoints(4)
    stats = Stats()
    for endpoint, calls in zip(eps, (3, 1, 2, 5), strict=True):
        load(stats, endpoint, calls)
    picker = LeastConnections().build(eps, stats)
    assert {picker.pick() for _ in range(200)} == {eps[1]}


def test_prefers_lower_in_flight() -> None:
    eps = endpoints(20)
    stats = Stats()
    for endpoint in eps[:10]:
        load(stats, endpoint, 5)
    picker = LeastConnections().build(eps, stats)
    counts = Counter(picker.pick() for _ in range(10_000))
    idle = sum(counts[e] for e in eps[10:])
    # A busy endpoint wins only when paired with another busy one: P = (10/20) * (9/19) ~ 0.237.
    assert 0.72 <= idle / 10_000 <= 0.80


def test_reads_live_stats_without_rebuild() -> None:
    eps = endpoints(3)
    stats = Stats()
    picker = LeastConnections().build(eps, stats)
    load(stats, eps[0], 1)
    load(stats, eps[1], 1)
    assert picker.pick() == eps[2]


@pytest.mark.parametrize("n", [2, 3, 10, 100])
def test_ties_spread_at_concurrency_one(n: int) -> None:
    eps = endpoints(n)
    stats = Stats()
    picker = LeastConnections().build(eps, stats)
    counts: Counter[Endpoint] = Counter()
    for _ in range(200 * n):
        endpoint = picker.pick()
        started = stats[endpoint.address].start()
        stats[endpoint.address].finish(started, ok=True)
        counts[endpoint] += 1
    assert set(counts) == set(eps)
    assert max(counts.values()) < 2 * 200


def test_slow_start_biases_load() -> None:
    eps = endpoints(2)
    stats = Stats()
    stats[eps[0].address].weight_factor = 0.25  # load (0 + 1) / 0.25 = 4
    load(stats, eps[1], 2)  # load (2 + 1) / 1 = 3
    picker = LeastConnections().build(eps, stats)
    assert picker.pick() == eps[1]
    load(stats, eps[1], 2)  # load 5 > 4
    assert picker.pick() == eps[0]


def test_more_choices_picks_among_least() -> None:
    eps = endpoints(10)
    stats = Stats()
    for endpoint in eps[1:]:
        load(stats, endpoint, 1)
    picker = LeastConnections(choices=10).build(eps, stats)
    assert {picker.pick() for _ in range(50)} == {eps[0]}
    picker = LeastConnections(choices=5).build(eps, stats)
    counts = Counter(picker.pick() for _ in range(2000))
    assert 0.45 <= counts[eps[0]] / 2000 <= 0.55  # eps[0] is sampled with P = 5/10


def test_one_choice_is_uniform() -> None:
    eps = endpoints(4)
    stats = Stats()
    load(stats, eps[0], 10)
    counts = Counter(LeastConnections(choices=1).build(eps, stats).pick() for _ in range(4000))
    assert all(800 <= counts[e] <= 1200 for e in eps)


@pytest.mark.parametrize("bad", [0, -1, 2.0, "2", True, None])
def test_bad_choices(bad: object) -> None:
    with pytest.raises(ConfigError, match=repr(bad).replace("(", r"\(")):
        LeastConnections(choices=bad)  # type: ignore[arg-type]
