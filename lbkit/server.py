"""Helpers for servers: ORCA load reports in each call's trailing metadata (gRFC A51).

Clients balancing with ``selector="weighted_round_robin"`` weigh each server by what it reports::

    load = lbkit.server.ServerLoad(capacity=8)        # 8 calls at once fill this server
    server = grpc.server(pool, interceptors=[lbkit.server.LoadReportInterceptor(load)])
    # grpc.aio: grpc.aio.server(interceptors=[lbkit.server.AsyncLoadReportInterceptor(load)])

    def Predict(self, request, context):
        ...
        lbkit.server.report_load(context, named_metrics={"queue_depth": queue.qsize()})

The interceptor attaches an ``endpoint-load-metrics-bin`` trailer (a binary ``OrcaLoadReport``) to every
call's trailing metadata, keeping whatever else the handler sets there; it is read by grpc clients in any
language (grpcio's own ``weighted_round_robin`` policy among them). grpcio never shows that trailer to
Python code, so the same bytes go again under ``lbkit-endpoint-load-metrics-bin`` for lbkit's clients.
Its figures are the server's (:class:`ServerLoad`: set by the application, or measured from the calls
the interceptor sees) overlaid with the call's own (:func:`report_load`), as gRFC A51 orders them.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import grpc

from lbkit._config import check_float
from lbkit.errors import ConfigError
from lbkit.orca import MIRROR_TRAILER, TRAILER, TRAILERS, LoadReport, decode, encode, find_report

__all__ = [
    "UNMEASURED_PREFIXES",
    "AsyncLoadReportInterceptor",
    "LoadReportInterceptor",
    "ServerLoad",
    "report_load",
]

UNMEASURED_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods the interceptor neither measures nor reports on: health checks (a Watch stream would count as
a call in progress forever) and reflection."""

_FIGURES = (
    "cpu_utilization",
    "mem_utilization",
    "application_utilization",
    "qps",
    "eps",
    "utilization",
    "request_cost",
    "named_metrics",
)
_MAPPINGS = ("utilization", "request_cost", "named_metrics")

Figures = dict[str, Any]


def _figures(report: LoadReport) -> Figures:
    """The non-zero figures of ``report``."""
    return {name: getattr(report, name) for name in _FIGURES if getattr(report, name)}


def _overlay(base: Figures, top: Figures) -> Figures:
    """``top`` over ``base``; maps merge key by key."""
    out = dict(base)
    for name, value in top.items():
        if name in _MAPPINGS and name in out:
            out[name] = {**out[name], **value}
        else:
            out[name] = value
    return out


def _validated(owner: str, figures: Mapping[str, Any]) -> Figures:
    """The given (not None) figures, checked as a LoadReport checks them (ConfigError naming a bad one)."""
    given = {name: value for name, value in figures.items() if value is not None}
    try:
        LoadReport(**given)
    except ConfigError as err:
        raise ConfigError(f"{owner}: {err}") from None
    return {name: dict(v) if name in _MAPPINGS else float(v) for name, v in given.items()}


