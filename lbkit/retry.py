"""Retry policy, per-method policies and the retry budget (gRPC's retry throttling, gRFC A6).

What these mean for a call is decided in one place, the attempt machine (:mod:`lbkit._attempts`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping

import grpc

from lbkit._config import check_float, check_int, check_status_codes, config
from lbkit.errors import ConfigError
from lbkit.hedging import HedgingPolicy

__all__ = ["MethodPolicies", "Policy", "RetryBudget", "RetryPolicy"]


@config
class RetryPolicy:
    """When a failed call is tried again on another endpoint.

    A call that provably never left the client (its endpoint's channel was not connected or was closed
    by lbkit before the call started) is always tried elsewhere, without counting as an attempt. A call
    that may have reached a server is retried only when its status is in ``retryable_codes``
    (UNAVAILABLE by default, as gRPC's retry policy does), while attempts, the retry budget and the
    call's deadline allow; streams only before their first response. For methods that are not
    idempotent, pass ``retryable_codes=()`` (or ``max_attempts=1``) for them (see
    :class:`MethodPolicies`). All attempts share the call's deadline.
    """

    max_attempts: int = 3
    """Attempts in all, the first included (1 disables retries)."""
    retryable_codes: Iterable[grpc.StatusCode] = (grpc.StatusCode.UNAVAILABLE,)
    initial_backoff: float = 0.01
    """Seconds before the first retry at most; doubles each retry up to ``max_backoff``, with full
    jitter (each wait is random between 0 and that bound). A wait that would reach the call's deadline
    is not made: the call ends with the last attempt's error."""
    max_backoff: float = 0.5
    budget_max_tokens: float = 100.0
    """Retry budget (gRFC A6 retry throttling), one per balancer, sized by the policy for ``"*"``: each
    retry of a call that may have reached a server costs a token, each successful call earns
    ``budget_token_ratio``; retries stop while tokens <= half of this. 0 disables the budget."""
    budget_token_ratio: float = 0.1
    attempt_timeout: float | None = None
    """Seconds one attempt may take before its response (Envoy's per-try timeout): a whole attempt for
    unary and client-streaming calls, the wait for the first response for server-streaming and
    bidirectional ones (a stream that answers is never cut). An attempt that runs out is retried on
    another endpoint while the call's own deadline allows. None: an attempt has the whole deadline."""

    def __post_init__(self) -> None:
        name = "RetryPolicy"
        check_int(name, "max_attempts", self.max_attempts, minimum=1)
        codes = check_status_codes(name, "retryable_codes", self.retryable_codes)
        object.__setattr__(self, "retryable_codes", codes)
        check_float(name, "initial_backoff", self.initial_backoff, minimum=0.0)
        check_float(name, "max_backoff", self.max_backoff, minimum=self.initial_backoff)
        check_float(name, "budget_max_tokens", self.budget_max_tokens, minimum=0.0)
        check_float(name, "budget_token_ratio", self.budget_token_ratio, minimum=0.0, maximum=1.0)
        if self.attempt_timeout is not None:
            check_float(name, "attempt_timeout", self.attempt_timeout, minimum=0.0, strict_min=True)


_SERVICE = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_PATTERN = re.compile(rf"/({_SERVICE})/([A-Za-z_][A-Za-z0-9_]*|\*)")


Policy = RetryPolicy | HedgingPolicy
"""What one method is given: retried after a failure, or hedged while it waits (never both)."""


class MethodPolicies:
    """The retry or hedging policy of each method, from ``Balancer(retry=...)``.

    ``retry`` is a :class:`RetryPolicy` or :class:`~lbkit.HedgingPolicy` for every method, None for the
    default ``RetryPolicy()``, or a mapping from method patterns to policies, as gRPC's service config
    ``methodConfig`` names methods: ``"/pkg.Service/Method"`` (one method), ``"/pkg.Service/*"`` (every
    method of a service) and ``"*"`` (every method). As in ``methodConfig``, where a method has a
    ``retryPolicy`` or a ``hedgingPolicy``, never both, each pattern maps to one policy of either kind.
    The most specific pattern wins; a method no pattern matches gets ``RetryPolicy()``.
    """

    __slots__ = ("_exact", "default", "fallback")

    def __init__(self, retry: Policy | Mapping[str, Policy] | None = None) -> None:
        self._exact: dict[str, Policy] = {}
        if retry is None or isinstance(retry, (RetryPolicy, HedgingPolicy)):
            self.fallback: Policy = retry if retry is not None else RetryPolicy()
            """The policy of methods no pattern names."""
            self.default: RetryPolicy = retry if isinstance(retry, RetryPolicy) else RetryPolicy()
            """The retry policy of methods no pattern names (``RetryPolicy()`` when that is a hedging
            policy): it sizes the balancer's retry budget."""
            return
        if not isinstance(retry, Mapping):
            raise ConfigError(
                "Balancer: retry must be a RetryPolicy, a HedgingPolicy or a mapping of method patterns "
                f"to them, got {retry!r}"
            )
        default: Policy = RetryPolicy()
        for pattern, policy in retry.items():
            if not isinstance(policy, (RetryPolicy, HedgingPolicy)):
                raise ConfigError(
                    f"Balancer: retry[{pattern!r}] must be a RetryPolicy or a HedgingPolicy, got {policy!r}"
                )
            if pattern == "*":
                default = policy
            elif isinstance(pattern, str) and _PATTERN.fullmatch(pattern):
                self._exact[pattern] = policy
            else:
                raise ConfigError(
                    f"Balancer: retry has the method pattern {pattern!r}; expected '/pkg.Service/Method', "
                    "'/pkg.Service/*' or '*'"
                )
        self.fallback = default
        self.default = default if isinstance(default, RetryPolicy) else RetryPolicy()

    def for_method(self, method: str) -> Policy:
        """The policy of ``method`` (``"/pkg.Service/Method"``, as stubs name it)."""
        exact = self._exact
        if not exact:
            return self.fallback
        policy = exact.get(method)
        if policy is None:
            policy = exact.get(method[: method.rfind("/") + 1] + "*", self.fallback)
        return policy

    def __repr__(self) -> str:
        return f"MethodPolicies({self._exact!r}, default={self.fallback!r})"


class RetryBudget:
    """A token bucket that stops retry storms (gRFC A6 retry throttling), shared by a balancer's calls.

    A retry of a call that may have reached a server is allowed while tokens exceed half the maximum,
    and costs a token when it is made; each successful call earns ``token_ratio``. ``max_tokens`` 0
    allows every retry.
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

    def allow(self) -> bool:
        """Whether a retry may be made now; counts refusals."""
        if self.max_tokens <= 0 or self.tokens > self.max_tokens / 2:
            return True
        with self._lock:
            self.refused += 1
        return False

    def spend(self) -> None:
        """Take the token of a retry being made."""
        if self.max_tokens > 0:
            with self._lock:
                self.tokens = max(0.0, self.tokens - 1.0)

    def refund(self) -> None:
        """Give back the token of a hedge that provably never left the client."""
        if self.max_tokens > 0:
            with self._lock:
                self.tokens = min(self.max_tokens, self.tokens + 1.0)
