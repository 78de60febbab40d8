"""The sync driver of hedged calls: the hedging machine (:mod:`lbkit._hedges`) over grpc futures and
streams.

Driven by events, never by a waiting thread: each attempt's end (grpc's done callback), a stream
attempt's first response (read by a short-lived thread per attempt, as sync grpc has no other way to
learn of it) and the hedge timer (the balancer's timer loop, ``lb.call_at``) each run one step of the
machine under the call's lock. A blocking call waits for the call's end. Only a wait for a ready
endpoint with no attempt in flight runs on a short-lived thread, as a ``future()``'s does.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import grpc

from lbkit._attempts import OK, SUCCESS, Attempt, failure, wants_report
from lbkit._callspec import CallSpecBase
from lbkit._driver import Member
from lbkit._futures import Cancelled, EndedFuture, call_kwargs
from lbkit._hedges import Hedges
from lbkit.selectors.base import Picker

__all__ = [
    "HEDGED_MULTICALLABLES",
    "HedgedCall",
    "HedgedStream",
    "HedgedUnary",
    "HedgedUnaryStream",
    "HedgedUnaryUnary",
]

_NO_RESPONSE = object()
"""A stream attempt that ended OK without a response (its first read met the end)."""


def _tick(ref: weakref.ReferenceType[HedgedCall]) -> None:
    """A hedge timer: the call's next step, if the caller still holds the call."""
    call = ref()
    if call is not None:
        call._ticked()


def _done_callback(call: HedgedCall, attempt: Attempt) -> Callable[[Any], None]:
    """grpc's done callback of one attempt. It holds the call weakly, so that a call its caller dropped
    is collected (and its finalizer cancels what still runs); then it only counts the attempt's end."""
    ref = weakref.ref(call)
    machine = call._machine
    cond = call._cond

    def done(inner: Any) -> None:
        me = ref()
        if me is not None:
            me._attempt_done(attempt, inner)
            return
        outcome = SUCCESS if inner.code() is OK else failure(inner, attempt.member, cancelled=True)
        with cond:
            machine.done(attempt, outcome)

    return done


def _read_first(ref: weakref.ReferenceType[HedgedStream], attempt: Attempt, inner: Any) -> None:
    """A stream attempt's reader (a short-lived thread): its first response, handed to the call if the
    caller still holds it."""
    try:
        first = next(inner)
    except StopIteration:
        first = _NO_RESPONSE  # ended OK without a response: grpc's done callback decides
    except grpc.RpcError:
        return  # failed: grpc's done callback counts it and decides
    call = ref()
    if call is not None:
        call._first_read(attempt, inner, first)


