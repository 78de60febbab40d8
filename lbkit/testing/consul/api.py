"""What every endpoint of :class:`ConsulServer` shares: requests and responses, ACL checks, namespace and
partition scoping, consistency modes, the agent cache, and blocking queries."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lbkit.testing.consul.checks import parse_duration
from lbkit.testing.consul.specs import ApiError
from lbkit.testing.consul.state import DEFAULT, ConsulState

__all__ = [
    "DEFAULT_WAIT",
    "MAX_WAIT",
    "TEXT",
    "ApiBase",
    "RawJSON",
    "Request",
    "Response",
    "body_json",
    "has_tags",
    "json_response",
    "parse_go_bool",
    "parse_wait",
    "required_name",
]

DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
TEXT = "text/plain; charset=utf-8"
_GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True}
_GO_BOOLS.update({"0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False})


@dataclass
class Request:
    """One HTTP request, its path split into the route's pattern and the ``rest`` after it."""

    method: str
    path: str
    rest: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def param(self, name: str) -> str:
        return self.query.get(name, [""])[0]

    @property
    def token(self) -> str:
        """As Consul's parseToken: ?token, then X-Consul-Token, then Authorization: Bearer."""
        if self.param("token"):
            return self.param("token")
        if self.headers.get("X-Consul-Token"):
            return self.headers["X-Consul-Token"]
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        return value.strip().split(" ")[0] if scheme.lower() == "bearer" else ""


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False


class RawJSON(bytes):
    """A body already encoded as JSON (rendered health entries, joined without decoding them again)."""


def json_response(obj: Any, headers: dict[str, str] | None = None) -> Response:
    """A 200 answer with ``obj`` as JSON (a :class:`RawJSON` is sent as it is)."""
    if isinstance(obj, RawJSON):
        body = bytes(obj)
    else:
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(200, body, "application/json", headers or {})


def parse_go_bool(raw: str) -> bool | None:
    """A Go ``strconv.ParseBool`` value, or None when it is not one."""
    return _GO_BOOLS.get(raw)


def parse_wait(req: Request) -> tuple[int, float]:
    """?index and ?wait as Consul parses them; wait defaults to 5m and is capped at 10m."""
    wait = DEFAULT_WAIT
    if req.param("wait"):
        try:
            wait = parse_duration(req.param("wait"))
        except ValueError:
            raise ApiError(400, "Invalid wait time") from None
        wait = DEFAULT_WAIT if wait <= 0 else min(wait, MAX_WAIT)
    index = 0
    if req.param("index"):
        if not req.param("index").isdigit():
            raise ApiError(400, "Invalid index")
        index = int(req.param("index"))
    return index, wait


