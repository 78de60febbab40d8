"""Active health checks (gRFC A17): follow each endpoint's ``grpc.health.v1.Health`` status.

Per endpoint a watcher keeps a ``Watch`` stream open for the configured service name and reports
SERVING as healthy, anything else as unhealthy. A server whose ``Watch`` is UNIMPLEMENTED is polled
with ``Check`` every ``interval`` instead; one without the health service at all (``Check`` UNIMPLEMENTED
too) counts as healthy, as gRPC does, unless ``unimplemented="unhealthy"``. ``Check`` failing with
NOT_FOUND means the server does not know the service: unhealthy. A broken stream (UNAVAILABLE, a server
restart) is reopened after a jittered exponential backoff, and the last status holds meanwhile:
connectivity is the balancer's business, not the health check's.

``on_status(address, serving, cause, reason)`` is called at the first answer and whenever ``serving``
flips; ``cause`` is the typed :class:`~lbkit.events.Cause` of the answer, ``reason`` its words.

:class:`HealthTracker` holds what the sync and asyncio watchers share (reading answers, reporting,
backoff) and does no I/O; :class:`HealthWatcher` runs it in a thread, ``AsyncHealthWatcher`` (in
:mod:`lbkit.health.active_aio`) in a task.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lbkit._config import check_choice, check_float, config
from lbkit.errors import ConfigError
from lbkit.events import Cause

__all__ = ["Backoff", "HealthCheck", "HealthTracker", "HealthWatcher", "OnStatus", "interpret"]

log = logging.getLogger("lbkit.health")

OnStatus = Callable[[str, bool, Cause, str], None]
"""Called with (address, serving, cause, reason) when an endpoint's health is first known and when it
flips."""

UNIMPLEMENTED_REASON = "health service unimplemented"


@config
class HealthCheck:
    """How to check endpoints with ``grpc.health.v1.Health`` (times in seconds)."""

    service: str = ""
    """The service name sent in each HealthCheckRequest; "" asks about the whole server."""
    timeout: float = 5.0
    """Deadline of each ``Check`` call."""
    interval: float = 5.0
    """Seconds between ``Check`` calls, used only when the server does not implement ``Watch``."""
    unimplemented: str = "healthy"
    """What a server without the health service is: "healthy" (as gRPC does) or "unhealthy"."""
    backoff_base: float = 1.0
    """First delay before reopening a broken ``Watch`` stream; it doubles with each failed attempt."""
    backoff_max: float = 30.0
    """Longest delay before reopening a broken ``Watch`` stream."""

    def __post_init__(self) -> None:
        owner = "HealthCheck"
        if not isinstance(self.service, str):
            raise ConfigError(f"{owner}: service must be a str, got {self.service!r}")
        check_float(owner, "timeout", self.timeout, minimum=0.0, strict_min=True)
        check_float(owner, "interval", self.interval, minimum=0.0, strict_min=True)
        check_choice(owner, "unimplemented", self.unimplemented, ("healthy", "unhealthy"))
        check_float(owner, "backoff_base", self.backoff_base, minimum=0.0, strict_min=True)
        check_float(owner, "backoff_max", self.backoff_max, minimum=self.backoff_base)


_STATUS_CAUSES = {
    health_pb2.HealthCheckResponse.SERVING: Cause.HEALTH_SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING: Cause.HEALTH_NOT_SERVING,
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: Cause.HEALTH_SERVICE_UNKNOWN,
}


def interpret(status: int) -> tuple[bool, Cause, str]:
    """Read a ``HealthCheckResponse.status``: (serving, its cause, its name). Only SERVING is serving."""
    try:
        name = str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    except ValueError:
        name = f"status {status}"
    cause = _STATUS_CAUSES.get(status, Cause.HEALTH_UNKNOWN)
    return cause is Cause.HEALTH_SERVING, cause, name


_JITTER = random.Random()
"""The jitter of backoffs made without an ``rng``: one generator for all (each holds 2.5 KB of state)."""


class Backoff:
    """Delays for retries: ``base * 2**n`` capped at ``maximum``, each times U(0.8, 1.2), never above it."""

    def __init__(self, base: float, maximum: float, rng: random.Random | None = None) -> None:
        self.base = base
        self.maximum = maximum
        self._rng = rng if rng is not None else _JITTER
        self._attempts = 0

    def next(self) -> float:
        """The delay before the next attempt; each call counts one failed attempt."""
        delay = min(self.maximum, self.base * 2.0 ** min(self._attempts, 64))
        self._attempts += 1
        return min(self.maximum, delay * (0.8 + 0.4 * self._rng.random()))

    def reset(self) -> None:
        """Start over from ``base`` (after a success)."""
        self._attempts = 0


class HealthTracker:
    """The health-check protocol of one endpoint, without I/O: read answers, report flips, pick delays.

    A driver opens ``Watch`` while :attr:`polling` is false and calls ``Check`` while it is true,
    feeding each outcome to :meth:`on_message`, :meth:`on_watch_end` or :meth:`on_check`, and waits
    the seconds these return before its next call.
    """

    def __init__(
        self, config: HealthCheck, address: str, on_status: OnStatus, *, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.address = address
        self._on_status = on_status
        self.backoff = Backoff(config.backoff_base, config.backoff_max, rng)
        self.polling = False
        """Whether the server lacks ``Watch``, so the driver polls with ``Check``."""
        self.serving: bool | None = None
        """The last status reported; None before the first answer."""
        self.enabled = True
        """While false, nothing is reported (the driver is stopping)."""

    def request(self) -> Any:
        """The HealthCheckRequest to send."""
        return health_pb2.HealthCheckRequest(service=self.config.service)

    def on_message(self, status: int) -> None:
        """A ``Watch`` stream delivered ``status``."""
        self.backoff.reset()
        self._report(*interpret(status))

    def on_watch_end(self, code: grpc.StatusCode | None) -> float:
        """The ``Watch`` stream ended with ``code`` (None: closed by the server without error).

        Returns the seconds to wait before the next call: none when the server lacks ``Watch`` (the
        driver switches to polling), else a backoff delay, keeping the last status.
        """
        if code is grpc.StatusCode.UNIMPLEMENTED:
            self.polling = True
            return 0.0
        return self.backoff.next()

    def on_check(self, status: int | None, code: grpc.StatusCode | None) -> float:
        """A ``Check`` answered ``status`` or failed with ``code``; returns the seconds until the next one."""
        if code is None and status is not None:
            self._report(*interpret(status))
        elif code is grpc.StatusCode.NOT_FOUND:
            self._report(False, Cause.HEALTH_SERVICE_UNKNOWN, "SERVICE_UNKNOWN (Check: NOT_FOUND)")
        elif code is grpc.StatusCode.UNIMPLEMENTED:
            serving = self.config.unimplemented == "healthy"
            self._report(serving, Cause.HEALTH_UNIMPLEMENTED, UNIMPLEMENTED_REASON)
        return self.config.interval

    def _report(self, serving: bool, cause: Cause, reason: str) -> None:
        if serving == self.serving or not self.enabled:
            return
        self.serving = serving
        try:
            self._on_status(self.address, serving, cause, reason)
        except Exception:
            log.exception("health status callback failed for %s", self.address)


class HealthWatcher:
    """Checks one endpoint's health over its ``grpc.Channel`` from a daemon thread."""

    def __init__(
        self,
        config: HealthCheck,
        channel: grpc.Channel,
        address: str,
        on_status: OnStatus,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.address = address
        self._tracker = HealthTracker(config, address, on_status, rng=rng)
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start checking (once)."""
        if self._thread is None and not self._stopping.is_set():
            self._thread = threading.Thread(
                target=self._run, name=f"lbkit-health-{self.address}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float | None = 1.0) -> None:
        """Stop checking: cancel the call in flight and wait up to ``timeout`` s for the thread to end.

        Nothing is reported after this returns.
        """
        self._stopping.set()
        self._tracker.enabled = False
        with self._lock:
            call, self._call = self._call, None
        if call is not None:
            call.cancel()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the checking thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        tracker = self._tracker
        while not self._stopping.is_set():
            try:
                delay = self._check() if tracker.polling else self._watch()
            except ValueError:  # the channel was closed under us
                return
            if delay > 0.0 and self._stopping.wait(delay):
                return

    def _hold(self, call: Any) -> bool:
        with self._lock:
            if self._stopping.is_set():
                call.cancel()
                return False
            self._call = call
            return True

    def _release(self) -> None:
        with self._lock:
            self._call = None

    def _watch(self) -> float:
        call = self._stub.Watch(self._tracker.request(), wait_for_ready=True)
        if not self._hold(call):
            return 0.0
        code: grpc.StatusCode | None = None
        try:
            for response in call:
                self._tracker.on_message(response.status)
        except grpc.RpcError as error:
            code = error.code()
        finally:
            self._release()
        return 0.0 if self._stopping.is_set() else self._tracker.on_watch_end(code)

    def _check(self) -> float:
        future = self._stub.Check.future(
            self._tracker.request(), timeout=self._tracker.config.timeout, wait_for_ready=True
        )
        if not self._hold(future):
            return 0.0
        status: int | None = None
        code: grpc.StatusCode | None = None
        try:
            status = int(future.result().status)
        except grpc.FutureCancelledError:
            return 0.0
        except grpc.RpcError as error:
            code = error.code()
        finally:
            self._release()
        return 0.0 if self._stopping.is_set() else self._tracker.on_check(status, code)