class HedgedCall:
    """One hedged call's attempts, run by events (see the module doc); the end is ``_ended``."""

    stream = False

    def __init__(self, c: CallSpecBase[Any], request: Any, timeout: float | None, kw: dict[str, Any]) -> None:
        key, kw["metadata"] = c.route(kw["metadata"], request)
        lb = c.lb
        began = lb.clock()
        self._c = c
        self._request = request
        self._kw = kw
        self._machine = Hedges(c, key, None if timeout is None else began + timeout, began)
        self._cond = threading.Condition(threading.Lock())
        self._calls: dict[Attempt, Any] = {}
        self._firsts: dict[Attempt, Any] = {}
        self._timer: float | None = None
        self._waiting = False
        self._cancelled = False
        self._ended = threading.Event()
        """Set once the call is decided: a winner (for a stream, with its first response) or an error."""
        self._error: BaseException | None = None
        self._inner: Any = None
        """The winning attempt's grpc call."""
        self._first: Any = _NO_RESPONSE
        """A stream's first response (read by its attempt's reader)."""
        self._callbacks: list[Callable[[], None]] = []
        self._step()

    # ----------------------------------------------------------------- the machine's steps

    def _step(self) -> None:
        """Ask the machine what to do until it says to wait; start attempts, arm the timer, or end."""
        machine = self._machine
        lb = self._c.lb
        started: list[tuple[Attempt, Any]] = []
        cancel: list[Any] = []
        with self._cond:
            while True:
                try:
                    action = machine.next()
                except BaseException as err:
                    cancel = [self._calls[a] for a in machine.in_flight if a in self._calls]
                    self._end(err)
                    break
                if action is None:
                    break
                if isinstance(action, float):
                    if machine.in_flight:
                        if self._timer is None or action < self._timer:
                            self._timer = action
                            lb.call_at(action, functools.partial(_tick, weakref.ref(self)))
                    elif not self._waiting:
                        self._waiting = True
                        threading.Thread(
                            target=self._wait, args=(action, machine.picker), daemon=True
                        ).start()
                    break
                attempt = machine.start(action)
                try:
                    inner = self._begin(action, attempt)
                except BaseException as exc:
                    cancel.extend(
                        self._calls[a] for a in machine.done(attempt, failure(exc, action, begun=False))
                    )
                    continue
                self._calls[attempt] = inner
                started.append((attempt, inner))
        for inner in cancel:
            inner.cancel()
        for attempt, inner in started:
            self._watch(attempt, inner)
        self._fire()

    def _ticked(self) -> None:
        with self._cond:
            self._timer = None
        self._step()

    def _wait(self, until: float, picker: Picker | None) -> None:
        self._c.lb.wait_change(until, picker)
        with self._cond:
            self._waiting = False
        self._step()

    def _begin(self, member: Member, attempt: Attempt) -> Any:
        raise NotImplementedError

    def _watch(self, attempt: Attempt, inner: Any) -> None:
        inner.add_done_callback(_done_callback(self, attempt))

    def __del__(self) -> None:
        # Dropped by the caller before its end (a stream: its attempts hold it weakly): cancel what still
        # runs, as a dropped grpc stream is cancelled; grpc's done callbacks then count each end, neutral.
        machine = getattr(self, "_machine", None)
        if machine is None:
            return
        with self._cond:
            self._cancelled = True
            machine.cancel(Cancelled())
            calls = list(self._calls.values())
        for inner in calls:
            inner.cancel()

    def _attempt_done(self, attempt: Attempt, inner: Any) -> None:
        """grpc's done callback of one attempt: count it; the machine decides what it means."""
        machine = self._machine
        code = inner.code()
        with self._cond:
            if code is OK:
                trailers = (
                    inner.trailing_metadata() if wants_report(self._c.lb, attempt.member.stats) else None
                )
                losers = machine.done(attempt, SUCCESS, trailers)
            else:
                outcome = failure(
                    inner, attempt.member, responded=attempt in self._firsts, cancelled=self._cancelled
                )
                losers = machine.done(attempt, outcome)
            self._calls.pop(attempt, None)
            cancel = [self._calls[a] for a in losers if a in self._calls]
            if machine.winner is attempt:
                self._won(attempt, inner)
        for call in cancel:
            call.cancel()
        if machine.winner is None:
            self._step()
        else:
            self._fire()

    def _won(self, attempt: Attempt, inner: Any) -> None:
        """Under the lock: ``attempt`` won; the call ends once a stream's first response is at hand."""
        if self._ended.is_set():
            return
        self._inner = inner
        if not self.stream or attempt in self._firsts:
            if self.stream:
                self._first = self._firsts[attempt]
            self._end(None)

    def _end(self, error: BaseException | None) -> None:
        """Under the lock: the call is decided."""
        if self._ended.is_set():
            return
        self._error = error
        self._ended.set()
        self._cond.notify_all()

    def _fire(self) -> None:
        """Run the caller's callbacks once the call is over (outside the lock)."""
        if not self._ended.is_set() or not self._callbacks:
            return
        with self._cond:
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def _on_end(self, callback: Callable[[], None]) -> bool:
        """Call ``callback()`` once the call is decided; False (not added) if it is already."""
        with self._cond:
            if not self._ended.is_set():
                self._callbacks.append(callback)
                return True
        return False

    def cancel(self) -> bool:
        """The caller cancels: every attempt in flight is cancelled."""
        with self._cond:
            if self._ended.is_set() and (self._error is not None or not self.stream or self._inner.done()):
                return False  # over (a stream that answered and still runs is cancelled below)
            self._cancelled = True
            attempts = self._machine.cancel(Cancelled())
            cancel = [self._calls[a] for a in attempts if a in self._calls]
            if self._inner is not None:
                cancel.append(self._inner)
            self._end(self._machine.error if self._error is None and self._inner is None else self._error)
        for inner in cancel:
            inner.cancel()
        if not cancel:
            self._c.lb.wake()
        self._fire()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the call to be decided; True if it is."""
        return self._ended.wait(timeout)

    def time_remaining(self) -> float | None:
        deadline = self._machine.deadline
        return None if deadline is None else max(deadline - self._c.lb.clock(), 0.0)


class HedgedUnary(HedgedCall, EndedFuture, grpc.Call, grpc.Future):  # type: ignore[misc]
    """A hedged unary call as a grpc.Future (what ``future()`` returns; a blocking call waits on it).

    Its attempts hold it, as grpc's own futures are held by their call: a future its caller drops (with
    only a done callback kept) still ends and calls back.
    """

    def _watch(self, attempt: Attempt, inner: Any) -> None:
        inner.add_done_callback(lambda call: self._attempt_done(attempt, call))

    def _begin(self, member: Member, attempt: Attempt) -> Any:
        mc = member.callables.get(self._c.spec) or member.callable(self._c.spec)
        return mc.future(self._request, timeout=attempt.timeout, **self._kw)

    def blocking(self, with_call: bool) -> Any:
        """The blocking call's answer: the winner's response (and its call), or the call's error."""
        try:
            self._ended.wait()
        except BaseException:
            self.cancel()
            raise
        if self._error is not None:
            raise self._error
        return (self._inner.result(), self._inner) if with_call else self._inner.result()


