"""A Consul-compatible HTTP server for tests and development: ``server`` (the server, its lifecycle and
test hooks), ``agent_api`` and ``catalog_api`` (the endpoints), ``api`` (what they share), ``state``
(nodes, services, checks, indexes), ``specs`` (decoding requests), ``filter`` (Consul's filter
expressions), ``checks`` (check runners and durations), ``tls`` (HTTPS and a throwaway CA for tests).

Run it alone with ``python -m lbkit.testing.consul --port 8500``.
"""

from __future__ import annotations

from lbkit.testing.consul.server import ConsulServer, ConsulTimings, RecordedRequest
from lbkit.testing.consul.tls import ServerTLS, TestPKI, make_test_pki

__all__ = ["ConsulServer", "ConsulTimings", "RecordedRequest", "ServerTLS", "TestPKI", "make_test_pki"]
