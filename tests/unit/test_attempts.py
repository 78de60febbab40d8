"""The attempt machine's rules, one at a time: typed facts, the pick, per-method policies, the budget,
and the stats it finishes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import lbkit
from lbkit._attempts import Attempts, CallRules, failure
from lbkit.errors import EndpointRemovedError
from lbkit.retry import MethodPolicies, RetryBudget, RetryPolicy
from lbkit.stats import Stats
from lbkit.testing.clock import FakeClock
from tests.unit.test_attempts_properties import ADDRESSES, Driver, Err

C = grpc.StatusCode


def member_of(lb: Driver, i: int = 0):
    return lb.members[ADDRESSES[i]]


# ------------------------------------------------------------------------------------ typed facts


def test_only_a_call_grpc_refused_on_a_channel_lbkit_closed_never_left_the_client():
    lb = Driver(1)
    m = member_of(lb)
    assert failure(ValueError("anything at all"), m, begun=False).local  # not closed: the caller's error
    m.mark_closed("drained")
    refused = failure(ValueError("Cannot invoke RPC: Channel closed!"), m, begun=False)
    assert not refused.sent and refused.neutral
    assert failure(grpc.aio.UsageError("Channel is closed."), m, begun=False).sent is False
    assert failure(TypeError("bad metadata"), m, begun=False).local  # not grpc's refusal


def test_a_call_cut_by_lbkit_closing_its_channel_is_unavailable_naming_the_endpoint():
    lb = Driver(1)
    m = member_of(lb)
    m.mark_closed("svc: 10.0.0.1:50051 left discovery and its drain ran out")
    cut = failure(Err(C.CANCELLED), m)
    assert cut.sent and cut.drained and cut.code is C.UNAVAILABLE
    assert isinstance(cut.error, EndpointRemovedError) and cut.error.address == m.address
    assert "drain" in cut.error.details() and isinstance(cut.error.__cause__, Err)
    # Any other status that ends a call on a closed channel is the server's answer.
    assert failure(Err(C.INVALID_ARGUMENT), m).code is C.INVALID_ARGUMENT


def test_cancelled_is_the_callers_when_they_asked_else_a_reset():
    lb = Driver(1)
    m = member_of(lb)
    assert failure(Err(C.CANCELLED), m).code is C.UNAVAILABLE  # the server reset the stream
    mine = failure(Err(C.CANCELLED), m, cancelled=True)
    assert mine.cancelled and mine.neutral
    source = failure(Err(C.UNKNOWN), m, source_error=KeyError("x"))
    assert source.local and isinstance(source.error, KeyError)


def test_an_asyncio_attempt_grpc_cancelled_under_a_caller_who_did_not_is_a_reset():
    lb = Driver(1)
    m = member_of(lb)
    reset = failure(asyncio.CancelledError(), m)
    assert reset.sent and not reset.local and not reset.cancelled and reset.code is C.UNAVAILABLE
    assert isinstance(reset.error, grpc.RpcError) and reset.error.code() is C.UNAVAILABLE
    assert m.address in reset.error.details()
    mine = failure(asyncio.CancelledError(), m, cancelled=True)
    assert mine.cancelled and isinstance(mine.error, asyncio.CancelledError)  # the caller's own


# ------------------------------------------------------------------------------------ the pick


def test_a_pick_of_an_unusable_member_is_refused_without_an_attempt():
    lb = Driver(2, selector="round_robin")
    rules = CallRules(lb, "unary_unary", RetryPolicy())
    member_of(lb, 0).ready = False  # the picker is stale: the channel just went down
    machine = Attempts(rules, None, None)
    for _ in range(5):
        assert machine.next() is member_of(lb, 1)
    assert machine.count == 0 and ADDRESSES[0] in machine.refused


def test_a_keyed_retry_goes_to_the_same_second_choice_for_the_same_key():
    no_ejection = lbkit.OutlierDetection(consecutive_failures=None)
    lb = Driver(4, selector="consistent_hash", outlier_detection=no_ejection)
    rules = CallRules(lb, "unary_unary", RetryPolicy())
    seconds = set()
    for _ in range(5):
        machine = Attempts(rules, "user-7", None)
        first = machine.next()
        assert not isinstance(first, float)
        attempt = machine.start(first)
        machine.done(attempt, failure(Err(C.UNAVAILABLE), first))
        lb.clock.advance(1.0)  # past the backoff
        second = machine.next()
        assert not isinstance(second, float) and second is not first
        seconds.add(second.address)
        machine.cancel(RuntimeError("done"))
        machine.finish(attempt, failure(Err(C.UNAVAILABLE), first))
    assert len(seconds) == 1


def test_once_every_endpoint_was_tried_one_is_tried_again():
    lb = Driver(2, selector="round_robin")
    rules = CallRules(lb, "unary_unary", RetryPolicy(max_attempts=4, budget_max_tokens=0))
    machine = Attempts(rules, None, None)
    seen = []
    for _ in range(4):
        action = machine.next()
        while isinstance(action, float):
            lb.clock.advance(action - lb.clock())
            action = machine.next()
        seen.append(action.address)
        machine.done(machine.start(action), failure(Err(C.UNAVAILABLE), action))
    assert set(seen[:2]) == set(ADDRESSES[:2]) and len(seen) == 4
    with pytest.raises(Err):
        machine.next()
    assert lb.stats.total_in_flight == 0


def test_a_picked_channel_fails_at_once_when_its_endpoint_left():
    lb = Driver(2)
    m = member_of(lb)
    rules = CallRules(lb, "unary_unary", RetryPolicy(), pinned=m)
    assert Attempts(rules, None, None).next() is m
    m.closing_at = lb.clock()
    with pytest.raises(EndpointRemovedError, match="pick again"):
        Attempts(rules, None, None).next()


def test_waiting_for_a_ready_endpoint_ends_at_the_deadline_or_after_wait_timeout_in_all():
    lb = Driver(1, wait_timeout=2.0)
    lb.set_ready(ADDRESSES[0], False)
    rules = CallRules(lb, "unary_unary", RetryPolicy())
    now = lb.clock()
    assert Attempts(rules, None, now + 0.5).next() == now + 0.5
    machine = Attempts(rules, None, None)
    assert machine.next() == now + 2.0
    lb.clock.advance(1.5)
    lb.set_ready(ADDRESSES[0], True)
    member = machine.next()  # waited 1.5 s of its 2
    attempt = machine.start(member)
    machine.done(attempt, failure(Err(C.UNAVAILABLE), member))
    lb.set_ready(ADDRESSES[0], False)
    lb.clock.advance(1.0)  # the backoff is over; nothing is ready
    assert machine.next() == pytest.approx(lb.clock() + 0.5)  # 0.5 s of waiting left, not 2
    lb.clock.advance(0.5)
    with pytest.raises(Err):
        machine.next()  # the last attempt's error


# ------------------------------------------------------------------------------------ policies


def test_the_most_specific_method_pattern_wins():
    exact, service, star = (RetryPolicy(max_attempts=n) for n in (1, 2, 4))
    policies = MethodPolicies({"/pkg.S/Hot": exact, "/pkg.S/*": service, "*": star})
    assert policies.for_method("/pkg.S/Hot") is exact
    assert policies.for_method("/pkg.S/Cold") is service
    assert policies.for_method("/other.T/Any") is star
    assert MethodPolicies({"/pkg.S/Hot": exact}).for_method("/pkg.S/Cold") == RetryPolicy()
    assert MethodPolicies(exact).for_method("/x.Y/Z") is exact
    assert MethodPolicies(None).default == RetryPolicy()


@pytest.mark.parametrize(
    "retry",
    [{pattern: RetryPolicy()} for pattern in ("Predict", "/pkg.S", "/pkg.S/*/x", "/*/M", "/pkg.S/M ")],
)
def test_a_malformed_pattern_is_a_config_error(retry):
    with pytest.raises(lbkit.ConfigError, match="pattern"):
        MethodPolicies(retry)


def test_a_mapping_value_that_is_no_policy_is_a_config_error():
    with pytest.raises(lbkit.ConfigError, match=r"retry\['\*'\] must be a RetryPolicy"):
        MethodPolicies({"*": {"max_attempts": 2}})  # type: ignore[dict-item]


# ------------------------------------------------------------------------------------ budget, stats


def test_the_budget_allows_above_half_and_a_retry_made_costs_a_token():
    budget = RetryBudget(max_tokens=4.0, token_ratio=0.5)
    assert budget.allow()
    budget.spend()
    budget.spend()
    assert budget.tokens == 2.0 and not budget.allow() and budget.refused == 1
    budget.on_success()
    assert budget.tokens == 2.5 and budget.allow()
    unlimited = RetryBudget(max_tokens=0.0)
    unlimited.spend()
    assert unlimited.allow() and unlimited.tokens == 0.0


def test_a_late_finish_after_discard_never_takes_the_total_below_zero():
    stats = Stats(clock=FakeClock())
    entry = stats["a:1"]
    started = entry.start()
    stats.discard("a:1")  # the endpoint is gone while the call is still in flight
    assert stats.total_in_flight == 0
    entry.finish(started, True)
    assert stats.total_in_flight == 0 and entry.in_flight == 0
    again = stats["a:1"]  # it came back: a new entry, counted afresh
    again.finish(again.start(), None)
    assert stats.total_in_flight == 0 and again.successes == 0 and again.failures == 0
