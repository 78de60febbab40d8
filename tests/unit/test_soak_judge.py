"""The soak's judgement of its calls: which failures could have succeeded elsewhere, which calls executed
twice, and what was serving when (benchmarks/soak.py), on hand-made records."""

from __future__ import annotations

from typing import Any

from benchmarks.soak import SETTLE, STARVED, Kind, Lag, Records, Truth, _judge


def _noop(stub: Any, md: list[tuple[str, str]], call: Any) -> None:
    raise AssertionError("not called")


LAGS = {False: Lag(), True: Lag()}
KINDS = [Kind("unary", "Predict", True, False, _noop), Kind("bidi", "UpdateFeatures", False, True, _noop)]


def _truth(
    changes: dict[int, list[tuple[float, bool]]], strikes: dict[int, list[tuple[float, float]]]
) -> Truth:
    truth = Truth(3)
    for index, items in changes.items():
        truth.changes[index].extend(items)
    for index, items in strikes.items():
        truth.strikes[index].extend(items)
    return truth


def test_serving_throughout_and_struck() -> None:
    truth = _truth({1: [(10.0, False), (13.0, True)]}, {1: [(10.0, 13.0)]})
    assert truth.serving_throughout(0, 5.0, 20.0)
    assert truth.serving_throughout(1, 5.0, 9.0)
    assert not truth.serving_throughout(1, 9.0, 11.0)  # went down during
    assert not truth.serving_throughout(1, 11.0, 12.0)  # down all along
    assert truth.serving_throughout(1, 13.5, 14.0)
    assert truth.struck(1, 12.0, 12.5) and not truth.struck(1, 13.5, 14.0) and not truth.struck(0, 0.0, 99.0)


def test_truth_set_tracks_overlapping_faults() -> None:
    truth = Truth(2)
    truth.set(0, "hung", True)
    truth.set(0, "deregistered", True)
    truth.set(0, "hung", False)
    assert [serving for _, serving in truth.changes[0]] == [True, False]  # still deregistered
    truth.set(0, "deregistered", False)
    assert [serving for _, serving in truth.changes[0]] == [True, False, True]
    (start, end) = truth.strikes[0][0]
    assert start <= end < float("inf")


def _record(
    records: Records, seq: int, start: float, end: float, ok: bool, code: str = "", responses: int = 0
) -> None:
    records.start[seq], records.end[seq], records.ok[seq] = start, end, ok
    records.responses[seq] = responses
    records.code[seq] = records.code_index(code) if code else 0
    records.sent = max(records.sent, seq + 1)


