"""The asyncio driver of hedged calls: the hedging machine (:mod:`lbkit._hedges`) over grpc.aio calls.

The twin of :mod:`lbkit._hedged`. A hedged call runs as one task, started when the call is made (as a
grpc.aio call starts): it asks the machine what to do, starts attempts, and waits for an event: an
attempt's end (grpc's done callback), a stream attempt's first message (a reader task per attempt) or
the hedge timer (the balancer's timer loop, ``lb.call_at``, so a test's fake clock drives it).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import grpc

from lbkit._attempts import OK, SUCCESS, Attempt, failure, wants_report
from lbkit._callspec import CallSpecBase
from lbkit._driver import Member
from lbkit._futures import call_kwargs
from lbkit._grpc_private import finished_code, finished_trailing_metadata
from lbkit._hedges import Hedges

__all__ = ["HEDGED_MULTICALLABLES"]


class _Ended(grpc.RpcError):  # type: ignore[misc]
    """A finished attempt's status, for the machine; the caller gets grpc's own error for it."""

    def __init__(self, code: grpc.StatusCode | None, inner: Any) -> None:
        super().__init__()
        self._code = code
        self.inner = inner

    def code(self) -> grpc.StatusCode | None:
        return self._code


async def _error_of(inner: Any) -> BaseException:
    """The error a finished grpc.aio attempt ended with, as grpc raises it."""
    error: BaseException = grpc.aio.AioRpcError(
        await inner.code(),
        await inner.initial_metadata(),
        await inner.trailing_metadata(),
        await inner.details(),
    )
    return error


def _done_callback(call: _Hedged, attempt: Attempt) -> Callable[[Any], None]:
    """grpc's done callback of one attempt. It holds the call weakly, so that a stream its caller dropped
    is collected (and its finalizer cancels what still runs); then it only counts the attempt's end."""
    ref = weakref.ref(call)
    machine = call._machine

    def done(inner: Any) -> None:
        me = ref()
        if me is not None:
            me._attempt_done(attempt, inner)
            return
        code = finished_code(inner)
        outcome = SUCCESS if code is OK else failure(_Ended(code, inner), attempt.member, cancelled=True)
        machine.done(attempt, outcome)

    return done


async def _read_first(ref: weakref.ReferenceType[_Hedged], attempt: Attempt, inner: Any) -> None:
    """A stream attempt's reader (a task): its first message, handed to the call if the caller still
    holds it."""
    try:
        first = await inner.read()
    except (grpc.RpcError, asyncio.CancelledError):
        return  # failed or cancelled: grpc's done callback counts it and decides
    call = ref()
    if call is not None:
        call._first_read(attempt, inner, first)


