"""The call path's sans-I/O attempt machine: one call's attempts, retries, backoff, budget and deadline.

No sockets, threads or ``await`` here. A channel's driver asks :meth:`Attempts.next` what to do: start
an attempt on this member, wait until this time (for a ready endpoint or a backoff), or stop (it raises
the call's error). It reports each attempt's end as typed facts (:class:`Outcome`): whether the attempt
can have left the client, whether a response arrived, whether the caller cancelled, whether lbkit closed
the channel under it. Never an error's text.

A call that succeeds at its first attempt builds nothing of this: the drivers' fast path picks with
:func:`pick_now`, sizes the attempt with :func:`first_timeout` and ends it with :func:`account`, the one
place where an attempt's end is counted (stats, hence outlier detection, and the retry budget's credit).
The machine is made only when a call needs it (nothing to pick at once, or a failed first attempt) and
adopts the attempt already made. Several attempts of one call may be in flight at once (the machine
counts and decides; the driver runs them), as hedging needs.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, Protocol

import grpc
import tenacity

from lbkit._driver import BalancerBase, Member
from lbkit._futures import StatusError
from lbkit.errors import EndpointRemovedError, NoEndpointsError
from lbkit.hedging import HedgingPolicy, LatencyWindow
from lbkit.orca import read_load_report
from lbkit.retry import Policy, RetryPolicy
from lbkit.selectors.base import Key, Picker
from lbkit.stats import EndpointStats

__all__ = [
    "SUCCESS",
    "Attempt",
    "AttemptCancelled",
    "AttemptTimeout",
    "Attempts",
    "CallRules",
    "Outcome",
    "Replayable",
    "account",
    "attempt_code",
    "failure",
    "first_timeout",
    "may_retry",
    "pick_now",
    "retrying",
    "wants_report",
]

OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED

_REFUSED = (ValueError, grpc.aio.UsageError)
"""What grpc raises when asked to start a call on a closed channel (sync, asyncio)."""

_PICKS = 4

_HEDGED_KINDS = ("unary_unary", "unary_stream")
"""Call kinds a hedging policy hedges; client and bidirectional streams under one are sent once."""

_SENT_ONCE = RetryPolicy(max_attempts=1)
"""Picks from the picker before scanning its endpoints for one this call has not tried."""


class Replayable(Protocol):
    """The requests of a client stream, kept so that a new attempt can send them again."""

    @property
    def replayable(self) -> bool:
        """Whether a new attempt could still be given every request sent so far."""
        ...


class CallRules:
    """What every call of one stub method shares: its balancer, retry policy and attempt sizing."""

    __slots__ = (
        "attempt_timeout",
        "core",
        "first_response_timeout",
        "hedging",
        "kind",
        "lb",
        "load_reports",
        "members",
        "observe",
        "pinned",
        "policy",
        "retrying",
        "window",
    )

    def __init__(self, lb: BalancerBase, kind: str, policy: Policy, pinned: Member | None = None) -> None:
        self.lb = lb
        self.core = lb.core
        self.members = lb.members
        self.kind = kind
        self.pinned = pinned
        """The one member a channel from ``lb.pick()`` calls; its calls are never sent elsewhere."""
        hedging = policy if isinstance(policy, HedgingPolicy) else None
        self.hedging = hedging if pinned is None and kind in _HEDGED_KINDS else None
        """The method's hedging policy, for the kinds that are hedged (unary, server streaming)."""
        self.window: LatencyWindow | None = None
        """The method's recent latencies, for a percentile hedging delay (set by the channel)."""
        # Hedged (client and bidi streams under hedging: sent once), or pinned: no retry.
        self.policy: RetryPolicy = (
            policy if isinstance(policy, RetryPolicy) and pinned is None else _SENT_ONCE
        )
        policy = self.policy
        unary_response = kind in ("unary_unary", "stream_unary")
        self.attempt_timeout = policy.attempt_timeout if unary_response else None
        """The per-attempt timeout given to grpc: calls with one response (an attempt ends with it)."""
        self.first_response_timeout = None if unary_response else self.policy.attempt_timeout
        """For response streams, how long an attempt may wait for its first response (a stream's length
        after that is the application's): the driver cuts it then, while a retry is still possible."""
        self.observe = kind == "unary_unary"
        """Whether an attempt's latency feeds the latency stats (a stream's length says nothing of the
        endpoint's speed)."""
        self.retrying = retrying(self.policy)
        self.load_reports = lb.load_reports
        """Whether attempts' trailing metadata is read for load reports (the selector uses them)."""


