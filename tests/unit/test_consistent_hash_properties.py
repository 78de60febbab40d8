"""Property tests: placement is a pure function of the endpoint set, and set changes move few keys."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from lbkit.endpoint import Endpoint
from lbkit.selectors import ConsistentHash, Picker

KEYS = [f"key-{i}" for i in range(3000)]
RING = ConsistentHash(algorithm="ring", bounded_load=None)
MAGLEV = ConsistentHash(algorithm="maglev", bounded_load=None)

endpoint_sets = st.lists(
    st.builds(
        lambda n, w: Endpoint(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}:50051", weight=w),
        st.integers(0, 2**20),
        st.integers(1, 3),
    ),
    min_size=2,
    max_size=24,
    unique_by=lambda e: e.address,
)


def mapping(picker: Picker) -> list[Endpoint]:
    return [picker.pick(k) for k in KEYS]


@settings(max_examples=10, deadline=None)
@given(eps=endpoint_sets, algorithm=st.sampled_from(["ring", "maglev"]), data=st.data())
def test_same_set_same_mapping_in_any_order(eps: list[Endpoint], algorithm: str, data: st.DataObject) -> None:
    selector = ConsistentHash(algorithm=algorithm)
    shuffled = data.draw(st.permutations(eps))
    assert mapping(selector.build(eps)) == mapping(selector.build(shuffled))


@settings(max_examples=10, deadline=None)
@given(eps=endpoint_sets, data=st.data())
def test_ring_removal_moves_only_the_removed_endpoints_keys(eps: list[Endpoint], data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(eps))
    before = mapping(RING.build(eps))
    after = mapping(RING.build([e for e in eps if e != gone]))
    for old, new in zip(before, after, strict=True):
        assert new == old or old == gone
        assert new != gone


@settings(max_examples=10, deadline=None)
@given(eps=endpoint_sets, data=st.data())
def test_maglev_removal_moves_few_other_keys(eps: list[Endpoint], data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(eps))
    before = mapping(MAGLEV.build(eps))
    after = mapping(MAGLEV.build([e for e in eps if e != gone]))
    assert gone not in after
    moved_others = sum(1 for old, new in zip(before, after, strict=True) if old != new and old != gone)
    assert moved_others <= 0.02 * len(KEYS) + 10  # Maglev trades a little stability for balance


@settings(max_examples=10, deadline=None)
@given(eps=endpoint_sets, algorithm=st.sampled_from(["ring", "maglev"]))
def test_adding_one_moves_about_its_share(eps: list[Endpoint], algorithm: str) -> None:
    selector = ConsistentHash(algorithm=algorithm, bounded_load=None)
    new = Endpoint("192.168.0.1:50051", weight=1)
    before = mapping(selector.build(eps))
    after = mapping(selector.build([*eps, new]))
    ideal = len(KEYS) * new.weight / (sum(e.weight for e in eps) + new.weight)
    to_new = after.count(new)
    moved = sum(1 for old, now in zip(before, after, strict=True) if old != now)
    if algorithm == "ring":
        assert moved == to_new  # keys move only onto the new endpoint
        assert 0.4 * ideal - 15 <= to_new <= 1.7 * ideal + 15  # 100 ring points: share within ~30%
    else:
        # The table gives the new endpoint its share to one slot per unit of weight; the fixed keys are
        # a sample of it, so the count is binomial: within 5 standard deviations (sd <= sqrt(ideal)).
        assert abs(to_new - ideal) <= 5 * math.sqrt(ideal)
        assert moved <= 2 * ideal + 30
