"""A Consul-compatible HTTP server for tests and development: ``server`` (HTTP API), ``state`` (catalog,
services, checks), ``filter`` (Consul's filter expressions), ``checks`` (check runners and durations).

Run it alone with ``python -m lbkit.testing.consul --port 8500``.
"""

from __future__ import annotations

from lbkit.testing.consul.server import ConsulServer, ConsulTimings, RecordedRequest

__all__ = ["ConsulServer", "ConsulTimings", "RecordedRequest"]
