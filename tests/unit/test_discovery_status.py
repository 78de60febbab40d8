"""DiscoveryStatus: counters and outage start/end notifications."""

from __future__ import annotations

from lbkit.discovery.base import DiscoveryStatus
from lbkit.errors import DiscoveryError


def test_listeners_hear_outage_start_and_end_once_each():
    status = DiscoveryStatus()
    heard: list[tuple[bool, str]] = []
    status.listeners.append(lambda s: heard.append((s.stale, s.last_error)))
    status.succeeded(1.0)
    assert heard == []  # no outage to end
    status.failed("refused")
    status.failed("refused again")
    assert heard == [(True, "refused")]
    assert status.errors == 2 and status.consecutive_errors == 2 and status.stale
    status.succeeded(2.0)
    assert heard == [(True, "refused"), (False, "refused again")]
    assert not status.stale and status.last_success == 2.0 and status.errors == 2


def test_a_failure_is_a_typed_discovery_error_until_the_next_good_answer():
    status = DiscoveryStatus()
    assert status.error is None
    refused = ConnectionRefusedError(111, "Connection refused")
    status.failed("ConnectionError: refused", cause=refused)
    first = status.error
    assert isinstance(first, DiscoveryError) and str(first) == "ConnectionError: refused"
    assert first.status == 0 and first.__cause__ is refused
    status.failed("HTTP 403: ACL not found", status=403)
    assert status.error is not first and status.error.status == 403 and status.error.__cause__ is None
    status.succeeded(3.0)
    assert status.error is None and status.last_error == "HTTP 403: ACL not found"
