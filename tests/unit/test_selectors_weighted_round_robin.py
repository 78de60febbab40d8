"""WeightedRoundRobin (gRFC A58) on fake time: weights, blackout, expiration, fallback, update period."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

import lbkit
from lbkit.endpoint import Endpoint
from lbkit.errors import ConfigError
from lbkit.orca import LoadReport
from lbkit.selectors import WeightedRoundRobin, by_name
from lbkit.selectors.weighted_round_robin import WeightedRoundRobinPicker, schedule_weights
from lbkit.stats import Stats

A, B, C = (Endpoint(f"10.0.0.{i}:50051") for i in (1, 2, 3))


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def setup(**options: Any) -> tuple[FakeClock, Stats, WeightedRoundRobin]:
    clock = FakeClock()
    return clock, Stats(clock=clock), WeightedRoundRobin(**options)


def report(
    stats: Stats, endpoint: Endpoint, utilization: float, qps: float = 100.0, eps: float = 0.0
) -> None:
    stats[endpoint.address].record_load(LoadReport(application_utilization=utilization, qps=qps, eps=eps))


def timer(picker: Any, clock: FakeClock) -> None:
    """What a balancer's timer does: refresh the picker when it says it is due."""
    if picker.next_refresh() <= clock.now:
        picker.refresh(clock.now)


def shares(picker: Any, n: int = 6000) -> dict[str, float]:
    counts = Counter(picker.pick().address for _ in range(n))
    return {address: count / n for address, count in counts.items()}


def test_without_reports_it_is_round_robin() -> None:
    _, stats, policy = setup()
    picker = policy.build([A, B, C], stats)
    picks = [picker.pick() for _ in range(300)]
    assert Counter(picks) == {A: 100, B: 100, C: 100}
    assert picks[:3] == picks[3:6]  # an exact rotation
    assert picker.weights == (1.0, 1.0, 1.0)


def test_weights_follow_reports_once_the_blackout_has_passed() -> None:
    clock, stats, policy = setup(blackout_period=10.0, weight_update_period=1.0)
    picker = policy.build([A, B], stats)
    report(stats, A, 0.5)  # weight 100 / 0.5 = 200
    report(stats, B, 0.25)  # weight 400
    clock.now += 9.0
    report(stats, A, 0.5)
    report(stats, B, 0.25)
    assert shares(picker) == {A.address: 0.5, B.address: 0.5}  # still in blackout
    clock.now += 1.0
    timer(picker, clock)  # the update time has come
    assert picker.weights == (200.0, 400.0)
    got = shares(picker)
    assert got[B.address] == pytest.approx(2 / 3, abs=0.01)


def test_blackout_zero_uses_the_first_report_at_once() -> None:
    clock, stats, policy = setup(blackout_period=0.0)
    picker = policy.build([A, B], stats)
    report(stats, A, 0.2)
    report(stats, B, 0.8)
    clock.now += 1.0
    timer(picker, clock)
    assert shares(picker)[A.address] == pytest.approx(0.8, abs=0.01)


def test_weights_change_only_every_update_period() -> None:
    clock, stats, policy = setup(blackout_period=0.0, weight_update_period=2.0)
    report(stats, A, 0.5)
    report(stats, B, 0.5)
    picker = policy.build([A, B], stats)
    assert picker.weights == (200.0, 200.0)
    report(stats, B, 0.125)  # B now weighs 800
    clock.now += 1.9
    timer(picker, clock)
    assert picker.weights == (200.0, 200.0)
    assert picker.next_refresh() == pytest.approx(clock.now + 0.1)
    clock.now += 0.1
    timer(picker, clock)
    assert picker.weights == (200.0, 800.0)


def test_a_pick_never_recomputes_the_weights() -> None:
    clock, stats, policy = setup(blackout_period=0.0, weight_update_period=1.0)
    report(stats, A, 0.5)
    report(stats, B, 0.5)
    picker = policy.build([A, B], stats)
    rows = [stats[A.address], stats[B.address]]
    for st in rows:
        st.load_wanted = False
    report(stats, B, 0.125)
    clock.now += 5.0  # long past the update, and past the time to ask for reports
    for _ in range(10):
        picker.pick()
    assert picker.weights == (200.0, 200.0)  # the timer's work, not the call path's
    assert [st.load_wanted for st in rows] == [False, False]
    picker.refresh()  # on the stats' clock
    assert picker.weights == (200.0, 800.0)


