"""``BalancedChannel``: a grpc.Channel that picks an endpoint per call, for generated stubs unchanged."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from typing import Any, ClassVar

import grpc
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_any, wait_random_exponential

from lbkit._callspec import CallSpecBase, ChannelMethods, call_kwargs, closed_channel, timeout_left
from lbkit._driver import BalancerBase, Member
from lbkit.errors import NoEndpointsError
from lbkit.orca import read_load_report
from lbkit.retry import StopAtDeadline, attempt_left, server_code
from lbkit.selectors.base import Key

__all__ = ["BalancedChannel"]

_MAX_REPLAY = 256
"""Requests of a client stream kept for a retry before the first response; past it, no retry."""


class SyncDriver(BalancerBase):
    """What the sync channel needs of its balancer beyond the shared base: a blocking pick."""

    def pick_member(
        self, key: Key, deadline: float | None, exclude: AbstractSet[str] = frozenset()
    ) -> Member:
        """The member for a pick, waiting for a ready endpoint until ``deadline`` (monotonic)."""
        raise NotImplementedError


class CallSpec(CallSpecBase[SyncDriver]):
    """A stub method's shared call rules, with the sync retry loop."""

    __slots__ = ()

    def retrying(self, deadline: float | None, attempts_left: int) -> Retrying:
        """A tenacity loop for the remaining attempts (built only once a call has failed)."""
        policy = self.lb.retry_policy

        def _retry(exc: BaseException) -> bool:
            if isinstance(exc, _ChannelClosed):  # the call never left
                return True
            if isinstance(exc, grpc.RpcError) and not isinstance(exc, NoEndpointsError):
                return self.retryable(server_code(exc.code()), exc.details(), deadline)
            return False

        return Retrying(
            stop=stop_any(stop_after_attempt(attempts_left), StopAtDeadline(deadline)),
            wait=wait_random_exponential(multiplier=policy.initial_backoff, max=policy.max_backoff),
            retry=retry_if_exception(_retry),
            reraise=True,
        )

    def future(self, arg: Any, key_request: Any, timeout: float | None, kw: dict[str, Any]) -> Any:
        """A grpc.Future for one call on one picked endpoint, counted in flight until it is done."""
        lb = self.lb
        deadline = None if timeout is None else time.monotonic() + timeout
        member = lb.pick_member(self.key(kw["metadata"], key_request), deadline)
        st = member.stats
        t0 = st.start()
        try:
            fut = member.callable(self.spec).future(arg, timeout=timeout_left(deadline), **kw)
        except BaseException:
            st.finish(t0, True, observe_latency=False)
            raise
        fut.add_done_callback(_finisher(lb, st, t0, observe=True))
        return fut

    def first_backoff(self) -> None:
        """Sleep before the first retry (full jitter)."""
        time.sleep(random.uniform(0.0, self.lb.retry_policy.initial_backoff))


class _ChannelClosed(Exception):
    """The picked endpoint's channel closed (it was drained) before the call could start."""


