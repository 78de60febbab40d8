"""Weighted: smooth interleaving, long-run proportions, slow start, O(1) pickers for any weights."""

from __future__ import annotations

from collections import Counter

import pytest

from lbkit.endpoint import Endpoint
from lbkit.selectors import Weighted
from lbkit.selectors.weighted import AliasPicker, TablePicker, smooth_order, weighted_picker
from lbkit.stats import Stats

A = Endpoint("10.0.0.1:50051", weight=8)
B = Endpoint("10.0.0.2:50051", weight=4)


def test_interleaves_8_to_4() -> None:
    picker = Weighted().build([A, B])
    picks = "".join("A" if picker.pick() == A else "B" for _ in range(30))
    start = picks.index("B")
    assert picks[start : start + 27] == "BAA" * 9  # A A B A A B ... from a random point


def test_smooth_order_period() -> None:
    assert smooth_order([2, 1]) == [0, 1, 0]
    assert smooth_order([1, 1, 1]) == [0, 1, 2]
    assert smooth_order([5, 1, 1], 14) == [0, 0, 0, 1, 2, 0, 0] * 2  # ties go to the lower index
    order = smooth_order([7, 3, 2])
    for prefix in range(1, len(order) + 1):  # every prefix gives each its share to within one turn
        for i, w in enumerate((7, 3, 2)):
            assert abs(order[:prefix].count(i) - prefix * w / 12) <= 1


def test_long_run_proportions() -> None:
    eps = [Endpoint(f"10.0.0.{i}:50051", weight=w) for i, w in enumerate((1, 2, 3, 10), start=1)]
    picker = Weighted().build(eps)
    counts = Counter(picker.pick() for _ in range(16_000))
    assert [counts[e] for e in eps] == [1000, 2000, 3000, 10_000]


def test_random_start_per_build() -> None:
    firsts = Counter(Weighted().build([A, B]).pick() for _ in range(300))
    assert 150 <= firsts[A] <= 250  # two of every three turns are A's


def test_slow_start_scales_weights() -> None:
    stats = Stats()
    stats[A.address].weight_factor = 0.25  # 8 * 0.25 = 2 against 4
    picker = Weighted().build([A, B], stats)
    counts = Counter(picker.pick() for _ in range(30_000))
    assert abs(counts[A] - 10_000) < 100


def test_large_or_fractional_weights_use_alias_sequence() -> None:
    eps = [Endpoint(f"10.0.0.{i}:50051", weight=w) for i, w in enumerate((1, 70_000, 3), start=1)]
    picker = weighted_picker(tuple(eps), [e.weight for e in eps])
    assert isinstance(picker, AliasPicker)
    counts = Counter(picker.pick() for _ in range(5 * 70_004))
    assert abs(counts[eps[1]] - 5 * 70_000) < 10
    assert 3 <= counts[eps[0]] <= 7 and 13 <= counts[eps[2]] <= 17
    assert isinstance(weighted_picker(tuple(eps[:2]), [1, 2]), TablePicker)


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1.0, 2.5, 0.5, 4.0], [1e-3] + [1.0] * 99])
def test_alias_sequence_is_even(weights: list[float]) -> None:
    eps = tuple(Endpoint(f"10.0.1.{i}:50051") for i in range(1, len(weights) + 1))
    picker = AliasPicker(eps, weights)
    total = sum(weights)
    picks = 40_000
    counts = Counter(picker.pick() for _ in range(picks))
    for endpoint, w in zip(eps, weights, strict=True):
        assert abs(counts[endpoint] - picks * w / total) <= max(0.01 * picks * w / total, 4)


def test_pick_is_flat_in_n() -> None:
    eps = [Endpoint(f"10.1.{i // 250}.{i % 250 + 1}:50051", weight=1 + i % 5) for i in range(10_000)]
    picker = Weighted().build(eps)
    assert isinstance(picker, TablePicker)
    counts = Counter(picker.pick() for _ in range(30_000))
    assert counts[eps[4]] == 5 * counts[eps[0]] == 5
