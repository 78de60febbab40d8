"""Consul's ``near`` order reaches the balancer: each endpoint's rank is its place in that order."""

from __future__ import annotations

import pytest

from lbkit.endpoint import Endpoint
from lbkit.errors import ConfigError
from tests.unit.test_consul_core import body, make_core
from tests.unit.test_consul_parse import entry


def test_near_ranks_endpoints_in_consuls_order_and_a_reorder_is_published():
    nodes = [("i1", "10.0.0.1", "a"), ("i2", "10.0.0.2", "b"), ("i3", "10.0.0.3", "c")]
    entries = {sid: entry(sid, addr, meta={"zone": zone}) for sid, addr, zone in nodes}
    core = make_core(near="_agent")
    snap = core.on_response(200, {"X-Consul-Index": "5"}, body(*(entries[s] for s in ("i2", "i1", "i3"))))
    assert snap is not None
    assert [(e.zone, e.rank) for e in snap] == [("b", 0), ("a", 1), ("c", 2)]
    first = {e.address: e for e in snap}
    again = core.on_response(200, {"X-Consul-Index": "6"}, body(*(entries[s] for s in ("i2", "i1", "i3"))))
    assert again is None  # same order, same endpoints: nothing to publish
    moved = core.on_response(200, {"X-Consul-Index": "7"}, body(*(entries[s] for s in ("i1", "i2", "i3"))))
    assert moved is not None
    assert [(e.zone, e.rank) for e in moved] == [("a", 0), ("b", 1), ("c", 2)]
    assert {e.address: e for e in moved}["10.0.0.3:50051"] is first["10.0.0.3:50051"]  # unchanged: reused


def test_without_near_endpoints_have_no_rank():
    snap = make_core().on_response(200, {"X-Consul-Index": "5"}, body(entry("i1"), entry("i2", "10.0.0.2")))
    assert snap is not None and [e.rank for e in snap] == [None, None]


def test_a_skipped_entry_leaves_ranks_contiguous():
    core = make_core(near="_agent")
    bad = entry("bad", port=None)
    snap = core.on_response(200, {"X-Consul-Index": "5"}, body(bad, entry("i1"), entry("i2", "10.0.0.2")))
    assert snap is not None and [e.rank for e in snap] == [0, 1]


def test_endpoint_rank_is_validated():
    for bad in (-1, True, 1.5, "0"):
        with pytest.raises(ConfigError, match="rank"):
            Endpoint("10.0.0.1:1", rank=bad)  # type: ignore[arg-type]
    assert "rank=2" in repr(Endpoint("10.0.0.1:1", rank=2))