class _UnaryUnary(grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    __slots__ = ("_c",)

    def __init__(self, c: CallSpec) -> None:
        self._c = c

    def _attempt(
        self, request: Any, deadline: float | None, kw: dict[str, Any], with_call: bool, tried: set[str]
    ) -> Any:
        """One attempt on an endpoint not in ``tried`` (which it joins); stats finished whatever happens."""
        c = self._c
        lb = c.lb
        member = lb.pick_member(c.key(kw["metadata"], request), deadline, tried)
        tried.add(member.address)
        st = member.stats
        t0 = st.start()
        try:
            mc = member.callable(c.spec)
            timeout = attempt_left(deadline, c.attempt_timeout)
            if lb.load_reports and st.load_wanted:
                result, call = mc.with_call(request, timeout=timeout, **kw)
                read_load_report(st, call.trailing_metadata())
                if with_call:
                    result = (result, call)
            elif with_call:
                result = mc.with_call(request, timeout=timeout, **kw)
            else:
                result = mc(request, timeout=timeout, **kw)
        except grpc.RpcError as err:
            if lb.load_reports and st.load_wanted:
                read_load_report(st, err.trailing_metadata())
            st.finish(
                t0, not lb.is_failure(server_code(err.code()))
            )  # a blocking call: never client-cancelled
            raise
        except ValueError as err:
            st.finish(t0, True, observe_latency=False)
            if not closed_channel(err):
                raise
            raise _ChannelClosed(member.address) from err
        st.finish(t0, True)
        return result

    def _invoke(self, request: Any, timeout: float | None, kw: dict[str, Any], with_call: bool) -> Any:
        c = self._c
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: set[str] = set()
        # The first attempt builds no retry machinery; a failure that may be retried hands over to tenacity.
        try:
            result = self._attempt(request, deadline, kw, with_call, tried)
        except grpc.RpcError as err:
            if not c.retryable(server_code(err.code()), err.details(), deadline):
                raise
            return self._retry(request, deadline, kw, with_call, tried)
        except _ChannelClosed:
            return self._retry(request, deadline, kw, with_call, tried)
        c.lb.budget.on_success()
        return result

    def _retry(
        self, request: Any, deadline: float | None, kw: dict[str, Any], with_call: bool, tried: set[str]
    ) -> Any:
        c = self._c
        c.first_backoff()
        for attempt in c.retrying(deadline, c.lb.retry_policy.max_attempts - 1):
            with attempt:
                c.lb.note_retry()
                result = self._attempt(request, deadline, kw, with_call, tried)
        c.lb.budget.on_success()
        return result

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
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
        """A grpc.Future for the call on one picked endpoint (no retries: the future is grpc's own)."""
        kw = call_kwargs(metadata, credentials, wait_for_ready, compression)
        return self._c.future(request, request, timeout, kw)


def _finisher(lb: SyncDriver, st: Any, t0: float, observe: bool) -> Callable[[Any], None]:
    def done(call: Any) -> None:
        code = call.code()
        if lb.load_reports and st.load_wanted:
            read_load_report(st, call.trailing_metadata())
        st.finish(t0, not lb.is_failure(code), observe_latency=observe)
        if code is grpc.StatusCode.OK:
            lb.budget.on_success()

    return done


class _Tape:
    """The requests of a client stream, kept until the first response so a retry can replay them."""

    def __init__(self, source: Iterator[Any]) -> None:
        self._source = source
        self._items: list[Any] = []
        self._recording = True
        self._lock = threading.Lock()
        self._attempt = 0

    @property
    def replayable(self) -> bool:
        """Whether a new attempt can still be given every request sent so far."""
        return self._recording

    def stop_recording(self) -> None:
        """The first response came: no more retries, so no more requests kept (the current attempt still
        replays what it has not sent yet)."""
        with self._lock:
            self._recording = False

    def reader(self) -> Iterator[Any]:
        """Requests from the start for a new attempt: replayed ones first, then new ones from the source.

        Readers of earlier attempts stop at once: grpc's request thread of a failed attempt may still
        be pulling, and a request it took from the source would be lost to the new attempt.
        """
        with self._lock:
            self._attempt += 1
            mine = self._attempt
        return self._read(mine)

    def _read(self, mine: int) -> Iterator[Any]:
        items = self._items
        i = 0
        while True:
            with self._lock:
                if mine != self._attempt:
                    return
                if i < len(items):
                    item = items[i]
                else:
                    try:
                        item = next(self._source)
                    except StopIteration:
                        return
                    if self._recording:
                        if len(items) >= _MAX_REPLAY:
                            self._recording = False  # too many to keep: no retry for this call
                        else:
                            items.append(item)
            i += 1
            yield item


class _StreamCall(grpc.Call, grpc.Future):  # type: ignore[misc]
    """A response stream (server or bidirectional streaming) over one picked endpoint at a time.

    Counts as in flight until the stream ends, fails or is cancelled; dropped unread, it cancels.
    Before the first response, a retryable failure re-opens the stream on another endpoint.
    """

    def __init__(
        self, c: CallSpec, request: Any, tape: _Tape | None, timeout: float | None, kw: dict[str, Any]
    ) -> None:
        self._c = c
        self._request = request
        self._tape = tape
        self._kw = kw
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._got_first = False
        self._user_cancelled = False
        self._attempt = 0
        self._tried: set[str] = set()
        self._inner: Any = None
        self._start()

    def _start(self) -> None:
        c = self._c
        lb = c.lb
        key = c.key(self._kw["metadata"], self._request)
        while True:
            member: Member = lb.pick_member(key, self._deadline, self._tried)
            self._tried.add(member.address)
            self._attempt += 1
            st = member.stats
            t0 = st.start()
            arg = self._tape.reader() if self._tape is not None else self._request
            try:
                inner = member.callable(c.spec)(arg, timeout=timeout_left(self._deadline), **self._kw)
            except ValueError as err:
                st.finish(t0, True, observe_latency=False)
                if closed_channel(err) and self._attempt < c.lb.retry_policy.max_attempts:
                    continue  # drained between pick and call: nothing was sent, pick another
                raise
            except BaseException:
                st.finish(t0, True, observe_latency=False)
                raise
            inner.add_done_callback(_finisher(lb, st, t0, observe=False))
            self._inner = inner
            return

    def _can_retry(self, err: grpc.RpcError) -> bool:
        c = self._c
        if self._got_first or self._attempt >= c.lb.retry_policy.max_attempts:
            return False
        if self._tape is not None and not self._tape.replayable:
            return False
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return False
        return c.retryable(server_code(err.code(), self._user_cancelled), err.details())

    def __iter__(self) -> _StreamCall:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                response = next(self._inner)
            except grpc.RpcError as err:
                if not self._can_retry(err):
                    raise
                self._c.lb.note_retry()
                self._c.first_backoff()
                self._start()
                continue
            if not self._got_first:
                self._got_first = True
                if self._tape is not None:
                    self._tape.stop_recording()
            return response

    def next(self) -> Any:
        """Same as ``next(call)``."""
        return self.__next__()

    def __del__(self) -> None:
        inner = getattr(self, "_inner", None)
        if inner is not None and inner.is_active():
            inner.cancel()

    # grpc.Call / grpc.RpcContext / grpc.Future, delegated to the current attempt.
    def is_active(self) -> bool:
        return bool(self._inner.is_active())

    def time_remaining(self) -> float | None:
        return self._inner.time_remaining()  # type: ignore[no-any-return]

    def cancel(self) -> bool:
        self._user_cancelled = True
        return bool(self._inner.cancel())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return bool(self._inner.add_callback(callback))

    def initial_metadata(self) -> Any:
        return self._inner.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._inner.trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._inner.code()

    def details(self) -> str:
        return self._inner.details()  # type: ignore[no-any-return]

    def cancelled(self) -> bool:
        return bool(self._inner.cancelled())

    def running(self) -> bool:
        return bool(self._inner.running())

    def done(self) -> bool:
        return bool(self._inner.done())

    def result(self, timeout: float | None = None) -> Any:
        return self._inner.result(timeout)

    def exception(self, timeout: float | None = None) -> Any:
        return self._inner.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        return self._inner.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._inner.add_done_callback(lambda _call: fn(self))


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
            self._c, request, None, timeout, call_kwargs(metadata, credentials, wait_for_ready, compression)
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
        tape = _Tape(iter(request_iterator))
        return _StreamCall(
            self._c, None, tape, timeout, call_kwargs(metadata, credentials, wait_for_ready, compression)
        )


class _StreamUnary(grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    __slots__ = ("_c",)

    def __init__(self, c: CallSpec) -> None:
        self._c = c

    def _invoke(
        self, request_iterator: Iterator[Any], timeout: float | None, kw: dict[str, Any], with_call: bool
    ) -> Any:
        c = self._c
        lb = c.lb
        deadline = None if timeout is None else time.monotonic() + timeout
        tape = _Tape(iter(request_iterator))
        tried: set[str] = set()
        attempt = 0
        while True:
            attempt += 1
            member = lb.pick_member(c.key(kw["metadata"], None), deadline, tried)
            tried.add(member.address)
            st = member.stats
            t0 = st.start()
            try:
                mc = member.callable(c.spec)
                if lb.load_reports and st.load_wanted:
                    result, call = mc.with_call(tape.reader(), timeout=timeout_left(deadline), **kw)
                    read_load_report(st, call.trailing_metadata())
                    if with_call:
                        result = (result, call)
                elif with_call:
                    result = mc.with_call(tape.reader(), timeout=timeout_left(deadline), **kw)
                else:
                    result = mc(tape.reader(), timeout=timeout_left(deadline), **kw)
            except grpc.RpcError as err:
                if lb.load_reports and st.load_wanted:
                    read_load_report(st, err.trailing_metadata())
                code = server_code(err.code())
                st.finish(t0, not lb.is_failure(code))
                if (
                    attempt >= lb.retry_policy.max_attempts
                    or not tape.replayable
                    or (deadline is not None and time.monotonic() >= deadline)
                    or not c.retryable(code, err.details())
                ):
                    raise
                lb.note_retry()
                c.first_backoff()
                continue
            except ValueError as err:
                st.finish(t0, True, observe_latency=False)
                if not closed_channel(err) or attempt >= lb.retry_policy.max_attempts:
                    raise
                continue  # drained between pick and call: nothing was sent, pick another
            st.finish(t0, True)
            lb.budget.on_success()
            return result

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._invoke(
            request_iterator, timeout, call_kwargs(metadata, credentials, wait_for_ready, compression), False
        )

    def with_call(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._invoke(
            request_iterator, timeout, call_kwargs(metadata, credentials, wait_for_ready, compression), True
        )

    def future(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """A grpc.Future on one picked endpoint (no retries: the future is grpc's own)."""
        kw = call_kwargs(metadata, credentials, wait_for_ready, compression)
        return self._c.future(request_iterator, None, timeout, kw)


class BalancedChannel(ChannelMethods, grpc.Channel):  # type: ignore[misc]
    """A grpc.Channel whose every call goes to an endpoint the balancer picks for it.

    Closing it does nothing: the balancer owns the real channels.
    """

    _spec_class = CallSpec
    _multicallables: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "unary_unary": _UnaryUnary,
        "unary_stream": _UnaryStream,
        "stream_unary": _StreamUnary,
        "stream_stream": _StreamStream,
    }

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