def retrying(policy: RetryPolicy) -> tenacity.Retrying:
    """The backoff curve of ``policy`` in tenacity's terms: exponential, with full jitter (each wait is
    random between 0 and ``initial_backoff * 2**(retry - 1)``, capped at ``max_backoff``)."""
    return tenacity.Retrying(
        wait=tenacity.wait_random_exponential(multiplier=policy.initial_backoff, max=policy.max_backoff)
    )


def may_retry(rules: CallRules, outcome: Outcome, attempts: int, limited: bool = True) -> bool:
    """The fixed part of the retry rule: whether a call whose ``attempts``-th attempt ended with
    ``outcome`` may be tried again (time, backoff and budget permitting).

    An attempt that provably never left the client may always go elsewhere. One that may have reached
    a server is retried only if its status is in the policy's ``retryable_codes`` (or is the
    DEADLINE_EXCEEDED of a per-attempt timeout, ``limited``), nothing was answered yet, the caller did
    not cancel, and attempts are left.
    """
    if not outcome.sent:
        return True
    if outcome.cancelled or outcome.local or outcome.responded:
        return False
    policy = rules.policy
    if attempts >= policy.max_attempts:
        return False
    code = outcome.code
    return code in policy.retryable_codes or (code is _DEADLINE and limited)


class Outcome:
    """How one attempt ended, as typed facts."""

    __slots__ = ("cancelled", "code", "drained", "error", "local", "responded", "sent")

    def __init__(
        self,
        code: grpc.StatusCode | None,
        error: BaseException | None,
        *,
        sent: bool = True,
        responded: bool = False,
        cancelled: bool = False,
        drained: bool = False,
        local: bool = False,
    ) -> None:
        self.code = code
        """The status, as the retry rule reads it: a CANCELLED the client did not ask for (a server
        resetting the stream, or lbkit closing the channel) is UNAVAILABLE."""
        self.error = error
        """What the caller sees if the call ends here."""
        self.sent = sent
        """False only when the attempt provably never left the client."""
        self.responded = responded
        """A response arrived: the call is committed to this attempt."""
        self.cancelled = cancelled
        """The caller cancelled."""
        self.drained = drained
        """lbkit closed the endpoint's channel under the attempt (drain timeout, or the balancer closed)."""
        self.local = local
        """The client failed the attempt itself: a bad argument, or the request iterator raised."""

    @property
    def neutral(self) -> bool:
        """Whether the end says nothing of the endpoint (counted neither success nor failure)."""
        return not self.sent or self.cancelled or self.drained or self.local

    def __repr__(self) -> str:
        facts = [n for n in ("responded", "cancelled", "drained", "local") if getattr(self, n)]
        if not self.sent:
            facts.append("not sent")
        return f"Outcome({self.code}, {type(self.error).__name__}{', ' if facts else ''}{', '.join(facts)})"


SUCCESS = Outcome(OK, None)


