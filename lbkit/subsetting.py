"""Subsetting: each client connects to a few endpoints of a large service, not to all of them.

Two algorithms, both a pure function of the endpoint addresses and the client's own identity, so a
client that restarts with the same identity gets the same subset, and nothing is shared at run time:

``"rendezvous"`` (the default): rendezvous hashing, as gRFC A68 proposes for grpc's
``random_subsetting``. Every endpoint gets the score ``MurmurHash3_x64_128(client_id + "\\0" +
address)`` and the client takes the ``size`` highest. Adding or removing one endpoint changes the
subset of only the clients that must change, by that one endpoint. It needs no coordination between
clients, but connection counts per endpoint spread as random draws do.

``"deterministic"``: a deterministic ring, after Finagle's deterministic aperture. The endpoints sit on a
ring in the order of ``MurmurHash3_x64_128(address)``; client ``client_index`` of ``client_count`` takes
``size`` consecutive endpoints from position ``client_index * N // client_count``. Clients spaced evenly
round the ring cover every endpoint equally: the connection counts per endpoint differ by at most one.
It needs each client's index and the client count. Adding or removing one endpoint shifts many
clients' windows by one endpoint each.

:meth:`Subsetting.order` gives the whole set in the algorithm's preference order (the subset is its
first ``size``); the balancer widens the subset along that order when endpoints of the subset are
unusable (see ``docs/subsetting.md``).
"""

from __future__ import annotations

import bisect
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import overload

import mmh3

from lbkit._config import check_choice, check_int, config
from lbkit.endpoint import Endpoint
from lbkit.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "CLIENT_COUNT_ENV",
    "CLIENT_ID_ENV",
    "CLIENT_INDEX_ENV",
    "PreferenceOrder",
    "Subsetting",
    "default_client_id",
    "widened",
]

ALGORITHMS = ("rendezvous", "deterministic")
"""The subsetting algorithms by name."""
CLIENT_ID_ENV = "LBKIT_CLIENT_ID"
"""Environment variable naming this client for rendezvous subsetting (default: the host name)."""
CLIENT_INDEX_ENV = "LBKIT_CLIENT_INDEX"
"""Environment variable with this client's index (0 .. count - 1) for deterministic subsetting."""
CLIENT_COUNT_ENV = "LBKIT_CLIENT_COUNT"
"""Environment variable with the number of clients for deterministic subsetting."""


def default_client_id() -> str:
    """This process's client id: ``$LBKIT_CLIENT_ID`` if set and not empty, else the host name.

    The host name is stable across restarts; processes that share a host share it, and so share a
    subset, unless each sets its own ``LBKIT_CLIENT_ID`` (say, the host name and a worker number).
    """
    return os.environ.get(CLIENT_ID_ENV) or socket.gethostname()


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"Subsetting: environment variable {name} must be an int, got {text!r}") from None


def _score(prefix: bytes, address: str) -> int:
    return int(mmh3.hash128(prefix + address.encode(), 0, False))


