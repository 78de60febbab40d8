"""What the sync and asyncio balanced channels share per stub method: key extraction and retry rules."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import grpc

from lbkit._driver import BalancerBase, KeyFn
from lbkit.retry import never_reached_server
from lbkit.selectors.base import Key

__all__ = ["CallSpecBase", "ChannelMethods", "call_kwargs", "closed_channel", "timeout_left"]

B = TypeVar("B", bound=BalancerBase)


def timeout_left(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (``time.monotonic``), never negative; None for no deadline."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def closed_channel(err: ValueError) -> bool:
    """Whether grpc (or a drained pool member) refused to start a call because the channel is closed:
    nothing was sent, so the call may go to another endpoint."""
    return "closed" in str(err)


def call_kwargs(metadata: Any, credentials: Any, wait_for_ready: Any, compression: Any) -> dict[str, Any]:
    """The per-call options a multicallable passes through to grpc unchanged."""
    return {
        "metadata": metadata,
        "credentials": credentials,
        "wait_for_ready": wait_for_ready,
        "compression": compression,
    }


class CallSpecBase(Generic[B]):
    """What every call of one stub method shares: the method, its codecs, the key rule, the balancer."""

    __slots__ = ("attempt_timeout", "header", "key_fn", "keyed", "lb", "method", "spec")

    def __init__(
        self,
        lb: B,
        kind: str,
        method: str,
        ser: Any,
        deser: Any,
        registered: bool,
        key_fn: KeyFn | None,
    ) -> None:
        self.lb = lb
        self.method = method
        self.spec = (kind, method, ser, deser, registered)
        self.key_fn = key_fn
        self.keyed = lb.keyed
        self.header = lb.options.key_header
        self.attempt_timeout = lb.retry_policy.attempt_timeout if kind == "unary_unary" else None

    def key(self, metadata: Any, request: Any) -> Key:
        """The call's hash key: None unless the policy uses keys."""
        if not self.keyed:
            return None
        if self.key_fn is not None:
            return self.key_fn(self.method, request)
        if metadata:
            for item in metadata:
                if item[0] == self.header:
                    value = item[1]
                    return value if isinstance(value, (str, bytes)) else str(value)
        return None

    def retryable(
        self, code: grpc.StatusCode | None, details: str | None, deadline: float | None = None
    ) -> bool:
        """Whether a failure may be retried on another endpoint (policy and budget permitting)."""
        policy = self.lb.retry_policy
        if policy.max_attempts <= 1:
            return False
        if never_reached_server(code, details):
            return True  # always safe, and not throttled (gRFC A6 transparent retries)
        if code in policy.retryable_codes or (
            code is grpc.StatusCode.DEADLINE_EXCEEDED
            and policy.attempt_timeout is not None
            and (deadline is None or time.monotonic() < deadline)
        ):
            self.lb.budget.on_failure()
            return self.lb.budget.allow()
        return False


class ChannelMethods:
    """The four method factories generated stubs call, shared by the sync and asyncio channels.

    A subclass names its call-rule class and its multicallable class for each call kind.
    """

    _spec_class: ClassVar[Callable[..., Any]]
    _multicallables: ClassVar[dict[str, Callable[[Any], Any]]]

    def __init__(self, lb: Any, key: KeyFn | None = None) -> None:
        self._lb = lb
        self._key = key

    def _make(self, kind: str, method: str, ser: Any, deser: Any, registered: bool) -> Any:
        spec = self._spec_class(self._lb, kind, method, ser, deser, registered, self._key)
        return self._multicallables[kind](spec)

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        """A multicallable for a unary-unary method; each call picks an endpoint."""
        return self._make(
            "unary_unary", method, request_serializer, response_deserializer, _registered_method
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        """A multicallable for a server-streaming method; each call picks an endpoint."""
        return self._make(
            "unary_stream", method, request_serializer, response_deserializer, _registered_method
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        """A multicallable for a client-streaming method; each call picks an endpoint."""
        return self._make(
            "stream_unary", method, request_serializer, response_deserializer, _registered_method
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        """A multicallable for a bidirectional-streaming method; each call picks an endpoint."""
        return self._make(
            "stream_stream", method, request_serializer, response_deserializer, _registered_method
        )
