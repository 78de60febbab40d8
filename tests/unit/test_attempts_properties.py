"""The attempt machine driven with random outcomes at every step, on a fake clock.

Whatever happens (refused, reset, retryable and non-retryable codes, deadline hit, cancel, an exception
in the request iterator, lbkit closing the channel, endpoints coming and going), the machine never
waits or starts an attempt past the call's deadline, never retries for free what may have reached a
server, spends and earns budget tokens exactly as the rule says, and leaves nothing in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lbkit._attempts import OK, SUCCESS, Attempt, Attempts, CallRules, Outcome, failure
from lbkit._driver import BalancerBase, Member
from lbkit._hedges import Hedges
from lbkit.endpoint import EndpointSet
from lbkit.errors import EndpointRemovedError, NoEndpointsError
from lbkit.hedging import HedgingPolicy
from lbkit.retry import RetryPolicy
from lbkit.testing.clock import FakeClock

C = grpc.StatusCode
ADDRESSES = [f"10.0.0.{i}:50051" for i in range(1, 5)]


class Err(grpc.RpcError):  # type: ignore[misc]
    """A grpc error with a status, as grpc raises them."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class Driver(BalancerBase):
    """A balancer without I/O: members without channels, readiness set by the test."""

    def __init__(self, n: int, **kw: object) -> None:
        super().__init__(ADDRESSES[:n], clock=FakeClock(), **kw)  # type: ignore[arg-type]
        self.core.set_endpoints(EndpointSet(ADDRESSES[:n]))
        for address in ADDRESSES[:n]:
            member = Member(address, None, self.stats[address])
            self.members[address] = member
            self.set_ready(address, True)

    def check_started(self) -> None:
        pass

    def set_ready(self, address: str, ready: bool) -> None:
        self.members[address].ready = ready
        self.core.set_ready(address, ready)


class Tape:
    replayable = True


@dataclass
class Case:
    policy: RetryPolicy
    timeout: float | None
    kind: str
    endpoints: int
    tokens: float


policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 5),
    retryable_codes=st.sets(st.sampled_from([C.UNAVAILABLE, C.INTERNAL, C.RESOURCE_EXHAUSTED])),
    initial_backoff=st.sampled_from([0.0, 0.01, 0.2, 1.0]),
    max_backoff=st.just(2.0),
    budget_max_tokens=st.sampled_from([0.0, 4.0, 100.0]),
    budget_token_ratio=st.sampled_from([0.0, 0.1, 0.5]),
    attempt_timeout=st.sampled_from([None, 0.05, 0.3]),
)
cases = st.builds(
    Case,
    policy=policies,
    timeout=st.sampled_from([None, 0.1, 0.5, 3.0]),
    kind=st.sampled_from(["unary_unary", "unary_stream", "stream_stream"]),
    endpoints=st.integers(1, 4),
    tokens=st.floats(0.0, 1.0),
)
OUTCOMES = [
    "ok",
    "refused",
    "reset",
    "unavailable",
    "internal",
    "invalid",
    "deadline",
    "cancel",
    "source",
    "local",
    "drained",
    "responded",
]
steps = st.lists(
    st.tuples(
        st.sampled_from(OUTCOMES),
        st.floats(0.0, 1.0),  # share of the attempt's time used
        st.integers(0, 3),  # endpoint whose readiness flips before the step (3: none)
        st.booleans(),  # the stream's failure reaches the caller before grpc's done callback
    ),
    max_size=12,
)


def fixed_rule_allows(case: Case, outcome: Outcome, count: int, limited: bool, responded: bool) -> bool:
    """The retry rule, restated: what must hold for a retry after a failure that may have been sent."""
    p = case.policy
    if outcome.cancelled or outcome.local or outcome.responded or responded:
        return False
    if count >= p.max_attempts:
        return False
    return outcome.code in p.retryable_codes or (outcome.code is C.DEADLINE_EXCEEDED and limited)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases, plan=steps)
