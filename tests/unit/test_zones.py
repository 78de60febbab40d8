"""Zone-aware routing: the rule against Envoy's formula, its balance property, and its pickers."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbkit.endpoint import Endpoint
from lbkit.errors import ConfigError
from lbkit.selectors import SELECTORS, ConsistentHash, RoundRobin, Weighted
from lbkit.stats import Stats
from lbkit.zones import (
    LocalZonePicker,
    SplitZonePicker,
    ZoneMode,
    ZonePicker,
    ZonePlan,
    ZoneRouter,
    ZoneRouting,
    plan_zones,
)

# ------------------------------------------------------------------------------------------------
# Envoy's formula, as its load balancer computes it (integer percentages in units of 1/10000), written
# from the description of ZoneAwareLoadBalancerBase: an independent reference for plan_zones.


def envoy(
    zone: str, upstream: dict[str, int], local: dict[str, int], scale: int = 10000
) -> tuple[str, float, dict[str, float]]:
    """(state, share kept local, share per other zone) for host counts per zone. Envoy's ``scale`` is
    10000 (percentages truncated to 0.01 %); a larger one leaves the formula without its rounding."""
    total_up, total_lo = sum(upstream.values()), sum(local.values())
    pct = {
        z: (scale * local.get(z, 0) // total_lo, scale * n // total_up) for z, n in upstream.items() if n > 0
    }
    lo_local, up_local = pct.get(zone, (scale * local.get(zone, 0) // total_lo, 0))
    if zone in pct and up_local > 0 and up_local >= lo_local:
        return "direct", 1.0, {}
    local_route = up_local * scale // lo_local if zone in pct and lo_local > 0 else 0
    residual = {z: u - lo for z, (lo, u) in pct.items() if z != zone and u > lo}
    total = sum(residual.values())
    p_local = local_route / scale
    return "residual", p_local, {z: (1 - p_local) * r / total for z, r in residual.items()}


def plan_for(zone: str, up: dict[str, int], lo: dict[str, int], **kw: int) -> ZonePlan:
    return plan_zones(
        zone,
        {z: float(n) for z, n in up.items()},
        {z: float(n) for z, n in lo.items()},
        usable_count=sum(up.values()),
        **{"min_cluster_size": 1, **kw},
    )


# ------------------------------------------------------------------------------------------------
# Hand-computed cases


def test_envoys_documented_example_routes_62_5_percent_locally():
    # From Envoy's source: local 40/40/20 %, upstream 25/50/25 %: residual capacity 0, 10, 5 (%).
    up, lo = {"a": 25, "b": 50, "c": 25}, {"a": 40, "b": 40, "c": 20}
    assert envoy("a", up, lo) == ("residual", 0.625, {"b": 0.25, "c": 0.125})
    plan = plan_for("a", up, lo)
    assert plan.mode is ZoneMode.RESIDUAL
    assert plan.local == pytest.approx(0.625)
    assert dict(plan.spill) == pytest.approx({"b": 0.25, "c": 0.125})  # 37.5 % split 10:5
    assert plan.shares == pytest.approx({"a": 0.625, "b": 0.25, "c": 0.125})


def test_more_capacity_than_clients_in_the_local_zone_routes_everything_locally():
    plan = plan_for("b", {"a": 25, "b": 50, "c": 25}, {"a": 40, "b": 40, "c": 20})
    assert plan.mode is ZoneMode.DIRECT and plan.local == 1.0 and plan.spill == ()
    assert plan_for("a", {"a": 3, "b": 3, "c": 3}, {"a": 3, "b": 3, "c": 3}).mode is ZoneMode.DIRECT


def test_one_local_endpoint_down_of_three_keeps_three_quarters_local():
    # 3 zones x 3 endpoints, clients placed alike; zone a loses one: up[a] = 2/8, lo[a] = 1/3.
    plan = plan_for("a", {"a": 2, "b": 3, "c": 3}, {"a": 3, "b": 3, "c": 3})
    assert plan.local == pytest.approx(0.75)
    assert dict(plan.spill) == pytest.approx({"b": 0.125, "c": 0.125})


def test_an_empty_local_zone_spills_everything_by_residual_capacity():
    plan = plan_for("a", {"b": 3, "c": 1}, {"a": 2, "b": 1, "c": 1})
    # up: b 3/4, c 1/4; lo: a 1/2, b 1/4, c 1/4: only b has residual capacity.
    assert plan.mode is ZoneMode.RESIDUAL and plan.local == 0.0
    assert dict(plan.spill) == pytest.approx({"b": 1.0})


@pytest.mark.parametrize(
    ("zone", "up", "lo", "kw", "reason"),
    [
        ("", {"a": 3, "b": 3}, {"a": 1, "b": 1}, {}, "zone is unknown"),
        ("a", {"a": 3}, {"a": 1, "b": 1}, {}, "in 1 zone"),
        ("a", {"a": 3, "b": 3}, {"a": 1}, {}, "clients are in 1 zone"),
        ("a", {"a": 3, "b": 3}, {"b": 1, "c": 1}, {}, "no share of the clients"),
        ("a", {"a": 3, "b": 2}, {"a": 1, "b": 1}, {"min_cluster_size": 6}, "fewer than min_cluster_size 6"),
    ],
)
def test_envoys_preconditions_turn_zone_routing_off(zone, up, lo, kw, reason):
    plan = plan_for(zone, up, lo, **kw)
    assert plan.mode is ZoneMode.OFF and reason in plan.reason and plan.shares == {}


def test_panic_turns_zone_routing_off():
    plan = plan_zones("a", {"a": 1.0, "b": 5.0}, {"a": 1.0, "b": 1.0}, usable_count=6, panic=True)
    assert plan.mode is ZoneMode.OFF and "panic" in plan.reason


# ------------------------------------------------------------------------------------------------
# Properties

zone_names = st.sampled_from(["a", "b", "c", "d", "e"])
counts = st.dictionaries(zone_names, st.integers(0, 40), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(up=counts, lo=counts, zone=zone_names)
def test_the_rule_matches_envoys_integer_formula(up, lo, zone):
    plan = plan_for(zone, up, lo)
    if plan.mode is ZoneMode.OFF:
        return
    # Envoy truncates each percentage to 0.01 %; the plan is exact, so it is held to the same integer
    # formula at a scale where truncation vanishes.
    state, p_local, spill = envoy(zone, up, lo, scale=10**15)
    assert plan.mode.value == state
    assert plan.local == pytest.approx(p_local, abs=1e-9)
    assert plan.shares.keys() - {zone} == spill.keys()
    for z, share in spill.items():
        assert plan.shares[z] == pytest.approx(share, abs=1e-9)
    # At Envoy's own scale the two differ by its rounding only.
    assert plan.local == pytest.approx(envoy(zone, up, lo)[1], abs=0.01)


@settings(max_examples=300, deadline=None)
@given(up=counts, lo=counts, zone=zone_names)
def test_shares_are_a_distribution(up, lo, zone):
    plan = plan_for(zone, up, lo)
    if plan.mode is ZoneMode.OFF:
        return
    shares = plan.shares
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(0.0 < s <= 1.0 for s in shares.values())
    assert all(up.get(z, 0) > 0 for z in shares)  # nothing goes to a zone without usable capacity


@settings(max_examples=300, deadline=None)
@given(up=counts, lo=counts)
def test_every_zone_receives_exactly_its_share_of_capacity(up, lo):
    """When the clients of every zone follow the rule, each zone's load equals its share of the usable
    capacity: every endpoint sees the same request rate (the point of Envoy's rule)."""
    total_lo = sum(lo.values())
    total_up = sum(up.values())
    if total_lo == 0 or total_up == 0:
        return
    load: Counter[str] = Counter()
    for client_zone, n in lo.items():
        if n == 0:
            continue
        plan = plan_for(client_zone, up, lo)
        if plan.mode is ZoneMode.OFF:
            return  # the preconditions are the same for every client zone
        for z, share in plan.shares.items():
            load[z] += n / total_lo * share
    for z, n in up.items():
        assert load[z] == pytest.approx(n / total_up, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(up=counts, lo=counts, zone=zone_names)
def test_more_local_capacity_never_keeps_fewer_calls_local(up, lo, zone):
    before = plan_for(zone, up, lo)
    after = plan_for(zone, {**up, zone: up.get(zone, 0) + 1}, lo)
    if before.mode is not ZoneMode.OFF and after.mode is not ZoneMode.OFF:
        assert after.local >= before.local


# ------------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        ({"min_cluster_size": 0}, "min_cluster_size"),
        ({"min_cluster_size": 2.5}, "min_cluster_size"),
        ({"routing_enabled": 101}, "routing_enabled"),
        ({"routing_enabled": -1}, "routing_enabled"),
        ({"client_shares": {"a": -1.0}}, "client_shares['a']"),
        ({"client_shares": {"a": 0, "b": 0}}, "positive share"),
        ({"client_shares": {"": 1.0}}, "client_shares keys"),
        ({"client_shares": [("a", 1.0)]}, "mapping"),
        ({"zone": "a"}, "unknown option"),
    ],
)
def test_bad_zone_routing_options_name_the_option(kw, names):
    with pytest.raises(ConfigError) as info:
        ZoneRouting(**kw)
    assert names in str(info.value) and "ZoneRouting" in str(info.value)


