"""The per-endpoint call-latency histogram kept by EndpointStats.finish."""

from __future__ import annotations

import itertools
import threading

import pytest

from lbkit.stats import LATENCY_BUCKETS, Stats
from lbkit.testing.clock import FakeClock


def one_call(stats: Stats, address: str, clock: FakeClock, seconds: float, ok: bool = True) -> None:
    # The clock stands at 0 and the call "started" at -seconds: 0 - -seconds is exact in floating point.
    entry = stats[address]
    assert entry.start() == clock.now == 0.0
    entry.finish(-seconds, ok)


def test_bounds_are_strictly_increasing_and_positive():
    assert all(b > 0 for b in LATENCY_BUCKETS)
    assert all(a < b for a, b in itertools.pairwise(LATENCY_BUCKETS))
    assert LATENCY_BUCKETS[0] <= 0.001, "sub-millisecond loopback calls need a bucket of their own"


def test_each_call_lands_in_the_first_bucket_whose_bound_holds_it():
    clock = FakeClock(0.0)
    stats = Stats(clock=clock)
    # 0.0003 -> bucket 0 (<= 0.0005); 0.001 exactly -> bucket 1 (bounds are inclusive, as Prometheus' le);
    # 0.0011 -> bucket 2 (<= 0.002); 1000 s -> the overflow bucket past the last bound.
    for seconds in (0.0003, 0.001, 0.0011, 1000.0):
        one_call(stats, "a:1", clock, seconds)
    buckets, total = stats["a:1"].latency_histogram()
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    expected = [0] * (len(LATENCY_BUCKETS) + 1)
    expected[0] = expected[1] = expected[2] = expected[-1] = 1
    assert list(buckets) == expected
    assert total == pytest.approx(0.0003 + 0.001 + 0.0011 + 1000.0)


def test_every_bound_is_inclusive():
    clock = FakeClock(0.0)
    stats = Stats(clock=clock)
    for bound in LATENCY_BUCKETS:
        one_call(stats, "a:1", clock, bound)  # a call that took exactly ``bound`` seconds
    entry = stats["a:1"]
    buckets, _ = entry.latency_histogram()
    assert list(buckets) == [1] * len(LATENCY_BUCKETS) + [0]


def test_failed_calls_count_but_unobserved_calls_and_rtt_samples_do_not():
    clock = FakeClock(0.0)
    stats = Stats(clock=clock)
    one_call(stats, "a:1", clock, 0.004, ok=False)
    entry = stats["a:1"]
    entry.start()
    entry.finish(-0.3, True, observe_latency=False)  # e.g. a call that never left the client
    entry.observe(0.2)  # an RTT sample for the EWMA, not a call
    buckets, total = entry.latency_histogram()
    assert sum(buckets) == 1
    assert buckets[LATENCY_BUCKETS.index(0.005)] == 1
    assert total == pytest.approx(0.004)
    assert entry.successes + entry.failures == 2


def test_a_clock_going_backwards_counts_zero_latency():
    clock = FakeClock(0.0)
    stats = Stats(clock=clock)
    entry = stats["a:1"]
    entry.finish(clock.now + 5.0, True)
    buckets, total = entry.latency_histogram()
    assert buckets[0] == 1 and total == 0.0


def test_histogram_copy_is_detached_and_endpoints_are_separate():
    clock = FakeClock(0.0)
    stats = Stats(clock=clock)
    one_call(stats, "a:1", clock, 0.01)
    before, _ = stats["a:1"].latency_histogram()
    one_call(stats, "a:1", clock, 0.01)
    one_call(stats, "b:1", clock, 0.01)
    after, _ = stats["a:1"].latency_histogram()
    assert sum(before) == 1 and sum(after) == 2
    assert sum(stats["b:1"].latency_histogram()[0]) == 1


def test_concurrent_finishes_lose_no_count():
    stats = Stats()
    entry = stats["a:1"]
    threads, per_thread = 4, 2000

    def work() -> None:
        for _ in range(per_thread):
            entry.finish(entry.start(), True)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=10)
    buckets, _ = entry.latency_histogram()
    assert sum(buckets) == threads * per_thread == entry.successes
    assert entry.in_flight == 0


def test_a_discarded_entry_keeps_its_counts_and_its_slot_goes_to_the_next_entry_zeroed():
    clock = FakeClock(0.0)
    stats = Stats(clock=clock)
    one_call(stats, "a:1", clock, 0.01)
    one_call(stats, "b:1", clock, 0.2)
    gone = stats["a:1"]
    started = gone.start()  # a call still in flight when its endpoint is forgotten
    stats.discard("a:1")
    newcomer = stats["c:1"]  # takes the freed slot
    assert sum(newcomer.latency_histogram()[0]) == 0
    gone.finish(started - 1.5, True)  # finishes late: counts for its own endpoint only
    one_call(stats, "c:1", clock, 0.0003)
    gone_buckets, _ = gone.latency_histogram()
    assert sum(gone_buckets) == 2 and gone_buckets[LATENCY_BUCKETS.index(2.0)] == 1
    assert list(newcomer.latency_histogram()[0]) == [1] + [0] * len(LATENCY_BUCKETS)
    assert sum(stats["b:1"].latency_histogram()[0]) == 1
    assert gone.latency_buckets == list(gone_buckets)