def failure(
    exc: BaseException,
    member: Member,
    *,
    begun: bool = True,
    responded: bool = False,
    cancelled: bool = False,
    source_error: BaseException | None = None,
    timed_out: float | None = None,
) -> Outcome:
    """The outcome of an attempt on ``member`` that ended with ``exc``.

    ``begun``: grpc accepted the call (False when starting it raised). ``cancelled``: the caller
    cancelled. ``source_error``: what the request iterator raised, if it did. ``timed_out``: the
    first-response timeout after which the driver cut the attempt, if it did.
    """
    if source_error is not None:
        return Outcome(None, source_error, responded=responded, local=True)
    if timed_out is not None:
        late = AttemptTimeout(member.address, timed_out)
        late.__cause__ = exc
        return Outcome(_DEADLINE, late, responded=responded)
    if cancelled:
        return Outcome(_CANCELLED, exc, responded=responded, cancelled=True)
    rpc = isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None))
    code = exc.code() if rpc else None  # type: ignore[attr-defined]
    if member.closed:
        if not begun and isinstance(exc, _REFUSED):
            # grpc refused to start the call on the channel lbkit had closed: nothing was sent.
            return Outcome(None, exc, sent=False)
        if code is _CANCELLED or isinstance(exc, asyncio.CancelledError):
            removed = EndpointRemovedError(member.address, member.closed_reason)
            removed.__cause__ = exc
            return Outcome(_UNAVAILABLE, removed, responded=responded, drained=True)
    if rpc:
        return Outcome(_UNAVAILABLE if code is _CANCELLED else code, exc, responded=responded)
    if isinstance(exc, asyncio.CancelledError) and begun:
        # grpc.aio cancelled the attempt itself (neither the caller, who is asked first, nor lbkit, which
        # marks the channel closed first): a reset, never a CancelledError for a caller who cancelled
        # nothing.
        reset = AttemptCancelled(member.address)
        reset.__cause__ = exc
        return Outcome(_UNAVAILABLE, reset, responded=responded)
    return Outcome(None, exc, responded=responded, local=True)


class _AttemptError(StatusError):
    """An attempt's end that lbkit states itself, as a finished grpc call: a status code and details."""

    _code = _UNAVAILABLE

    def __init__(self, address: str, details: str) -> None:
        self.address = address
        self._details = details
        super().__init__(details)


class AttemptTimeout(_AttemptError):
    """A stream attempt cut because no response came within ``attempt_timeout``: DEADLINE_EXCEEDED, as
    a unary attempt that runs out of its per-attempt timeout ends (what the caller sees if no retry
    follows)."""

    _code = _DEADLINE

    def __init__(self, address: str, seconds: float) -> None:
        super().__init__(address, f"no response from {address} within attempt_timeout ({seconds:g} s)")


class AttemptCancelled(_AttemptError):
    """An asyncio attempt that grpc cancelled, not the caller: UNAVAILABLE, as a reset (what the caller
    sees if no retry follows)."""

    def __init__(self, address: str) -> None:
        super().__init__(address, f"the call to {address} was cancelled inside grpc, not by the caller")


def attempt_code(
    code: grpc.StatusCode | None, locally_cancelled: bool, member: Member
) -> grpc.StatusCode | None:
    """The code :func:`account` counts for a finished grpc call: None (neutral) when the client cancelled
    it or lbkit closed its channel; a CANCELLED nobody on the client asked for (a reset) as UNAVAILABLE."""
    if code is _CANCELLED:
        return None if locally_cancelled or member.closed else _UNAVAILABLE
    return code


def account(
    lb: BalancerBase,
    stats: EndpointStats,
    started: float,
    code: grpc.StatusCode | None,
    observe: bool,
    trailers: Any = None,
) -> None:
    """End one attempt's accounting, once per attempt started: in-flight count, outcome (which feeds
    outlier detection) and latency, the retry budget's credit for a success, and the load report in its
    ``trailers`` (passed only when the selector reads load reports). ``code`` None: a neutral end (never
    sent, cancelled by the client, lbkit closed the channel, a client-side error)."""
    if trailers is not None:
        read_load_report(stats, trailers)
    if code is OK:
        stats.finish(started, True, observe_latency=observe)
        budget = lb.budget
        if budget.tokens < budget.max_tokens:
            budget.on_success()
    elif code is None:
        stats.finish(started, None, observe_latency=False)
    else:
        stats.finish(started, not lb.is_failure(code), observe_latency=observe)