def test_client_shares_are_frozen():
    shares = {"a": 1.0, "b": 2}
    routing = ZoneRouting(client_shares=shares)
    shares["c"] = 5.0
    assert dict(routing.client_shares or {}) == {"a": 1.0, "b": 2.0}
    with pytest.raises(TypeError):
        routing.client_shares["a"] = 3.0  # type: ignore[index]


# ------------------------------------------------------------------------------------------------
# Pickers built by the router


def endpoints(spec: dict[str, int], weight: int = 1) -> list[Endpoint]:
    out = []
    for i, (zone, n) in enumerate(sorted(spec.items())):
        out += [Endpoint(f"10.0.{i}.{j + 1}:50051", weight=weight, zone=zone) for j in range(n)]
    return out


def zone_counts(picker, n: int = 20000, key=None) -> Counter[str]:
    return Counter(picker.pick(key if key is None else key(i)).zone for i in range(n))


def router(zone: str | None = "a", seed: int = 7, **kw) -> ZoneRouter:
    return ZoneRouter(zone, ZoneRouting(**kw), rng=random.Random(seed).random)


def test_all_healthy_every_call_stays_local_with_one_extra_call():
    known = endpoints({"a": 3, "b": 3, "c": 3})
    picker = router().build(RoundRobin(), known, known, Stats())
    assert isinstance(picker, LocalZonePicker)
    assert set(picker.endpoints) == set(known)  # the picker speaks for every usable endpoint
    assert zone_counts(picker) == {"a": 20000}
    assert {e.zone for e in (picker.fallback.pick() for _ in range(30))} == {"a", "b", "c"}


