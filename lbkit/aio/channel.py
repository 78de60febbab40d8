"""The asyncio ``BalancedChannel``: grpc.aio-style call objects that pick an endpoint per call.

The asyncio driver of the attempt machine (:mod:`lbkit._attempts`), the twin of :mod:`lbkit.channel`:
the same rules, the loops differ only in ``await``. A call starts its first attempt when it is made (as a
grpc.aio call does) if an endpoint is ready; a retry is made where the caller awaits or iterates it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, ClassVar

import grpc

from lbkit._attempts import (
    OK,
    Attempt,
    Attempts,
    Outcome,
    account,
    attempt_code,
    failure,
    first_timeout,
    may_retry,
    pick_now,
)
from lbkit._callspec import CallSpecBase, ChannelMethods
from lbkit._driver import BalancerBase, Member
from lbkit._futures import call_kwargs
from lbkit._grpc_private import finished_code, finished_trailing_metadata, keep_server_status
from lbkit.aio._hedged import HEDGED_MULTICALLABLES
from lbkit.selectors.base import Key, Picker

__all__ = ["AsyncDriver", "AsyncRequestTape", "BalancedChannel", "PickedChannel"]

MAX_REPLAY = 256
"""Requests of a client stream kept for a retry before the first response; past it, no retry."""


class AsyncDriver(BalancerBase):
    """What the asyncio channel needs of its balancer beyond the shared base: an awaitable wait."""

    async def await_change(self, until: float, picker: Picker | None) -> None:
        """Wait until ``lb.clock`` reaches ``until``, the picker is no longer ``picker``, the clock is
        advanced or the balancer closes, whichever comes first."""
        raise NotImplementedError

    def wake(self) -> None:
        """End every :meth:`await_change` now (a call was cancelled)."""
        raise NotImplementedError


class _Spec(CallSpecBase[AsyncDriver]):
    """A stub method's shared call rules."""

    __slots__ = ()


def _finisher(
    lb: BalancerBase,
    member: Member,
    started: float,
    observe: bool,
    tape: AsyncRequestTape | None,
    cut: set[Any] | None,
) -> Callable[[Any], None]:
    """grpc's done callback of one attempt: its accounting, once. A call failed by its own request
    iterator says nothing of the endpoint; one cut for want of a first response (in ``cut``) ran out of
    time there."""
    stats = member.stats
    counted = False

    def done(call: Any) -> None:
        nonlocal counted
        if counted:
            return
        counted = True
        code = finished_code(call)
        if tape is not None and tape.error is not None:
            code = None
        elif cut is not None and call in cut:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        elif code is not OK:
            code = attempt_code(code, call.cancelled(), member)
        trailers = finished_trailing_metadata(call) if lb.load_reports and stats.load_wanted else None
        account(lb, stats, started, code, observe, trailers)

    return done