def test_each_endpoint_is_asked_for_a_report_once_shortly_before_each_update() -> None:
    clock, stats, policy = setup(weight_update_period=1.0)
    picker = policy.build([A, B], stats)
    rows = [stats[A.address], stats[B.address]]
    for st in rows:
        st.load_wanted = False  # the first calls answered
    clock.now += 0.5
    timer(picker, clock)
    assert [st.load_wanted for st in rows] == [False, False]
    assert picker.next_refresh() == pytest.approx(clock.now + 0.3)
    clock.now += 0.35  # the last fifth of the period
    timer(picker, clock)
    assert [st.load_wanted for st in rows] == [True, True]
    rows[0].load_wanted = False  # A's next call brought its report
    timer(picker, clock)
    assert [st.load_wanted for st in rows] == [False, True]  # asked once per update
    assert picker.next_refresh() == pytest.approx(clock.now + 0.15)
    clock.now += 0.2
    timer(picker, clock)  # the update
    clock.now += 0.5
    timer(picker, clock)
    assert rows[0].load_wanted is False
    clock.now += 0.35
    timer(picker, clock)
    assert rows[0].load_wanted is True


def test_weights_expire_and_the_blackout_starts_again() -> None:
    clock, stats, policy = setup(blackout_period=5.0, weight_expiration_period=60.0)
    picker = policy.build([A, B], stats)
    report(stats, A, 0.5)
    report(stats, B, 0.25)
    clock.now += 5.0
    timer(picker, clock)
    assert picker.weights == (200.0, 400.0)
    clock.now += 30.0
    report(stats, A, 0.5)  # only A keeps reporting
    clock.now += 30.0  # B's last report is 60 s old
    timer(picker, clock)
    assert picker.weights == (1.0, 1.0)  # one weight left: round robin
    assert stats[B.address].load_usable_since == float("inf")
    report(stats, B, 0.25)  # B reports again: a new blackout
    clock.now += 4.0
    report(stats, A, 0.5)
    timer(picker, clock)
    assert picker.weights == (1.0, 1.0)
    clock.now += 1.0
    timer(picker, clock)
    assert picker.weights == (200.0, 400.0)


def test_an_endpoint_that_rejoins_waits_out_a_new_blackout() -> None:
    clock, stats, policy = setup(blackout_period=5.0)
    policy.build([A, B, C], stats)
    for e in (A, B, C):
        report(stats, e, 0.5)
    clock.now += 5.0
    assert policy.build([A, B, C], stats).weights == (200.0, 200.0, 200.0)
    policy.build([A, B], stats)  # C left the picker (not ready, ejected)
    report(stats, C, 0.1)  # a report that was in flight
    picker = policy.build([A, B, C], stats)
    assert picker.weights == (200.0, 200.0, 200.0)  # C back: mean weight, not its 1000
    report(stats, C, 0.1)
    clock.now += 5.0
    for e in (A, B):
        report(stats, e, 0.5)
    timer(picker, clock)
    assert picker.weights == (200.0, 200.0, 1000.0)


def test_endpoints_without_weights_get_the_mean() -> None:
    _clock, stats, policy = setup(blackout_period=0.0)
    report(stats, A, 1.0)  # 100
    report(stats, B, 1 / 3)  # 300
    picker = policy.build([A, B, C], stats)
    assert picker.weights == pytest.approx((100.0, 300.0, 200.0))
    got = shares(picker, 12_000)
    assert got[C.address] == pytest.approx(1 / 3, abs=0.01)