@pytest.mark.parametrize("selector", [s for s in SELECTORS.values() if not s.uses_key], ids=lambda s: s.name)
def test_spill_follows_the_plan_for_every_selector(selector):
    known = endpoints({"a": 3, "b": 3, "c": 3})
    usable = [e for e in known if e.address != "10.0.0.1:50051"]
    r = router()
    picker = r.build(selector, usable, known, Stats())
    assert isinstance(picker, SplitZonePicker) and r.plan.mode is ZoneMode.RESIDUAL
    seen = zone_counts(picker)
    assert seen["a"] / 20000 == pytest.approx(0.75, abs=0.015)
    assert seen["b"] / 20000 == pytest.approx(0.125, abs=0.01)
    assert seen["c"] / 20000 == pytest.approx(0.125, abs=0.01)


def test_consistent_hash_keeps_a_key_in_one_zone_and_on_one_endpoint():
    known = endpoints({"a": 3, "b": 3, "c": 3})
    usable = known[1:]  # zone a lost one of three
    picker = router().build(ConsistentHash(), usable, known, Stats())
    assert isinstance(picker, SplitZonePicker)
    for k in range(200):
        key = f"user-{k}"
        assert len({picker.pick(key).address for _ in range(5)}) == 1
    local = sum(picker.pick(f"user-{k}").zone == "a" for k in range(20000)) / 20000
    assert local == pytest.approx(0.75, abs=0.015)


