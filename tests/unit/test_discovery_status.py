"""DiscoveryStatus: counters and outage start/end notifications."""

from __future__ import annotations

from lbkit.discovery.base import DiscoveryStatus


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