class ServerLoad:
    """The server-wide figures of every call's load report.

    Figures set with :meth:`set` are reported as set until changed. With ``capacity`` (how many calls at
    once fill the server: its batch slots, its workers), the interceptor also measures, over each
    ``window`` seconds, ``qps`` (calls finished per second), ``eps`` (of those, failed per second) and
    ``application_utilization`` (the share of the ``capacity`` slots busy on average: calls in progress,
    at most ``capacity``, as a CPU's utilization counts busy time and not the queue); without it, only
    ``qps`` and ``eps``. A figure set with :meth:`set` wins over the measured one. Thread-safe.
    """

    def __init__(
        self,
        *,
        capacity: float | None = None,
        window: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity is not None:
            check_float("ServerLoad", "capacity", capacity, minimum=0.0, strict_min=True)
        self.capacity = capacity
        self.window = check_float("ServerLoad", "window", window, minimum=0.0, strict_min=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._set: Figures = {}
        self._measured: Figures = {}
        now = clock()
        self._start = now
        self._last = now
        self._busy = 0.0
        self._in_flight = 0
        self._done = 0
        self._errors = 0
        self._encoded: bytes | None = None

    @property
    def in_progress(self) -> int:
        """Calls in progress now, as the interceptor counts them."""
        return self._in_flight

    def set(
        self,
        *,
        cpu_utilization: float | None = None,
        mem_utilization: float | None = None,
        application_utilization: float | None = None,
        qps: float | None = None,
        eps: float | None = None,
        utilization: Mapping[str, float] | None = None,
        named_metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Set server-wide figures (None leaves one as it is); ConfigError for a negative or NaN one."""
        figures = _validated(
            "ServerLoad.set",
            {
                "cpu_utilization": cpu_utilization,
                "mem_utilization": mem_utilization,
                "application_utilization": application_utilization,
                "qps": qps,
                "eps": eps,
                "utilization": utilization,
                "named_metrics": named_metrics,
            },
        )
        with self._lock:
            self._set = _overlay(self._set, figures)
            self._encoded = None

    def clear(self, *names: str) -> None:
        """Forget the figures set under ``names`` (all of them if none is named)."""
        unknown = [n for n in names if n not in _FIGURES]
        if unknown:
            raise ConfigError(f"ServerLoad.clear: unknown figure(s) {unknown}; figures are {list(_FIGURES)}")
        with self._lock:
            self._set = {k: v for k, v in self._set.items() if names and k not in names}
            self._encoded = None

    def figures(self) -> Figures:
        """The server-wide figures as of now: measured over the last full window, overlaid with those set."""
        with self._lock:
            self._advance(self._clock())
            return _overlay(self._measured, self._set)

    def report(self) -> LoadReport:
        """The server-wide figures as a LoadReport."""
        return LoadReport(**self.figures())

    def encoded(self) -> bytes:
        """:meth:`report` encoded, kept until the figures change."""
        with self._lock:
            self._advance(self._clock())
            data = self._encoded
            if data is None:
                data = self._encoded = encode(LoadReport(**_overlay(self._measured, self._set)))
            return data

    # The interceptor's side.

    def call_started(self) -> None:
        """Count a call as in progress."""
        with self._lock:
            self._advance(self._clock())
            self._in_flight += 1

    def call_finished(self, ok: bool) -> None:
        """Count a call as finished, failed unless ``ok``."""
        with self._lock:
            self._advance(self._clock())
            self._in_flight -= 1
            self._done += 1
            if not ok:
                self._errors += 1

    def _advance(self, now: float) -> None:
        """Move the measurement to ``now``, closing the window (or windows) that ended."""
        window = self.window
        end = self._start + window
        slots = self._slots_busy()
        if now < end:
            self._busy += slots * (now - self._last)
            self._last = now
            return
        self._busy += slots * (end - self._last)
        measured: Figures = {"qps": self._done / window, "eps": self._errors / window}
        busy = self._busy
        skipped = math.floor((now - end) / window)
        if skipped >= 1:  # whole windows passed with no event: nothing finished, as many in progress
            measured = {"qps": 0.0, "eps": 0.0}
            busy = slots * window
        if self.capacity is not None:
            measured["application_utilization"] = busy / (window * self.capacity)
        self._measured = measured
        self._encoded = None
        self._start = end + skipped * window
        self._busy = slots * (now - self._start)
        self._last = now
        self._done = 0
        self._errors = 0

    def _slots_busy(self) -> float:
        """Calls being served now: those in progress, at most ``capacity`` (the rest wait for a slot)."""
        capacity = self.capacity
        in_flight = self._in_flight
        return in_flight if capacity is None or in_flight < capacity else capacity


# ----------------------------------------------------------------------------------------------- per call

_calls: dict[int, _Call] = {}
"""The calls under an interceptor, by ``id(context)`` (a context lives as long as its call)."""


class _Call:
    __slots__ = ("figures", "load")

    def __init__(self, load: ServerLoad | None) -> None:
        self.load = load
        self.figures: Figures = {}

    def encoded(self) -> bytes:
        if self.load is None:
            return encode(LoadReport(**self.figures))
        if not self.figures:
            return self.load.encoded()
        return encode(LoadReport(**_overlay(self.load.figures(), self.figures)))


def _attach(context: Any, data: bytes) -> None:
    """Put ``data`` in the call's trailing metadata as its load report (under both keys), keeping the rest."""
    current = context.trailing_metadata() or ()
    context.set_trailing_metadata(
        (*(kv for kv in current if kv[0] not in TRAILERS), (TRAILER, data), (MIRROR_TRAILER, data))
    )


def report_load(
    context: Any,
    *,
    cpu_utilization: float | None = None,
    mem_utilization: float | None = None,
    application_utilization: float | None = None,
    qps: float | None = None,
    eps: float | None = None,
    utilization: Mapping[str, float] | None = None,
    request_cost: Mapping[str, float] | None = None,
    named_metrics: Mapping[str, float] | None = None,
) -> None:
    """Report load figures for this call (``context``: a grpc or grpc.aio servicer context).

    The trailer is attached at once, so a call aborted afterwards still carries it; under a load-report
    interceptor it is attached again when the call ends (after anything the handler set), with the
    server's figures beneath these. Later calls override earlier figures. ConfigError for a negative or
    NaN figure (named metrics and request costs may be negative, not NaN).
    """
    figures = _validated(
        "report_load",
        {
            "cpu_utilization": cpu_utilization,
            "mem_utilization": mem_utilization,
            "application_utilization": application_utilization,
            "qps": qps,
            "eps": eps,
            "utilization": utilization,
            "request_cost": request_cost,
            "named_metrics": named_metrics,
        },
    )
    if not figures:
        return
    call = _calls.get(id(context))
    if call is not None:
        call.figures = _overlay(call.figures, figures)
        _attach(context, call.encoded())
        return
    previous = find_report(context.trailing_metadata())
    if previous is not None:
        figures = _overlay(_figures(decode(previous)), figures)
    _attach(context, encode(LoadReport(**figures)))


# ---------------------------------------------------------------------------------------------- interceptors


def _measured(method: str) -> bool:
    return not method.startswith(UNMEASURED_PREFIXES)


def _failed(context: Any) -> bool:
    code = context.code()
    return code is not None and code is not grpc.StatusCode.OK


class _Tracker:
    """A call under an interceptor: known to report_load, measured, its trailer attached at the end."""

    __slots__ = ("call", "context", "load")

    def __init__(self, load: ServerLoad | None, context: Any) -> None:
        self.load = load
        self.context = context
        self.call = _calls[id(context)] = _Call(load)
        if load is not None:
            load.call_started()

    def end(self, ok: bool) -> None:
        _calls.pop(id(self.context), None)
        if self.load is not None:
            self.load.call_finished(ok and not _failed(self.context))
        elif not self.call.figures:
            return  # nothing to report
        data = self.call.encoded()
        if data:  # an empty report (nothing measured yet) says nothing
            _attach(self.context, data)


def _handler(handler: Any, wrap: Callable[[Callable[..., Any], bool], Callable[..., Any]]) -> Any:
    """``handler`` with its behaviour wrapped by ``wrap(behaviour, response_streaming)``."""
    ser, deser = handler.response_serializer, handler.request_deserializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), deser, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), deser, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), deser, ser)
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), deser, ser)


