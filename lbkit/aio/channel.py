"""The asyncio ``BalancedChannel``: grpc.aio-style call objects that pick an endpoint per call."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, ClassVar

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_any, wait_random_exponential

from lbkit._callspec import CallSpecBase, ChannelMethods, call_kwargs, closed_channel, timeout_left
from lbkit._driver import BalancerBase, Member
from lbkit._grpc_private import finished_code, finished_trailing_metadata
from lbkit.errors import NoEndpointsError
from lbkit.orca import read_load_report
from lbkit.retry import StopAtDeadline, attempt_left, server_code
from lbkit.selectors.base import Key

__all__ = ["BalancedChannel"]


class AsyncDriver(BalancerBase):
    """What the asyncio channel needs of its balancer beyond the shared base: picks now and awaited."""

    def pick_now(self, key: Key, exclude: frozenset[str] = frozenset()) -> Member | None:
        """The member for a pick now, or None when nothing suitable is pickable yet."""
        raise NotImplementedError

    async def apick_member(
        self, key: Key, deadline: float | None, exclude: frozenset[str] = frozenset()
    ) -> Member:
        """The member for a pick, waiting for a ready endpoint until ``deadline`` (monotonic)."""
        raise NotImplementedError


class _Spec(CallSpecBase[AsyncDriver]):
    """A stub method's shared call rules, with how one asyncio attempt starts."""

    __slots__ = ()

    def start(
        self, member: Member, request: Any, deadline: float | None, kw: dict[str, Any], observe: bool
    ) -> Any:
        """Issue one attempt on ``member``, counted in flight until it is done."""
        lb = self.lb
        st = member.stats
        t0 = st.start()
        try:
            timeout = attempt_left(deadline, self.attempt_timeout)
            inner = member.callable(self.spec)(request, timeout=timeout, **kw)
        except BaseException:
            st.finish(t0, True, observe_latency=False)
            raise

        def done(call: Any) -> None:
            code = finished_code(call)
            if lb.load_reports and st.load_wanted:
                read_load_report(st, finished_trailing_metadata(call))
            st.finish(t0, not lb.is_failure(code) if code is not None else True, observe_latency=observe)
            if code is grpc.StatusCode.OK:
                lb.budget.on_success()

        inner.add_done_callback(done)
        return inner


