"""Subsetting: validation, client identity, and the algorithms' properties (hypothesis)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbkit import ConfigError, Endpoint, Subsetting
from lbkit.subsetting import (
    CLIENT_COUNT_ENV,
    CLIENT_ID_ENV,
    CLIENT_INDEX_ENV,
    PreferenceOrder,
    default_client_id,
    widened,
)


def ep(n: int) -> Endpoint:
    return Endpoint(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}:50051")


endpoint_lists = st.lists(st.integers(0, 2**20).map(ep), min_size=1, max_size=60, unique=True)
client_ids = st.text(min_size=1, max_size=12)


@pytest.fixture(autouse=True)
def _no_identity_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (CLIENT_ID_ENV, CLIENT_INDEX_ENV, CLIENT_COUNT_ENV):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("size", [0, -1, 2.0, "3", True, None])
def test_size_must_be_a_positive_int(size: object) -> None:
    with pytest.raises(ConfigError, match="size"):
        Subsetting(size)  # type: ignore[arg-type]


def test_unknown_algorithm_is_named() -> None:
    with pytest.raises(ConfigError, match=r"algorithm.*'random'"):
        Subsetting(3, algorithm="random")


@pytest.mark.parametrize("client_id", [42, b"host", "", ["a"]])
def test_client_id_must_be_a_non_empty_str(client_id: object) -> None:
    with pytest.raises(ConfigError, match="client_id"):
        Subsetting(3, client_id=client_id)  # type: ignore[arg-type]


def test_deterministic_without_index_and_count_names_both() -> None:
    names = r"client_index.*LBKIT_CLIENT_INDEX.*client_count.*LBKIT_CLIENT_COUNT"
    with pytest.raises(ConfigError, match=names):
        Subsetting(3, algorithm="deterministic")
    with pytest.raises(ConfigError, match="missing client_count") as info:
        Subsetting(3, algorithm="deterministic", client_index=1)
    assert "client_index (" not in str(info.value)


@pytest.mark.parametrize(
    ("index", "count", "word"),
    [(3, 3, "client_index must be < client_count"), (-1, 3, "client_index"), (0, 0, "client_count"),
     ("1", 3, "client_index"), (1, 2.5, "client_count")],
)  # fmt: skip
def test_deterministic_index_and_count_are_checked(index: object, count: object, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        Subsetting(3, algorithm="deterministic", client_index=index, client_count=count)  # type: ignore[arg-type]


def test_options_of_the_other_algorithm_are_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match="client_index is for algorithm 'deterministic'"):
        Subsetting(3, client_index=1, client_count=4)
    with pytest.raises(ConfigError, match="client_id is for algorithm 'rendezvous'"):
        Subsetting(3, client_id="a", algorithm="deterministic", client_index=0, client_count=2)


def test_unknown_option_is_named() -> None:
    with pytest.raises(ConfigError, match="seed"):
        Subsetting(3, seed=1)  # type: ignore[call-arg]


# ----------------------------------------------------------------- where identity comes from


def test_client_id_defaults_to_the_host_name_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Subsetting(3).client_id == socket.gethostname() == default_client_id()
    monkeypatch.setenv(CLIENT_ID_ENV, "web-7")
    assert Subsetting(3).client_id == "web-7"
    assert Subsetting(3, client_id="given").client_id == "given"


def test_deterministic_reads_index_and_count_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CLIENT_INDEX_ENV, "4")
    monkeypatch.setenv(CLIENT_COUNT_ENV, "10")
    s = Subsetting(3, algorithm="deterministic")
    assert (s.client_index, s.client_count) == (4, 10)
    assert Subsetting(3, algorithm="deterministic", client_index=2).client_index == 2
    monkeypatch.setenv(CLIENT_COUNT_ENV, "ten")
    with pytest.raises(ConfigError, match="LBKIT_CLIENT_COUNT must be an int, got 'ten'"):
        Subsetting(3, algorithm="deterministic")
    monkeypatch.setenv(CLIENT_COUNT_ENV, "4")
    with pytest.raises(ConfigError, match="client_index must be < client_count"):
        Subsetting(3, algorithm="deterministic")


def test_rendezvous_ignores_the_deterministic_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CLIENT_INDEX_ENV, "x")
    assert Subsetting(3, client_id="a").client_index is None


# ----------------------------------------------------------------- properties


def make(algorithm: str, who: str | int, size: int, count: int = 64) -> Subsetting:
    if algorithm == "rendezvous":
        return Subsetting(size, client_id=str(who))
    return Subsetting(size, algorithm="deterministic", client_index=int(who) % count, client_count=count)


algorithms = st.sampled_from(["rendezvous", "deterministic"])


@settings(max_examples=60, deadline=None)
@given(eps=endpoint_lists, who=st.integers(0, 10**6), size=st.integers(1, 80), alg=algorithms, data=st.data())
def test_same_identity_same_subset_whatever_the_order_and_after_a_restart(
    eps: list[Endpoint], who: int, size: int, alg: str, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(eps))
    first = make(alg, who, size).select(eps)
    assert make(alg, who, size).select(shuffled) == first  # a new instance: as after a restart
    assert len(first) == min(size, len(eps)) == len(set(first))
    assert set(first) <= set(eps)
    order = make(alg, who, size).order(eps)
    assert sorted(order, key=lambda e: e.address) == sorted(eps, key=lambda e: e.address)
    assert order[:size] == first


@settings(max_examples=60, deadline=None)
@given(
    eps=endpoint_lists, extra=st.integers(2**20 + 1, 2**21).map(ep), who=client_ids, size=st.integers(1, 20)
)
def test_rendezvous_adding_one_endpoint_changes_a_subset_only_to_take_it(
    eps: list[Endpoint], extra: Endpoint, who: str, size: int
) -> None:
    s = Subsetting(size, client_id=who)
    before, after = set(s.select(eps)), set(s.select([*eps, extra]))
    if extra in after:
        assert len(after - before) == 1 and len(before - after) == (1 if len(eps) >= size else 0)
    else:
        assert after == before


@settings(max_examples=60, deadline=None)
@given(eps=endpoint_lists, who=client_ids, size=st.integers(1, 20), data=st.data())
def test_rendezvous_removing_one_endpoint_changes_only_subsets_that_held_it(
    eps: list[Endpoint], who: str, size: int, data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(eps))
    s = Subsetting(size, client_id=who)
    order = s.order(eps)
    before, after = set(order[:size]), set(s.select([e for e in eps if e != gone]))
    if gone in before:
        assert before - after == {gone}
        assert after - before == set(order[size : size + 1])  # the next in its own preference order
    else:
        assert after == before


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 120), clients=st.integers(1, 300), size=st.integers(1, 40))
def test_deterministic_connection_counts_differ_by_at_most_one(n: int, clients: int, size: int) -> None:
    eps = [ep(i) for i in range(n)]
    counts = Counter(
        e
        for i in range(clients)
        for e in Subsetting(size, algorithm="deterministic", client_index=i, client_count=clients).select(eps)
    )
    per_endpoint = [counts[e] for e in eps]
    assert max(per_endpoint) - min(per_endpoint) <= 1
    assert sum(per_endpoint) == clients * min(size, n)


@settings(max_examples=60, deadline=None)
@given(
    eps=st.lists(st.integers(0, 2**20).map(ep), min_size=2, max_size=60, unique=True),
    clients=st.integers(1, 50),
    size=st.integers(1, 20),
    data=st.data(),
)
def test_deterministic_one_endpoint_more_or_less_moves_each_subset_by_at_most_one_other(
    eps: list[Endpoint], clients: int, size: int, data: st.DataObject
) -> None:
    """Besides the endpoint that came or went, at most one endpoint enters and one leaves a subset."""
    odd = data.draw(st.sampled_from(eps))
    fewer = [e for e in eps if e != odd]
    for i in range(clients):
        s = Subsetting(size, algorithm="deterministic", client_index=i, client_count=clients)
        with_it, without = set(s.select(eps)), set(s.select(fewer))
        # removing `odd`: with_it -> without; adding it: without -> with_it
        assert len(with_it - without - {odd}) <= 1
        assert len(without - with_it) <= 1 + (odd in with_it)


def test_rendezvous_subsets_differ_between_clients() -> None:
    eps = [ep(i) for i in range(100)]
    subsets = {make("rendezvous", f"host-{i}", 5).select(eps) for i in range(50)}
    assert len(subsets) == 50


def test_size_at_or_above_the_endpoint_count_selects_them_all() -> None:
    eps = [ep(i) for i in range(7)]
    for alg in ("rendezvous", "deterministic"):
        for size in (7, 8, 100):
            assert set(make(alg, 3, size).select(eps)) == set(eps)
    assert Subsetting(3, client_id="a").select([]) == ()


# ----------------------------------------------------------------- widening


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 30), size=st.integers(1, 10), down=st.sets(st.integers(0, 29)))
def test_widened_is_the_shortest_prefix_with_size_endpoints_up(n: int, size: int, down: set[int]) -> None:
    order = [ep(i) for i in range(n)]
    is_down = {ep(i).address for i in down}.__contains__
    got = widened(order, size, is_down)
    assert list(got) == order[: len(got)]
    up = [e for e in got if not is_down(e.address)]
    if len(got) < n:
        assert len(up) == size and not is_down(got[-1].address)  # shortest: it ends on an endpoint up
    else:
        assert len(up) <= size


@pytest.mark.parametrize("algorithm", ["rendezvous", "deterministic"])
def test_a_restarted_process_gets_the_same_subset(algorithm: str) -> None:
    """Another interpreter, with another str hash seed, picks the same subset for the same identity."""
    code = (
        "from lbkit import Endpoint, Subsetting\n"
        "eps = [Endpoint(f'10.0.{i // 256}.{i % 256}:50051') for i in range(200)]\n"
        f"s = Subsetting(10, **{_identity(algorithm)!r})\n"
        "print(' '.join(e.address for e in s.select(reversed(eps))))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    eps = [Endpoint(f"10.0.{i // 256}.{i % 256}:50051") for i in range(200)]
    here = Subsetting(10, **_identity(algorithm)).select(eps)  # type: ignore[arg-type]
    assert out.stdout.split() == [e.address for e in here]


def _identity(algorithm: str) -> dict[str, object]:
    if algorithm == "rendezvous":
        return {"client_id": "web-3"}
    return {"algorithm": "deterministic", "client_index": 3, "client_count": 7}


def test_both_balancers_take_a_subsetting_and_refuse_anything_else() -> None:
    import lbkit.aio

    subset = Subsetting(3, client_id="a")
    for balancer in (lbkit.Balancer, lbkit.aio.Balancer):
        assert balancer(["127.0.0.1:1"], subset=subset).core.subsetting is subset
        with pytest.raises(ConfigError, match="subset must be a Subsetting or None, got 3"):
            balancer(["127.0.0.1:1"], subset=3)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    first=st.sets(st.integers(0, 400), min_size=1, max_size=120),
    edits=st.lists(
        st.tuples(st.sets(st.integers(0, 400), max_size=3), st.integers(0, 3)), min_size=1, max_size=8
    ),
    alg=algorithms,
    who=st.integers(0, 63),
)
def test_the_incremental_order_equals_the_order_computed_afresh(
    first: set[int], edits: list[tuple[set[int], int]], alg: str, who: int
) -> None:
    """Whatever sequence of endpoint sets the core sees (a few endpoints coming and going, or many), its
    kept-up-to-date order is ``order()``'s."""
    s = make(alg, who, 5)
    kept = PreferenceOrder(s)
    numbers = set(first)
    views = []
    for added, removed in [(set(), 0), *edits]:
        numbers = (numbers - set(sorted(numbers)[:removed])) | added
        eps = {e.address: e for e in map(ep, sorted(numbers))}
        view = kept.update(eps)
        fresh = s.order(eps.values())
        views.append((view, fresh))
        assert tuple(view) == fresh and len(view) == len(eps)
        assert view[:3] == fresh[:3] and (not fresh or view[-1] == fresh[-1])
    for view, fresh in views:  # a view handed out earlier is not changed by later updates
        assert tuple(view) == fresh
