"""RoundRobin: exact rotation from a random offset; weighting by weight_factor during slow start."""

from __future__ import annotations

from collections import Counter

from lbkit.endpoint import Endpoint
from lbkit.selectors import RoundRobin
from lbkit.stats import Stats

EPS = [Endpoint(f"10.0.0.{i}:50051") for i in range(1, 6)]


def test_exact_rotation() -> None:
    picker = RoundRobin().build(EPS)
    picks = [picker.pick() for _ in range(50)]
    start = EPS.index(picks[0])
    assert picks == [EPS[(start + k) % len(EPS)] for k in range(50)]


def test_start_offset_is_random_per_build() -> None:
    firsts = Counter(RoundRobin().build(EPS).pick() for _ in range(500))
    assert set(firsts) == set(EPS)
    assert max(firsts.values()) < 200  # uniform would give about 100 each


def test_key_is_ignored() -> None:
    picker = RoundRobin().build(EPS)
    first = picker.pick(key="user-1")
    assert picker.pick(key="user-1") != first


def test_slow_start_weights_by_factor() -> None:
    stats = Stats()
    stats[EPS[0].address].weight_factor = 0.25
    picker = RoundRobin().build(EPS, stats)
    counts = Counter(picker.pick() for _ in range(17_000))
    # Shares 0.25 : 1 : 1 : 1 : 1 -> 1000 and 4000 per 17,000.
    assert 800 <= counts[EPS[0]] <= 1200
    for endpoint in EPS[1:]:
        assert 3700 <= counts[endpoint] <= 4300


def test_factors_are_read_at_build_time() -> None:
    stats = Stats()
    picker = RoundRobin().build(EPS, stats)
    stats[EPS[0].address].weight_factor = 0.1
    counts = Counter(picker.pick() for _ in range(500))
    assert all(counts[e] == 100 for e in EPS)
