"""``BalancedChannel``: a grpc.Channel that picks an endpoint per call, for generated stubs unchanged.

The sync driver of the attempt machine (:mod:`lbkit._attempts`): one thin loop per call kind. A call
that succeeds at its first attempt costs a pick, the grpc call and its accounting; the machine is made
only when a call needs it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import grpc

from lbkit._attempts import (
    OK,
    SUCCESS,
    Attempt,
    Attempts,
    Outcome,
    account,
    attempt_code,
    failure,
    first_timeout,
    may_retry,
    pick_now,
    wants_report,
)
from lbkit._callspec import CallSpecBase, ChannelMethods
from lbkit._driver import BalancerBase, Member
from lbkit._futures import Cancelled, EndedFuture, call_kwargs
from lbkit._hedged import HEDGED_MULTICALLABLES
from lbkit.selectors.base import Key, Picker

__all__ = ["BalancedChannel", "PickedChannel", "RequestTape", "SyncDriver"]

_LOCK_MAKING = threading.Lock()
"""Held only while a call makes its own lock (on its slow path)."""

MAX_REPLAY = 256
"""Requests of a client stream kept for a retry before the first response; past it, no retry."""


class SyncDriver(BalancerBase):
    """What the sync channel needs of its balancer beyond the shared base: a blocking wait."""

    def wait_change(self, until: float, picker: Picker | None) -> None:
        """Block until ``lb.clock`` reaches ``until``, the picker is no longer ``picker``, the clock is
        advanced or the balancer closes, whichever comes first."""
        raise NotImplementedError

    def wake(self) -> None:
        """End every :meth:`wait_change` now (a call was cancelled)."""
        raise NotImplementedError


class CallSpec(CallSpecBase[SyncDriver]):
    """A stub method's shared call rules, with the sync machine loop."""

    __slots__ = ()

    def run(
        self, machine: Attempts, call: Callable[[Member, Attempt], Any], tape: RequestTape | None = None
    ) -> Any:
        """Make attempts until one answers (returned) or the machine stops (its error raised).

        ``call(member, attempt)`` runs one blocking attempt: it returns (result, trailing metadata for load
        reports or None); ``tape`` holds a client stream's requests.
        """
        lb = self.lb
        while True:
            action = machine.next()
            if isinstance(action, float):
                lb.wait_change(action, machine.picker)
                continue
            attempt = machine.start(action)
            try:
                result, trailers = call(action, attempt)
            except BaseException as exc:
                begun = isinstance(exc, grpc.RpcError)
                source_error = tape.error if tape is not None else None
                machine.done(attempt, failure(exc, action, begun=begun, source_error=source_error))
                continue
            machine.done(attempt, SUCCESS, trailers)
            return result

    def machine(self, key: Key, timeout: float | None, replay: RequestTape | None = None) -> Attempts:
        """The machine of a call that found nothing to pick at once."""
        return Attempts(self, key, None if timeout is None else self.lb.clock() + timeout, replay)


def _blocking(
    mc: Any, arg: Any, timeout: float | None, kw: dict[str, Any], with_call: bool, reports: bool
) -> Any:
    """One blocking attempt: (result, its trailing metadata when load reports are read, else None)."""
    if not reports:
        return (
            mc.with_call(arg, timeout=timeout, **kw) if with_call else mc(arg, timeout=timeout, **kw)
        ), None
    response, call = mc.with_call(arg, timeout=timeout, **kw)
    return ((response, call) if with_call else response), call.trailing_metadata()


def _stream_finisher(
    lb: BalancerBase, member: Member, started: float, tape: RequestTape | None, cut: set[Any] | None
) -> Callable[[Any], None]:
    """grpc's done callback of one stream attempt: its accounting, once (it holds no reference to the
    call the user sees, so an abandoned stream can be collected and cancelled). A call failed by its
    own request iterator says nothing of the endpoint; one cut for want of a first response (in
    ``cut``) ran out of time there."""
    stats = member.stats

    def done(call: Any) -> None:
        code = call.code()
        if tape is not None and tape.error is not None:
            code = None
        elif cut is not None and call in cut:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        elif code is not OK:
            code = attempt_code(code, call.cancelled(), member)
        account(
            lb, stats, started, code, False, call.trailing_metadata() if wants_report(lb, stats) else None
        )

    return done


