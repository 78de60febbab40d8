"""The only place lbkit reaches into grpcio's private parts: each use with its reason.

grpcio has no public API for either of these. ``tests/integration/test_grpc_private.py`` exercises
every function here on real channels and calls, so a grpcio release that changes them fails loudly
there instead of degrading silently in production (where each falls back to doing nothing).
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc._common import CYGRPC_STATUS_CODE_TO_STATUS_CODE

__all__ = ["finished_code", "finished_trailing_metadata", "request_connection"]


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


def request_connection(channel: Any) -> bool:
    """Ask a sync ``grpc.Channel`` that is IDLE to connect now rather than at its next call.

    Why private: the public way, ``channel.subscribe(..., try_to_connect=True)``, starts a polling thread
    per subscription; the underlying Cython channel's ``check_connectivity_state(True)`` does only the
    asking. Returns False when the channel is not grpcio's own or is closed.
    """
    try:
        channel._channel.check_connectivity_state(True)
    except (AttributeError, ValueError):
        return False
    return True