def _task_cancelled() -> bool:
    """Whether the running task is being cancelled (Python 3.11+ can tell; 3.10 says no)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is not None and cancelling() > 0


def _code_of(error: BaseException) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    if isinstance(error, grpc.RpcError) and callable(code):
        value = code()
        if isinstance(value, grpc.StatusCode):
            return value
    return None


class AsyncRequestTape:
    """The requests of an asyncio client stream, read from their source once and given to one attempt at
    a time: the twin of :class:`lbkit.channel.RequestTape`.

    The source is the caller's iterator (sync or async) or, without one, what the caller passes to
    ``write()`` until ``done_writing()``.
    """

    def __init__(self, source: Any) -> None:
        self._writes: collections.deque[tuple[Any, asyncio.Future[None] | None]] | None = None
        if source is None:
            self._writes = collections.deque()
            self._more = asyncio.Event()
            self._source: Any = self._written()
            self._async = True
        elif hasattr(source, "__aiter__"):
            self._source = source.__aiter__()
            self._async = True
        else:
            self._source = iter(source)
            self._async = False
        self._log: list[Any] = []
        self._base = 0
        self._recording = True
        self._attempt = 0
        self._pull = asyncio.Lock()
        self._ended = False
        self._closed: BaseException | None = None
        self._writing_done = False
        self.error: BaseException | None = None
        """What the source raised, if it did."""

    @property
    def replayable(self) -> bool:
        """Whether a new attempt can still be given every request read so far."""
        return self._recording and self.error is None

    def stop_recording(self) -> None:
        """The first response came: no more retries, so no more requests kept."""
        self._recording = False

    def reader(self) -> AsyncIterator[Any]:
        """The requests from the first, for a new attempt; earlier attempts' readers stop."""
        self._attempt += 1
        return self._read(self._attempt)

    async def _next(self) -> Any:
        if self._async:
            return await self._source.__anext__()
        try:
            return next(self._source)
        except StopIteration:
            raise StopAsyncIteration from None

    async def _read(self, mine: int) -> AsyncIterator[Any]:
        i = 0
        while mine == self._attempt:
            j = i - self._base
            if j < len(self._log):
                item = self._log[j]
            else:
                async with self._pull:
                    if mine != self._attempt or self._ended:
                        return
                    if i - self._base >= len(self._log):
                        try:
                            item = await self._next()
                        except StopAsyncIteration:
                            self._ended = True
                            return
                        except BaseException as exc:
                            if not isinstance(exc, asyncio.CancelledError):
                                self.error = exc
                                self._ended = True
                            raise
                        self._log.append(item)
                        if self._recording and self._base + len(self._log) > MAX_REPLAY:
                            self._recording = False
                        if mine != self._attempt:
                            return
                    else:
                        item = self._log[i - self._base]
            i += 1
            if not self._recording and i - self._base >= 64 and not self._pull.locked():
                del self._log[: i - self._base]
                self._base = i
            yield item

    # the caller's write() / done_writing()
    async def _written(self) -> AsyncIterator[Any]:
        writes = self._writes
        assert writes is not None
        while True:
            while not writes:
                self._more.clear()
                await self._more.wait()
            item, taken = writes.popleft()
            if taken is not None and not taken.done():
                taken.set_result(None)
            if taken is None:
                return
            yield item

    def push(self, request: Any) -> asyncio.Future[None]:
        """Queue ``request`` for the call; the future is done once an attempt has taken it."""
        if self._writes is None:
            raise grpc.aio.UsageError("write() is for calls made without a request iterator")
        if self._closed is not None:
            raise self._closed
        if self._writing_done:
            raise asyncio.InvalidStateError("done_writing() was called: no more requests")
        taken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writes.append((request, taken))
        self._more.set()
        return taken

    async def write(self, request: Any) -> None:
        """Hand ``request`` to the call; returns once an attempt has taken it."""
        await self.push(request)

    def done_writing(self) -> None:
        """No more requests."""
        if self._writes is None:
            raise grpc.aio.UsageError("done_writing() is for calls made without a request iterator")
        if not self._writing_done and self._closed is None:
            self._writing_done = True
            self._writes.append((None, None))
            self._more.set()

    def close(self, error: BaseException) -> None:
        """The call is over: writes waiting or to come fail with ``error``."""
        if self._closed is not None:
            return
        self._closed = error
        for _, taken in self._writes or ():
            if taken is not None and not taken.done():
                taken.set_exception(error)