def wants_report(lb: BalancerBase, stats: EndpointStats) -> bool:
    """Whether to read an attempt's trailing metadata for a load report: the selector reads reports and
    one is wanted from this endpoint now (a reader takes one per look, not one per call)."""
    return lb.load_reports and stats.load_wanted


def pick_now(rules: CallRules, key: Key) -> Member | None:
    """The fast path's pick: a member the picker chooses now, if it is usable, else None (then the
    machine takes over)."""
    if rules.lb._closed:
        return None
    pinned = rules.pinned
    if pinned is not None:
        return pinned if pinned.closing_at is None and not pinned.closed else None
    try:
        endpoint = rules.core.picker.pick(key)
    except NoEndpointsError:
        return None
    member = rules.members.get(endpoint.address)
    if member is not None and member.ready and member.closing_at is None and not member.closed:
        return member
    return None


def first_timeout(rules: CallRules, timeout: float | None) -> float | None:
    """The fast path's first attempt timeout: the call's, capped by the per-attempt timeout."""
    per = rules.attempt_timeout
    if per is None or (timeout is not None and timeout <= per):
        return timeout
    return per


def _usable(member: Member | None) -> bool:
    return member is not None and member.ready and member.closing_at is None and not member.closed


def _alternate(key: str | bytes, i: int) -> bytes:
    """Another key for a retry of a keyed call: the same one each time for the same key (a stable
    second choice), a different one from the key's own owner."""
    raw = key.encode() if isinstance(key, str) else key
    return raw + b"\x00retry" + bytes((i,))


class Attempt:
    """One attempt the machine started: where, when, and how long it may take."""

    __slots__ = ("finished", "judged", "limited", "member", "number", "started", "timeout")

    def __init__(
        self, member: Member, started: float, timeout: float | None, limited: bool, number: int
    ) -> None:
        self.member = member
        self.started = started
        """When it started (``lb.clock`` time)."""
        self.timeout = timeout
        """The timeout to give grpc: the call's time left, capped by the per-attempt timeout."""
        self.limited = limited
        """The per-attempt timeout, not the call's deadline, bounds it: its DEADLINE_EXCEEDED may be
        retried."""
        self.number = number
        self.finished = False
        """Its end was counted (:meth:`Attempts.finish`)."""
        self.judged = False
        """Its failure was put to the retry rule (:meth:`Attempts.failed`)."""