def test_the_machine_keeps_its_promises_whatever_happens(case: Case, plan: list) -> None:
    lb = Driver(case.endpoints, retry=case.policy, wait_timeout=2.0)
    clock = lb.clock
    assert isinstance(clock, FakeClock)
    budget = lb.budget
    budget.tokens = case.tokens * budget.max_tokens
    expected_tokens = budget.tokens
    rules = CallRules(lb, case.kind, case.policy)
    start = clock()
    deadline = None if case.timeout is None else start + case.timeout
    tape = Tape() if case.kind == "stream_stream" else None
    machine = Attempts(rules, None, deadline, tape)
    started = retries = pick_waited = 0
    responded = False
    outcomes: list[Outcome] = []
    final: BaseException | None = None
    plan = list(plan)
    for _ in range(60):
        flip = plan[0][2] if plan else 3
        if flip < case.endpoints:
            address = ADDRESSES[flip]
            lb.set_ready(address, not lb.members[address].ready)
        try:
            action = machine.next()
        except BaseException as exc:
            final = exc
            break
        now = clock()
        if isinstance(action, float):
            # A wait: never past the deadline, and only for a backoff or a ready endpoint.
            assert action > now
            if deadline is not None:
                assert action <= deadline
            if machine.until is None:
                pick_waited += action - now
            clock.advance(action - now)
            if plan and plan[0][0] == "ok":  # endpoints come back while waiting
                for address in ADDRESSES[: case.endpoints]:
                    lb.set_ready(address, True)
            continue
        member = action
        assert member.ready and not member.closed
        if deadline is not None and started > 0:
            assert now < deadline, "a retry started at or past the deadline"
        attempt = machine.start(member)
        started += 1
        if deadline is not None:
            assert attempt.timeout is not None and now + attempt.timeout <= deadline + 1e-9
        kind, share, _, callback_first = plan.pop(0) if plan else ("ok", 0.0, 3, True)
        elapsed = share * (attempt.timeout if attempt.timeout is not None else 1.0)
        if kind == "deadline" and attempt.timeout is not None:
            elapsed = attempt.timeout
        clock.advance(elapsed)
        if kind == "ok":
            outcome = SUCCESS
        elif kind == "refused":
            member.closed = True
            outcome = failure(ValueError("closed"), member, begun=False)
            member.closed = False
        elif kind == "drained":
            member.mark_closed("drained by the test")
            outcome = failure(Err(C.CANCELLED), member)
            member.closed = False
        elif kind == "reset":
            outcome = failure(Err(C.CANCELLED), member)
        elif kind == "cancel":
            outcome = failure(Err(C.CANCELLED), member, cancelled=True)
        elif kind == "source":
            outcome = failure(Err(C.UNKNOWN), member, source_error=RuntimeError("iterator"))
        elif kind == "local":
            outcome = failure(TypeError("metadata"), member, begun=False)
        elif kind == "responded" and case.kind != "unary_unary":
            outcome = failure(Err(C.UNAVAILABLE), member, responded=True)
        else:
            code = {"unavailable": C.UNAVAILABLE, "internal": C.INTERNAL, "deadline": C.DEADLINE_EXCEEDED}
            outcome = failure(Err(code.get(kind, C.INVALID_ARGUMENT)), member)
        outcomes.append(outcome)
        spent_before, retried_before = budget.tokens, lb.calls_retried
        count_before = machine.count
        if case.kind == "unary_unary" or outcome.code is OK:
            machine.done(attempt, outcome)
        elif callback_first:  # a stream: grpc's callback counts it, the caller's read decides
            machine.finish(attempt, outcome)
            machine.failed(attempt, outcome)
        else:
            machine.failed(attempt, outcome)
            machine.finish(attempt, outcome)
        machine.finish(attempt, outcome)  # a second end is not counted again
        if outcome.code is OK and outcome.error is None:
            expected_tokens = min(budget.max_tokens, expected_tokens + budget.token_ratio)
            assert machine.stopped
            break
        responded = responded or outcome.responded
        if not outcome.sent:
            # Never left the client: another pick, free, not an attempt.
            assert machine.count == count_before - 1
            assert lb.calls_retried == retried_before and budget.tokens == spent_before
            continue
        if not machine.stopped:
            # A retry of what may have reached a server: the rule allowed it, and it was paid for.
            retries += 1
            assert fixed_rule_allows(case, outcome, count_before, attempt.limited, responded)
            assert lb.calls_retried == retried_before + 1
            if budget.max_tokens > 0:
                assert spent_before > budget.max_tokens / 2
                expected_tokens = max(0.0, expected_tokens - 1.0)
            assert machine.until is not None
            if deadline is not None:
                assert machine.until < deadline
        elif deadline is None and fixed_rule_allows(case, outcome, count_before, attempt.limited, responded):
            # Nothing but the budget may stop a retry the rule allows when time is unlimited.
            assert budget.max_tokens > 0 and budget.tokens <= budget.max_tokens / 2
    else:
        machine.cancel(RuntimeError("test over"))
        final = RuntimeError("test over")
    assert budget.tokens == expected_tokens or abs(budget.tokens - expected_tokens) < 1e-9
    assert lb.stats.total_in_flight == 0
    assert all(e.in_flight == 0 for e in lb.stats)
    assert machine.count <= case.policy.max_attempts
    if deadline is None:
        assert pick_waited <= lb.options.wait_timeout + 1e-9
    else:
        assert clock() <= deadline + 1e-9 or started == 0
    last = outcomes[-1] if outcomes else None
    if final is not None and last is not None and last.sent and last.error is not None:
        # The call ends with its last attempt's error (or why no attempt could follow it).
        assert final is last.error or isinstance(
            final, (EndpointRemovedError, NoEndpointsError, RuntimeError)
        )


