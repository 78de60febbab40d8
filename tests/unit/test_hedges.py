"""The hedging machine on a fake clock: when hedges go, where, what wins, what is cancelled and counted."""

from __future__ import annotations

import grpc
import pytest

from lbkit._attempts import SUCCESS, CallRules, failure
from lbkit._hedges import Hedges
from lbkit.errors import ConfigError
from lbkit.hedging import HedgingPolicy, LatencyWindow
from lbkit.retry import MethodPolicies, RetryPolicy
from tests.unit.test_attempts_properties import Driver, Err

C = grpc.StatusCode


def machine(
    policy: HedgingPolicy, n: int = 4, timeout: float | None = 5.0, tokens: float | None = None
) -> tuple[Driver, Hedges]:
    lb = Driver(n, retry=policy)
    if tokens is not None:
        lb.budget.tokens = tokens
    rules = CallRules(lb, "unary_unary", policy)
    if policy.percentile is not None:
        rules.window = lb.latency_window("/m", policy)
    now = lb.clock()
    return lb, Hedges(rules, None, None if timeout is None else now + timeout, now)


def test_a_hedge_goes_after_the_delay_to_an_untried_endpoint_and_its_win_cancels_the_first() -> None:
    lb, m = machine(HedgingPolicy(max_attempts=3, hedging_delay=0.05))
    first = m.start(m.next())  # type: ignore[arg-type]
    assert m.next() == pytest.approx(lb.clock() + 0.05)  # nothing before the delay
    lb.clock.advance(0.05)  # type: ignore[attr-defined]
    member = m.next()
    assert member is not None and not isinstance(member, float)
    assert member.address != first.member.address
    hedge = m.start(member)
    assert lb.hedges_sent == 1 and lb.budget.tokens == lb.budget.max_tokens - 1
    losers = m.done(hedge, SUCCESS)
    assert losers == [first] and m.winner is hedge
    assert (lb.hedges_won, lb.hedges_cancelled) == (1, 1)
    m.done(first, failure(Err(C.CANCELLED), first.member, cancelled=True))
    stats = lb.stats[first.member.address]
    assert (stats.successes, stats.failures, stats.in_flight) == (0, 0, 0)
    assert lb.stats[hedge.member.address].successes == 1
    assert lb.stats.total_in_flight == 0
    assert m.next() is None


def test_a_loser_that_fails_after_the_win_is_no_failure_of_its_endpoint() -> None:
    lb, m = machine(HedgingPolicy(hedging_delay=0.0))
    first = m.start(m.next())  # type: ignore[arg-type]
    hedge = m.start(m.next())  # type: ignore[arg-type]
    assert m.done(first, SUCCESS) == [hedge]
    m.done(hedge, failure(Err(C.UNAVAILABLE), hedge.member))  # its reset, in the same instant
    assert lb.stats[hedge.member.address].failures == 0
    assert lb.hedges_won == 0 and lb.hedges_cancelled == 1


def test_a_fatal_status_ends_the_call_at_once_and_cancels_the_rest() -> None:
    lb, m = machine(HedgingPolicy(max_attempts=3, hedging_delay=0.0))
    first = m.start(m.next())  # type: ignore[arg-type]
    hedge = m.start(m.next())  # type: ignore[arg-type]
    error = Err(C.INVALID_ARGUMENT)
    assert m.done(hedge, failure(error, hedge.member)) == [first]
    with pytest.raises(Err) as raised:
        m.next()
    assert raised.value is error
    m.done(first, failure(Err(C.CANCELLED), first.member, cancelled=True))
    assert lb.stats.total_in_flight == 0


def test_a_non_fatal_status_sends_the_next_hedge_at_once() -> None:
    lb, m = machine(HedgingPolicy(max_attempts=3, hedging_delay=1.0, non_fatal_status_codes=[C.UNAVAILABLE]))
    first = m.start(m.next())  # type: ignore[arg-type]
    lb.clock.advance(1.0)  # type: ignore[attr-defined]
    hedge = m.start(m.next())  # type: ignore[arg-type]
    assert m.done(hedge, failure(Err(C.UNAVAILABLE), hedge.member)) == []
    third = m.next()  # due now, not a second later
    assert third is not None and not isinstance(third, float)
    assert third.address not in (first.member.address, hedge.member.address)
    last = m.start(third)
    assert m.next() is None  # max_attempts reached
    m.done(first, failure(Err(C.UNAVAILABLE), first.member))
    m.done(last, failure(Err(C.UNAVAILABLE), last.member))
    with pytest.raises(Err):
        m.next()
    assert lb.stats.total_in_flight == 0


def test_a_drained_budget_sends_no_hedge() -> None:
    lb, m = machine(HedgingPolicy(hedging_delay=0.0), tokens=50.0)  # half of 100: throttled
    m.start(m.next())  # type: ignore[arg-type]
    assert m.next() is None
    assert lb.hedges_sent == 0 and lb.budget.refused == 1


