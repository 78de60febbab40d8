"""Retry policy and retry budget (gRPC's retry throttling, gRFC A6), shared by both drivers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import grpc
from tenacity import RetryCallState
from tenacity.stop import stop_base

from lbkit._config import check_float, check_int, config
from lbkit.errors import ConfigError

__all__ = [
    "RetryBudget",
    "RetryPolicy",
    "StopAtDeadline",
    "attempt_left",
    "never_reached_server",
    "server_code",
]

# Details gRPC gives for a call that failed before any byte reached a server.
_NOT_SENT_MARKERS = (
    "failed to connect to all addresses",
    "connection refused",
    "connections to all backends failing",
    "dns resolution failed",
    "channel closed",
    "closed channel",
    "no address",
    "address not available",
    "network is unreachable",
    "no route to host",
)


def attempt_left(deadline: float | None, attempt_timeout: float | None) -> float | None:
    """Seconds the next attempt may take: what is left of the deadline, capped by ``attempt_timeout``."""
    if deadline is None:
        return attempt_timeout
    left = max(deadline - time.monotonic(), 0.0)
    return left if attempt_timeout is None else min(left, attempt_timeout)


def server_code(code: grpc.StatusCode | None, client_cancelled: bool = False) -> grpc.StatusCode | None:
    """The status as the server's doing: CANCELLED that the client did not ask for is a reset stream
    (the server went away mid-call, e.g. stopped without grace), which counts as UNAVAILABLE."""
    if code is grpc.StatusCode.CANCELLED and not client_cancelled:
        return grpc.StatusCode.UNAVAILABLE
    return code


def never_reached_server(code: grpc.StatusCode | None, details: str | None) -> bool:
    """Whether a failure is one where the request cannot have reached a server (safe to retry)."""
    if code is not grpc.StatusCode.UNAVAILABLE:
        return False
    text = (details or "").lower()
    return any(marker in text for marker in _NOT_SENT_MARKERS)


@config
class RetryPolicy:
    """When a failed call is tried again on another endpoint.

    A call that never reached a server (connection refused, endpoint gone while picking) is always
    retried. A call that failed with a status in ``retryable_codes`` is retried too: UNAVAILABLE by
    default, as gRPC's retry policy does. For methods that are not idempotent, pass
    ``retryable_codes=()``: only the always-safe retries remain. Application errors (INVALID_ARGUMENT,
    NOT_FOUND, ...) are never retried unless listed. Streams are retried only before their first
    response. All attempts share the call's deadline.
    """

    max_attempts: int = 3
    """Attempts in all, the first included (1 disables retries)."""
    retryable_codes: Iterable[grpc.StatusCode] = (grpc.StatusCode.UNAVAILABLE,)
    initial_backoff: float = 0.01
    """Seconds before the first retry; doubles each retry, with full jitter."""
    max_backoff: float = 0.5
    budget_max_tokens: float = 100.0
    """Retry budget (gRFC A6 retry throttling): a retryable failure costs a token, a success earns
    ``budget_token_ratio``; retries stop while tokens <= half of this (the default lets a burst of 50
    failures retry, e.g. a server dying under 50 calls). 0 disables the budget. Calls that never
    reached a server are retried without a token."""
    budget_token_ratio: float = 0.1
    attempt_timeout: float | None = None
    """Seconds one unary attempt may take (Envoy's per-try timeout); an attempt that runs out is retried
    on another endpoint while the call's own deadline allows. None: an attempt has the whole deadline."""

    def __post_init__(self) -> None:
        name = "RetryPolicy"
        check_int(name, "max_attempts", self.max_attempts, minimum=1)
        codes = self.retryable_codes
        if isinstance(codes, (str, bytes, grpc.StatusCode)) or not isinstance(codes, Iterable):
            raise ConfigError(
                f"{name}: retryable_codes must be an iterable of grpc.StatusCode, got {codes!r}"
            )
        frozen = frozenset(codes)
        for c in frozen:
            if not isinstance(c, grpc.StatusCode) or c is grpc.StatusCode.OK:
                raise ConfigError(f"{name}: retryable_codes holds {c!r}, not a failing grpc.StatusCode")
        object.__setattr__(self, "retryable_codes", frozen)
        check_float(name, "initial_backoff", self.initial_backoff, minimum=0.0)
        check_float(name, "max_backoff", self.max_backoff, minimum=self.initial_backoff)
        check_float(name, "budget_max_tokens", self.budget_max_tokens, minimum=0.0)
        check_float(name, "budget_token_ratio", self.budget_token_ratio, minimum=0.0, maximum=1.0)
        if self.attempt_timeout is not None:
            check_float(name, "attempt_timeout", self.attempt_timeout, minimum=0.0, strict_min=True)


class RetryBudget:
    """A token bucket that stops retry storms (gRFC A6 retry throttling).

    Each retryable failure costs a token, each success earns ``token_ratio``; a retry is allowed
    while tokens exceed half the maximum. ``max_tokens`` 0 allows every retry.
    """

    __slots__ = ("_lock", "max_tokens", "refused", "token_ratio", "tokens")

    def __init__(self, max_tokens: float = 100.0, token_ratio: float = 0.1) -> None:
        self.max_tokens = max_tokens
        self.token_ratio = token_ratio
        self.tokens = max_tokens
        self.refused = 0
        """Retries refused by the budget."""
        self._lock = threading.Lock()

    def on_success(self) -> None:
        """Earn back a fraction of a token (cheap when full, as on the common path)."""
        if self.tokens < self.max_tokens:
            with self._lock:
                self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)

    def on_failure(self) -> None:
        """Spend a token for a retryable failure."""
        with self._lock:
            self.tokens = max(0.0, self.tokens - 1.0)

    def allow(self) -> bool:
        """Whether a retry may go ahead now; counts refusals."""
        if self.max_tokens <= 0 or self.tokens > self.max_tokens / 2:
            return True
        self.refused += 1
        return False


class StopAtDeadline(stop_base):
    """A tenacity stop condition: the call's deadline (``time.monotonic``; None: never) has passed."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline
