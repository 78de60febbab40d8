"""The one error tree of lbkit."""

from __future__ import annotations

import grpc

__all__ = [
    "ConfigError",
    "DiscoveryError",
    "EndpointRemovedError",
    "LbkitError",
    "NoEndpointsError",
    "NoReadyEndpointError",
    "RegistrationError",
]


class LbkitError(Exception):
    """Base of every error lbkit raises."""


class ConfigError(LbkitError, ValueError):
    """A bad option, address, weight or payload; the message names the bad value."""


class DiscoveryError(LbkitError):
    """Discovery is failing: its last query got no usable answer.

    The discovery loops do not raise it (they keep the last good endpoint set and retry): it is
    ``discovery.status.error`` while the failure lasts, and the ``__cause__`` of the
    :class:`NoEndpointsError` of a call that found no endpoint because discovery never answered.
    ``status`` is the HTTP status of a refused answer (0: no answer, or an unusable one); the
    transport error, if any, is chained as ``__cause__``. The text never holds a token.
    """

    def __init__(self, text: str, *, status: int = 0) -> None:
        super().__init__(text)
        self.status = status


class _Unavailable(LbkitError, grpc.RpcError):  # type: ignore[misc]
    """An lbkit error that is also a `grpc.RpcError` with code UNAVAILABLE, so callers that handle gRPC
    status codes keep working."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._details = text

    def code(self) -> grpc.StatusCode:
        """Always UNAVAILABLE."""
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        """The message."""
        return self._details

    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        """Empty: no server answered."""
        return ()

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Empty: no server answered."""
        return ()

    def debug_error_string(self) -> str:
        """The message, as grpc errors offer it."""
        return self._details


class NoEndpointsError(_Unavailable):
    """Nothing to pick from: no endpoints are known.

    It is also a `grpc.RpcError` with code UNAVAILABLE, so callers that handle
    gRPC status codes keep working.
    """

    def __init__(self, message: str = "no endpoints", *, service: str | None = None) -> None:
        self.service = service
        super().__init__(f"{service}: {message}" if service else message)


class NoReadyEndpointError(NoEndpointsError):
    """Endpoints are known but none is ready (connecting, unhealthy or ejected)."""


class EndpointRemovedError(_Unavailable):
    """The call's endpoint left the balancer: its drain ran out with the call in flight, the balancer
    closed, or a call was made on a channel from ``lb.pick()`` after its endpoint left discovery.

    A `grpc.RpcError` with code UNAVAILABLE; ``address`` names the endpoint. The call may have reached
    the server, so it is retried only as the retry policy allows.
    """

    def __init__(self, address: str, message: str) -> None:
        self.address = address
        super().__init__(message)


class RegistrationError(LbkitError):
    """The Consul agent refused a registration or could not be reached; ``status`` is the HTTP status
    (0: no answer)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