def test_no_hedge_is_due_at_or_past_the_deadline() -> None:
    _lb, m = machine(HedgingPolicy(hedging_delay=0.3), timeout=0.3)
    first = m.start(m.next())  # type: ignore[arg-type]
    assert first.timeout == pytest.approx(0.3)
    assert m.next() is None  # the hedge would be due at the deadline


def test_hedges_only_go_to_untried_endpoints() -> None:
    _lb, m = machine(HedgingPolicy(max_attempts=5, hedging_delay=0.0), n=2)
    a = m.start(m.next())  # type: ignore[arg-type]
    b = m.start(m.next())  # type: ignore[arg-type]
    assert a.member.address != b.member.address
    assert m.next() is None  # both endpoints have an attempt: no third on either


def test_a_percentile_delay_falls_back_until_the_window_is_full_enough() -> None:
    policy = HedgingPolicy(hedging_delay="p50", min_samples=10, window=10, fallback_delay=0.7)
    lb, m = machine(policy)
    m.start(m.next())  # type: ignore[arg-type]
    assert m.due == pytest.approx(lb.clock() + 0.7)
    window = lb.latency_windows["/m"]
    for i in range(10):
        window.record(0.01 * (i + 1))
    _, m2 = machine(policy)
    m2.rules.window = window
    m2.start(m2.next())  # type: ignore[arg-type]
    assert m2.due == pytest.approx(m2.lb.clock() + 0.05)


def test_without_a_fallback_nothing_is_hedged_before_the_window_fills() -> None:
    _lb, m = machine(HedgingPolicy(hedging_delay="p95", fallback_delay=None))
    m.start(m.next())  # type: ignore[arg-type]
    assert m.next() is None


def test_the_window_records_the_call_latency_of_a_hedged_win() -> None:
    policy = HedgingPolicy(hedging_delay=0.05)
    lb, m = machine(policy)
    window = m.rules.window = LatencyWindow(95.0, 10, 1)
    first = m.start(m.next())  # type: ignore[arg-type]
    lb.clock.advance(0.05)  # type: ignore[attr-defined]
    hedge = m.start(m.next())  # type: ignore[arg-type]
    lb.clock.advance(0.01)  # type: ignore[attr-defined]
    m.done(hedge, SUCCESS)
    assert window.count == 1 and window.threshold == pytest.approx(0.06)
    m.done(first, failure(Err(C.CANCELLED), first.member, cancelled=True))


def test_method_policies_take_hedging_policies() -> None:
    hedged = HedgingPolicy()
    policies = MethodPolicies({"/pkg.S/Predict": hedged, "*": RetryPolicy(max_attempts=2)})
    assert policies.for_method("/pkg.S/Predict") is hedged
    assert policies.for_method("/pkg.S/Other") == RetryPolicy(max_attempts=2)
    everything = MethodPolicies({"*": hedged})
    assert everything.for_method("/pkg.S/Other") is hedged
    assert everything.default == RetryPolicy()  # sizes the budget
    assert MethodPolicies(hedged).for_method("/a.B/C") is hedged


def test_a_bad_mapping_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"retry\['/pkg.S/Predict'\].*HedgingPolicy"):
        MethodPolicies({"/pkg.S/Predict": {"hedging_delay": 0.1}})  # type: ignore[dict-item]


def test_client_and_bidi_streams_under_hedging_are_sent_once() -> None:
    lb = Driver(2)
    for kind in ("stream_unary", "stream_stream"):
        rules = CallRules(lb, kind, HedgingPolicy())
        assert rules.hedging is None and rules.policy.max_attempts == 1
    for kind in ("unary_unary", "unary_stream"):
        assert CallRules(lb, kind, HedgingPolicy()).hedging is not None


def test_a_bad_fallback_delay_is_named() -> None:
    with pytest.raises(ConfigError, match="fallback_delay"):
        HedgingPolicy(fallback_delay=-1.0)


def test_an_attempt_that_never_left_the_client_is_no_hedge_and_costs_no_token() -> None:
    lb, m = machine(HedgingPolicy(max_attempts=2, hedging_delay=0.0))
    first = m.start(m.next())  # type: ignore[arg-type]
    hedge = m.start(m.next())  # type: ignore[arg-type]
    assert (lb.hedges_sent, lb.budget.tokens) == (1, lb.budget.max_tokens - 1)
    first.member.closed = True
    m.done(first, failure(ValueError("closed"), first.member, begun=False))  # never sent
    first.member.closed = False
    # The hedge is now the call's first attempt: nothing was hedged, nothing paid, and one hedge is left.
    assert (lb.hedges_sent, lb.budget.tokens) == (0, lb.budget.max_tokens)
    assert hedge.number == 1
    again = m.next()
    assert again is not None and not isinstance(again, float)
    m.start(again)
    assert lb.hedges_sent == 1 and m.next() is None