class _CallBase:
    """What every balanced aio call shares: the current attempt, its deadline, cancellation."""

    def __init__(self, c: _Spec, request: Any, timeout: float | None, kw: dict[str, Any]) -> None:
        self._c = c
        self._request = request
        self._kw = kw
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._inner: Any = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._tried: tuple[str, ...] = ()
        self._attempts = 0
        self._callbacks: list[Callable[[Any], None]] | None = None

    def _try_start_now(self, observe: bool) -> None:
        member = self._c.lb.pick_now(self._c.key(self._kw["metadata"], self._request))
        if member is not None:
            self._issue(member, observe)

    def _issue(self, member: Member, observe: bool) -> None:
        """Start an attempt on ``member``; if its channel was drained and closed meanwhile (nothing was
        sent), leave no attempt, so the next await picks another endpoint."""
        self._tried += (member.address,)
        self._attempts += 1
        try:
            self._inner = self._c.start(member, self._request, self._deadline, self._kw, observe)
        except ValueError as err:
            if not closed_channel(err) or self._attempts >= self._c.lb.retry_policy.max_attempts:
                raise
            return
        for cb in self._callbacks or ():
            self._inner.add_done_callback(lambda _call, cb=cb: cb(self))

    async def _ensure_inner(self, observe: bool) -> Any:
        c = self._c
        while self._inner is None:
            try:
                member = await c.lb.apick_member(
                    c.key(self._kw["metadata"], self._request), self._deadline, frozenset(self._tried)
                )
            except NoEndpointsError as err:
                self._error = err
                raise
            if self._cancelled:
                raise asyncio.CancelledError()
            self._issue(member, observe)
        return self._inner

    def _can_retry(self, err: grpc.RpcError) -> bool:
        c = self._c
        if self._cancelled or self._attempts >= c.lb.retry_policy.max_attempts:
            return False
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return False
        return c.retryable(server_code(err.code(), self._cancelled), err.details(), self._deadline)

    async def _backoff(self, count: bool = True) -> None:
        if count:
            self._c.lb.note_retry()
        await asyncio.sleep(random.uniform(0.0, self._c.lb.retry_policy.initial_backoff))
        self._inner = None

    # grpc.aio.RpcContext / Call
    def cancelled(self) -> bool:
        return self._cancelled or (self._inner is not None and bool(self._inner.cancelled()))

    def done(self) -> bool:
        if self._error is not None:
            return True
        return self._inner is not None and bool(self._inner.done())

    def time_remaining(self) -> float | None:
        return timeout_left(self._deadline)

    def cancel(self) -> bool:
        self._cancelled = True
        if self._inner is not None:
            return bool(self._inner.cancel())
        return True

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback(call)`` when the current (and any later) attempt is done."""
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)
        if self._inner is not None:
            self._inner.add_done_callback(lambda _call: callback(self))

    async def _settled(self) -> Any:
        if self._error is not None or self._inner is None:
            return None
        with contextlib.suppress(asyncio.CancelledError):
            await self._inner.code()
        return self._inner

    async def initial_metadata(self) -> Any:
        inner = await self._ensure_inner(True)
        return await inner.initial_metadata()

    async def trailing_metadata(self) -> Any:
        inner = await self._settled()
        return grpc.aio.Metadata() if inner is None else await inner.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        inner = await self._settled()
        if inner is None:
            return grpc.StatusCode.UNAVAILABLE
        return await inner.code()

    async def details(self) -> str:
        inner = await self._settled()
        if inner is None:
            return str(self._error) if self._error else ""
        return await inner.details()  # type: ignore[no-any-return]

    async def wait_for_connection(self) -> None:
        inner = await self._ensure_inner(True)
        await inner.wait_for_connection()


class _UnaryUnaryCall(_CallBase, grpc.aio.UnaryUnaryCall):  # type: ignore[misc]
    def __init__(self, c: _Spec, request: Any, timeout: float | None, kw: dict[str, Any]) -> None:
        super().__init__(c, request, timeout, kw)
        self._outcome: tuple[bool, Any] | None = None
        self._try_start_now(True)

    async def _run(self) -> Any:
        inner = self._inner
        if inner is None:
            inner = await self._ensure_inner(True)
        try:
            return await inner
        except grpc.RpcError as err:
            if not self._can_retry(err):
                raise
        return await self._retry()

    async def _retry(self) -> Any:
        c = self._c

        def _retry_on(exc: BaseException) -> bool:
            return (
                isinstance(exc, grpc.RpcError)
                and not isinstance(exc, NoEndpointsError)
                and self._can_retry(exc)
            )

        await self._backoff(count=False)
        policy = c.lb.retry_policy
        async for attempt in AsyncRetrying(
            stop=stop_any(
                stop_after_attempt(policy.max_attempts - self._attempts), StopAtDeadline(self._deadline)
            ),
            wait=wait_random_exponential(multiplier=policy.initial_backoff, max=policy.max_backoff),
            retry=retry_if_exception(_retry_on),
            reraise=True,
        ):
            with attempt:
                c.lb.note_retry()
                self._inner = None
                inner = await self._ensure_inner(True)
                return await inner
        raise AssertionError("unreachable")  # pragma: no cover

    def __await__(self) -> Generator[Any, None, Any]:
        if self._outcome is None:
            try:
                result = yield from self._run().__await__()
            except BaseException as exc:
                self._outcome = (False, exc)
                raise
            self._outcome = (True, result)
            return result
        ok, value = self._outcome
        if ok:
            return value
        raise value


class _StreamingCall(_CallBase):
    """A response stream (server or bidirectional) retried on another endpoint before its first response."""

    def __init__(
        self, c: _Spec, request: Any, timeout: float | None, kw: dict[str, Any], retry: bool
    ) -> None:
        super().__init__(c, request, timeout, kw)
        self._retry_ok = retry
        self._got_first = False
        self._iter: AsyncIterator[Any] | None = None
        self._try_start_now(False)

    async def _responses(self) -> AsyncIterator[Any]:
        while True:
            inner = await self._ensure_inner(False)
            try:
                async for response in inner:
                    self._got_first = True
                    yield response
                return
            except grpc.RpcError as err:
                if self._got_first or not self._retry_ok or not self._can_retry(err):
                    raise
            await self._backoff()

    def __aiter__(self) -> AsyncIterator[Any]:
        if self._iter is None:
            self._iter = self._responses()
        return self._iter

    async def read(self) -> Any:
        try:
            return await self.__aiter__().__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF

    async def write(self, request: Any) -> None:
        inner = await self._ensure_inner(False)
        await inner.write(request)

    async def done_writing(self) -> None:
        inner = await self._ensure_inner(False)
        await inner.done_writing()

    def __del__(self) -> None:
        inner = getattr(self, "_inner", None)
        if inner is not None and not inner.done():
            inner.cancel()


class _UnaryStreamCall(_StreamingCall, grpc.aio.UnaryStreamCall):  # type: ignore[misc]
    pass


class _StreamStreamCall(_StreamingCall, grpc.aio.StreamStreamCall):  # type: ignore[misc]
    pass


class _StreamUnaryCall(_CallBase, grpc.aio.StreamUnaryCall):  # type: ignore[misc]
    """A client stream: not retried once it has started sending (its requests cannot be replayed)."""

    def __init__(self, c: _Spec, request: Any, timeout: float | None, kw: dict[str, Any]) -> None:
        super().__init__(c, request, timeout, kw)
        self._try_start_now(True)

    async def _run(self) -> Any:
        inner = await self._ensure_inner(True)
        return await inner

    def __await__(self) -> Generator[Any, None, Any]:
        return (yield from self._run().__await__())

    async def write(self, request: Any) -> None:
        inner = await self._ensure_inner(True)
        await inner.write(request)

    async def done_writing(self) -> None:
        inner = await self._ensure_inner(True)
        await inner.done_writing()


class _MultiCallable:
    __slots__ = ("_c",)

    def __init__(self, c: _Spec) -> None:
        self._c = c


class _UnaryUnary(_MultiCallable, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return _UnaryUnaryCall(
            self._c, request, timeout, call_kwargs(metadata, credentials, wait_for_ready, compression)
        )


class _UnaryStream(_MultiCallable, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return _UnaryStreamCall(
            self._c, request, timeout, call_kwargs(metadata, credentials, wait_for_ready, compression), True
        )


class _StreamUnary(_MultiCallable, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return _StreamUnaryCall(
            self._c,
            request_iterator,
            timeout,
            call_kwargs(metadata, credentials, wait_for_ready, compression),
        )


class _StreamStream(_MultiCallable, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        # Requests may already be sent when the first attempt fails: no retry after it started.
        return _StreamStreamCall(
            self._c,
            request_iterator,
            timeout,
            call_kwargs(metadata, credentials, wait_for_ready, compression),
            False,
        )


class BalancedChannel(ChannelMethods):
    """A grpc.aio-style channel whose every call goes to an endpoint the balancer picks for it.

    Closing it does nothing: the balancer owns the real channels.
    """

    _spec_class = _Spec
    _multicallables: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "unary_unary": _UnaryUnary,
        "unary_stream": _UnaryStream,
        "stream_unary": _StreamUnary,
        "stream_stream": _StreamStream,
    }

    async def close(self, grace: float | None = None) -> None:
        """Nothing to do: the balancer closes its channels."""

    async def __aenter__(self) -> BalancedChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None