class _Hedged:
    """One hedged asyncio call: its task, its attempts, and the call object the caller holds."""

    stream = False

    def __init__(self, c: CallSpecBase[Any], request: Any, timeout: float | None, kw: dict[str, Any]) -> None:
        key, kw["metadata"] = c.route(kw["metadata"], request)
        lb = c.lb
        began = lb.clock()
        self._c = c
        self._request = request
        self._kw = kw
        self._timeout = timeout
        self._began = began
        self._machine = Hedges(c, key, None if timeout is None else began + timeout, began)
        self._calls: dict[Attempt, Any] = {}
        self._firsts: dict[Attempt, Any] = {}
        self._kick = asyncio.Event()
        self._cancelled = False
        self._inner: Any = None
        self._first: Any = grpc.aio.EOF
        self._task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(self._run())

    # ----------------------------------------------------------------- the call's task

    async def _run(self) -> Any:
        machine = self._machine
        c = self._c
        lb = c.lb
        armed: float | None = None
        try:
            while True:
                try:
                    action = machine.next()
                except _Ended as ended:
                    raise await _error_of(ended.inner) from None
                if isinstance(action, Member):
                    self._start(action)
                    continue
                winner = machine.winner
                if winner is not None and (not self.stream or winner in self._firsts):
                    self._inner = self._calls.get(winner) or self._inner
                    if self.stream:
                        self._first = self._firsts[winner]
                    return self._inner
                if isinstance(action, float):
                    if not machine.in_flight:
                        await lb.await_change(action, machine.picker)
                        continue
                    if armed is None or action < armed:
                        armed = action
                        lb.call_at(action, self._kick.set)
                await self._kick.wait()
                self._kick.clear()
                if armed is not None and lb.clock() >= armed:
                    armed = None
        finally:
            if machine.winner is None:
                if not machine.stopped:
                    self._cancelled = True
                    machine.cancel(asyncio.CancelledError())
                for inner in list(self._calls.values()):
                    inner.cancel()

    def _start(self, member: Member) -> None:
        machine = self._machine
        attempt = machine.start(member)
        try:
            mc = member.callables.get(self._c.spec) or member.callable(self._c.spec)
            inner = mc(self._request, timeout=attempt.timeout, **self._kw)
        except BaseException as exc:
            self._cancel(machine.done(attempt, failure(exc, member, begun=False)))
            return
        self._calls[attempt] = inner
        inner.add_done_callback(_done_callback(self, attempt))
        if self.stream:
            asyncio.get_running_loop().create_task(_read_first(weakref.ref(self), attempt, inner))

    def _cancel(self, attempts: list[Attempt]) -> None:
        for a in attempts:
            inner = self._calls.get(a)
            if inner is not None:
                inner.cancel()

    def _attempt_done(self, attempt: Attempt, inner: Any) -> None:
        """grpc's done callback of one attempt: count it; the machine decides what it means."""
        machine = self._machine
        code = finished_code(inner)
        if code is OK:
            stats = attempt.member.stats
            trailers = finished_trailing_metadata(inner) if wants_report(self._c.lb, stats) else None
            losers = machine.done(attempt, SUCCESS, trailers)
        else:
            outcome = failure(
                _Ended(code, inner),
                attempt.member,
                responded=attempt in self._firsts,
                cancelled=self._cancelled or inner.cancelled(),
            )
            losers = machine.done(attempt, outcome)
        if machine.winner is attempt and self._inner is None:
            self._inner = inner
        self._calls.pop(attempt, None)
        self._cancel(losers)
        self._kick.set()

    def _first_read(self, attempt: Attempt, inner: Any, first: Any) -> None:
        """A stream attempt's first message (or its end): it decides the call if it comes first."""
        self._firsts[attempt] = first
        if first is not grpc.aio.EOF:
            self._cancel(self._machine.won(attempt))
        if self._machine.winner is attempt:
            self._inner = inner
        self._kick.set()

    # ----------------------------------------------------------------- the caller's side

    def cancel(self) -> bool:
        if self._task.done() and (self._inner is None or self._inner.done()):
            return False
        self._cancelled = True
        self._cancel(self._machine.cancel(asyncio.CancelledError()))
        self._task.cancel()
        if self._inner is not None:
            self._inner.cancel()
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._task.done() and (self._inner is None or bool(self._inner.done()))

    def time_remaining(self) -> float | None:
        timeout = self._timeout
        if timeout is None:
            return None
        left: float = max(self._began + timeout - self._c.lb.clock(), 0.0)
        return left

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback(call)`` once the call is over."""

        def decided(task: asyncio.Task[Any]) -> None:
            inner = self._inner
            if task.cancelled() or task.exception() is not None or inner is None:
                callback(self)
            else:
                inner.add_done_callback(lambda _call: callback(self))

        self._task.add_done_callback(decided)

    async def _held(self) -> Any:
        """What holds the call's status: the winning attempt, or the call's error."""
        try:
            return await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if not self._cancelled:
                raise
            return None
        except BaseException as exc:
            return exc

    async def code(self) -> grpc.StatusCode:
        held = await self._held()
        if held is None:
            return grpc.StatusCode.CANCELLED
        if isinstance(held, BaseException):
            code = getattr(held, "code", None)
            return code() if callable(code) else grpc.StatusCode.UNKNOWN
        return await held.code()

    async def details(self) -> str:
        held = await self._held()
        if held is None or isinstance(held, BaseException):
            details = getattr(held, "details", None)
            return str(details()) if callable(details) else str(held or "")
        return await held.details()  # type: ignore[no-any-return]

    async def initial_metadata(self) -> Any:
        held = await self._held()
        if held is None or isinstance(held, BaseException):
            return grpc.aio.Metadata()
        return await held.initial_metadata()

    async def trailing_metadata(self) -> Any:
        held = await self._held()
        if held is None or isinstance(held, BaseException):
            read = getattr(held, "trailing_metadata", None)
            return read() if callable(read) else grpc.aio.Metadata()
        return await held.trailing_metadata()

    async def wait_for_connection(self) -> None:
        await self._held()


class _HedgedUnaryCall(_Hedged, grpc.aio.UnaryUnaryCall):  # type: ignore[misc]
    """A hedged unary call: awaiting it gives the winner's response."""

    def __await__(self) -> Generator[Any, None, Any]:
        inner = yield from self._task.__await__()
        return (yield from inner.__await__())


class _HedgedUnaryStreamCall(_Hedged, grpc.aio.UnaryStreamCall):  # type: ignore[misc]
    """A hedged server stream: hedged until its first message, then the winner's stream."""

    stream = True
    _iter: AsyncIterator[Any] | None = None

    async def _responses(self) -> AsyncIterator[Any]:
        inner = await self._task
        first, self._first = self._first, grpc.aio.EOF
        if first is grpc.aio.EOF:
            return
        yield first
        while True:
            message = await inner.read()
            if message is grpc.aio.EOF:
                return
            yield message

    def __aiter__(self) -> AsyncIterator[Any]:
        if self._iter is None:
            self._iter = self._responses()
        return self._iter

    async def read(self) -> Any:
        try:
            return await self.__aiter__().__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF

    def __del__(self) -> None:
        # Dropped before its end: cancel what still runs (its status would otherwise wait for a reader);
        # grpc's done callbacks then count each attempt's end, neutral.
        machine = getattr(self, "_machine", None)
        if machine is None:
            return
        self._cancelled = True
        machine.cancel(asyncio.CancelledError())
        for inner in list(self._calls.values()):
            with contextlib.suppress(Exception):
                inner.cancel()


class _MultiCallable:
    __slots__ = ("_c",)

    _call: Callable[..., Any]

    def __init__(self, c: CallSpecBase[Any]) -> None:
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
        return type(self)._call(self._c, request, timeout, kw)


class _HedgedUnaryUnary(_MultiCallable, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    _call = _HedgedUnaryCall


class _HedgedUnaryStream(_MultiCallable, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    _call = _HedgedUnaryStreamCall


HEDGED_MULTICALLABLES: dict[str, Callable[[Any], Any]] = {
    "unary_unary": _HedgedUnaryUnary,
    "unary_stream": _HedgedUnaryStream,
}
"""The multicallables of the call kinds a hedging policy hedges."""