# ------------------------------------------------------------------------------------------- hedging

HEDGE_EVENTS = ["time", "ok", "unavailable", "internal", "refused", "first", "cancel"]

hedging_policies = st.builds(
    HedgingPolicy,
    max_attempts=st.integers(2, 5),
    hedging_delay=st.sampled_from([0.0, 0.02, 0.2, "p90"]),
    non_fatal_status_codes=st.sets(st.sampled_from([C.UNAVAILABLE, C.INTERNAL])),
    min_samples=st.just(1),
    window=st.just(10),
    fallback_delay=st.sampled_from([None, 0.05]),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=hedging_policies,
    timeout=st.sampled_from([None, 0.1, 0.5]),
    endpoints=st.integers(1, 4),
    tokens=st.floats(0.0, 1.0),
    kind=st.sampled_from(["unary_unary", "unary_stream"]),
    events=st.lists(st.tuples(st.sampled_from(HEDGE_EVENTS), st.integers(0, 4)), max_size=20),
)
# The first attempt refused while its hedge is in flight: its stand-in is not a second hedge.
@example(
    policy=HedgingPolicy(max_attempts=2, hedging_delay=0.0, min_samples=1, window=10),
    timeout=None,
    endpoints=3,
    tokens=1.0,
    kind="unary_unary",
    events=[("refused", 0)],
)
def test_the_hedging_machine_keeps_its_promises_whatever_happens(
    policy: HedgingPolicy, timeout: float | None, endpoints: int, tokens: float, kind: str, events: list
) -> None:
    """Hedges never start at or past the deadline, never go to an endpoint the call already has an
    attempt on while an untried one could be had, cost a token each and stop when the budget is low;
    the first response wins and what is left is cancelled and counted neutral; nothing stays in flight."""
    lb = Driver(endpoints, retry=policy, wait_timeout=1.0)
    clock = lb.clock
    assert isinstance(clock, FakeClock)
    budget = lb.budget
    budget.tokens = tokens * budget.max_tokens
    rules = CallRules(lb, kind, policy)
    if policy.percentile is not None:
        rules.window = lb.latency_window("/m", policy)
        rules.window.record(0.03)
    began = clock()
    deadline = None if timeout is None else began + timeout
    m = Hedges(rules, None, deadline, began)
    live: list[Attempt] = []
    failures_before_decision = 0
    cancelled: list[Attempt] = []
    final: BaseException | None = None
    events = list(events)
    for _ in range(80):
        try:
            action = m.next()
        except BaseException as exc:
            final = exc
            break
        if isinstance(action, Member):
            now = clock()
            if deadline is not None:
                assert now < deadline, "an attempt started at or past the deadline"
            untried = [a for a in ADDRESSES[:endpoints] if a not in m.tried]
            if m.in_flight:
                assert action.address not in {a.member.address for a in m.in_flight}
                assert budget.max_tokens == 0 or budget.tokens > budget.max_tokens / 2
                assert action.address in untried
            tokens_before, sent_before = budget.tokens, lb.hedges_sent
            attempt = m.start(action)
            if m.count > 1:  # every attempt after the first is a hedge: counted, and a token
                assert lb.hedges_sent == sent_before + 1
                if budget.max_tokens > 0:
                    assert budget.tokens == max(0.0, tokens_before - 1.0)
            assert m.count <= policy.max_attempts
            live.append(attempt)
            if deadline is not None:
                assert attempt.timeout is not None and now + attempt.timeout <= deadline + 1e-9
            continue
        if isinstance(action, float):
            assert action > clock()
            if deadline is not None:
                assert action <= deadline
        event, which = events.pop(0) if events else ("ok", 0)
        if not live or event == "time":
            if isinstance(action, float):
                clock.advance(action - clock())
            elif not live:
                break  # nothing to wait for: the machine waits for an endpoint that will not come
            else:
                event = "ok"
        if event == "time" and live:
            continue
        if not live:
            continue
        attempt = live[which % len(live)]
        if event == "cancel":
            for a in m.cancel(RuntimeError("caller cancelled")):
                cancelled.append(a)
            continue
        if event == "first" and kind == "unary_stream":
            won = not m.stopped
            losers = m.won(attempt)
            if won:
                assert m.winner is attempt and attempt not in losers
                cancelled.extend(losers)
            continue
        live.remove(attempt)
        member = attempt.member
        if event == "ok" or event == "first":
            outcome = SUCCESS
        elif event == "refused":
            member.closed = True
            outcome = failure(ValueError("closed"), member, begun=False)
            member.closed = False
        else:
            code = C.UNAVAILABLE if event == "unavailable" else C.INTERNAL
            outcome = failure(Err(code), member, cancelled=attempt in cancelled)
        decided = m.stopped
        if (not decided or attempt is m.winner) and outcome.sent and outcome.code is not OK:
            failures_before_decision += 1  # a failure of its own (a winning stream's too), not a loser's
        losers = m.done(attempt, outcome)
        cancelled.extend(losers)
        if not decided and outcome is SUCCESS:
            assert m.winner is attempt
            assert set(losers) == {a for a in live}
    # End whatever is still running (cancelled by a winner, an error, or the test).
    m.cancel(RuntimeError("test over"))
    for attempt in live:
        m.done(attempt, failure(Err(C.CANCELLED), attempt.member, cancelled=True))
    assert lb.stats.total_in_flight == 0 and all(e.in_flight == 0 for e in lb.stats)
    assert sum(e.failures for e in lb.stats) == failures_before_decision
    assert sum(e.successes for e in lb.stats) <= 1, "a hedged call counts as one call"
    assert m.count <= policy.max_attempts
    assert lb.hedges_won <= 1 and lb.hedges_sent <= policy.max_attempts - 1
    # An attempt refused before it left the client is no attempt: the hedges are the attempts that
    # were sent, less the first.
    assert lb.hedges_sent == max(m.count - 1, 0)
    if m.winner is not None:
        assert final is None
