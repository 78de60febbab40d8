"""Outlier detection: streaks, sweeps, the ejection cap, ejection times, decay, deadlines."""

from __future__ import annotations

import random

import grpc
import pytest

from lbkit.errors import ConfigError
from lbkit.events import Cause, Event, EventKind
from lbkit.health.outlier import (
    FailurePercentageEjection,
    OutlierDetection,
    OutlierDetector,
    SuccessRateEjection,
)
from lbkit.stats import EndpointStats, Stats
from lbkit.testing.clock import FakeClock


class FixedRandom(random.Random):
    """An rng whose ``random()`` always returns ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def addrs(n: int) -> list[str]:
    return [f"10.0.0.{i}:50051" for i in range(1, n + 1)]


class Rig:
    """A detector over ``n`` endpoints, a fake clock, and the streak callback wired as the balancer does."""

    def __init__(self, config: OutlierDetection, n: int = 10, rng: random.Random | None = None) -> None:
        self.clock = FakeClock(100.0)
        self.stats = Stats(clock=self.clock)
        self.detector = OutlierDetector(config, self.stats, clock=self.clock, rng=rng or FixedRandom(0.0))
        self.addresses = addrs(n)
        self.events: list[Event] = []
        if config.consecutive_failures is not None:
            self.stats.streak_threshold = config.consecutive_failures
            self.stats.on_failure_streak = self._on_streak

    def _on_streak(self, entry: EndpointStats) -> None:
        event = self.detector.on_failure_streak(entry, self.addresses)
        if event is not None:
            self.events.append(event)

    def calls(self, address: str, ok: int = 0, failed: int = 0) -> None:
        entry = self.stats[address]
        for _ in range(ok):
            entry.finish(entry.start(), True)
        for _ in range(failed):
            entry.finish(entry.start(), False)

    def ejection_length(self, address: str) -> float:
        """Eject ``address`` by a streak now and return how long it stays out."""
        threshold = self.detector.config.consecutive_failures
        assert threshold is not None
        self.calls(address, failed=threshold)
        until = self.detector.ejected_until(address)
        assert until is not None
        return until - self.clock.now

    def return_all(self) -> list[Event]:
        """Move the clock to when the last ejected endpoint is due back and return them all."""
        times = [self.detector.ejected_until(a) for a in self.detector.ejected]
        self.clock.now = max(t for t in times if t is not None)
        events = self.detector.expire()
        assert self.detector.ejected == frozenset()
        return events


STREAK_ONLY = OutlierDetection(consecutive_failures=5, jitter=0.0, interval=1000.0)


# -- configuration --------------------------------------------------------------------------------


def test_failure_codes_accept_any_iterable_and_reject_ok_and_non_codes() -> None:
    cfg = OutlierDetection(failure_codes=[grpc.StatusCode.UNAVAILABLE])
    assert cfg.failure_codes == frozenset({grpc.StatusCode.UNAVAILABLE})
    with pytest.raises(ConfigError, match="OK"):
        OutlierDetection(failure_codes=[grpc.StatusCode.OK])
    with pytest.raises(ConfigError, match="'UNAVAILABLE'"):
        OutlierDetection(failure_codes=["UNAVAILABLE"])
    with pytest.raises(ConfigError, match="iterable"):
        OutlierDetection(failure_codes="UNAVAILABLE")


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"consecutive_failures": 0}, "consecutive_failures"),
        ({"interval": 0}, "interval"),
        ({"base_ejection_time": -1.0}, "base_ejection_time"),
        ({"max_ejection_percent": 101}, "max_ejection_percent"),
        ({"jitter": -0.1}, "jitter"),
        ({"success_rate": 5}, "success_rate"),
        ({"max_ejections": 3}, "max_ejections"),
    ],
)
def test_bad_options_raise_config_error_naming_them(kwargs: dict[str, object], bad: str) -> None:
    with pytest.raises(ConfigError, match=bad):
        OutlierDetection(**kwargs)  # type: ignore[arg-type]


def test_sub_configs_validate() -> None:
    with pytest.raises(ConfigError, match="enforcement_percentage"):
        SuccessRateEjection(enforcement_percentage=150.0)
    with pytest.raises(ConfigError, match="request_volume"):
        FailurePercentageEjection(request_volume=0)
    with pytest.raises(ConfigError, match="threshold"):
        FailurePercentageEjection(threshold=-1.0)


def test_is_failure_follows_failure_codes_and_treats_no_status_as_unavailable() -> None:
    detector = OutlierDetector(OutlierDetection(), Stats())
    assert detector.is_failure(grpc.StatusCode.UNAVAILABLE)
    assert detector.is_failure(None)
    assert not detector.is_failure(grpc.StatusCode.INVALID_ARGUMENT)
    assert not detector.is_failure(grpc.StatusCode.OK)
    narrow = OutlierDetector(OutlierDetection(failure_codes={grpc.StatusCode.INTERNAL}), Stats())
    assert not narrow.is_failure(None)


# -- consecutive failures -------------------------------------------------------------------------


def test_streak_ejects_exactly_at_threshold() -> None:
    rig = Rig(STREAK_ONLY)
    a = rig.addresses[0]
    rig.calls(a, failed=4)
    assert rig.events == [] and not rig.detector.is_ejected(a)
    rig.calls(a, failed=1)
    assert [(e.kind, e.address) for e in rig.events] == [(EventKind.EJECTED, a)]
    assert rig.events[0].cause is Cause.CONSECUTIVE_FAILURES
    assert rig.events[0].reason.startswith("5 consecutive failures")
    assert rig.events[0].time == rig.clock.now
    assert rig.detector.ejected == frozenset({a})


def test_a_success_breaks_the_streak() -> None:
    rig = Rig(STREAK_ONLY)
    a = rig.addresses[0]
    rig.calls(a, failed=4)
    rig.calls(a, ok=1)
    rig.calls(a, failed=4)
    assert not rig.detector.is_ejected(a)


def test_streak_of_an_address_no_longer_current_is_ignored() -> None:
    rig = Rig(STREAK_ONLY)
    entry = rig.stats["10.9.9.9:1"]
    assert rig.detector.on_failure_streak(entry, rig.addresses) is None
    assert rig.detector.ejected == frozenset()


def test_streak_does_nothing_when_consecutive_failures_is_off() -> None:
    rig = Rig(OutlierDetection(consecutive_failures=None))
    entry = rig.stats[rig.addresses[0]]
    assert rig.detector.on_failure_streak(entry, rig.addresses) is None


# -- the ejection cap -----------------------------------------------------------------------------


def test_cap_limits_ejections_to_max_ejection_percent() -> None:
    rig = Rig(OutlierDetection(consecutive_failures=5, max_ejection_percent=20.0, jitter=0.0), n=10)
    for a in rig.addresses[:3]:
        rig.calls(a, failed=5)
    assert rig.detector.ejected == frozenset(rig.addresses[:2])
    # The refused endpoint's streak starts over, so another five failures try again.
    third = rig.addresses[2]
    assert rig.stats[third].consecutive_failures == 0
    rig.return_all()
    rig.calls(third, failed=5)
    assert rig.detector.is_ejected(third)


def test_one_endpoint_may_always_be_ejected() -> None:
    for percent in (10.0, 0.0):
        rig = Rig(OutlierDetection(consecutive_failures=5, max_ejection_percent=percent), n=5)
        rig.calls(rig.addresses[0], failed=5)
        rig.calls(rig.addresses[1], failed=5)
        assert rig.detector.ejected == frozenset({rig.addresses[0]}), percent


def test_cap_counts_only_current_endpoints() -> None:
    rig = Rig(OutlierDetection(consecutive_failures=5), n=5)
    rig.calls(rig.addresses[0], failed=5)
    rig.detector.forget(rig.addresses[0])
    rig.addresses = rig.addresses[1:]
    rig.calls(rig.addresses[0], failed=5)
    assert rig.detector.ejected == frozenset({rig.addresses[0]})


# -- ejection times -------------------------------------------------------------------------------


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    rig = Rig(
        OutlierDetection(consecutive_failures=5, base_ejection_time=10.0, max_ejection_time=25.0, jitter=0.0)
    )
    a = rig.addresses[0]
    lengths = []
    for _ in range(4):
        lengths.append(rig.ejection_length(a))
        rig.return_all()
    assert lengths == [10.0, 20.0, 25.0, 25.0]


def test_cap_is_base_when_max_ejection_time_is_smaller() -> None:
    rig = Rig(
        OutlierDetection(consecutive_failures=5, base_ejection_time=30.0, max_ejection_time=5.0, jitter=0.0)
    )
    a = rig.addresses[0]
    assert rig.ejection_length(a) == 30.0
    rig.return_all()
    assert rig.ejection_length(a) == 30.0


def test_jitter_stretches_ejection_within_bounds() -> None:
    cfg = OutlierDetection(consecutive_failures=5, base_ejection_time=30.0, jitter=0.1)
    assert Rig(cfg, rng=FixedRandom(0.0)).ejection_length(addrs(1)[0]) == 30.0
    assert Rig(cfg, rng=FixedRandom(0.5)).ejection_length(addrs(1)[0]) == pytest.approx(31.5)
    lengths = [Rig(cfg, rng=random.Random(seed)).ejection_length(addrs(1)[0]) for seed in range(50)]
    assert all(30.0 <= x < 33.0 for x in lengths)
    assert len(set(lengths)) > 40


def test_endpoint_returns_exactly_when_its_time_passes_with_a_fresh_streak() -> None:
    rig = Rig(OutlierDetection(consecutive_failures=5, base_ejection_time=30.0, jitter=0.0, interval=1000.0))
    a = rig.addresses[0]
    rig.calls(a, failed=5)
    start = rig.clock.now
    rig.clock.now = start + 29.999
    assert rig.detector.expire() == []
    assert rig.detector.is_ejected(a)
    rig.clock.now = start + 30.0
    (event,) = rig.detector.expire()
    assert (event.kind, event.address, event.time) == (EventKind.RETURNED, a, start + 30.0)
    assert event.cause is Cause.EJECTION_ENDED
    assert not rig.detector.is_ejected(a)
    assert rig.detector.ejected_until(a) is None
    assert rig.stats[a].consecutive_failures == 0
    assert rig.detector.expire() == []
    rig.events.clear()
    rig.calls(a, failed=5)
    assert [e.kind for e in rig.events] == [EventKind.EJECTED]


def test_evaluate_also_returns_endpoints_whose_time_passed() -> None:
    rig = Rig(OutlierDetection(consecutive_failures=5, base_ejection_time=30.0, jitter=0.0, interval=10.0))
    a = rig.addresses[0]
    rig.calls(a, failed=5)
    rig.clock.now += 30.0
    assert [(e.kind, e.address) for e in rig.detector.evaluate(rig.addresses)] == [(EventKind.RETURNED, a)]


# -- multiplier decay -----------------------------------------------------------------------------


def test_multiplier_decays_one_step_per_interval_spent_not_ejected() -> None:
    cfg = OutlierDetection(consecutive_failures=5, base_ejection_time=10.0, jitter=0.0, interval=5.0)
    rig = Rig(cfg)
    a = rig.addresses[0]
    assert rig.ejection_length(a) == 10.0
    rig.clock.now += 5.0
    rig.detector.evaluate(rig.addresses)  # still ejected: no decay
    rig.return_all()
    assert rig.ejection_length(a) == 20.0  # multiplier 2
    rig.return_all()
    rig.clock.now += 5.0
    rig.detector.evaluate(rig.addresses)  # healthy interval: multiplier 2 -> 1
    assert rig.ejection_length(a) == 20.0  # multiplier back to 2
    rig.return_all()
    for _ in range(2):
        rig.clock.now += 5.0
        rig.detector.evaluate(rig.addresses)  # 2 -> 1 -> 0
    assert rig.ejection_length(a) == 10.0


def test_an_endpoint_returned_by_a_sweep_does_not_decay_in_that_sweep() -> None:
    cfg = OutlierDetection(consecutive_failures=5, base_ejection_time=10.0, jitter=0.0, interval=10.0)
    rig = Rig(cfg)
    a = rig.addresses[0]
    rig.calls(a, failed=5)
    rig.clock.now += 10.0
    rig.detector.evaluate(rig.addresses)  # returns a
    assert rig.ejection_length(a) == 20.0


# -- success rate ---------------------------------------------------------------------------------


def sr_rig(n: int = 6, **kwargs: object) -> Rig:
    sr = SuccessRateEjection(**kwargs)  # type: ignore[arg-type]
    return Rig(OutlierDetection(consecutive_failures=None, success_rate=sr, jitter=0.0), n=n)


def test_success_rate_ejects_the_one_bad_endpoint_among_six() -> None:
    rig = sr_rig()
    for a in rig.addresses[:5]:
        rig.calls(a, ok=100)
    bad = rig.addresses[5]
    rig.calls(bad, ok=50, failed=50)
    events = rig.detector.evaluate(rig.addresses)
    assert [(e.kind, e.address) for e in events] == [(EventKind.EJECTED, bad)]
    assert events[0].cause is Cause.SUCCESS_RATE
    assert "success rate 50.0%" in events[0].reason


def test_success_rate_ejects_none_when_endpoints_are_alike() -> None:
    rig = sr_rig()
    for i, a in enumerate(rig.addresses):
        rig.calls(a, ok=95 + i % 3, failed=5 - i % 3)
    assert rig.detector.evaluate(rig.addresses) == []
    for a in rig.addresses:
        rig.calls(a, ok=90, failed=10)
    assert rig.detector.evaluate(rig.addresses) == []


def test_success_rate_needs_minimum_hosts_with_request_volume() -> None:
    rig = sr_rig()
    for a in rig.addresses[:3]:
        rig.calls(a, ok=100)
    rig.calls(rig.addresses[3], ok=10)  # below request_volume: not counted
    rig.calls(rig.addresses[4], ok=0, failed=100)
    assert rig.detector.evaluate(rig.addresses) == []  # only 4 endpoints with volume < minimum_hosts 5
    # Four endpoints can never put one 1.9 deviations below the mean (at most sqrt(3)): use 1.0.
    rig2 = sr_rig(minimum_hosts=4, stdev_factor=1.0)
    for a in rig2.addresses[:3]:
        rig2.calls(a, ok=100)
    rig2.calls(rig2.addresses[4], ok=0, failed=100)
    assert [e.address for e in rig2.detector.evaluate(rig2.addresses)] == [rig2.addresses[4]]


def test_success_rate_skips_an_endpoint_below_request_volume() -> None:
    rig = sr_rig()
    for a in rig.addresses[:5]:
        rig.calls(a, ok=100)
    rig.calls(rig.addresses[5], failed=99)
    assert rig.detector.evaluate(rig.addresses) == []


def test_sweep_takes_the_intervals_counts() -> None:
    rig = sr_rig()
    for a in rig.addresses[:5]:
        rig.calls(a, ok=100)
    rig.calls(rig.addresses[5], ok=50, failed=50)
    rig.stats[rig.addresses[5]].take_interval()  # someone else took them: nothing to judge
    assert rig.detector.evaluate(rig.addresses) == []
    assert all(rig.stats[a].interval_successes == 0 for a in rig.addresses)


def test_success_rate_cap_keeps_out_the_worst_first() -> None:
    sr = SuccessRateEjection(stdev_factor=0.5)
    rig = Rig(OutlierDetection(consecutive_failures=None, success_rate=sr, max_ejection_percent=10.0), n=10)
    for a in rig.addresses[:8]:
        rig.calls(a, ok=100)
    rig.calls(rig.addresses[8], ok=60, failed=40)
    rig.calls(rig.addresses[9], ok=30, failed=70)
    assert [e.address for e in rig.detector.evaluate(rig.addresses)] == [rig.addresses[9]]


# -- failure percentage ---------------------------------------------------------------------------


def fp_rig(n: int = 5, **kwargs: object) -> Rig:
    fp = FailurePercentageEjection(**kwargs)  # type: ignore[arg-type]
    return Rig(
        OutlierDetection(consecutive_failures=None, failure_percentage=fp, max_ejection_percent=50.0), n=n
    )


def test_failure_percentage_ejects_at_or_above_threshold() -> None:
    rig = fp_rig()
    rig.calls(rig.addresses[0], ok=5, failed=45)  # 90 %
    rig.calls(rig.addresses[1], ok=10, failed=40)  # 80 %
    rig.calls(rig.addresses[2], ok=15, failed=85)  # 85 %: at the threshold
    events = rig.detector.evaluate(rig.addresses)
    assert [(e.kind, e.address) for e in events] == [
        (EventKind.EJECTED, rig.addresses[0]),
        (EventKind.EJECTED, rig.addresses[2]),
    ]
    assert {e.cause for e in events} == {Cause.FAILURE_PERCENTAGE}
    assert "failure percentage 90.0%" in events[0].reason


def test_failure_percentage_gates() -> None:
    rig = fp_rig(n=4)  # fewer than minimum_hosts 5
    rig.calls(rig.addresses[0], failed=100)
    assert rig.detector.evaluate(rig.addresses) == []
    rig = fp_rig()
    rig.calls(rig.addresses[0], failed=49)  # below request_volume 50
    assert rig.detector.evaluate(rig.addresses) == []


# -- enforcement ----------------------------------------------------------------------------------


def test_enforcement_percentage_zero_ejects_nothing() -> None:
    sr = SuccessRateEjection(enforcement_percentage=0.0)
    fp = FailurePercentageEjection(enforcement_percentage=0.0)
    rig = Rig(OutlierDetection(consecutive_failures=None, success_rate=sr, failure_percentage=fp), n=6)
    for a in rig.addresses[:5]:
        rig.calls(a, ok=100)
    rig.calls(rig.addresses[5], failed=100)
    assert rig.detector.evaluate(rig.addresses) == []


@pytest.mark.parametrize(("roll", "ejected"), [(0.49, True), (0.51, False)])
def test_enforcement_percentage_rolls_the_rng(roll: float, ejected: bool) -> None:
    fp = FailurePercentageEjection(enforcement_percentage=50.0)
    rig = Rig(OutlierDetection(consecutive_failures=None, failure_percentage=fp), n=5, rng=FixedRandom(roll))
    rig.calls(rig.addresses[0], failed=100)
    assert bool(rig.detector.evaluate(rig.addresses)) is ejected


# -- forget and deadlines -------------------------------------------------------------------------


def test_forget_drops_ejection_and_multiplier() -> None:
    rig = Rig(OutlierDetection(consecutive_failures=5, base_ejection_time=10.0, jitter=0.0))
    a = rig.addresses[0]
    rig.calls(a, failed=5)
    rig.detector.forget(a)
    assert not rig.detector.is_ejected(a)
    assert rig.detector.ejected == frozenset()
    assert rig.detector.expire() == []
    rig.detector.forget("10.9.9.9:1")  # unknown: no error
    assert rig.ejection_length(a) == 10.0  # multiplier started over


def test_next_deadline_is_none_when_nothing_is_on() -> None:
    detector = OutlierDetector(OutlierDetection(consecutive_failures=None), Stats(), clock=FakeClock(100.0))
    assert detector.next_deadline() is None
    assert detector.next_sweep is None


def test_next_deadline_is_the_earliest_of_sweep_and_returns() -> None:
    cfg = OutlierDetection(consecutive_failures=5, base_ejection_time=3.0, jitter=0.0, interval=10.0)
    rig = Rig(cfg)
    start = rig.clock.now
    assert rig.detector.next_deadline() == start + 10.0
    rig.clock.now = start + 1.0
    rig.calls(rig.addresses[0], failed=5)
    assert rig.detector.next_deadline() == start + 4.0
    rig.clock.now = start + 4.0
    assert [e.kind for e in rig.detector.tick(rig.addresses)] == [EventKind.RETURNED]
    assert rig.detector.next_deadline() == start + 10.0
    rig.clock.now = start + 10.5
    assert rig.detector.tick(rig.addresses) == []  # the sweep
    assert rig.detector.next_deadline() == start + 20.5