class Attempts:
    """One call's attempts: where to send the next, how long to wait, when to stop.

    The driver's loop::

        while True:
            action = machine.next()          # raises the call's error when it is over
            if isinstance(action, float):    # wait until this lb.clock time (or a picker change)
                ...; continue
            attempt = machine.start(action)  # count it in flight, size its timeout
            ... run it on grpc ...
            machine.done(attempt, outcome)   # or finish() from grpc's callback and failed() where the
                                             # caller sees the error, for streams
    """

    __slots__ = (
        "_picker",
        "_state",
        "count",
        "deadline",
        "error",
        "key",
        "lb",
        "refused",
        "replay",
        "responded",
        "rules",
        "stopped",
        "tried",
        "until",
        "wait_from",
        "waited",
    )

    def __init__(
        self, rules: CallRules, key: Key, deadline: float | None, replay: Replayable | None = None
    ) -> None:
        self.rules = rules
        self.lb = rules.lb
        self.key = key
        self.deadline = deadline
        """The call's deadline (``lb.clock`` time), None for none."""
        self.replay = replay
        self.tried: set[str] = set()
        """Addresses of attempts made."""
        self.refused: set[str] = set()
        """Addresses picked but not usable (channel not connected, draining or closed) under ``_picker``."""
        self._picker: Picker | None = None
        self.count = 0
        """Attempts that may have reached a server."""
        self.error: BaseException | None = None
        """The error the call ends with if it stops now."""
        self.stopped = False
        self.responded = False
        self.until: float | None = None
        """The end of the backoff before the next attempt."""
        self.waited = 0.0
        """Seconds spent waiting for a ready endpoint, over the call."""
        self.wait_from: float | None = None
        self._state: tenacity.RetryCallState | None = None

    # ----------------------------------------------------------------- the driver's questions

    @property
    def picker(self) -> Picker | None:
        """The picker whose replacement ends the wait :meth:`next` asked for early: for a ready endpoint,
        the one the last pick looked at; during a backoff, the current one (a new picker ends no backoff,
        the driver then asks again)."""
        return self._picker if self.until is None else self.rules.core.picker

    def next(self) -> Member | float:
        """The member to start the next attempt on, or the ``lb.clock`` time to wait until (for a backoff
        or for a ready endpoint; a picker change may end the wait early). Raises the call's error once
        it is over."""
        if self.stopped:
            assert self.error is not None
            raise self.error
        lb = self.lb
        now = lb.clock()
        if lb.closed:
            raise self._stop(self.error or NoEndpointsError(f"{lb.service}: the balancer is closed"))
        until = self.until
        if until is not None:
            if now < until:
                return until
            self.until = None
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            self._waited(now)
            raise self._stop(self.error or lb.no_endpoint_error())
        member = self._pick()
        if member is not None:
            self._waited(now)
            return member
        lb.check_started()
        if self.wait_from is None:
            self.wait_from = now
        limit = deadline if deadline is not None else self.wait_from + lb.options.wait_timeout - self.waited
        if now >= limit:
            self._waited(now)
            raise self._stop(self.error or lb.no_endpoint_error())
        return limit

    def start(self, member: Member) -> Attempt:
        """Start an attempt on ``member`` (from :meth:`next`): it counts in flight until :meth:`finish`."""
        started = member.stats.start()
        self.count += 1
        self.tried.add(member.address)
        deadline = self.deadline
        left = None if deadline is None else max(deadline - started, 0.0)
        rules = self.rules
        per = rules.attempt_timeout
        if per is not None and (left is None or per < left):
            return Attempt(member, started, per, True, self.count)
        first = rules.first_response_timeout
        limited = first is not None and (left is None or first < left)
        return Attempt(member, started, left, limited, self.count)

    def adopt(self, member: Member, started: float, timeout: float | None) -> Attempt:
        """Take over the fast path's first attempt, started at ``started`` with the call's ``timeout``."""
        self.count += 1
        self.tried.add(member.address)
        rules = self.rules
        per = rules.attempt_timeout if rules.attempt_timeout is not None else rules.first_response_timeout
        limited = per is not None and (timeout is None or per < timeout)
        return Attempt(member, started, first_timeout(rules, timeout), limited, self.count)

    def finish(self, attempt: Attempt, outcome: Outcome, trailers: Any = None) -> None:
        """Count the attempt's end, once (later calls do nothing); ``trailers``: its trailing metadata,
        for load reports (read from a grpc error when not given)."""
        if attempt.finished:
            return
        attempt.finished = True
        rules = self.rules
        if trailers is None and wants_report(self.lb, attempt.member.stats):
            read = getattr(outcome.error, "trailing_metadata", None)
            trailers = read() if callable(read) else None
        code = None if outcome.neutral else outcome.code
        account(self.lb, attempt.member.stats, attempt.started, code, rules.observe, trailers)

    def done(self, attempt: Attempt, outcome: Outcome, trailers: Any = None) -> None:
        """The attempt ended: count it and, if it failed, decide what comes next."""
        self.finish(attempt, outcome, trailers)
        if outcome.code is not OK or outcome.error is not None:
            self.failed(attempt, outcome)
        else:
            self.stopped = True  # answered: nothing more to try

    def failed(self, attempt: Attempt, outcome: Outcome) -> None:
        """Decide after a failed attempt: pick again at once (it never left the client), back off and
        retry, or stop (:meth:`next` then raises its error). Where a retry is made, its budget token is
        spent."""
        attempt.judged = True
        if self.stopped:
            return
        if not outcome.sent:
            self.count -= 1  # not an attempt: nothing reached a server
            self.refused.add(attempt.member.address)
            self.tried.discard(attempt.member.address)
            if self.rules.pinned is not None:
                self._stop(self._removed(attempt.member))
            return
        error = outcome.error
        assert error is not None, "a failed attempt's outcome carries its error"
        self.error = error
        if outcome.responded:
            self.responded = True
        now = self.lb.clock()
        delay = self._retry_delay(attempt, outcome, now)
        if delay is None:
            self._stop(error)
            return
        self.lb.budget.spend()
        self.lb.note_retry()
        self.until = now + delay

    def cancel(self, error: BaseException) -> None:
        """The caller cancelled the call: stop with ``error``."""
        self._stop(error)

    # ----------------------------------------------------------------- rules

    def _retry_delay(self, attempt: Attempt, outcome: Outcome, now: float) -> float | None:
        """The backoff before a retry of this failure, or None when it is not retried."""
        replay = self.replay
        if self.responded or (replay is not None and not replay.replayable):
            return None
        rules = self.rules
        if not may_retry(rules, outcome, self.count, attempt.limited):
            return None
        deadline = self.deadline
        if (deadline is not None and now >= deadline) or self.lb.closed:
            return None
        state = self._state
        if state is None:
            state = self._state = tenacity.RetryCallState(rules.retrying, None, (), {})
        state.attempt_number = self.count
        delay = float(rules.retrying.wait(state))
        if deadline is not None and now + delay >= deadline:
            return None  # the wait would use up the deadline: no retry could be made in time
        if not self.lb.budget.allow():
            return None
        return delay

    def _pick(self) -> Member | None:
        """A usable member for the next attempt, one not tried yet while there is one; once every usable
        endpoint was tried, a tried one (trying again beats failing); None if there is none now."""
        pinned = self.rules.pinned
        if pinned is not None:
            if pinned.closing_at is not None or pinned.closed:
                raise self._stop(self.error or self._removed(pinned))
            return pinned
        picker = self.rules.core.picker
        refused = self.refused
        if picker is not self._picker:
            self._picker = picker
            refused.clear()  # a new picker: what was refused may be usable now
        members = self.rules.members
        tried = self.tried
        key = self.key
        again: Member | None = None
        # The picker, then (a picker that routes by zone) its fallback over every zone: a call whose
        # local endpoints were all tried goes on elsewhere.
        for source in (picker, getattr(picker, "fallback", None)):
            if source is None:
                break
            for i in range(_PICKS):
                try:
                    endpoint = source.pick(key if key is None or i == 0 else _alternate(key, i))
                except NoEndpointsError:
                    return again
                address = endpoint.address
                if address in refused:
                    continue
                member = members.get(address)
                if member is None or not _usable(member):
                    refused.add(address)
                    continue
                if address not in tried:
                    return member
                again = member
            endpoints = source.endpoints
            n = len(endpoints)
            start = random.randrange(n) if n and key is None else 0
            for j in range(n):
                address = endpoints[(start + j) % n].address
                if address in refused:
                    continue
                member = members.get(address)
                if not _usable(member):
                    refused.add(address)
                elif address not in tried:
                    return member
                elif again is None:
                    again = member
        return again

    def _removed(self, member: Member) -> EndpointRemovedError:
        return EndpointRemovedError(
            member.address,
            member.closed_reason
            or f"{self.lb.service}: {member.address} left discovery; a channel from lb.pick() is good only "
            "while its endpoint is in discovery: pick again",
        )

    def _waited(self, now: float) -> None:
        if self.wait_from is not None:
            self.waited += now - self.wait_from
            self.wait_from = None

    def _stop(self, error: BaseException) -> BaseException:
        self.stopped = True
        self.error = error
        return error
