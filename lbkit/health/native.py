"""Active health checks by gRPC itself (gRFC A17) on the connection the calls use, for both balancers.

Following a ``Watch`` stream in Python costs a thread per endpoint (sync) or a task, a call and some
seventy Python objects the cyclic collector walks (asyncio), so instead per endpoint a balancer opens a
second channel whose service config turns on gRPC's client-side health checking. With the same target,
options and credentials it shares the call channel's connection (gRPC's subchannel pool), so the
``Watch`` stream rides the calls' connection: the second channel is READY while the server says SERVING
and TRANSIENT_FAILURE while it says anything else. The balancer reads that state with the rest of its
pool (:mod:`lbkit._connectivity`) and :func:`verdict` turns it into a health report.

Calls never go on the health-checked channel, though it would save a channel per endpoint: once its
server flips NOT_SERVING, gRPC fails every call on it at once with UNAVAILABLE, and nothing typed tells
such a call (never sent) from one the server answered UNAVAILABLE, so a call picked just before the
balancer hears the flip would be lost with retries off, though that server still serves.

What this gives up against :class:`~lbkit.health.active.HealthWatcher` (the protocol run in Python, for
a channel of one's own): the reason of an unhealthy report is not the status name; a server whose
``Watch`` is UNIMPLEMENTED counts as healthy, as gRPC has it (with ``unimplemented="unhealthy"`` one
``Check`` per connection tells a server without the health service apart, see :func:`probe`); the stream
is reopened with gRPC's connection backoff, so ``interval`` and ``backoff_*`` do not apply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lbkit.events import Cause
from lbkit.health.active import UNIMPLEMENTED_REASON, HealthCheck

__all__ = [
    "UNIMPLEMENTED_REASON",
    "HealthChannel",
    "aprobe",
    "health_options",
    "probe",
    "service_config",
    "verdict",
]

log = logging.getLogger("lbkit.health")

SERVING_REASON = "SERVING"
NOT_SERVING_REASON = "not SERVING (gRPC health check)"


def service_config(check: HealthCheck) -> str:
    """The service config that makes a channel to one address health-checked by gRPC.

    ``round_robin`` over the one address, because ``pick_first`` ignores health checks (gRFC A17).
    """
    return json.dumps(
        {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": check.service}}
    )


def health_options(options: Sequence[tuple[str, Any]], check: HealthCheck) -> list[tuple[str, Any]]:
    """``options`` of a call channel, with the health-checking service config in place of any other."""
    kept = [(k, v) for k, v in options if k != "grpc.service_config"]
    return [*kept, ("grpc.service_config", service_config(check))]


def verdict(
    health_state: grpc.ChannelConnectivity | None, call_ready: bool
) -> tuple[bool, Cause, str] | None:
    """(serving, cause, reason) from the health channel's state, or None while it says nothing.

    READY is SERVING. TRANSIENT_FAILURE means not serving only while the connection itself is up (the call
    channel READY); with the connection down it says nothing about the server, and the last report holds.
    gRPC does not say which status it got: any other than SERVING counts as NOT_SERVING.
    """
    if health_state is grpc.ChannelConnectivity.READY:
        return True, Cause.HEALTH_SERVING, SERVING_REASON
    if health_state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and call_ready:
        return False, Cause.HEALTH_NOT_SERVING, NOT_SERVING_REASON
    return None


class HealthChannel:
    """The health-checked twin of one endpoint's call channel, and the last state read from it."""

    __slots__ = ("channel", "member", "state")

    def __init__(self, member: Any, channel: grpc.Channel) -> None:
        self.member = member
        """The pool member whose health this channel tells."""
        self.channel = channel
        self.state: grpc.ChannelConnectivity | None = None

    def close(self) -> None:
        """Close the channel (its connection stays while the call channel holds it)."""
        try:
            self.channel.close()
        except Exception:
            log.debug("closing a health channel failed", exc_info=True)


def probe(
    channel: grpc.Channel, check: HealthCheck, on_unimplemented: Callable[[], None]
) -> grpc.Future | None:
    """Ask ``channel``'s server once with ``Check``; call ``on_unimplemented`` (on a grpc thread) if it has
    no health service. Only needed with ``unimplemented="unhealthy"``: gRPC counts such a server healthy."""
    try:
        future: Any = health_pb2_grpc.HealthStub(channel).Check.future(
            health_pb2.HealthCheckRequest(service=check.service), timeout=check.timeout
        )
    except ValueError:  # the channel was closed under us
        return None

    def done(f: Any) -> None:
        try:
            f.result()
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.UNIMPLEMENTED:
                on_unimplemented()
        except Exception:  # cancelled with its channel
            pass

    future.add_done_callback(done)
    return future


async def aprobe(channel: grpc.aio.Channel, check: HealthCheck) -> bool:
    """:func:`probe` for a ``grpc.aio`` channel: whether its server answered ``Check`` UNIMPLEMENTED."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        await stub.Check(health_pb2.HealthCheckRequest(service=check.service), timeout=check.timeout)
    except grpc.RpcError as error:
        return error.code() is grpc.StatusCode.UNIMPLEMENTED
    except Exception:  # the channel was closed under us
        return False
    return False
