"""Options shared by the sync and asyncio balancers, validated once."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from lbkit._config import check_float, config
from lbkit.errors import ConfigError
from lbkit.health.outlier import OutlierDetection
from lbkit.health.slow_start import SlowStart
from lbkit.retry import MethodPolicies, Policy, RetryPolicy
from lbkit.selectors.base import Selector
from lbkit.subsetting import Subsetting
from lbkit.zones import ZoneRouting

if TYPE_CHECKING:
    from lbkit.health.active import HealthCheck

__all__ = ["DEFAULT_CHANNEL_OPTIONS", "POOL_ARG", "BalancerOptions", "resolve_selector"]

DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Reconnect to a recovered server within seconds rather than grpc's default of up to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 5000),
    # No channelz node per channel: about 3.5 KiB per endpoint, a fifth of what lbkit adds over one
    # native channel to the same servers. Turn it back on with ("grpc.enable_channelz", 1).
    ("grpc.enable_channelz", 0),
)
"""Options every endpoint channel gets unless ``channel_options`` sets the same name."""

POOL_ARG = "lbkit.pool"
"""A channel arg every endpoint channel gets, valued per balancer. gRPC shares a connection between the
channels of a process whose target and args are equal: with a value of its own, a balancer's channels
share no connection with other channels (a stale one in backoff, say, to a server that used the same
port before, cannot stall them), while an endpoint's call channel and its health-checked twin (sync
balancer) share one."""


def resolve_selector(selector: Selector | str) -> Selector:
    """A selector instance from an instance or a policy name (``"round_robin"``, ...)."""
    if isinstance(selector, Selector):
        return selector
    if isinstance(selector, str):
        from lbkit.selectors import by_name

        return by_name(selector)
    raise ConfigError(f"selector must be a Selector or a policy name, got {selector!r}")


@config
class BalancerOptions:
    """Every option of ``lbkit.Balancer`` and ``lbkit.aio.Balancer``, validated on construction."""

    selector: Selector | str = "round_robin"
    retry: Policy | Mapping[str, Policy] | MethodPolicies | None = None
    """A RetryPolicy or HedgingPolicy for every method, or a mapping of method patterns
    (``"/pkg.Service/Method"``, ``"/pkg.Service/*"``, ``"*"``) to either (see
    :class:`~lbkit.retry.MethodPolicies`); None: the default RetryPolicy(). To turn retries off:
    RetryPolicy(max_attempts=1)."""
    health_check: HealthCheck | None = None
    """Active grpc.health.v1 checks; None: off."""
    outlier_detection: OutlierDetection | None = None
    """Passive outlier ejection; None: the default OutlierDetection() (5 consecutive failures)."""
    slow_start: SlowStart | None = None
    panic_threshold: float = 50.0
    """Percent of connected endpoints that must be healthy; below it, balance over all of them (0: off)."""
    key_header: str = "lb-key"
    """Metadata header whose value is a call's consistent-hash key; the balancer consumes it."""
    forward_key_header: bool = False
    """Send the key header on to servers too (by default it is not sent: it may carry a user id)."""
    wait_timeout: float = 10.0
    """Seconds a call without a deadline waits for a ready endpoint before failing UNAVAILABLE."""
    drain_timeout: float = 30.0
    """Seconds a removed endpoint's channel waits for its calls in flight before it closes."""
    channel_options: Sequence[tuple[str, Any]] = ()
    """grpc channel options for every endpoint channel, over :data:`DEFAULT_CHANNEL_OPTIONS`."""
    credentials: grpc.ChannelCredentials | None = None
    """Channel credentials (e.g. ``grpc.ssl_channel_credentials(...)``); None: insecure."""
    service: str | None = None
    """The name in errors, logs and metric labels; None: the discovery's service name."""
    latency_decay: float = 10.0
    """Seconds of the peak-EWMA latency decay window (Finagle's and Linkerd's default is 10 s)."""
    subset: Subsetting | None = None
    """Hold channels to a subset of the endpoints (widened while some are down); None: to all of them."""
    zone: str | None = None
    """The client's zone, for zone-aware routing. None: ``CONSUL_ZONE`` if set, else what discovery
    reports (``Discovery.local_zone``: with ConsulDiscovery, its ``zone`` option or the local agent's node
    metadata with ``zone_from_agent=True``; else the zone of the nearest instance with Consul's ``near``);
    "": zone routing off."""
    zone_routing: ZoneRouting | None = None
    """How calls are kept in the client's zone; None: the default ZoneRouting()."""

    def __post_init__(self) -> None:
        o = "Balancer"
        object.__setattr__(self, "selector", resolve_selector(self.selector))
        if not isinstance(self.retry, MethodPolicies):
            object.__setattr__(self, "retry", MethodPolicies(self.retry))
        if self.outlier_detection is None:
            object.__setattr__(self, "outlier_detection", OutlierDetection())
        if self.health_check is not None:
            from lbkit.health.active import HealthCheck

            if not isinstance(self.health_check, HealthCheck):
                raise ConfigError(
                    f"{o}: health_check must be a HealthCheck or None, got {self.health_check!r}"
                )
        for name, kind in (
            ("outlier_detection", OutlierDetection),
            ("slow_start", SlowStart),
            ("subset", Subsetting),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ConfigError(f"{o}: {name} must be a {kind.__name__} or None, got {value!r}")
        check_float(o, "panic_threshold", self.panic_threshold, minimum=0.0, maximum=100.0)
        if (
            not isinstance(self.key_header, str)
            or not self.key_header
            or self.key_header != self.key_header.lower()
        ):
            raise ConfigError(f"{o}: key_header must be a non-empty lower-case str, got {self.key_header!r}")
        if not isinstance(self.forward_key_header, bool):
            raise ConfigError(f"{o}: forward_key_header must be a bool, got {self.forward_key_header!r}")
        check_float(o, "wait_timeout", self.wait_timeout, minimum=0.0)
        check_float(o, "drain_timeout", self.drain_timeout, minimum=0.0)
        opts = self.channel_options
        if isinstance(opts, (str, bytes)) or not all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in opts
        ):
            raise ConfigError(f"{o}: channel_options must be a sequence of (name, value) pairs, got {opts!r}")
        names = {name for name, _ in opts}
        merged = tuple(opts) + tuple(p for p in DEFAULT_CHANNEL_OPTIONS if p[0] not in names)
        object.__setattr__(self, "channel_options", merged)
        if self.credentials is not None and not isinstance(self.credentials, grpc.ChannelCredentials):
            raise ConfigError(f"{o}: credentials must be grpc.ChannelCredentials, got {self.credentials!r}")
        check_float(o, "latency_decay", self.latency_decay, minimum=0.0, strict_min=True)
        if self.service is not None and (not isinstance(self.service, str) or not self.service):
            raise ConfigError(f"{o}: service must be a non-empty str, got {self.service!r}")
        zone = self.zone
        if zone is None:
            zone = os.environ.get("CONSUL_ZONE") or None
            source = "the CONSUL_ZONE environment variable"
        else:
            source = "zone"
        if zone is not None and (not isinstance(zone, str) or zone != zone.strip()):
            raise ConfigError(f"{o}: {source} must be a zone name without surrounding blanks, got {zone!r}")
        object.__setattr__(self, "zone", zone)
        if self.zone_routing is None:
            object.__setattr__(self, "zone_routing", ZoneRouting())
        elif not isinstance(self.zone_routing, ZoneRouting):
            raise ConfigError(f"{o}: zone_routing must be a ZoneRouting or None, got {self.zone_routing!r}")

    @property
    def policy(self) -> Selector:
        """The selector, resolved."""
        assert isinstance(self.selector, Selector)
        return self.selector

    @property
    def retry_policies(self) -> MethodPolicies:
        """The retry policy of each method, resolved."""
        assert isinstance(self.retry, MethodPolicies)
        return self.retry

    @property
    def retry_policy(self) -> RetryPolicy:
        """The retry policy of methods no pattern names."""
        return self.retry_policies.default
