"""ConsistentHash: determinism, balance, weights, bounded-load spill, keyless picks, Maglev's fill."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from lbkit.endpoint import Endpoint
from lbkit.errors import ConfigError
from lbkit.selectors import ConsistentHash
from lbkit.selectors.maglev import _maglev_table, _turns
from lbkit.stats import Stats

ALGORITHMS = ["ring", "maglev"]
KEYS = [f"user-{i}" for i in range(20_000)]


def endpoints(n: int, weight: int = 1) -> list[Endpoint]:
    return [Endpoint(f"10.0.{i // 250}.{i % 250 + 1}:50051", weight=weight) for i in range(n)]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_same_key_same_endpoint(algorithm: str) -> None:
    eps = endpoints(10)
    selector = ConsistentHash(algorithm=algorithm, bounded_load=None)
    first = selector.build(eps)
    again = selector.build(list(reversed(eps)))
    assert all(first.pick(k) == again.pick(k) == first.pick(k) for k in KEYS[:2000])
    assert first.pick("user-1") == first.pick(b"user-1")  # a str is hashed as its UTF-8 bytes


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_keys_spread_evenly(algorithm: str) -> None:
    eps = endpoints(10)
    picker = ConsistentHash(algorithm=algorithm, bounded_load=None).build(eps)
    counts = Counter(picker.pick(k) for k in KEYS)
    assert set(counts) == set(eps)
    limit = 1.10 if algorithm == "maglev" else 1.35
    assert max(counts.values()) <= limit * len(KEYS) / len(eps)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_weights_scale_shares(algorithm: str) -> None:
    eps = [*endpoints(3), Endpoint("10.9.0.1:50051", weight=3)]
    picker = ConsistentHash(algorithm=algorithm, bounded_load=None).build(eps)
    counts = Counter(picker.pick(k) for k in KEYS)
    share = counts[eps[3]] / len(KEYS)
    assert 0.40 <= share <= 0.60  # 3 / 6


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_key_is_random(algorithm: str) -> None:
    eps = endpoints(5)
    picker = ConsistentHash(algorithm=algorithm).build(eps)
    counts = Counter(picker.pick() for _ in range(5000))
    assert set(counts) == set(eps)
    assert max(counts.values()) < 1500


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bounded_load_spills_from_overloaded_owner(algorithm: str) -> None:
    eps = endpoints(4)
    stats = Stats()
    picker = ConsistentHash(algorithm=algorithm, bounded_load=1.25).build(eps, stats)
    key = "user-42"
    owner = picker.pick(key)
    for _ in range(3):  # owner: 3 in flight of 3; bound ceil(1.25 * 4 / 4) = 2 -> 3 + 1 > 2
        stats[owner.address].start()
    spilled = picker.pick(key)
    assert spilled != owner
    assert picker.pick(key) == spilled  # the spill is deterministic too
    stats[spilled.address].start()
    stats[spilled.address].start()  # 5 in flight; bound ceil(1.25 * 6 / 4) = 2: spilled is full too
    third = picker.pick(key)
    assert third not in (owner, spilled)
    unbounded = ConsistentHash(algorithm=algorithm, bounded_load=None).build(eps, stats)
    assert unbounded.pick(key) == owner


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bounded_load_keeps_owner_within_bound(algorithm: str) -> None:
    eps = endpoints(4)
    stats = Stats()
    picker = ConsistentHash(algorithm=algorithm, bounded_load=2.0).build(eps, stats)
    owner = picker.pick("k")
    for other in eps:
        stats[other.address].start()
    stats[owner.address].start()  # owner 2 of 5: 2 + 1 <= ceil(2 * 6 / 4) = 3
    assert picker.pick("k") == owner
    stats[owner.address].start()  # owner 3 of 6: 3 + 1 > ceil(2 * 7 / 4) = 4? no: 4 <= 4
    assert picker.pick("k") == owner
    stats[owner.address].start()  # owner 4 of 7: 5 > ceil(2 * 8 / 4) = 4
    assert picker.pick("k") != owner


def test_maglev_fill_matches_the_paper() -> None:
    cases = [
        (5, 101, None),
        (7, 1009, None),
        (4, 1009, [1, 3, 2, 2]),
        (3, 7, None),
        (6, 4099, [9, 1, 1, 2, 2, 5]),
    ]
    for n, size, weights in cases:
        eps = [Endpoint(f"10.0.0.{i + 1}:50051", weight=weights[i] if weights else 1) for i in range(n)]
        assert _maglev_table(eps, size) == reference_maglev(eps, size)


def reference_maglev(eps: list[Endpoint], size: int) -> list[int]:
    import mmh3

    perms = []
    for e in eps:
        h1, h2 = mmh3.hash64(e.address.encode(), 0, True, False)
        offset, skip = h1 % size, h2 % (size - 1) + 1
        perms.append([(offset + j * skip) % size for j in range(size)])
    table = [-1] * size
    nxt = [0] * len(eps)
    for i in itertools.islice(_turns([e.weight for e in eps], size), size):
        while table[perms[i][nxt[i]]] >= 0:
            nxt[i] += 1
        table[perms[i][nxt[i]]] = i
    return table


def test_maglev_shares_differ_by_at_most_one_slot() -> None:
    counts = Counter(_maglev_table(endpoints(100), 65537))
    assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("weights", [[1, 2, 3, 10], [5, 5, 1], [1000, 1, 1], list(range(1, 400))])
def test_maglev_turns_follow_weights(weights: list[int]) -> None:
    turns = _turns(weights, 65537)
    counts = Counter(turns[:65537])
    total = sum(weights)
    for i, w in enumerate(weights):
        assert abs(counts[i] - 65537 * w / total) <= len(set(weights)) + 1


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"algorithm": "jump"}, "'jump'"),
        ({"vnodes": 0}, "vnodes"),
        ({"vnodes": 1.5}, "1.5"),
        ({"table_size": 65536}, "65536"),
        ({"table_size": 1}, "table_size"),
        ({"bounded_load": 0.9}, "0.9"),
        ({"bounded_load": "1.25"}, "'1.25'"),
        ({"bounded_load": float("nan")}, "nan"),
        ({"ring_size": 10}, "ring_size"),
    ],
)
def test_bad_options(options: dict[str, object], word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        ConsistentHash(**options)  # type: ignore[arg-type]


def test_defaults() -> None:
    selector = ConsistentHash()
    assert (selector.algorithm, selector.table_size, selector.bounded_load) == ("maglev", 65537, 1.25)
    assert ConsistentHash(bounded_load=2).bounded_load == 2.0