# ---------------------------------------------------------------------------------------------- unary


class _UnaryUnary(grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    __slots__ = ("_c",)

    def __init__(self, c: CallSpec) -> None:
        self._c = c

    def _invoke(self, request: Any, timeout: float | None, kw: dict[str, Any], with_call: bool) -> Any:
        c = self._c
        if kw["metadata"] is None and c.key_fn is None:
            key: Key = None
        else:
            key, kw["metadata"] = c.route(kw["metadata"], request)
        member = pick_now(c, key)
        if member is not None:
            stats = member.stats
            started = stats.start()
            try:
                mc = member.callables.get(c.spec) or member.callable(c.spec)
                t = timeout if c.attempt_timeout is None else first_timeout(c, timeout)
                if c.load_reports and stats.load_wanted:
                    result, trailers = _blocking(mc, request, t, kw, with_call, True)
                else:
                    trailers = None
                    result = (
                        mc.with_call(request, timeout=t, **kw) if with_call else mc(request, timeout=t, **kw)
                    )
            except BaseException as exc:
                machine = Attempts(c, key, None if timeout is None else started + timeout)
                attempt = machine.adopt(member, started, timeout)
                machine.done(attempt, failure(exc, member, begun=isinstance(exc, grpc.RpcError)))
            else:
                account(c.lb, stats, started, OK, True, trailers)
                return result
        else:
            machine = c.machine(key, timeout)
        return self._run(machine, request, kw, with_call)

    def _run(self, machine: Attempts, request: Any, kw: dict[str, Any], with_call: bool) -> Any:
        c = self._c

        def call(m: Member, attempt: Attempt) -> Any:
            return _blocking(
                m.callable(c.spec), request, attempt.timeout, kw, with_call, wants_report(c.lb, m.stats)
            )

        return c.run(machine, call)

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        c = self._c
        if metadata is None and c.simple:
            # The common call, in one frame: no key, no per-attempt timeout, no load reports.
            member = pick_now(c, None)
            if member is not None:
                stats = member.stats
                started = stats.start()
                try:
                    result = (member.callables.get(c.spec) or member.callable(c.spec))(
                        request,
                        timeout=timeout,
                        metadata=None,
                        credentials=credentials,
                        wait_for_ready=wait_for_ready,
                        compression=compression,
                    )
                except BaseException as exc:
                    kw = call_kwargs(None, credentials, wait_for_ready, compression)
                    machine = Attempts(c, None, None if timeout is None else started + timeout)
                    attempt = machine.adopt(member, started, timeout)
                    machine.done(attempt, failure(exc, member, begun=isinstance(exc, grpc.RpcError)))
                    return self._run(machine, request, kw, False)
                account(c.lb, stats, started, OK, True)
                return result
        return self._invoke(
            request, timeout, call_kwargs(metadata, credentials, wait_for_ready, compression), False
        )

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._invoke(
            request, timeout, call_kwargs(metadata, credentials, wait_for_ready, compression), True
        )

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """A grpc.Future for the call, retried like a blocking one."""
        kw = call_kwargs(metadata, credentials, wait_for_ready, compression)
        key, kw["metadata"] = self._c.route(metadata, request)
        return _Future(self._c, key, lambda: request, None, timeout, kw)


class _StreamUnary(grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    __slots__ = ("_c",)

    def __init__(self, c: CallSpec) -> None:
        self._c = c

    def _invoke(
        self, request_iterator: Iterator[Any], timeout: float | None, kw: dict[str, Any], with_call: bool
    ) -> Any:
        c = self._c
        key, kw["metadata"] = c.route(kw["metadata"], None)
        tape = RequestTape(iter(request_iterator))

        def call(m: Member, attempt: Attempt) -> Any:
            return _blocking(
                m.callable(c.spec), tape.reader(), attempt.timeout, kw, with_call, wants_report(c.lb, m.stats)
            )

        return c.run(c.machine(key, timeout, tape), call, tape)

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        kw = call_kwargs(metadata, credentials, wait_for_ready, compression)
        return self._invoke(request_iterator, timeout, kw, False)

    def with_call(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        kw = call_kwargs(metadata, credentials, wait_for_ready, compression)
        return self._invoke(request_iterator, timeout, kw, True)

    def future(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """A grpc.Future for the call, retried like a blocking one (its requests replayed)."""
        kw = call_kwargs(metadata, credentials, wait_for_ready, compression)
        key, kw["metadata"] = self._c.route(metadata, None)
        tape = RequestTape(iter(request_iterator))
        return _Future(self._c, key, tape.reader, tape, timeout, kw)


class _Future(EndedFuture, grpc.Call, grpc.Future):  # type: ignore[misc]
    """A unary-response call as a grpc.Future: attempts chain from grpc's done callbacks; waits (a
    backoff, a ready endpoint) run on a short-lived thread, never on grpc's."""

    def __init__(
        self,
        c: CallSpec,
        key: Key,
        arg: Callable[[], Any],
        tape: RequestTape | None,
        timeout: float | None,
        kw: dict[str, Any],
    ) -> None:
        self._c = c
        self._arg = arg
        self._tape = tape
        self._kw = kw
        self._cancelled = False
        self._ended = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._error: BaseException | None = None
        self._inner: Any = None
        self._attempt: Attempt | None = None
        self._machine = Attempts(c, key, None if timeout is None else c.lb.clock() + timeout, tape)
        self._advance()

    def _advance(self) -> None:
        """Start the next attempt, or end the future; a wait moves to a helper thread."""
        machine = self._machine
        c = self._c
        while True:
            try:
                action = machine.next()
            except BaseException as err:
                self._end(err)
                return
            if isinstance(action, float):
                threading.Thread(
                    target=self._wait_then_advance, args=(action, machine.picker), daemon=True
                ).start()
                return
            attempt = machine.start(action)
            try:
                inner = action.callable(c.spec).future(self._arg(), timeout=attempt.timeout, **self._kw)
            except BaseException as exc:
                machine.done(attempt, failure(exc, action, begun=False))
                continue
            self._inner = inner
            self._attempt = attempt
            inner.add_done_callback(self._attempt_done)
            return

    def _wait_then_advance(self, until: float, picker: Picker | None) -> None:
        self._c.lb.wait_change(until, picker)
        self._advance()

    def _attempt_done(self, inner: Any) -> None:
        attempt = self._attempt
        assert attempt is not None
        machine = self._machine
        code = inner.code()
        if code is OK:
            trailers = inner.trailing_metadata() if wants_report(self._c.lb, attempt.member.stats) else None
            machine.done(attempt, SUCCESS, trailers)
            self._end(None)
            return
        tape = self._tape
        machine.done(
            attempt,
            failure(
                inner,
                attempt.member,
                cancelled=self._cancelled,
                source_error=tape.error if tape is not None else None,
            ),
        )
        self._advance()

    def _end(self, error: BaseException | None) -> None:
        with self._lock:
            if self._ended.is_set():
                return
            self._error = error
            self._ended.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    # grpc.Future
    def cancel(self) -> bool:
        if self._ended.is_set():
            return False
        self._cancelled = True
        inner = self._inner
        self._machine.cancel(Cancelled())
        if inner is not None:
            inner.cancel()
        else:
            self._c.lb.wake()
        return True

    # grpc.Call
    def time_remaining(self) -> float | None:
        deadline = self._machine.deadline
        return None if deadline is None else max(deadline - self._c.lb.clock(), 0.0)

    def _on_end(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if not self._ended.is_set():
                self._callbacks.append(callback)
                return True
        return False


# ---------------------------------------------------------------------------------------------- streams


class RequestTape:
    """The requests of a client stream, read from their source once and given to one attempt at a time.

    Kept from the start until the first response (at most :data:`MAX_REPLAY`), so that a new attempt
    can send them again; after that only what the current attempt has not sent yet is kept. The source
    is read under a lock of its own that nothing else takes, so a source that waits for responses (a
    ping-pong stream) holds up only the reading of requests. A reader of an attempt that is no longer
    the current one stops, and what it read is kept for the current one.
    """

    def __init__(self, source: Iterator[Any]) -> None:
        self._source = source
        self._log: list[Any] = []
        self._base = 0
        """Index (from the first request) of ``_log[0]``."""
        self._recording = True
        self._attempt = 0
        self._pull = threading.Lock()
        self._ended = False
        self.error: BaseException | None = None
        """What the source raised, if it did."""

    @property
    def replayable(self) -> bool:
        """Whether a new attempt can still be given every request read so far."""
        return self._recording and self.error is None

    def stop_recording(self) -> None:
        """The first response came: no more retries, so no more requests kept (the current attempt
        still gets what it has not sent yet)."""
        self._recording = False

    def reader(self) -> Iterator[Any]:
        """The requests from the first, for a new attempt; earlier attempts' readers stop."""
        self._attempt += 1
        return self._read(self._attempt)

    def _read(self, mine: int) -> Iterator[Any]:
        i = 0
        while mine == self._attempt:
            j = i - self._base
            log = self._log
            if j < len(log):
                item = log[j]
            else:
                with self._pull:
                    if mine != self._attempt or self._ended:
                        return
                    if i - self._base >= len(self._log):
                        try:
                            item = next(self._source)
                        except StopIteration:
                            self._ended = True
                            return
                        except BaseException as exc:
                            self.error = exc
                            self._ended = True
                            raise
                        self._log.append(item)
                        if self._recording and self._base + len(self._log) > MAX_REPLAY:
                            self._recording = False  # too many to keep: no retry for this call
                        if mine != self._attempt:
                            return  # kept for the current attempt
                    else:
                        item = self._log[i - self._base]
            i += 1
            if not self._recording and i - self._base >= 64 and self._pull.acquire(blocking=False):
                try:
                    del self._log[: i - self._base]
                    self._base = i
                finally:
                    self._pull.release()
            yield item


class _StreamCall(grpc.Call, grpc.Future):  # type: ignore[misc]
    """A response stream (server or bidirectional streaming) over one attempt at a time.

    Counts as in flight until the stream ends, fails or is cancelled; dropped unread, it cancels. Before
    the first response, a failure the policy retries re-opens the stream on another endpoint (replaying
    a bidirectional stream's requests); the retry is made where the caller reads (or waits for the
    status), and done callbacks fire once, for the call the caller sees.
    """

    # What the slow path sets; a call that succeeds at once never does.
    _got = False
    _cancelled = False
    _machine: Attempts | None = None
    _attempt: Attempt | None = None
    _callbacks: list[Callable[[], None]] | None = None
    _fired = False
    _final: BaseException | None = None
    _inner: Any = None
    _cut: set[Any] | None = None
    """Attempts cut for want of a first response within ``attempt_timeout`` (only with one)."""

    def __init__(
        self,
        c: CallSpec,
        request: Any,
        tape: RequestTape | None,
        timeout: float | None,
        metadata: Any,
        credentials: Any,
        wait_for_ready: Any,
        compression: Any,
    ) -> None:
        if metadata is None and c.key_fn is None:
            key: Key = None
        else:
            key, metadata = c.route(metadata, request)
        self._c = c
        self._request = request
        self._tape = tape
        self._kw = call_kwargs(metadata, credentials, wait_for_ready, compression)
        self._key = key
        self._timeout = timeout
        member = pick_now(c, key)
        if member is None:
            self._machine = c.machine(key, timeout, tape)
            self._open()
            return
        started = member.stats.start()
        self._member = member
        self._started = started
        if c.first_response_timeout is not None:
            self._cut = set()
        try:
            mc = member.callables.get(c.spec) or member.callable(c.spec)
            inner = mc(tape.reader() if tape is not None else request, timeout=timeout, **self._kw)
        except BaseException as exc:
            machine = self._adopt()
            assert self._attempt is not None
            machine.done(self._attempt, failure(exc, member, begun=False))
            self._open()
            return
        inner.add_done_callback(_stream_finisher(c.lb, member, started, tape, self._cut))
        self._inner = inner
        if self._cut is not None:
            self._arm(inner, started, None if timeout is None else started + timeout)

    def _adopt(self) -> Attempts:
        """The machine, made on the first failure, holding the first attempt."""
        c = self._c
        timeout = self._timeout
        machine = Attempts(c, self._key, None if timeout is None else self._started + timeout, self._tape)
        self._attempt = machine.adopt(self._member, self._started, timeout)
        self._machine = machine
        return machine

    def _open(self) -> None:
        """Start the next attempt (waiting as the machine says), or raise the call's error."""
        machine = self._machine
        assert machine is not None
        c = self._c
        tape = self._tape
        while True:
            action = machine.next()
            if isinstance(action, float):
                c.lb.wait_change(action, machine.picker)
                continue
            attempt = machine.start(action)
            try:
                inner = action.callable(c.spec)(
                    tape.reader() if tape is not None else self._request, timeout=attempt.timeout, **self._kw
                )
            except BaseException as exc:
                machine.done(attempt, failure(exc, action, begun=False))
                continue
            if c.first_response_timeout is not None and self._cut is None:
                self._cut = set()
            inner.add_done_callback(_stream_finisher(c.lb, action, attempt.started, tape, self._cut))
            self._inner = inner
            self._member = action
            self._attempt = attempt
            if attempt.limited:
                self._arm(inner, attempt.started, machine.deadline)
            if self._callbacks is not None:
                inner.add_done_callback(self._watch)
            return

    def __iter__(self) -> _StreamCall:
        return self

    def __next__(self) -> Any:
        inner = self._inner
        try:
            response = next(inner)
        except grpc.RpcError as err:
            return self._next_after(inner, err)
        if not self._got:
            self._first()
        return response

    def next(self) -> Any:
        """Same as ``next(call)``."""
        return self.__next__()

    def _first(self) -> None:
        if self._cut is not None:
            with self._lock:  # against _first_due cutting the attempt at this instant
                self._got = True
        else:
            self._got = True
        if self._tape is not None:
            self._tape.stop_recording()

    def _arm(self, inner: Any, started: float, deadline: float | None) -> None:
        """Cut attempt ``inner`` if no response comes within ``attempt_timeout`` (sooner than the call's
        deadline), so that it can be retried elsewhere."""
        c = self._c
        first = c.first_response_timeout
        assert first is not None
        due = started + first
        if deadline is None or due < deadline:
            c.lb.call_at(due, functools.partial(self._first_due, inner))

    def _first_due(self, inner: Any) -> None:
        """The timer of attempt ``inner``: no response yet? Then cut it, if it could be retried."""
        cut = self._cut
        if cut is None or inner is not self._inner or self._got or self._cancelled or self._fired:
            return
        tape = self._tape
        machine = self._machine
        if (tape is not None and not tape.replayable) or (machine is not None and machine.stopped):
            return
        late = Outcome(grpc.StatusCode.DEADLINE_EXCEEDED, None)
        if not may_retry(self._c, late, machine.count if machine is not None else 1):
            return
        # Never wait on the timer thread for a call moving past this attempt, which already failed: its
        # retry may be backing off under the call's lock. Other holders (the first response, a done
        # callback being added) hold it for an instant.
        lock = self._lock
        while not lock.acquire(timeout=0.005):
            attempt = self._attempt
            if inner is not self._inner or (attempt is not None and attempt.judged):
                return
        try:
            if self._got or inner is not self._inner:
                return
            cut.add(inner)
        finally:
            lock.release()
        inner.cancel()

    def _next_after(self, inner: Any, err: grpc.RpcError) -> Any:
        while True:
            self._advance(inner, err)
            inner = self._inner
            try:
                response = next(inner)
            except grpc.RpcError as again:
                err = again
                continue
            if not self._got:
                self._first()
            return response

    @property
    def _lock(self) -> threading.Lock:
        """The call's own lock, made when first needed (a call that succeeds at once needs none)."""
        lock: threading.Lock | None = self.__dict__.get("_call_lock")
        if lock is None:
            with _LOCK_MAKING:
                lock = self.__dict__.setdefault("_call_lock", threading.Lock())
        return lock

    def _advance(self, inner: Any, err: BaseException) -> None:
        """The attempt ``inner`` failed with ``err``: open the next one, or raise the call's error."""
        final: BaseException | None = None
        with self._lock:
            if inner is not self._inner:
                return  # another thread moved on already
            machine = self._machine or self._adopt()
            assert self._attempt is not None
            tape = self._tape
            machine.failed(
                self._attempt,
                failure(
                    err,
                    self._member,
                    responded=self._got,
                    cancelled=self._cancelled,
                    source_error=tape.error if tape is not None else None,
                    timed_out=self._timed_out(inner),
                ),
            )
            try:
                self._open()
            except BaseException as exc:
                final = self._final = exc
        if final is not None:
            self._fire()
            raise final

    def _settle(self) -> None:
        """Wait for the call the caller sees to end, making its retries."""
        while not self._fired:
            inner = self._inner
            if inner.code() is OK or not self._may_retry(inner):
                return
            try:
                self._advance(inner, inner)
            except BaseException:
                return

    def _may_retry(self, inner: Any) -> bool:
        """Whether the failed attempt ``inner`` might be retried (the caller's next read decides)."""
        if self._cancelled or self._got or (self._machine is not None and self._machine.stopped):
            return False
        tape = self._tape
        if tape is not None and not tape.replayable:
            return False
        timed_out = self._timed_out(inner)
        outcome = failure(
            inner, self._member, cancelled=inner.cancelled() and not timed_out, timed_out=timed_out
        )
        count = self._machine.count if self._machine is not None else 1
        return may_retry(self._c, outcome, count)

    def _timed_out(self, inner: Any) -> float | None:
        """The first-response timeout after which ``inner`` was cut, if it was."""
        cut = self._cut
        return self._c.first_response_timeout if cut is not None and inner in cut else None

    def _watch(self, inner: Any) -> None:
        """grpc's done callback while the caller has callbacks: fire them once the call is over."""
        if inner is self._inner and (inner.code() is OK or not self._may_retry(inner)):
            self._fire()

    def _fire(self) -> None:
        with self._lock:
            if self._fired:
                return
            self._fired = True
            callbacks = self._callbacks or []
        for cb in callbacks:
            cb()

    def __del__(self) -> None:
        inner = getattr(self, "_inner", None)
        if inner is not None and inner.is_active():
            inner.cancel()

    # grpc.Call / grpc.RpcContext / grpc.Future, of the call the caller sees.
    def _status(self) -> Any:
        self._settle()
        final = self._final
        return (
            final
            if final is not None and final is not self._inner and hasattr(final, "code")
            else self._inner
        )

    def is_active(self) -> bool:
        return not self._fired and bool(self._inner.is_active())

    def time_remaining(self) -> float | None:
        return self._inner.time_remaining()  # type: ignore[no-any-return]

    def cancel(self) -> bool:
        self._cancelled = True
        machine = self._machine
        if machine is not None:
            machine.cancel(Cancelled())
            self._c.lb.wake()
        return bool(self._inner.cancel())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._add(callback)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        if not self._add(lambda: fn(self)):
            fn(self)

    def _add(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._fired:
                return False
            first = self._callbacks is None
            if self._callbacks is None:
                self._callbacks = []
            self._callbacks.append(callback)
            inner = self._inner
        if first:
            inner.add_done_callback(self._watch)
        return True

    def initial_metadata(self) -> Any:
        return self._inner.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._status().trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._status().code()

    def details(self) -> str:
        return self._status().details()  # type: ignore[no-any-return]

    def cancelled(self) -> bool:
        return self._cancelled

    def running(self) -> bool:
        return self.is_active()

    def done(self) -> bool:
        if self._fired:
            return True
        inner = self._inner
        return bool(inner.done()) and (inner.code() is OK or not self._may_retry(inner))

    def result(self, timeout: float | None = None) -> Any:
        if timeout is None:
            self._settle()
        return self._inner.result(timeout)

    def exception(self, timeout: float | None = None) -> Any:
        if timeout is None:
            self._settle()
            if self._final is not None:
                return self._final
        return self._inner.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        return self._inner.traceback(timeout)


class _UnaryStream(grpc.UnaryStreamMultiCallable):  # type: ignore[misc]
    __slots__ = ("_c",)

    def __init__(self, c: CallSpec) -> None:
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
        return _StreamCall(
            self._c, request, None, timeout, metadata, credentials, wait_for_ready, compression
        )


class _StreamStream(grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    __slots__ = ("_c",)

    def __init__(self, c: CallSpec) -> None:
        self._c = c

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        tape = RequestTape(iter(request_iterator))
        return _StreamCall(self._c, None, tape, timeout, metadata, credentials, wait_for_ready, compression)


_MULTICALLABLES: dict[str, Callable[[Any], Any]] = {
    "unary_unary": _UnaryUnary,
    "unary_stream": _UnaryStream,
    "stream_unary": _StreamUnary,
    "stream_stream": _StreamStream,
}


class BalancedChannel(ChannelMethods, grpc.Channel):  # type: ignore[misc]
    """A grpc.Channel whose every call goes to an endpoint the balancer picks for it.

    Closing it does nothing: the balancer owns the real channels.
    """

    _spec_class = CallSpec
    _multicallables: ClassVar[dict[str, Callable[[Any], Any]]] = _MULTICALLABLES
    _hedged: ClassVar[dict[str, Callable[[Any], Any]]] = HEDGED_MULTICALLABLES

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        """Not supported: connectivity is per endpoint; use the balancer's events."""
        raise NotImplementedError(
            "a BalancedChannel has no single connectivity state; use Balancer.add_listener"
        )

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        """Not supported (see :meth:`subscribe`)."""
        raise NotImplementedError("a BalancedChannel has no single connectivity state")

    def close(self) -> None:
        """Nothing to do: the balancer closes its channels."""

    def __enter__(self) -> BalancedChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class PickedChannel(ChannelMethods, grpc.Channel):  # type: ignore[misc]
    """The channel of one endpoint, from ``lb.pick()``: its calls count in flight (the endpoint's drain
    waits for them) and go to that endpoint only, never retried elsewhere.

    Good while the endpoint is in discovery: once it leaves, calls in flight get the drain's time to
    finish and new calls fail at once with :class:`~lbkit.EndpointRemovedError` (pick again). Closing
    it does nothing: the balancer owns the channel.
    """

    _spec_class = CallSpec
    _multicallables: ClassVar[dict[str, Callable[[Any], Any]]] = _MULTICALLABLES
    _hedged: ClassVar[dict[str, Callable[[Any], Any]]] = HEDGED_MULTICALLABLES

    def __init__(self, lb: Any, member: Member) -> None:
        super().__init__(lb, None, member)
        self.address = member.address
        """The endpoint this channel calls."""

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        """The endpoint channel's connectivity, as ``grpc.Channel.subscribe``."""
        assert self._pinned is not None
        self._pinned.channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        """Stop a :meth:`subscribe`."""
        assert self._pinned is not None
        self._pinned.channel.unsubscribe(callback)

    def close(self) -> None:
        """Nothing to do: the balancer closes its channels."""

    def __enter__(self) -> PickedChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"PickedChannel({self.address!r})"
