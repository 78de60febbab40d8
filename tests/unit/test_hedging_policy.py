"""HedgingPolicy validation and the adaptive delay's latency window."""

from __future__ import annotations

import math
import random

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbkit.errors import ConfigError
from lbkit.hedging import HedgingPolicy, LatencyWindow, parse_percentile


def test_defaults_hedge_once_at_the_95th_percentile() -> None:
    policy = HedgingPolicy()
    assert policy.max_attempts == 2 and policy.percentile == 95.0
    assert policy.non_fatal_status_codes == frozenset()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_attempts": 1}, "max_attempts"),
        ({"max_attempts": 6}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"hedging_delay": -0.1}, "hedging_delay"),
        ({"hedging_delay": math.nan}, "hedging_delay"),
        ({"hedging_delay": "p0"}, "hedging_delay"),
        ({"hedging_delay": "p100"}, "hedging_delay"),
        ({"hedging_delay": "p101"}, "hedging_delay"),
        ({"hedging_delay": "95"}, "hedging_delay"),
        ({"hedging_delay": "p-5"}, "hedging_delay"),
        ({"non_fatal_status_codes": grpc.StatusCode.UNAVAILABLE}, "non_fatal_status_codes"),
        ({"non_fatal_status_codes": [grpc.StatusCode.OK]}, "non_fatal_status_codes"),
        ({"non_fatal_status_codes": ["UNAVAILABLE"]}, "non_fatal_status_codes"),
        ({"min_samples": 0}, "min_samples"),
        ({"window": 10, "min_samples": 50}, "window"),
        ({"hedging": 1}, "hedging"),
    ],
)
def test_bad_options_raise_config_error_naming_them(options: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        HedgingPolicy(**options)  # type: ignore[arg-type]


def test_fixed_delay_and_codes_are_kept() -> None:
    policy = HedgingPolicy(
        max_attempts=5, hedging_delay=0.02, non_fatal_status_codes=[grpc.StatusCode.UNAVAILABLE]
    )
    assert policy.percentile is None and policy.hedging_delay == 0.02
    assert policy.non_fatal_status_codes == frozenset({grpc.StatusCode.UNAVAILABLE})


@pytest.mark.parametrize(("text", "value"), [("p95", 95.0), ("p99.9", 99.9), ("p50", 50.0), ("p0.5", 0.5)])
def test_percentiles_parse(text: str, value: float) -> None:
    assert parse_percentile(text) == value


def _nearest_rank(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100.0 * len(ordered)) - 1)]


def test_no_threshold_before_min_samples() -> None:
    window = LatencyWindow(95.0, size=100, min_samples=20)
    for _ in range(19):
        window.record(0.01)
    assert window.threshold == math.inf
    window.record(0.01)
    assert window.threshold == 0.01


@given(
    st.lists(st.floats(min_value=0.0, max_value=10.0, allow_nan=False), min_size=1, max_size=400),
    st.sampled_from([50.0, 90.0, 95.0, 99.0, 99.9]),
)
def test_threshold_is_the_nearest_rank_percentile_of_the_last_window(samples: list[float], q: float) -> None:
    size, every = 100, 10
    window = LatencyWindow(q, size=size, min_samples=1)
    for s in samples:
        window.record(s)
    # Recomputed when the count minus min_samples is a multiple of size // 10: at the last such count.
    last = len(samples) - (len(samples) - 1) % every
    recent = samples[:last][-size:]
    assert window.threshold == _nearest_rank(recent, q)
    assert window.count == len(samples)


def test_old_latencies_leave_the_window() -> None:
    window = LatencyWindow(95.0, size=100, min_samples=10)
    for _ in range(100):
        window.record(1.0)
    assert window.threshold == 1.0
    rng = random.Random(1)
    for _ in range(100):
        window.record(rng.uniform(0.001, 0.002))
    assert window.threshold < 0.002
