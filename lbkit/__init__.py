"""lbkit: client-side load balancing for gRPC in Python.

Selectors (round robin, least connections, weighted, consistent hash, peak EWMA, weighted round robin from
the servers' load reports), discovery (static, Consul), health (active checks, outlier ejection),
zone-aware routing and balanced channels that generated stubs accept.
Public names load lazily, so ``import lbkit`` costs little more than ``import grpc``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from lbkit._lazy import lazy_exports

__version__ = "0.1.0"

# Quiet unless the application configures logging.
logging.getLogger("lbkit").addHandler(logging.NullHandler())

_LAZY: dict[str, str] = {
    "aio": "lbkit.aio",
    "metrics": "lbkit.metrics",
    "registration": "lbkit.registration",
    "testing": "lbkit.testing",
    "ConfigError": "lbkit.errors",
    "DiscoveryError": "lbkit.errors",
    "EndpointRemovedError": "lbkit.errors",
    "LbkitError": "lbkit.errors",
    "NoEndpointsError": "lbkit.errors",
    "NoReadyEndpointError": "lbkit.errors",
    "RegistrationError": "lbkit.errors",
    "Endpoint": "lbkit.endpoint",
    "EndpointDiff": "lbkit.endpoint",
    "EndpointHealth": "lbkit.endpoint",
    "EndpointSet": "lbkit.endpoint",
    "Cause": "lbkit.events",
    "Event": "lbkit.events",
    "EventKind": "lbkit.events",
    "EndpointStats": "lbkit.stats",
    "Stats": "lbkit.stats",
    "Picker": "lbkit.selectors.base",
    "Selector": "lbkit.selectors.base",
    "Discovery": "lbkit.discovery.base",
    "StaticDiscovery": "lbkit.discovery.static",
    "ConsulDiscovery": "lbkit.discovery.consul",
    "Balancer": "lbkit.balancer",
    "BalancedChannel": "lbkit.channel",
    "RetryPolicy": "lbkit.retry",
    "HedgingPolicy": "lbkit.hedging",
    "OutlierDetection": "lbkit.health.outlier",
    "SuccessRateEjection": "lbkit.health.outlier",
    "FailurePercentageEjection": "lbkit.health.outlier",
    "SlowStart": "lbkit.health.slow_start",
    "Subsetting": "lbkit.subsetting",
    "HealthCheck": "lbkit.health.active",
    "RoundRobin": "lbkit.selectors.round_robin",
    "LeastConnections": "lbkit.selectors.least_connections",
    "Weighted": "lbkit.selectors.weighted",
    "ConsistentHash": "lbkit.selectors.consistent_hash",
    "PeakEwma": "lbkit.selectors.peak_ewma",
    "WeightedRoundRobin": "lbkit.selectors.weighted_round_robin",
    "ZoneMode": "lbkit.zones",
    "ZonePlan": "lbkit.zones",
    "ZoneRouting": "lbkit.zones",
}

__all__ = [
    "BalancedChannel",
    "Balancer",
    "Cause",
    "ConfigError",
    "ConsistentHash",
    "ConsulDiscovery",
    "Discovery",
    "DiscoveryError",
    "Endpoint",
    "EndpointDiff",
    "EndpointHealth",
    "EndpointRemovedError",
    "EndpointSet",
    "EndpointStats",
    "Event",
    "EventKind",
    "FailurePercentageEjection",
    "HealthCheck",
    "HedgingPolicy",
    "LbkitError",
    "LeastConnections",
    "NoEndpointsError",
    "NoReadyEndpointError",
    "OutlierDetection",
    "PeakEwma",
    "Picker",
    "RegistrationError",
    "RetryPolicy",
    "RoundRobin",
    "Selector",
    "SlowStart",
    "StaticDiscovery",
    "Stats",
    "Subsetting",
    "SuccessRateEjection",
    "Weighted",
    "WeightedRoundRobin",
    "ZoneMode",
    "ZonePlan",
    "ZoneRouting",
    "__version__",
]

if TYPE_CHECKING:
    from lbkit.balancer import Balancer
    from lbkit.channel import BalancedChannel
    from lbkit.discovery.base import Discovery
    from lbkit.discovery.consul import ConsulDiscovery
    from lbkit.discovery.static import StaticDiscovery
    from lbkit.endpoint import Endpoint, EndpointDiff, EndpointHealth, EndpointSet
    from lbkit.errors import (
        ConfigError,
        DiscoveryError,
        EndpointRemovedError,
        LbkitError,
        NoEndpointsError,
        NoReadyEndpointError,
        RegistrationError,
    )
    from lbkit.events import Cause, Event, EventKind
    from lbkit.health.active import HealthCheck
    from lbkit.health.outlier import FailurePercentageEjection, OutlierDetection, SuccessRateEjection
    from lbkit.health.slow_start import SlowStart
    from lbkit.hedging import HedgingPolicy
    from lbkit.retry import RetryPolicy
    from lbkit.selectors.base import Picker, Selector
    from lbkit.selectors.consistent_hash import ConsistentHash
    from lbkit.selectors.least_connections import LeastConnections
    from lbkit.selectors.peak_ewma import PeakEwma
    from lbkit.selectors.round_robin import RoundRobin
    from lbkit.selectors.weighted import Weighted
    from lbkit.selectors.weighted_round_robin import WeightedRoundRobin
    from lbkit.stats import EndpointStats, Stats
    from lbkit.subsetting import Subsetting
    from lbkit.zones import ZoneMode, ZonePlan, ZoneRouting


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