def body_json(req: Request) -> Any:
    if not req.body.strip():
        raise ApiError(400, "Request decode failed: EOF")
    try:
        return json.loads(req.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Request decode failed: {exc}") from None


def required_name(req: Request, what: str = "service name") -> str:
    if not req.rest:
        raise ApiError(400, f"Missing {what}")
    return req.rest


def has_tags(service_tags: list[str], wanted: list[str]) -> bool:
    have = {t.lower() for t in service_tags}
    return all(t.lower() in have for t in wanted)


@dataclass
class _CacheEntry:
    fetched_at: float
    index: int


class ApiBase:
    """State and rules the endpoint groups share (ACLs, scoping, consistency, cache, blocking)."""

    acl_token: str | None
    node_name: str
    datacenter: str
    enterprise: bool
    _state: ConsulState

    def _init_api(self) -> None:
        self._raft_lock = threading.Lock()
        self._leader = True
        self._last_contact = 0.0
        self._cache: dict[tuple[Any, ...], _CacheEntry] = {}

    def _forward(self, datacenter: str, req: Request) -> Response:
        """Serve ``req`` in another datacenter; the server overrides this for its WAN-joined peers."""
        raise ApiError(500, "No path to datacenter")

    # -- test hook -------------------------------------------------------------------------------

    def set_raft(self, *, leader: bool = True, last_contact: float = 0.0) -> None:
        """Make the datacenter lose (``leader=False``) or regain its Raft leader, and set how long ago
        (seconds) the serving follower last heard from the leader (test hook).

        As in Consul: without a leader, default and consistent reads fail 500 ``No cluster leader``;
        ``?stale`` reads are served with ``X-Consul-KnownLeader: false`` and the last contact.
        """
        with self._raft_lock:
            self._leader = leader
            self._last_contact = max(0.0, float(last_contact))

    # -- ACLs: default_policy "deny" and one management token ---------------------------------------

    def _authorize(self, req: Request, permission: str, resource: str) -> None:
        if self.acl_token is None or req.token == self.acl_token:
            return
        if req.token:
            raise ApiError(403, "ACL not found")
        raise ApiError(
            403,
            f"Permission denied: anonymous token lacks permission '{permission}' on \"{resource}\". "
            "The anonymous token is used implicitly when a request does not specify a token.",
        )

    def _may_read(self, req: Request) -> bool:
        """False for the anonymous token: Consul filters what it may not read out of list results."""
        if self.acl_token is None or req.token == self.acl_token:
            return True
        if req.token:
            raise ApiError(403, "ACL not found")
        return False

    # -- Enterprise namespaces and partitions ------------------------------------------------------

    def _scope(self, req: Request, body_namespace: str = "", body_partition: str = "") -> tuple[str, str]:
        """(partition, namespace) of a request: ``?partition`` / ``X-Consul-Partition``, ``?ns`` /
        ``X-Consul-Namespace``, then the body's, then ``default``. Without Enterprise, any of them is 400
        as Consul's CE agent answers."""
        ns = req.param("ns") or req.headers.get("X-Consul-Namespace", "")
        partition = req.param("partition") or req.headers.get("X-Consul-Partition", "")
        if not self.enterprise:
            if req.headers.get("X-Consul-Namespace"):
                raise ApiError(
                    400, 'Invalid header: "X-Consul-Namespace" - Namespaces are a Consul Enterprise feature'
                )
            if req.param("ns"):
                raise ApiError(
                    400, 'Invalid query parameter: "ns" - Namespaces are a Consul Enterprise feature'
                )
            if req.headers.get("X-Consul-Partition"):
                raise ApiError(
                    400, 'Invalid header: "X-Consul-Partition" - Partitions are a Consul Enterprise feature'
                )
            if req.param("partition"):
                raise ApiError(
                    400, 'Invalid query parameter: "partition" - Partitions are a Consul Enterprise feature'
                )
            if body_namespace not in ("", DEFAULT):
                raise ApiError(400, "Request decode failed: Namespaces are a Consul Enterprise feature")
            if body_partition not in ("", DEFAULT):
                raise ApiError(400, "Request decode failed: Partitions are a Consul Enterprise feature")
            return DEFAULT, DEFAULT
        if "*" in (ns, partition):
            raise ApiError(400, "lbkit ConsulServer does not evaluate wildcard namespaces or partitions")
        return (partition or body_partition or self._state.partition), (ns or body_namespace or DEFAULT)

    def _agent_scope(self, req: Request, body_namespace: str = "", body_partition: str = "") -> str:
        """The namespace of an agent-local request; its partition must be the agent's."""
        partition, ns = self._scope(req, body_namespace, body_partition)
        if partition != self._state.partition:
            raise ApiError(
                400,
                f'Invalid partition "{partition}": this agent is in partition "{self._state.partition}"',
            )
        return ns

    # -- blocking queries, consistency modes and the agent cache -----------------------------------

    def _consistency(self, req: Request) -> tuple[str, float, bool]:
        """(mode, last contact seconds, known leader) of a read, or ApiError as Consul answers."""
        stale = "stale" in req.query
        consistent = "consistent" in req.query
        cached = "cached" in req.query
        max_stale: float | None = None
        if req.param("max_stale"):
            try:
                max_stale = parse_duration(req.param("max_stale"))
            except ValueError:
                raise ApiError(400, f'Invalid max_stale value "{req.param("max_stale")}"') from None
            if max_stale > 0:
                stale = True
        if stale and consistent:
            raise ApiError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        if cached and consistent:
            raise ApiError(400, "Cannot specify ?cached with ?consistent, conflicting semantics.")
        with self._raft_lock:
            leader, contact = self._leader, self._last_contact
        if stale and max_stale is not None and contact > max_stale:
            stale = False  # too stale: Consul re-runs the read on the leader
        if not stale:
            if not leader:
                raise ApiError(500, "No cluster leader")
            return ("consistent" if consistent else "leader"), 0.0, True
        return "stale", contact, leader

    def _cache_headers(self, req: Request, current: int) -> dict[str, str]:
        """X-Cache (and Age on a hit) of a ``?cached`` read; the entry refreshes in the background on
        every change, as Consul's agent cache does for health and catalog reads."""
        max_age: float | None = None
        revalidate = False
        for directive in req.headers.get("Cache-Control", "").lower().split(","):
            directive = directive.strip()
            if directive == "must-revalidate":
                revalidate = True
            elif directive.startswith("max-age="):
                try:
                    max_age = float(int(directive[8:]))
                except ValueError:
                    raise ApiError(400, "Invalid Cache-Control header.") from None
                revalidate = revalidate or max_age == 0
        skip = {"index", "wait", "cached", "token", "stale", "max_stale"}
        key = (req.path, tuple(sorted((k, tuple(v)) for k, v in req.query.items() if k not in skip)))
        now = time.monotonic()
        with self._raft_lock:
            entry = self._cache.get(key)
            if entry is not None and entry.index != current:
                entry.fetched_at, entry.index = now, current  # refreshed in the background
            if entry is None or revalidate or (max_age is not None and now - entry.fetched_at > max_age):
                self._cache[key] = _CacheEntry(now, current)
                return {"X-Cache": "MISS"}
            return {"X-Cache": "HIT", "Age": f"{now - entry.fetched_at:.0f}"}

    def _blocking(self, req: Request, index: Callable[[], int], render: Callable[[], Any]) -> Response:
        min_index, wait = parse_wait(req)
        mode, contact, leader = self._consistency(req)
        dc = req.param("dc")
        if dc and dc != self.datacenter:
            raise ApiError(500, "No path to datacenter")
        st = self._state
        with st.lock:
            deadline = time.monotonic() + wait + random.uniform(0.0, wait / 16)
            while min_index > 0 and max(1, index()) <= min_index and st.running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                st.changed.wait(remaining)
            if not st.running:
                return Response(drop=True)
            current = max(1, index())
            data = render()
        if mode == "stale":  # the query's metadata is the server's as it answers, not as it was asked
            with self._raft_lock:
                leader, contact = self._leader, self._last_contact
        headers = {
            "X-Consul-Index": str(current),
            "X-Consul-KnownLeader": "true" if leader else "false",
            "X-Consul-LastContact": str(int(contact * 1000)),
            "X-Consul-Effective-Consistency": mode,
        }
        if "cached" in req.query:
            headers.update(self._cache_headers(req, current))
        return json_response(data, headers)
