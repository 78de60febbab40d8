"""PeakEwma: avoids a measured slow endpoint, gives traffic back as its EWMA decays, probes new ones."""

from __future__ import annotations

from collections import Counter

import pytest

from lbkit.endpoint import Endpoint
from lbkit.errors import ConfigError
from lbkit.selectors import PeakEwma
from lbkit.stats import Stats
from lbkit.testing.clock import FakeClock

EPS = [Endpoint(f"10.0.0.{i}:50051") for i in range(1, 5)]


def test_avoids_slow_endpoint_then_returns_to_it() -> None:
    clock = FakeClock(1000.0)
    stats = Stats(clock=clock)
    slow = EPS[0]
    stats[slow.address].observe(1.0)
    for endpoint in EPS[1:]:
        stats[endpoint.address].observe(0.010)
    picker = PeakEwma().build(EPS, stats)
    counts = Counter(picker.pick() for _ in range(2000))
    assert counts[slow] == 0  # the slow one loses every comparison
    # It recovers: nothing new is measured on it while the others keep answering in 10 ms.
    for _ in range(12):
        clock.now += 5.0
        for endpoint in EPS[1:]:
            stats[endpoint.address].observe(0.010)
    assert stats[slow.address].latency() < 0.005  # 1.0 * exp(-60 / 10)
    counts = Counter(picker.pick() for _ in range(2000))
    assert counts[slow] > 500  # now the cheapest: it wins whenever it is drawn (P = 1/2)


def test_latency_times_in_flight() -> None:
    stats = Stats(clock=FakeClock(1000.0))
    eps = EPS[:2]
    stats[eps[0].address].observe(0.010)
    stats[eps[1].address].observe(0.030)
    picker = PeakEwma().build(eps, stats)
    assert picker.pick() == eps[0]
    for _ in range(3):  # cost 0.010 * 4 > 0.030 * 1
        stats[eps[0].address].start()
    assert picker.pick() == eps[1]


def test_unmeasured_endpoint_is_probed_but_not_flooded() -> None:
    stats = Stats(clock=FakeClock(1000.0))
    eps = EPS[:2]
    stats[eps[0].address].observe(0.010)
    picker = PeakEwma().build(eps, stats)
    assert picker.pick() == eps[1]  # idle and never measured: cost 0, probe it
    stats[eps[1].address].start()
    assert {picker.pick() for _ in range(20)} == {eps[0]}  # its probe is in flight: wait for it


def test_slow_start_divides_cost_by_factor() -> None:
    stats = Stats(clock=FakeClock(1000.0))
    eps = EPS[:2]
    stats[eps[0].address].observe(0.010)
    stats[eps[1].address].observe(0.030)
    stats[eps[0].address].weight_factor = 0.25  # 0.010 / 0.25 = 0.040 > 0.030
    assert PeakEwma().build(eps, stats).pick() == eps[1]


def test_ties_spread() -> None:
    counts = Counter(PeakEwma().build(EPS).pick() for _ in range(4000))
    assert all(800 <= counts[e] <= 1200 for e in EPS)


def test_more_choices_compares_all_small_sets() -> None:
    stats = Stats(clock=FakeClock(1000.0))
    for i, endpoint in enumerate(EPS):
        stats[endpoint.address].observe(0.010 * (i + 1))
    picker = PeakEwma(choices=4).build(EPS, stats)
    assert {picker.pick() for _ in range(50)} == {EPS[0]}
    picker = PeakEwma(choices=3).build(EPS, stats)
    counts = Counter(picker.pick() for _ in range(2000))
    assert counts[EPS[3]] == 0 and 0.65 <= counts[EPS[0]] / 2000 <= 0.85  # EPS[0] drawn with P = 3/4


@pytest.mark.parametrize("bad", [0, -2, 1.5, "x"])
def test_bad_choices(bad: object) -> None:
    with pytest.raises(ConfigError, match="choices"):
        PeakEwma(choices=bad)  # type: ignore[arg-type]