class HedgedStream(HedgedCall, EndedFuture, grpc.Call, grpc.Future):  # type: ignore[misc]
    """A hedged server stream: hedged until its first response, then the winner's stream."""

    stream = True

    def _begin(self, member: Member, attempt: Attempt) -> Any:
        mc = member.callables.get(self._c.spec) or member.callable(self._c.spec)
        return mc(self._request, timeout=attempt.timeout, **self._kw)

    def _watch(self, attempt: Attempt, inner: Any) -> None:
        super()._watch(attempt, inner)
        threading.Thread(target=_read_first, args=(weakref.ref(self), attempt, inner), daemon=True).start()

    def _first_read(self, attempt: Attempt, inner: Any, first: Any) -> None:
        """An attempt's first response (or its end), from its reader: it decides the call if it comes
        first."""
        cancel: list[Any] = []
        machine = self._machine
        with self._cond:
            self._firsts[attempt] = first
            if first is not _NO_RESPONSE:
                losers = machine.won(attempt)
                cancel = [self._calls[a] for a in losers if a in self._calls]
            if machine.winner is attempt:
                self._won(attempt, inner)
        for call in cancel:
            call.cancel()
        self._fire()

    def __iter__(self) -> HedgedStream:
        return self

    def __next__(self) -> Any:
        if self._first is not _NO_RESPONSE:
            first, self._first = self._first, _NO_RESPONSE
            return first
        if not self._ended.is_set():
            try:
                self._ended.wait()
            except BaseException:
                self.cancel()
                raise
            return self.__next__()
        if self._error is not None:
            raise self._error
        return next(self._inner)

    def next(self) -> Any:
        return self.__next__()

    # grpc.Call / grpc.Future, of the winning stream (or the call's error); its metadata, code and
    # details are EndedFuture's
    def is_active(self) -> bool:
        return not self._ended.is_set() or (self._error is None and bool(self._inner.is_active()))

    def add_callback(self, callback: Callable[[], None]) -> bool:
        def fire() -> None:
            if self._error is not None or not self._inner.add_callback(callback):
                callback()

        if self._on_end(fire):
            return True
        return self._error is None and bool(self._inner.add_callback(callback))

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        def fire() -> None:
            if self._error is not None:
                fn(self)
            else:
                self._inner.add_done_callback(lambda _call: fn(self))

        if not self._on_end(fire):
            fire()

    def cancelled(self) -> bool:
        return self._cancelled

    def running(self) -> bool:
        return self.is_active()

    def done(self) -> bool:
        return self._ended.is_set() and (self._error is not None or bool(self._inner.done()))

    def result(self, timeout: float | None = None) -> Any:
        self._ended.wait()
        if self._error is not None:
            raise self._error
        return self._inner.result(timeout)

    def exception(self, timeout: float | None = None) -> Any:
        self._ended.wait()
        return self._error if self._error is not None else self._inner.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        self._ended.wait()
        error = self._error
        return error.__traceback__ if error is not None else self._inner.traceback(timeout)


class HedgedUnaryStream(grpc.UnaryStreamMultiCallable):  # type: ignore[misc]
    """The multicallable of a hedged server-streaming method."""

    __slots__ = ("_c",)

    def __init__(self, c: CallSpecBase[Any]) -> None:
        self._c = c

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        kw = call_kwargs(metadata, credentials, wait_for_ready, compression)
        return HedgedStream(self._c, request, timeout, kw)


class HedgedUnaryUnary(grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    """The multicallable of a hedged unary method."""

    __slots__ = ("_c",)

    def __init__(self, c: CallSpecBase[Any]) -> None:
        self._c = c

    def _call(self, request: Any, timeout: float | None, kw: dict[str, Any]) -> HedgedUnary:
        return HedgedUnary(self._c, request, timeout, kw)

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        kw = call_kwargs(metadata, credentials, wait_for_ready, compression)
        return self._call(request, timeout, kw).blocking(False)

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        kw = call_kwargs(metadata, credentials, wait_for_ready, compression)
        return self._call(request, timeout, kw).blocking(True)

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """A grpc.Future for the hedged call."""
        kw = call_kwargs(metadata, credentials, wait_for_ready, compression)
        return self._call(request, timeout, kw)


HEDGED_MULTICALLABLES: dict[str, Callable[[Any], Any]] = {
    "unary_unary": HedgedUnaryUnary,
    "unary_stream": HedgedUnaryStream,
}
"""The multicallables of the call kinds a hedging policy hedges."""
