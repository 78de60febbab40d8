"""The hedging rule (gRFC A6 ``hedgingPolicy``) as a sans-I/O machine: one hedged call's attempts.

A hedged call starts its first attempt at once and, while no response has come, another attempt on an
endpoint not tried yet each ``hedging_delay``, up to ``max_attempts`` in all. The first response wins
and the other attempts are cancelled. A failure with a status in ``non_fatal_status_codes`` makes the
next hedge due at once; any other failure ends the call with it and cancels the rest. A hedge is sent
only while the balancer's retry budget allows a retry (A6 throttling), and costs a token as a retry
does. No hedge starts at or past the call's deadline, and every attempt's timeout is the call's time
left.

The machine answers the driver's question (:meth:`Hedges.next`): start an attempt on this member, do
nothing until this ``lb.clock`` time (a hedge falls due, or an endpoint may become ready), do nothing
until an attempt ends (None), or stop (it raises the call's error). The driver tells it of each
attempt's first response (:meth:`Hedges.won`, for streams) and end (:meth:`Hedges.done`); both return
the attempts to cancel. Each attempt's end is counted once, by :meth:`Attempts.finish`: an attempt that
ends after another won (cancelled as a loser, or finishing in the same instant) is counted neutral, so a
loser is never an endpoint failure for outlier detection, and a hedged call counts as one call.
"""

from __future__ import annotations

from typing import Any

from lbkit._attempts import OK, Attempt, Attempts, CallRules, Outcome
from lbkit._driver import Member
from lbkit.hedging import HedgingPolicy, hedge_delay
from lbkit.selectors.base import Key

__all__ = ["Hedges"]

_NEUTRAL = Outcome(None, None, sent=False)
"""How an attempt that ended after the call was decided is counted: neither success nor failure."""


