"""What the call objects share: a call's keyword arguments, the errors lbkit states itself (a call its
caller cancelled, an attempt lbkit ended), and grpc.Future / grpc.Call over a call that ends once (a
retried or a hedged unary call)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["Cancelled", "EndedFuture", "StatusError", "call_kwargs"]


def call_kwargs(metadata: Any, credentials: Any, wait_for_ready: Any, compression: Any) -> dict[str, Any]:
    """The keyword arguments every attempt of a call passes on to grpc."""
    return {
        "metadata": metadata,
        "credentials": credentials,
        "wait_for_ready": wait_for_ready,
        "compression": compression,
    }


class StatusError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """An end of a call that lbkit states itself, as a finished grpc call: a status code and details."""

    _code: grpc.StatusCode
    _details: str

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Any:
        return ()

    def trailing_metadata(self) -> Any:
        return ()

    def debug_error_string(self) -> str:
        return self._details

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


class Cancelled(StatusError):
    """The error of a call the caller cancelled (grpc's code and text for it)."""

    _code = grpc.StatusCode.CANCELLED
    _details = "Locally cancelled by application!"


class EndedFuture:
    """grpc.Future and grpc.Call (all but ``cancel``) of a unary-response call that ends once.

    The class sets ``_ended`` when the call is over, with ``_error`` (the call's error, or None) and
    ``_inner`` (the grpc call that answered); ``_on_end`` adds a callback for the end.
    """

    _ended: threading.Event
    _cancelled: bool
    _error: BaseException | None
    _inner: Any

    def _on_end(self, callback: Callable[[], None]) -> bool:
        """Call ``callback()`` once the call is over; False (not added) if it is already."""
        raise NotImplementedError

    # grpc.Future
    def cancelled(self) -> bool:
        return self._cancelled and self._ended.is_set()

    def running(self) -> bool:
        return not self._ended.is_set()

    def done(self) -> bool:
        return self._ended.is_set()

    def _settled(self, timeout: float | None) -> None:
        if not self._ended.wait(timeout):
            raise grpc.FutureTimeoutError()
        if self._cancelled:
            raise grpc.FutureCancelledError()

    def result(self, timeout: float | None = None) -> Any:
        self._settled(timeout)
        if self._error is not None:
            raise self._error
        return self._inner.result()

    def exception(self, timeout: float | None = None) -> Any:
        self._settled(timeout)
        return self._error

    def traceback(self, timeout: float | None = None) -> Any:
        self._settled(timeout)
        return None if self._error is None else self._error.__traceback__

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        if not self._on_end(lambda: fn(self)):
            fn(self)

    # grpc.Call: the answering attempt's, or the call's error
    def is_active(self) -> bool:
        return not self._ended.is_set()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._on_end(callback)

    def _final(self) -> Any:
        self._ended.wait()
        error = self._error
        return error if error is not None and hasattr(error, "code") else self._inner

    def initial_metadata(self) -> Any:
        return self._final().initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._final().trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._final().code()

    def details(self) -> str:
        return self._final().details()  # type: ignore[no-any-return]