def test_weights_are_clamped_around_the_mean() -> None:
    high = schedule_weights([1.0] * 99 + [1000.0])  # mean 10.99: the one at 1000 takes 10x that
    assert high is not None and high[-1] == pytest.approx(109.9) and high[0] == 1.0
    low = schedule_weights([100.0] * 9 + [0.001])  # mean 90.0001: the one at 0.001 gets 1 % of it
    assert low is not None and low[-1] == pytest.approx(0.900001) and low[0] == 100.0
    assert schedule_weights([0.0, 100.0, 300.0]) == [200.0, 100.0, 300.0]
    assert schedule_weights([0.0, 5.0]) is None  # one weight: round robin
    assert schedule_weights([0.0, 0.0]) is None


def test_errors_cost_utilization() -> None:
    _clock, stats, policy = setup(blackout_period=0.0, error_utilization_penalty=2.0)
    report(stats, A, 0.5, qps=100.0, eps=25.0)  # 100 / (0.5 + 0.25 * 2) = 100
    report(stats, B, 0.5, qps=100.0)  # 200
    assert policy.build([A, B], stats).weights == (100.0, 200.0)
    no_penalty = WeightedRoundRobin(blackout_period=0.0, error_utilization_penalty=0.0)
    assert no_penalty.build([A, B], stats).weights == (200.0, 200.0)


def test_slow_start_scales_the_weights() -> None:
    _clock, stats, policy = setup(blackout_period=0.0)
    report(stats, A, 0.5)
    report(stats, B, 0.5)
    stats[B.address].weight_factor = 0.25
    picker = policy.build([A, B], stats)
    assert picker.weights == (200.0, 50.0)


def test_endpoint_weights_from_discovery_are_ignored() -> None:
    _, stats, policy = setup()
    heavy = Endpoint("10.0.0.9:50051", weight=8)
    assert shares(policy.build([heavy, A], stats), 600) == {heavy.address: 0.5, A.address: 0.5}


def test_a_refresh_in_progress_never_makes_a_pick_wait() -> None:
    clock, stats, policy = setup(blackout_period=0.0)
    picker = policy.build([A, B], stats)
    assert isinstance(picker, WeightedRoundRobinPicker)
    clock.now += 5.0
    done = threading.Event()
    with picker._lock:  # another thread is recomputing the weights

        def pick() -> None:
            picker.pick()
            done.set()

        thread = threading.Thread(target=pick)
        thread.start()
        assert done.wait(5.0)
    thread.join()


def test_concurrent_picks_during_refreshes_stay_in_proportion() -> None:
    clock, stats, policy = setup(blackout_period=0.0, weight_update_period=0.1)
    report(stats, A, 0.25)  # 400
    report(stats, B, 1.0)  # 100
    picker = policy.build([A, B], stats)
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(5)
    picking = [4]

    def worker() -> None:
        mine = Counter()
        start.wait()
        for _ in range(5000):
            mine[picker.pick().address] += 1
        with lock:
            counts.update(mine)
            picking[0] -= 1

    def refresher() -> None:  # a timer refreshing while the others pick, bounded by count
        start.wait()
        for _ in range(200):
            clock.now += 0.1
            picker.refresh()
            with lock:
                if not picking[0]:
                    return

    threads = [threading.Thread(target=worker) for _ in range(4)] + [threading.Thread(target=refresher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts.values()) == 20_000
    assert counts[A.address] / 20_000 == pytest.approx(0.8, abs=0.02)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("blackout_period", -1.0),
        ("blackout_period", float("nan")),
        ("weight_expiration_period", 0.0),
        ("weight_update_period", 0.05),
        ("weight_update_period", "1s"),
        ("error_utilization_penalty", -0.5),
        ("error_utilization_penalty", float("inf")),
    ],
)
def test_bad_options_raise_config_error_naming_them(option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=option):
        WeightedRoundRobin(**{option: value})


def test_known_by_name_and_exported() -> None:
    assert isinstance(by_name("weighted_round_robin"), WeightedRoundRobin)
    assert lbkit.WeightedRoundRobin is WeightedRoundRobin
    assert WeightedRoundRobin.uses_load_reports and not lbkit.RoundRobin.uses_load_reports
    with pytest.raises(ConfigError, match="unknown option"):
        WeightedRoundRobin(blackout=1.0)  # type: ignore[call-arg]