class Hedges(Attempts):
    """One hedged call's attempts: which to start and when, which answer wins, what to cancel.

    The driver's loop (run again whenever an attempt ends or a time it was given comes)::

        action = machine.next()          # raises the call's error when it is over
        if isinstance(action, Member):   # start an attempt: machine.start(action), then ask again
        elif isinstance(action, float):  # ask again at this lb.clock time (or when an attempt ends)
        else:                            # None: ask again when an attempt ends
        ...
        losers = machine.done(attempt, outcome)   # or machine.won(attempt) at a stream's first response
    """

    __slots__ = ("began", "due", "hedging", "in_flight", "winner")

    def __init__(self, rules: CallRules, key: Key, deadline: float | None, began: float) -> None:
        super().__init__(rules, key, deadline)
        hedging = rules.hedging
        assert hedging is not None, "a hedged call's method has a hedging policy"
        self.hedging: HedgingPolicy = hedging
        self.began = began
        """When the call began (``lb.clock`` time): its latency, for the method's window, runs from it."""
        self.in_flight: list[Attempt] = []
        """Attempts started and not ended, oldest first."""
        self.winner: Attempt | None = None
        """The attempt whose response won."""
        self.due: float | None = None
        """When the next hedge is due (``lb.clock`` time); None: no hedge planned."""

    def next(self) -> Member | float | None:  # type: ignore[override]
        """The member to start an attempt on now, the ``lb.clock`` time to ask again at, or None (ask
        again when an attempt ends). Raises the call's error once it is over."""
        if self.stopped:
            if self.winner is not None:
                return None
            assert self.error is not None
            raise self.error
        if not self.in_flight:
            # Nothing running: the first attempt, or the next after non-fatal failures (a hedge too).
            if self.count:
                if self.count >= self.hedging.max_attempts:
                    assert self.error is not None
                    raise self._stop(self.error)
                if not self.lb.budget.allow():
                    assert self.error is not None
                    raise self._stop(self.error)
            return super().next()
        if self.count >= self.hedging.max_attempts:
            return None
        due = self.due
        deadline = self.deadline
        if due is None or (deadline is not None and due >= deadline):
            return None  # no hedge planned, or none before the deadline
        lb = self.lb
        if lb.closed:
            return None
        now = lb.clock()
        if now < due:
            return due
        self.due = None
        if not lb.budget.allow():
            return None  # throttled: no more hedges for this call
        member = self._pick()
        if member is None or member.address in self.tried:
            return None  # every usable endpoint has an attempt of this call already
        return member

    def start(self, member: Member) -> Attempt:
        """Start an attempt on ``member`` (from :meth:`next`): in flight until :meth:`done`. Every attempt
        after the first is a hedge and spends a budget token; the next hedge falls due a delay later."""
        started = member.stats.start()
        hedge = self.count > 0
        self.count += 1
        self.tried.add(member.address)
        deadline = self.deadline
        left = None if deadline is None else max(deadline - started, 0.0)
        attempt = Attempt(member, started, left, False, self.count)
        self.in_flight.append(attempt)
        lb = self.lb
        if hedge:
            lb.budget.spend()
            lb.note_hedges(sent=1)
        if self.count < self.hedging.max_attempts:
            self.due = started + hedge_delay(self.hedging, self.rules.window)
        else:
            self.due = None
        return attempt

    def won(self, attempt: Attempt) -> list[Attempt]:
        """A response of ``attempt`` came first: the call is its. Returns the attempts to cancel."""
        if self.stopped:
            return []
        self.stopped = True
        self.winner = attempt
        self.error = None
        self.due = None
        lb = self.lb
        window = self.rules.window
        if window is not None:
            # The call's latency to its first response, hedged or not: the share of calls slower than
            # the percentile stays what it would be unhedged, so the percentile does not drift down.
            window.record(max(lb.clock() - self.began, 0.0))
        losers = [a for a in self.in_flight if a is not attempt]
        lb.note_hedges(won=1 if attempt.number > 1 else 0, cancelled=len(losers))
        return losers

    def done(self, attempt: Attempt, outcome: Outcome, trailers: Any = None) -> list[Attempt]:  # type: ignore[override]
        """``attempt`` ended with ``outcome``: count it and decide. Returns the attempts to cancel (the
        call was decided by this end: it won, or failed fatally)."""
        if attempt in self.in_flight:
            self.in_flight.remove(attempt)
        if self.stopped and attempt is not self.winner:
            # Ended after the call was decided: cancelled by the driver (a loser, or the rest of a call
            # that failed or was cancelled), or ending in the same instant. It says nothing of its
            # endpoint, and the call is counted once, by its deciding attempt.
            self.finish(attempt, _NEUTRAL)
            return []
        self.finish(attempt, outcome, trailers)
        if self.stopped:
            return []
        if outcome.code is OK and outcome.error is None:
            return self.won(attempt)
        self.failed(attempt, outcome)
        return list(self.in_flight) if self.stopped else []

    def failed(self, attempt: Attempt, outcome: Outcome) -> None:
        """The hedging rule after a failed attempt: one that never left the client is not an attempt
        (another is picked at once); a status in ``non_fatal_status_codes`` makes the next hedge due
        now; anything else (or the caller's cancel, a response already received, a client-side error)
        ends the call with it."""
        attempt.judged = True
        if self.stopped:
            return
        if not outcome.sent:
            self.count -= 1
            if self.count >= 1:
                # One attempt fewer, so one hedge fewer (every attempt after the first is one): the
                # hedge is neither counted nor paid for, and the attempts after this one move up.
                self.lb.note_hedges(sent=-1)
                self.lb.budget.refund()
            for other in self.in_flight:
                if other.number > attempt.number:
                    other.number -= 1
            self.refused.add(attempt.member.address)
            self.tried.discard(attempt.member.address)
            if self.in_flight and self.due is None and self.count < self.hedging.max_attempts:
                self.due = self.lb.clock()  # the hedge it was stands in for: due now
            return
        error = outcome.error
        assert error is not None, "a failed attempt's outcome carries its error"
        self.error = error
        if (
            outcome.cancelled
            or outcome.local
            or outcome.responded
            or outcome.code not in self.hedging.non_fatal_status_codes
        ):
            self._stop(error)
            return
        if self.count < self.hedging.max_attempts:
            self.due = self.lb.clock()  # A6: a non-fatal status sends the next hedge at once
        elif not self.in_flight:
            self._stop(error)

    def cancel(self, error: BaseException) -> list[Attempt]:  # type: ignore[override]
        """The caller cancelled the call: stop with ``error``; returns the attempts to cancel."""
        if self.stopped:
            return []
        self._stop(error)
        return list(self.in_flight)