def _wrap_sync(load: ServerLoad | None) -> Callable[[Callable[..., Any], bool], Callable[..., Any]]:
    def wrap(behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        if streaming:

            def stream(request: Any, context: Any) -> Iterator[Any]:
                tracker = _Tracker(load, context)
                ok = False
                try:
                    yield from behavior(request, context)
                    ok = True
                except GeneratorExit:
                    ok = True  # the client went away: not the server's failure
                    raise
                finally:
                    tracker.end(ok)

            return stream

        def unary(request: Any, context: Any) -> Any:
            tracker = _Tracker(load, context)
            ok = False
            try:
                response = behavior(request, context)
                ok = True
                return response
            finally:
                tracker.end(ok)

        return unary

    return wrap


def _wrap_async(load: ServerLoad | None) -> Callable[[Callable[..., Any], bool], Callable[..., Any]]:
    sync = _wrap_sync(load)

    def wrap(behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                tracker = _Tracker(load, context)
                ok = False
                try:
                    async for response in behavior(request, context):
                        yield response
                    ok = True
                except asyncio.CancelledError:
                    ok = True  # the client went away: not the server's failure
                    raise
                finally:
                    tracker.end(ok)

            return stream
        if inspect.iscoroutinefunction(behavior):

            async def unary(request: Any, context: Any) -> Any:
                tracker = _Tracker(load, context)
                ok = False
                try:
                    response = await behavior(request, context)
                    ok = True
                    return response
                except asyncio.CancelledError:
                    ok = True
                    raise
                finally:
                    tracker.end(ok)

            return unary
        return sync(behavior, streaming)  # a plain function run by grpc.aio in a thread

    return wrap


class LoadReportInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """A grpc server interceptor that attaches a load report to every call (but health checks).

    ``load`` holds the server-wide figures (and measures calls); None reports only what handlers give
    :func:`report_load`.
    """

    def __init__(self, load: ServerLoad | None = None) -> None:
        if load is not None and not isinstance(load, ServerLoad):
            raise ConfigError(f"LoadReportInterceptor: load must be a ServerLoad or None, got {load!r}")
        self.load = load
        self._wrap = _wrap_sync(load)

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        """Wrap the method's handler so that its calls carry a load report."""
        handler = continuation(handler_call_details)
        if handler is None or not _measured(handler_call_details.method):
            return handler
        return _handler(handler, self._wrap)


class AsyncLoadReportInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The grpc.aio twin of :class:`LoadReportInterceptor`."""

    def __init__(self, load: ServerLoad | None = None) -> None:
        if load is not None and not isinstance(load, ServerLoad):
            raise ConfigError(f"AsyncLoadReportInterceptor: load must be a ServerLoad or None, got {load!r}")
        self.load = load
        self._wrap = _wrap_async(load)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        """Wrap the method's handler so that its calls carry a load report."""
        handler = await continuation(handler_call_details)
        if handler is None or not _measured(handler_call_details.method):
            return handler
        return _handler(handler, self._wrap)
