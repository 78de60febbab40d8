"""ServerLoad on fake time: what it measures per window, what the application sets, what it refuses."""

from __future__ import annotations

import math

import pytest

from lbkit.errors import ConfigError
from lbkit.orca import LoadReport, decode
from lbkit.server import ServerLoad


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_measures_qps_eps_and_utilization_over_each_window() -> None:
    clock = FakeClock()
    load = ServerLoad(capacity=4, window=1.0, clock=clock)
    assert load.figures() == {}  # no window has ended yet
    # Window 1: a call over [0, 0.5], a failed one over [0.5, 0.9], a third from 0.75: 1.15 s busy.
    load.call_started()
    clock.now += 0.5
    load.call_finished(True)
    load.call_started()
    clock.now += 0.25
    load.call_started()
    clock.now += 0.15
    load.call_finished(False)
    clock.now += 0.2
    assert load.figures() == {"qps": 2.0, "eps": 1.0, "application_utilization": pytest.approx(1.15 / 4)}
    # Window 2: the third call runs on until 1.5 s.
    clock.now += 0.4
    load.call_finished(True)
    clock.now += 0.6
    assert load.figures() == {"qps": 1.0, "eps": 0.0, "application_utilization": pytest.approx(0.5 / 4)}


def test_windows_with_nothing_finished_report_what_is_in_progress() -> None:
    clock = FakeClock()
    load = ServerLoad(capacity=2, window=1.0, clock=clock)
    load.call_started()  # a long stream
    clock.now += 3.5
    assert load.figures() == {"qps": 0.0, "eps": 0.0, "application_utilization": 0.5}
    load.call_finished(True)
    clock.now += 1.0
    assert load.figures()["application_utilization"] == pytest.approx(0.25)
    clock.now += 5.0
    assert load.figures() == {"qps": 0.0, "eps": 0.0, "application_utilization": 0.0}


def test_utilization_counts_busy_slots_not_the_queue() -> None:
    clock = FakeClock()
    load = ServerLoad(capacity=2, window=1.0, clock=clock)
    for _ in range(5):  # two served, three waiting for a slot
        load.call_started()
    clock.now += 0.5
    for _ in range(4):  # one left: one slot of two busy
        load.call_finished(True)
    clock.now += 0.5
    assert load.figures() == {"qps": 4.0, "eps": 0.0, "application_utilization": 0.75}
    assert load.in_progress == 1


def test_without_capacity_only_rates_are_measured() -> None:
    clock = FakeClock()
    load = ServerLoad(window=0.5, clock=clock)
    for _ in range(4):
        load.call_started()
        load.call_finished(True)
    clock.now += 0.5
    assert load.figures() == {"qps": 8.0, "eps": 0.0}


def test_set_figures_win_over_measured_and_clear_forgets_them() -> None:
    clock = FakeClock()
    load = ServerLoad(capacity=1, window=1.0, clock=clock)
    load.call_started()
    clock.now += 1.0
    load.set(application_utilization=0.9, named_metrics={"queue_depth": 7})
    load.set(cpu_utilization=0.3, named_metrics={"gpu_utilization": 0.8})
    assert load.report() == LoadReport(
        qps=0.0,
        cpu_utilization=0.3,
        application_utilization=0.9,
        named_metrics={"queue_depth": 7.0, "gpu_utilization": 0.8},
    )
    assert decode(load.encoded()) == load.report()
    load.clear("application_utilization")
    assert load.report().application_utilization == 1.0  # measured again
    load.clear()
    assert load.report() == LoadReport(application_utilization=1.0)


def test_encoded_is_kept_until_the_figures_change() -> None:
    clock = FakeClock()
    load = ServerLoad(window=1.0, clock=clock)
    first = load.encoded()
    assert load.encoded() is first
    load.set(cpu_utilization=0.5)
    second = load.encoded()
    assert second is not first and decode(second).cpu_utilization == 0.5
    clock.now += 1.0  # a window ends: new measured figures
    assert load.encoded() is not second


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cpu_utilization": -1.0},
        {"qps": math.nan},
        {"application_utilization": math.inf},
        {"named_metrics": {"queue_depth": math.nan}},
        {"utilization": {"gpu": -0.5}},
    ],
)
def test_bad_figures_raise_config_error_naming_them(kwargs: dict[str, object]) -> None:
    load = ServerLoad()
    with pytest.raises(ConfigError, match=f"ServerLoad.set: .*{next(iter(kwargs))}"):
        load.set(**kwargs)  # type: ignore[arg-type]
    assert load.figures() == {}


@pytest.mark.parametrize(
    "kwargs",
    [{"capacity": 0}, {"capacity": -2.0}, {"capacity": math.nan}, {"window": 0.0}, {"window": "1"}],
)
def test_bad_options_raise_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        ServerLoad(**kwargs)  # type: ignore[arg-type]


def test_clear_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="unknown figure"):
        ServerLoad().clear("gpu")