class _Call:
    """What every balanced asyncio call shares: its attempts, cancellation, done callbacks, status."""

    _machine: Attempts | None = None
    _attempt: Attempt | None = None
    _inner: Any = None
    _member: Member | None = None
    _final: BaseException | None = None
    """The call's error, once it ended with one."""
    _ended = False
    _cancelled = False
    _callbacks: list[Callable[[Any], None]] | None = None
    _fired = False
    _tape: AsyncRequestTape | None = None
    _got = False
    _lock: asyncio.Lock | None = None
    _cut: set[Any] | None = None
    """Attempts cut for want of a first response within ``attempt_timeout`` (only with one)."""

    def __init__(self, c: _Spec, arg: Any, timeout: float | None, kw: dict[str, Any]) -> None:
        if kw["metadata"] is None and c.key_fn is None:
            key: Key = None
        else:
            key, kw["metadata"] = c.route(kw["metadata"], arg)
        self._c = c
        self._arg = arg
        self._key = key
        self._timeout = timeout
        self._kw = kw
        member = pick_now(c, key)
        if member is None:
            self._started = c.lb.clock()
            return
        started = self._started = member.stats.start()
        self._member = member
        if c.first_response_timeout is not None:
            self._cut = set()
        try:
            mc = member.callables.get(c.spec) or member.callable(c.spec)
            inner = mc(
                self._request() if self._tape is not None else arg,
                timeout=timeout if c.attempt_timeout is None else first_timeout(c, timeout),
                **kw,
            )
            if self._tape is not None:
                keep_server_status(inner)
        except BaseException as exc:
            machine = self._adopt()
            assert self._attempt is not None
            machine.done(self._attempt, failure(exc, member, begun=False))
            if machine.stopped:  # a bad argument: raised where grpc raises it
                raise
            return
        inner.add_done_callback(_finisher(c.lb, member, started, c.observe, self._tape, self._cut))
        self._inner = inner
        if self._cut is not None:
            self._arm(inner, started, None if timeout is None else started + timeout)

    def _request(self) -> Any:
        tape = self._tape
        return tape.reader() if tape is not None else self._arg

    def _adopt(self) -> Attempts:
        """The machine, made when the call first needs it; it holds the first attempt, if one was made."""
        machine = self._machine
        if machine is not None:
            return machine
        c = self._c
        timeout = self._timeout
        machine = self._machine = Attempts(
            c, self._key, None if timeout is None else self._started + timeout, self._tape
        )
        if self._member is not None:
            self._attempt = machine.adopt(self._member, self._started, timeout)
        return machine

    async def _open(self) -> Any:
        """Start the next attempt (waiting as the machine says) and return it, or raise the call's
        error."""
        machine = self._adopt()
        c = self._c
        lb = c.lb
        while True:
            try:
                action = machine.next()
            except BaseException as exc:
                self._end(exc)
                raise
            if isinstance(action, float):
                await lb.await_change(action, machine.picker)
                continue
            attempt = machine.start(action)
            try:
                inner = action.callable(c.spec)(self._request(), timeout=attempt.timeout, **self._kw)
                if self._tape is not None:
                    keep_server_status(inner)
            except BaseException as exc:
                machine.done(attempt, failure(exc, action, begun=False))
                continue
            if c.first_response_timeout is not None and self._cut is None:
                self._cut = set()
            inner.add_done_callback(_finisher(lb, action, attempt.started, c.observe, self._tape, self._cut))
            self._inner = inner
            self._member = action
            self._attempt = attempt
            if attempt.limited and self._cut is not None:
                self._arm(inner, attempt.started, machine.deadline)
            if self._callbacks is not None:
                inner.add_done_callback(self._watch)
            return inner

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
        if cut is None or inner is not self._inner or self._got or self._ended or self._cancelled:
            return
        tape = self._tape
        machine = self._machine
        if (tape is not None and not tape.replayable) or (machine is not None and machine.stopped):
            return
        late = Outcome(grpc.StatusCode.DEADLINE_EXCEEDED, None)
        if may_retry(self._c, late, machine.count if machine is not None else 1):
            cut.add(inner)
            inner.cancel()

    def _timed_out(self, inner: Any) -> float | None:
        """The first-response timeout after which ``inner`` was cut, if it was."""
        cut = self._cut
        return self._c.first_response_timeout if cut is not None and inner in cut else None

    def _mine(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the caller's own cancellation (which is theirs to see, never retried)."""
        return isinstance(exc, asyncio.CancelledError) and (self._cancelled or _task_cancelled())

    def _failed(self, exc: BaseException) -> None:
        """The current attempt failed with ``exc``: let the machine decide (its next() says what next)."""
        inner = self._inner
        if inner is not None and not inner.done():
            # Failed in the client before grpc finished it (a bad argument raised in grpc's task):
            # cancelling ends it, and grpc's done callback counts its end.
            inner.cancel()
        machine = self._adopt()
        assert self._attempt is not None and self._member is not None
        tape = self._tape
        machine.failed(
            self._attempt,
            failure(
                exc,
                self._member,
                timed_out=self._timed_out(inner),
                responded=self._got,
                cancelled=self._cancelled,
                source_error=tape.error if tape is not None else None,
            ),
        )

    async def _advance(self, inner: Any, exc: BaseException) -> Any:
        """The attempt ``inner`` ended with ``exc``: return the attempt to go on with (the next one, made
        now unless another reader or writer of this call made it already), or raise the call's error.
        Whoever of the caller's reads, writes and awaits sees a failure first makes the retry."""
        lock = self._lock
        if lock is None:
            lock = self._lock = asyncio.Lock()
        async with lock:
            if self._inner is None:
                return await self._open()  # no attempt yet: the first one
            if inner is self._inner and not (self._attempt is not None and self._attempt.judged):
                if self._mine(exc):
                    self._end(exc)
                    raise exc
                self._failed(exc)
                return await self._open()
            if self._ended:
                raise (
                    self._final
                    if self._final is not None
                    else asyncio.InvalidStateError("the RPC has finished")
                )
            return self._inner

    def _end(self, error: BaseException | None) -> None:
        """The call the caller sees is over."""
        if self._ended:
            return
        self._ended = True
        self._final = error
        tape = self._tape
        if tape is not None:
            tape.close(error if error is not None else asyncio.InvalidStateError("the RPC has finished"))
        self._fire()

    def _may_retry(self, inner: Any) -> bool:
        if self._cancelled or self._got or self._ended or self._member is None:
            return False
        tape = self._tape
        if tape is not None and not tape.replayable:
            return False
        code = finished_code(inner)
        outcome = failure(_Status(code), self._member, timed_out=self._timed_out(inner))
        return may_retry(self._c, outcome, self._machine.count if self._machine is not None else 1)

    def _watch(self, inner: Any) -> None:
        """grpc's done callback while the caller has callbacks: fire them once the call is over."""
        if inner is self._inner and (finished_code(inner) is OK or not self._may_retry(inner)):
            self._fire()

    def _fire(self) -> None:
        if self._fired:
            return
        self._fired = True
        for cb in self._callbacks or ():
            cb(self)

    # grpc.aio.RpcContext / Call
    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        if self._ended:
            return True
        inner = self._inner
        if inner is None or not inner.done():
            return False
        return finished_code(inner) is OK or not self._may_retry(inner)

    def time_remaining(self) -> float | None:
        timeout = self._timeout
        if timeout is None:
            return None
        return max(self._started + timeout - self._c.lb.clock(), 0.0)

    def cancel(self) -> bool:
        if self._ended:
            return False
        self._cancelled = True
        machine = self._machine
        if machine is not None:
            machine.cancel(asyncio.CancelledError())
            self._c.lb.wake()
        inner = self._inner
        if inner is not None:
            inner.cancel()
        return True

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback(call)`` once the call is over (after its last attempt)."""
        if self._fired:
            callback(self)
            return
        first = self._callbacks is None
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)
        if first and self._inner is not None:
            self._inner.add_done_callback(self._watch)

    async def _settle(self) -> None:
        raise NotImplementedError

    async def _settled(self) -> Any:
        """Wait for the call to be over; return what holds its status (an error, or the last attempt)."""
        try:
            await self._settle()
        except asyncio.CancelledError:
            if not self._cancelled:
                raise
        except Exception:
            pass
        final = self._final
        if final is not None and _code_of(final) is not None:
            return final
        return self._inner

    async def initial_metadata(self) -> Any:
        inner = self._inner if self._inner is not None else await self._open()
        return await inner.initial_metadata()

    async def trailing_metadata(self) -> Any:
        held = await self._settled()
        if held is None:
            return grpc.aio.Metadata()
        value = held.trailing_metadata()
        return await value if asyncio.iscoroutine(value) else value

    async def code(self) -> grpc.StatusCode:
        held = await self._settled()
        if held is None:
            return grpc.StatusCode.CANCELLED if self._cancelled else grpc.StatusCode.UNAVAILABLE
        if held is self._inner:
            return await held.code()
        return _code_of(held) or grpc.StatusCode.UNKNOWN

    async def details(self) -> str:
        held = await self._settled()
        if held is None:
            return str(self._final) if self._final is not None else ""
        if held is self._inner:
            return await held.details()  # type: ignore[no-any-return]
        return str(held.details())

    async def wait_for_connection(self) -> None:
        inner = self._inner if self._inner is not None else await self._open()
        await inner.wait_for_connection()


class _Status(grpc.RpcError):  # type: ignore[misc]
    """A finished attempt's status as an error, for the retry rule's questions."""

    def __init__(self, code: grpc.StatusCode | None) -> None:
        super().__init__()
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code


class _UnaryResponse(_Call):
    """A call with one response (unary-unary, client streaming): awaitable, retried where awaited."""

    _response: Any = None

    def __await__(self) -> Generator[Any, None, Any]:
        inner = self._inner
        if inner is not None and self._machine is None:
            try:
                response = yield from inner.__await__()
            except BaseException as exc:
                return (yield from self._retry(inner, exc).__await__())
            if self._callbacks is not None or self._tape is not None:
                self._response = response
                self._end(None)
            else:
                self._ended = True
            return response
        return (yield from self._run().__await__())

    async def _run(self) -> Any:
        if self._ended:
            if self._final is not None:
                raise self._final
            return self._response if self._machine is not None else await self._inner
        inner = self._inner
        if inner is None:
            inner = await self._advance(None, asyncio.InvalidStateError())
        elif self._attempt is not None and self._attempt.judged:
            inner = await self._advance(inner, asyncio.InvalidStateError())
        return await self._attempts(inner)

    async def _retry(self, inner: Any, exc: BaseException) -> Any:
        return await self._attempts(await self._advance(inner, exc))

    async def _attempts(self, inner: Any) -> Any:
        while True:
            try:
                response = await inner
            except BaseException as exc:
                inner = await self._advance(inner, exc)
                continue
            if inner is self._inner and not self._ended:
                self._response = response
                self._end(None)
            return response

    async def _settle(self) -> None:
        await self


class _StreamResponse(_Call):
    """A call with a response stream (server streaming, bidirectional): retried before its first
    response where the caller reads or writes."""

    _iter: AsyncIterator[Any] | None = None

    async def _responses(self) -> AsyncIterator[Any]:
        inner = self._inner
        if inner is None:
            inner = await self._advance(None, asyncio.InvalidStateError())
        while True:
            try:
                async for response in inner:
                    if not self._got:
                        self._got = True
                        if self._tape is not None:
                            self._tape.stop_recording()
                    yield response
            except GeneratorExit:
                raise
            except BaseException as exc:
                inner = await self._advance(inner, exc)
                continue
            self._end(None)
            return

    def __aiter__(self) -> AsyncIterator[Any]:
        if self._iter is None:
            self._iter = self._responses()
        return self._iter

    def __del__(self) -> None:
        # Dropped before its end: cancel the attempt, whose status would otherwise wait for a reader.
        inner = self._inner
        if inner is not None and not inner.done():
            inner.cancel()

    async def read(self) -> Any:
        try:
            return await self.__aiter__().__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF

    async def _settle(self) -> None:
        async for _ in self.__aiter__():
            pass


class _Writes(_Call):
    """write() / done_writing() of a client-streaming or bidirectional call made without an iterator:
    a write returns once an attempt took the request; if the attempt ends first, the write makes the
    retry (or raises the call's error)."""

    _over: asyncio.Future[None] | None = None
    _over_for: Any = None

    async def write(self, request: Any) -> None:
        tape = self._tape
        assert tape is not None
        taken = tape.push(request)
        inner = self._inner
        while not taken.done():
            if inner is None:
                inner = await self._advance(None, asyncio.InvalidStateError())
                continue
            over = self._attempt_over(inner)
            await asyncio.wait((taken, over), return_when=asyncio.FIRST_COMPLETED)
            if taken.done():
                break
            if finished_code(inner) is OK:
                raise asyncio.InvalidStateError("the RPC has finished")
            inner = await self._advance(inner, await _error_of(inner))
        taken.result()

    async def done_writing(self) -> None:
        tape = self._tape
        assert tape is not None
        tape.done_writing()

    def _attempt_over(self, inner: Any) -> asyncio.Future[None]:
        """A future done when attempt ``inner`` is."""
        if self._over_for is not inner or self._over is None:
            over: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def ended(_call: Any) -> None:
                if not over.done():
                    over.set_result(None)

            inner.add_done_callback(ended)
            self._over, self._over_for = over, inner
        return self._over


async def _error_of(inner: Any) -> BaseException:
    """The error a finished grpc.aio attempt ended with, as grpc raises it."""
    error: BaseException = grpc.aio.AioRpcError(
        await inner.code(),
        await inner.initial_metadata(),
        await inner.trailing_metadata(),
        await inner.details(),
    )
    return error


class _UnaryUnaryCall(_UnaryResponse, grpc.aio.UnaryUnaryCall):  # type: ignore[misc]
    pass


class _UnaryStreamCall(_StreamResponse, grpc.aio.UnaryStreamCall):  # type: ignore[misc]
    pass


class _StreamUnaryCall(_Writes, _UnaryResponse, grpc.aio.StreamUnaryCall):  # type: ignore[misc]
    def __init__(self, c: _Spec, request_iterator: Any, timeout: float | None, kw: dict[str, Any]) -> None:
        self._tape = AsyncRequestTape(request_iterator)
        super().__init__(c, None, timeout, kw)

    def __del__(self) -> None:
        # Dropped before its end: cancel the attempt, which would otherwise wait for requests.
        inner = self._inner
        if inner is not None and not inner.done():
            inner.cancel()


class _StreamStreamCall(_Writes, _StreamResponse, grpc.aio.StreamStreamCall):  # type: ignore[misc]
    def __init__(self, c: _Spec, request_iterator: Any, timeout: float | None, kw: dict[str, Any]) -> None:
        self._tape = AsyncRequestTape(request_iterator)
        super().__init__(c, None, timeout, kw)


class _MultiCallable:
    __slots__ = ("_c",)

    _call: ClassVar[Callable[..., Any]]

    def __init__(self, c: _Spec) -> None:
        self._c = c

    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        kw = call_kwargs(metadata, credentials, wait_for_ready, compression)
        return self._call(self._c, request, timeout, kw)


class _UnaryUnary(_MultiCallable, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    _call = _UnaryUnaryCall


class _UnaryStream(_MultiCallable, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    _call = _UnaryStreamCall


class _StreamUnary(_MultiCallable, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    _call = _StreamUnaryCall


class _StreamStream(_MultiCallable, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    _call = _StreamStreamCall


_MULTICALLABLES: dict[str, Callable[[Any], Any]] = {
    "unary_unary": _UnaryUnary,
    "unary_stream": _UnaryStream,
    "stream_unary": _StreamUnary,
    "stream_stream": _StreamStream,
}


class BalancedChannel(ChannelMethods):
    """A grpc.aio-style channel whose every call goes to an endpoint the balancer picks for it.

    Closing it does nothing: the balancer owns the real channels.
    """

    _spec_class = _Spec
    _multicallables: ClassVar[dict[str, Callable[[Any], Any]]] = _MULTICALLABLES
    _hedged: ClassVar[dict[str, Callable[[Any], Any]]] = HEDGED_MULTICALLABLES

    async def close(self, grace: float | None = None) -> None:
        """Nothing to do: the balancer closes its channels."""

    async def __aenter__(self) -> BalancedChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class PickedChannel(ChannelMethods, grpc.aio.Channel):  # type: ignore[misc]
    """The channel of one endpoint, from ``await lb.pick()``: its calls count in flight (the endpoint's
    drain waits for them) and go to that endpoint only, never retried elsewhere.

    Good while the endpoint is in discovery: once it leaves, calls in flight get the drain's time to
    finish and new calls fail at once with :class:`~lbkit.EndpointRemovedError` (pick again). Closing
    it does nothing: the balancer owns the channel.
    """

    _spec_class = _Spec
    _multicallables: ClassVar[dict[str, Callable[[Any], Any]]] = _MULTICALLABLES
    _hedged: ClassVar[dict[str, Callable[[Any], Any]]] = HEDGED_MULTICALLABLES

    def __init__(self, lb: Any, member: Member) -> None:
        super().__init__(lb, None, member)
        self.address = member.address
        """The endpoint this channel calls."""

    def _channel(self) -> Any:
        assert self._pinned is not None
        return self._pinned.channel

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The endpoint channel's connectivity."""
        return self._channel().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Wait for the endpoint channel's connectivity to change from ``last_observed_state``."""
        await self._channel().wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        """Wait until the endpoint channel is READY."""
        await self._channel().channel_ready()

    async def close(self, grace: float | None = None) -> None:
        """Nothing to do: the balancer closes its channels."""

    async def __aenter__(self) -> PickedChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"PickedChannel({self.address!r})"


with contextlib.suppress(Exception):  # the ABC leaves no abstract method unimplemented
    PickedChannel.__abstractmethods__ = frozenset()