def test_weights_are_capacity_and_clients_spread_evenly_over_zones():
    # Zone a: 2 endpoints of weight 3 (6); b and c: 3 of weight 1 each (3 and 3).
    known = [
        *(Endpoint(f"10.0.0.{i}:1", weight=3, zone="a") for i in (1, 2)),
        *endpoints({"b": 3, "c": 3}),
    ]
    r = router(min_cluster_size=1)
    r.build(Weighted(), known, known, Stats())
    assert r.plan.mode is ZoneMode.DIRECT  # up[a] = 6/12 >= lo[a] = 1/3
    r.build(Weighted(), known[1:], known, Stats())  # a keeps weight 3: up[a] = 3/9, still a third
    assert r.plan.mode is ZoneMode.DIRECT
    without_b1 = [*known[:2], *known[3:]]  # b loses one of 3: up[b] = 2/11
    r.build(Weighted(), without_b1, known, Stats())
    assert r.plan.mode is ZoneMode.DIRECT
    rb = router("b", min_cluster_size=1)
    rb.build(Weighted(), without_b1, known, Stats())
    assert rb.plan.local == pytest.approx((2 / 11) / (1 / 3))


def test_a_deregistered_local_endpoint_spills_like_a_down_one():
    """Clients do not leave a zone because an instance of the service did: by default they are spread
    evenly over the zones, so an endpoint gone from discovery costs its zone capacity, not clients."""
    known = endpoints({"a": 3, "b": 3, "c": 3})
    down = router()
    down.build(RoundRobin(), known[1:], known, Stats())
    gone = router()
    gone.build(RoundRobin(), known[1:], known[1:], Stats())
    assert down.plan.local == gone.plan.local == pytest.approx(0.75)


def test_routing_enabled_sends_the_rest_anywhere():
    known = endpoints({"a": 3, "b": 3, "c": 3})
    r = router(routing_enabled=40.0)
    picker = r.build(RoundRobin(), known, known, Stats())
    assert isinstance(picker, SplitZonePicker) and r.plan.mode is ZoneMode.DIRECT
    seen = zone_counts(picker, 30000)
    # 40 % routed (all local), 60 % anywhere (a third of it local).
    assert seen["a"] / 30000 == pytest.approx(0.4 + 0.6 / 3, abs=0.015)


def test_zone_routing_off_builds_the_plain_picker():
    known = endpoints({"a": 3, "b": 3})
    for zone, kw in (("", {}), (None, {}), ("a", {"min_cluster_size": 7}), ("z", {})):
        r = router(zone, **kw)
        picker = r.build(RoundRobin(), known, known, Stats())
        assert not isinstance(picker, ZonePicker), (zone, kw)
        assert r.plan.mode is ZoneMode.OFF


def test_clients_in_one_zone_spread_like_envoy():
    known = endpoints({"a": 3, "b": 3, "c": 3})
    r = router(client_shares={"a": 1.0})
    picker = r.build(RoundRobin(), known, known, Stats())
    assert r.plan.mode is ZoneMode.OFF and not isinstance(picker, ZonePicker)
    r = router(client_shares={"a": 3.0, "b": 1.0})  # a has 75 % of the clients, 33 % of the capacity
    r.build(RoundRobin(), known, known, Stats())
    assert r.plan.local == pytest.approx((1 / 3) / 0.75)
    assert dict(r.plan.spill) == pytest.approx(
        {"b": (1 - 4 / 9) * (1 / 12) / (1 / 12 + 1 / 3), "c": 0.4444444}
    )


def test_the_nearest_ranked_endpoint_names_the_zone_unless_one_is_set():
    known = [
        Endpoint(e.address, zone=e.zone, rank=rank)
        for rank, e in enumerate(reversed(endpoints({"a": 3, "b": 3, "c": 3})))
    ]
    assert known[0].zone == "c"
    r = router(None)
    r.build(RoundRobin(), known, known, Stats())
    assert r.plan.zone == "c" and r.plan.mode is ZoneMode.DIRECT
    r.set_learned("b")
    r.build(RoundRobin(), known, known, Stats())
    assert r.plan.zone == "b"
    r = router("a")
    r.build(RoundRobin(), known, known, Stats())
    assert r.plan.zone == "a"
    r = router("")
    r.build(RoundRobin(), known, known, Stats())
    assert r.plan.mode is ZoneMode.OFF