@config
class Subsetting:
    """Connect to ``size`` endpoints of the service, chosen by ``algorithm``, instead of to all of them.

    ``algorithm`` is ``"rendezvous"`` (the default; needs only ``client_id``) or ``"deterministic"``
    (even connection counts; needs ``client_index`` and ``client_count``). ``client_id`` defaults to
    :func:`default_client_id` (``$LBKIT_CLIENT_ID``, else the host name); ``client_index`` and
    ``client_count`` default to ``$LBKIT_CLIENT_INDEX`` and ``$LBKIT_CLIENT_COUNT``. A ``size`` at or
    above the number of endpoints selects them all. Pass it to a balancer as ``subset=``.
    """

    size: int
    """How many endpoints the subset holds (while they are usable), >= 1."""
    client_id: str | None = None
    """This client's identity for rendezvous hashing; None: :func:`default_client_id`."""
    algorithm: str = "rendezvous"
    client_index: int | None = None
    """This client's index, 0 .. ``client_count`` - 1 (deterministic only); None: ``$LBKIT_CLIENT_INDEX``."""
    client_count: int | None = None
    """How many clients share the service (deterministic only); None: ``$LBKIT_CLIENT_COUNT``."""

    def __post_init__(self) -> None:
        o = "Subsetting"
        check_int(o, "size", self.size, minimum=1)
        check_choice(o, "algorithm", self.algorithm, ALGORITHMS)
        if self.algorithm == "rendezvous":
            for name in ("client_index", "client_count"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{o}: {name} is for algorithm 'deterministic'; 'rendezvous' uses client_id"
                    )
            if self.client_id is None:
                object.__setattr__(self, "client_id", default_client_id())
            elif not isinstance(self.client_id, str) or not self.client_id:
                raise ConfigError(f"{o}: client_id must be a non-empty str, got {self.client_id!r}")
            return
        if self.client_id is not None:
            raise ConfigError(
                f"{o}: client_id is for algorithm 'rendezvous'; 'deterministic' uses client_index and "
                "client_count"
            )
        index = self.client_index if self.client_index is not None else _env_int(CLIENT_INDEX_ENV)
        count = self.client_count if self.client_count is not None else _env_int(CLIENT_COUNT_ENV)
        if index is None or count is None:
            missing = [
                f"{name} (or ${env})"
                for name, env, value in (
                    ("client_index", CLIENT_INDEX_ENV, index),
                    ("client_count", CLIENT_COUNT_ENV, count),
                )
                if value is None
            ]
            raise ConfigError(
                f"{o}: algorithm 'deterministic' needs this client's index and the client count; "
                f"missing {' and '.join(missing)}"
            )
        check_int(o, "client_count", count, minimum=1)
        check_int(o, "client_index", index, minimum=0)
        if index >= count:
            raise ConfigError(f"{o}: client_index must be < client_count ({count}), got {index}")
        object.__setattr__(self, "client_index", index)
        object.__setattr__(self, "client_count", count)

    def order(self, endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
        """Every endpoint, most preferred first: the subset is the first ``size``, widening takes the next.

        Depends only on the addresses (not on the order given), the client's identity and the
        algorithm.
        """
        by_address = {e.address: e for e in endpoints}
        ranked = sorted(self.rank(a) for a in by_address)
        return tuple(by_address[address] for _, address in self.rotate(ranked))

    def rank(self, address: str) -> tuple[int, str]:
        """The key ``address`` sorts by (ascending) before :meth:`rotate`; the same in every process."""
        if self.algorithm == "rendezvous":
            assert self.client_id is not None
            return (-_score(self.client_id.encode() + b"\0", address), address)  # highest score first
        return (_score(b"", address), address)  # the ring's order, the same for every client

    def rotate(self, ranked: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """``ranked`` (sorted by :meth:`rank`) as a preference order: the ring from this client's place
        for the deterministic algorithm, unchanged for rendezvous."""
        if self.algorithm == "rendezvous":
            return ranked
        assert self.client_index is not None and self.client_count is not None
        start = self.client_index * len(ranked) // self.client_count
        return ranked[start:] + ranked[:start]

    def select(self, endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
        """This client's subset of ``endpoints``: ``size`` of them (all if fewer), most preferred first."""
        return self.order(endpoints)[: self.size]


def widened(order: Sequence[Endpoint], size: int, down: Callable[[str], bool]) -> Sequence[Endpoint]:
    """The endpoints to hold channels to: the shortest prefix of ``order`` (a preference order) with
    ``size`` endpoints that ``down(address)`` does not call down; all of ``order`` if it has fewer.

    Endpoints still connecting are not down, so a pool that starts opens only ``size`` channels. Down
    endpoints inside the prefix stay in it (their channels keep reconnecting, so their recovery is
    seen), and when one recovers the prefix shrinks back.
    """
    up = 0
    for i, e in enumerate(order):
        if not down(e.address):
            up += 1
            if up >= size:
                return order[: i + 1]
    return order


class PreferenceOrder:
    """A subsetting's order of preference over a changing endpoint set, kept up to date incrementally:
    when a few addresses come or go it hashes and places only those, not every endpoint again."""

    __slots__ = ("_keys", "_ranked", "subsetting")

    def __init__(self, subsetting: Subsetting) -> None:
        self.subsetting = subsetting
        self._keys: dict[str, tuple[int, str]] = {}
        self._ranked: list[tuple[int, str]] = []
        """Every address's :meth:`Subsetting.rank` key, sorted."""

    def update(self, by_address: Mapping[str, Endpoint]) -> Sequence[Endpoint]:
        """The endpoints of ``by_address`` (address -> endpoint), most preferred first (a read-only view
        that later updates leave alone)."""
        keys, rank = self._keys, self.subsetting.rank
        gone = keys.keys() - by_address.keys()
        new = by_address.keys() - keys.keys()
        if (len(gone) + len(new)) * 8 > len(self._ranked):  # many changes (or the first set): rank all
            self._keys = keys = {a: rank(a) for a in by_address}
            ranked = sorted(keys.values())
        else:
            ranked = list(self._ranked)  # views handed out earlier keep theirs
            for a in gone:
                del ranked[bisect.bisect_left(ranked, keys.pop(a))]
            for a in new:
                keys[a] = key = rank(a)
                bisect.insort(ranked, key)
        self._ranked = ranked
        return _Ordered(by_address, self.subsetting.rotate(ranked))


class _Ordered(Sequence[Endpoint]):
    """Endpoints in the order of a ranked address list, looked up as they are read."""

    __slots__ = ("_by_address", "_ranked")

    def __init__(self, by_address: Mapping[str, Endpoint], ranked: list[tuple[int, str]]) -> None:
        self._by_address = by_address
        self._ranked = ranked

    def __len__(self) -> int:
        return len(self._ranked)

    @overload
    def __getitem__(self, i: int) -> Endpoint: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[Endpoint, ...]: ...

    def __getitem__(self, i: int | slice) -> Endpoint | tuple[Endpoint, ...]:
        if isinstance(i, slice):
            return tuple(self._by_address[a] for _, a in self._ranked[i])
        return self._by_address[self._ranked[i][1]]

    def __iter__(self) -> Iterator[Endpoint]:
        by_address = self._by_address
        return (by_address[a] for _, a in self._ranked)