def test_classification_of_failures_and_duplicates() -> None:
    # Server 0 hangs from t=100 to t=103; servers 1 and 2 serve throughout; server 2 is down from t=200.
    truth = _truth({0: [(100.0, False), (103.0, True)], 2: [(200.0, False)]}, {0: [(100.0, 103.0)]})
    index_of = {"a:0": 0, "a:1": 1, "a:2": 2}
    records = Records(10)
    executed: dict[str, list[tuple[float, str, str]]] = {}
    # seq even: unary (retries on); seq odd: bidi (retries off).
    _record(records, 0, 100.5, 102.5, False, "DEADLINE_EXCEEDED")  # unary hung on 0: could have moved
    executed["c0"] = [(100.5, "Predict", "a:0")]
    _record(records, 1, 100.5, 102.5, False, "DEADLINE_EXCEEDED")  # bidi hung on 0: may not move
    executed["c1"] = [(100.5, "UpdateFeatures", "a:0")]
    _record(records, 3, 50.0, 52.0, False, "UNAVAILABLE")  # bidi that reached no server: could have moved
    _record(records, 4, 100.5, 100.6, False, "UNAVAILABLE", responses=1)  # after a response: may not move
    executed["c4"] = [(100.5, "Predict", "a:0")]
    _record(records, 5, 60.0, 60.1, True)  # bidi executed on two servers
    executed["c5"] = [(60.0, "UpdateFeatures", "a:0"), (60.05, "UpdateFeatures", "a:1")]
    _record(records, 6, 60.0, 60.1, True)  # unary retried: executed twice, retries on
    executed["c6"] = [(60.0, "Predict", "a:0"), (60.05, "Predict", "a:1")]
    _record(records, 7, 60.0, 62.0, False, "DEADLINE_EXCEEDED")  # bidi failed on a healthy server
    executed["c7"] = [(60.0, "UpdateFeatures", "a:1")]
    # The client starved from t=150 to t=151 (a 50 ms sleep woke a second late).
    lag = Lag()
    lag.note(150.0, 151.05, 0.05)
    _record(records, 8, 149.0, 152.0, False, "DEADLINE_EXCEEDED")  # timed out while starved: the run's load
    _record(records, 9, 101.0, 101.5, False, "UNAVAILABLE")  # bidi, no server executed it, 0 hung meanwhile
    records.sent = 10
    data = _judge(KINDS, records, executed, truth, index_of, {}, {}, 0, {False: lag, True: Lag()})
    assert data["kinds"]["unary"] == {
        "method": "Predict",
        "retries": True,
        "calls": 4,
        "failed": 3,
        "avoidable": 1,
        "no_fault": 0,
        "starved": 1,
        "unfinished": 0,
        "twice": 1,
        "p50_ms": 100.0,
        "p99_ms": 100.0,
    }
    bidi = data["kinds"]["bidi"]
    assert bidi["calls"] == 5 and bidi["failed"] == 4 and bidi["avoidable"] == 1 and bidi["twice"] == 1
    assert bidi["no_fault"] == 1 and data["no_fault_codes"] == {"DEADLINE_EXCEEDED": 1}
    assert lag.worst > STARVED and data["client_starved_s"] == 1.1
    goals = data["goals"]
    assert goals["avoidable failures"] == {"value": 2, "goal": "0", "pass": False}
    assert goals["executed twice, retries off"]["value"] == 1  # the retried unary call is not counted
    assert goals["in flight after the run"]["pass"]
    assert goals["RSS growth"]["value"] is None and not goals["RSS growth"]["pass"]  # not measured: no pass
    assert {e["code"] for e in data["avoidable_examples"]} == {"DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert data["avoidable_examples"][0]["struck"] == [0]


def test_no_other_endpoint_serving_means_not_avoidable() -> None:
    # Servers 1 and 2 went down 1 s before the call: within SETTLE, so they do not count as serving.
    t = 300.0
    truth = _truth({1: [(t - 1.0, False)], 2: [(t - SETTLE / 2, False), (t - 0.1, True)]}, {})
    records = Records(2)
    _record(records, 1, t, t + 0.1, False, "UNAVAILABLE")
    data = _judge(KINDS, records, {"c1": [(t, "UpdateFeatures", "a:0")]}, truth, {"a:0": 0}, {}, {}, 0, LAGS)
    assert data["kinds"]["bidi"]["failed"] == 1 and data["kinds"]["bidi"]["avoidable"] == 0
    records = Records(2)
    _record(records, 1, t, 0.0, False)  # never finished: judged as if it ran to its deadline
    data = _judge(
        KINDS,
        records,
        {},
        _truth({}, {}),
        {},
        {},
        {"lb": {"total_in_flight": 0, "endpoints_in_flight": 0}},
        1,
        LAGS,
    )
    assert data["failed_codes"] == {"UNFINISHED": 1}
    assert data["goals"]["in flight after the run"] == {"value": 1, "goal": "0", "pass": False}


def test_growth_is_judged_on_the_client_process_that_grew_most() -> None:
    samples = {
        "sync": {"warm": (100 * 2**20, 10), "end": (101 * 2**20, 10)},
        "asyncio": {"warm": (100 * 2**20, 4), "end": (110 * 2**20, 4)},
    }
    data = _judge(KINDS, Records(1), {}, _truth({}, {}), {}, samples, {}, 0, LAGS)
    assert data["goals"]["RSS growth"] == {"value": 10.0, "goal": "<= 5 %", "pass": False}
    assert data["goals"]["thread growth"] == {"value": 0.0, "goal": "<= 5 %", "pass": True}
    assert data["samples"]["asyncio"]["end"] == {"rss_mb": 110.0, "threads": 4}
