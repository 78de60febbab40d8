"""The slow-start weight curve."""

from __future__ import annotations

import math

import pytest

from lbkit.errors import ConfigError
from lbkit.health.slow_start import SlowStart


def test_linear_curve_from_floor_to_full() -> None:
    s = SlowStart(window=10.0, min_weight_percent=10.0)
    assert s.factor(0.0) == 0.1
    assert s.factor(-5.0) == 0.1
    assert s.factor(0.5) == 0.1  # 0.05 is below the floor
    assert s.factor(5.0) == pytest.approx(0.5)
    assert s.factor(9.99) == pytest.approx(0.999)
    assert s.factor(10.0) == 1.0
    assert s.factor(1e9) == 1.0


def test_aggression_bends_the_curve() -> None:
    eager = SlowStart(window=10.0, aggression=2.0, min_weight_percent=1.0)
    shy = SlowStart(window=10.0, aggression=0.5, min_weight_percent=1.0)
    assert eager.factor(5.0) == pytest.approx(math.sqrt(0.5))
    assert shy.factor(5.0) == pytest.approx(0.25)


def test_factor_never_decreases_and_stays_in_bounds() -> None:
    s = SlowStart(window=30.0, min_weight_percent=5.0, aggression=1.5)
    values = [s.factor(t / 10) for t in range(0, 400)]
    assert all(0.05 <= v <= 1.0 for v in values)
    assert values == sorted(values)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"window": 0.0}, "window"),
        ({"min_weight_percent": 0.0}, "min_weight_percent"),
        ({"min_weight_percent": 101.0}, "min_weight_percent"),
        ({"aggression": 0.0}, "aggression"),
        ({"aggression": float("nan")}, "aggression"),
    ],
)
def test_bad_options_raise_config_error(kwargs: dict[str, float], bad: str) -> None:
    with pytest.raises(ConfigError, match=bad):
        SlowStart(**kwargs)
