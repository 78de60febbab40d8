"""The only place lbkit reaches into grpcio's private parts: each use with its reason.

grpcio has no public API for any of these. ``tests/integration/test_grpc_private.py`` exercises
every function here on real channels and calls, so a grpcio release that changes them fails loudly
there instead of degrading silently in production (where each falls back to doing nothing).
"""

from __future__ import annotations

import contextlib
from typing import Any

import grpc
from grpc._common import CYGRPC_STATUS_CODE_TO_STATUS_CODE

__all__ = ["connectivity", "finished_code", "finished_trailing_metadata", "keep_server_status"]

_STATES = {state.value[0]: state for state in grpc.ChannelConnectivity}
"""grpc core's connectivity numbers (``grpc_connectivity_state``) to the public enum, whose values carry
them."""


def finished_code(call: Any) -> grpc.StatusCode | None:
    """The status of a finished ``grpc.aio`` call, read without awaiting; None if it cannot be read.

    Why private: a grpc.aio done callback is a plain function, but ``call.code()`` is a coroutine;
    awaiting it would cost a task per call on the hot path. The call's Cython object holds the status.
    """
    try:
        return CYGRPC_STATUS_CODE_TO_STATUS_CODE[call._cython_call._status.code()]
    except (AttributeError, KeyError):
        return None


def finished_trailing_metadata(call: Any) -> Any:
    """The trailing metadata of a finished ``grpc.aio`` call, read without awaiting; None if unreadable.

    Why private: as for :func:`finished_code`, ``call.trailing_metadata()`` is a coroutine; the call's
    Cython object holds the trailers with the status (the call path reads them for load reports).
    """
    try:
        return call._cython_call._status.trailing_metadata()
    except AttributeError:
        return None


def connectivity(channel: Any, try_to_connect: bool = False) -> grpc.ChannelConnectivity | None:
    """A sync ``grpc.Channel``'s connectivity now, asking an IDLE one to connect if ``try_to_connect``;
    None when the channel is closed or not grpcio's own.

    Why private: a sync channel's state is public only through ``channel.subscribe()``, which runs a
    polling thread per channel (and a delivery thread per change): a pool of ten thousand channels would
    cost ten thousand threads. One thread reading every channel's state through the Cython channel's
    ``check_connectivity_state`` (what ``subscribe``'s own thread calls) costs a few microseconds per read.
    """
    try:
        return _STATES[channel._channel.check_connectivity_state(try_to_connect)]
    except (AttributeError, ValueError, KeyError):
        return None


try:
    from grpc._cython.cygrpc import ExecuteBatchError as _ExecuteBatchError
    from grpc._cython.cygrpc import InternalError as _INTERNAL_ERROR

    _BATCH_ERRORS: tuple[type[BaseException], ...] = (_ExecuteBatchError,)
except ImportError:  # not this grpcio's layout: the calls fail as grpc.aio makes them
    _BATCH_ERRORS = ()
    _INTERNAL_ERROR = RuntimeError


class _ServerStatus:
    """A grpc.aio call's Cython call, except that a failed request write leaves the status to the server."""

    __slots__ = ("_call",)

    def __init__(self, call: Any) -> None:
        self._call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    def set_internal_error(self, error_str: str) -> None:
        """Ignored: the call's status is the one its receive-status operation brings."""

    async def send_serialized_message(self, message: bytes) -> None:
        """A write that fails because the call is ending raises what grpc.aio's writer handles (it then
        waits for the status), not the batch error that would make it cancel the call."""
        try:
            await self._call.send_serialized_message(message)
        except _BATCH_ERRORS as exc:
            raise _INTERNAL_ERROR(str(exc)) from exc

    async def send_receive_close(self) -> None:
        """A half-close that fails because the call is ending is left at that: the status comes with the
        call's end. (grpc.aio's writer would cancel the call, and its caller would see a CancelledError
        instead of the status.)"""
        with contextlib.suppress(*_BATCH_ERRORS):
            await self._call.send_receive_close()


def keep_server_status(call: Any) -> bool:
    """Make a ``grpc.aio`` client-streaming or bidirectional call report the server's status when a
    request write loses the race with the server ending the call.

    Why private: grpc.aio's request writer turns such a failed write into a status of its own (INTERNAL,
    "Internal error from Core") that replaces the server's, until the server's arrives and replaces it
    again, calling the done callbacks twice. The caller, the retry rule and the accounting would see
    INTERNAL where the server said, say, UNAVAILABLE. And a half-close (or a write) that fails because the
    call is ending makes the writer cancel the call, so that its caller gets a CancelledError instead of
    the status. With this, the writer waits for the status instead. Call it right after the call is made
    (before the event loop runs its tasks).
    Returns False if the call is not grpcio's own.
    """
    cython_call = getattr(call, "_cython_call", None)
    if cython_call is None or not hasattr(cython_call, "set_internal_error"):
        return False
    call._cython_call = _ServerStatus(cython_call)
    return True
