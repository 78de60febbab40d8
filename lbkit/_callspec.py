"""What the sync and asyncio balanced channels share per stub method: the call's key and metadata, its
retry policy, and the four method factories generated stubs call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from lbkit._attempts import CallRules
from lbkit._driver import BalancerBase, KeyFn, Member, method_spec
from lbkit.selectors.base import Key

__all__ = ["CallSpecBase", "ChannelMethods"]

B = TypeVar("B", bound=BalancerBase)


class CallSpecBase(CallRules, Generic[B]):
    """What every call of one stub method shares: the method, its codecs, the key rule, the policy."""

    __slots__ = ("forward", "header", "key_fn", "keyed", "method", "simple", "spec")

    lb: B

    def __init__(
        self,
        lb: B,
        kind: str,
        method: str,
        ser: Any,
        deser: Any,
        registered: bool,
        key_fn: KeyFn | None,
        pinned: Member | None = None,
    ) -> None:
        super().__init__(lb, kind, lb.retry_policies.for_method(method), pinned)
        hedging = self.hedging
        if hedging is not None and hedging.percentile is not None:
            self.window = lb.latency_window(method, hedging)
        self.method = method
        self.spec = method_spec(kind, method, ser, deser, registered)
        self.key_fn = key_fn
        self.keyed = lb.keyed
        self.header = lb.options.key_header
        self.forward = lb.options.forward_key_header
        self.simple = (
            key_fn is None and self.attempt_timeout is None and not self.load_reports and pinned is None
        )
        """Calls without metadata need no key, no per-attempt timeout and no load report: the drivers'
        shortest path."""

    def route(self, metadata: Any, request: Any) -> tuple[Key, Any]:
        """The call's hash key (None unless the selector uses keys), and the metadata to send: the key
        header is the balancer's and is left out unless ``forward_key_header``."""
        key: Key = None
        if self.key_fn is not None and self.keyed:
            key = self.key_fn(self.method, request)
        if not metadata:
            return key, metadata
        header = self.header
        for item in metadata:
            if item[0] == header:
                if self.keyed and self.key_fn is None:
                    value = item[1]
                    key = value if isinstance(value, (str, bytes)) else str(value)
                if not self.forward:
                    metadata = tuple(i for i in metadata if i[0] != header) or None
                break
        return key, metadata


class ChannelMethods:
    """The four method factories generated stubs call, shared by the sync and asyncio channels.

    A subclass names its call-rule class and its multicallable class for each call kind. ``pinned``: the
    one member a channel from ``lb.pick()`` calls.
    """

    _spec_class: ClassVar[Callable[..., Any]]
    _multicallables: ClassVar[dict[str, Callable[[Any], Any]]]
    _hedged: ClassVar[dict[str, Callable[[Any], Any]]]
    """The multicallables of methods under a hedging policy (unary and server streaming)."""

    def __init__(self, lb: Any, key: KeyFn | None = None, pinned: Member | None = None) -> None:
        self._lb = lb
        self._key = key
        self._pinned = pinned

    def _make(self, kind: str, method: str, ser: Any, deser: Any, registered: bool) -> Any:
        spec = self._spec_class(self._lb, kind, method, ser, deser, registered, self._key, self._pinned)
        if spec.hedging is not None:
            return self._hedged[kind](spec)
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
