"""A Consul agent's HTTP API in a local thread, for tests, the demo and users' tests of lbkit.

It follows Consul's documented HTTP API for the endpoints it covers (service and check
registration, TTL and active checks, catalog and health reads, blocking queries, filtering,
ACL tokens), so code tested against it works against a real agent. What it covers and what
not is in ``docs/consul-test-server.md``. Run it alone with
``python -m lbkit.testing.consul [--port N]``.

Test hooks that Consul does not have (``fail_next``, ``garbage_next``, ``set_delay``,
``requests``) let tests inject faults and see what a client sent.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from lbkit.testing.consul.checks import CRITICAL, PASSING, WARNING, is_loopback_host, parse_duration
from lbkit.testing.consul.filter import FilterError, compile_filter
from lbkit.testing.consul.state import (
    VERSION,
    ApiError,
    ConsulState,
    ConsulTimings,
    ServiceSpec,
    parse_check,
    parse_service,
)

__all__ = ["ConsulServer", "ConsulTimings", "RecordedRequest"]

DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
_GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True}
_GO_BOOLS.update({"0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False})
_TEXT = "text/plain; charset=utf-8"


class RecordedRequest(NamedTuple):
    """One request the server received. Header names are canonical ("X-Consul-Token")."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class _Request:
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
        return value.strip().split(" ")[0] if scheme == "Bearer" else ""


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False


def _json(obj: Any, headers: dict[str, str] | None = None) -> _Response:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return _Response(200, body, "application/json", headers or {})


def _canonical(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))


Handler = Callable[["ConsulServer", _Request], _Response]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], owner: ConsulServer) -> None:
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client or a stop cutting the line is no error
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        """Cut every open (keep-alive or blocked) connection, as a stopping agent does."""
        with self.connections_lock:
            for conn in list(self.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        req = _Request(
            method=self.command,
            path=urllib.parse.unquote(url.path),
            rest="",
            query=urllib.parse.parse_qs(url.query, keep_blank_values=True),
            headers={_canonical(k): v for k, v in self.headers.items()},
            body=self._read_body(),
        )
        resp = self.server.owner._serve(req)
        if resp.drop:
            self.close_connection = True
            return
        self.send_response(resp.status)
        if resp.content_type:
            self.send_header("Content-Type", resp.content_type)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)

    do_GET = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_HEAD = _handle


class ConsulServer:
    """A Consul agent's HTTP API (one dev-mode node, datacenter ``datacenter``) on ``host:port``.

    Port 0 picks a free port at :meth:`start`; later restarts keep it. With ``acl_token`` set,
    ACLs behave as an agent's with ``default_policy = "deny"`` and that one management token.
    ``timings`` overrides Consul's built-in check timings (lower them in tests).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        datacenter: str = "dc1",
        node_name: str = "lbkit-node",
        acl_token: str | None = None,
        timings: ConsulTimings | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.datacenter = datacenter
        self.node_name = node_name
        self.acl_token = acl_token
        node_address = host if is_loopback_host(host) and host != "localhost" else "127.0.0.1"
        self._state = ConsulState(
            datacenter=datacenter,
            node_name=node_name,
            node_address=node_address,
            timings=timings or ConsulTimings(),
        )
        self._hooks = threading.Lock()
        self._faults: collections.deque[tuple[int, str, bool]] = collections.deque()
        self._delay = 0.0
        self._requests: collections.deque[RecordedRequest] = collections.deque(maxlen=1000)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port``, as CONSUL_HTTP_ADDR takes it."""
        return f"{self.host}:{self.port}"

    @property
    def http_addr(self) -> str:
        """``http://host:port``."""
        return f"http://{self.address}"

    @property
    def index(self) -> int:
        """The current Raft-like index (the last catalog change)."""
        with self._state.lock:
            return self._state.index

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._httpd is not None

    def start(self) -> ConsulServer:
        """Listen and serve in a daemon thread, and run checks; state from before a stop is kept."""
        if self._httpd is not None:
            return self
        httpd = _HTTPServer((self.host, self.port), self)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        with self._state.lock:
            self._state.start()
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="consul-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and checking: open connections are cut, blocked queries get no answer."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        with self._state.lock:
            threads = self._state.stop()
        httpd.shutdown()
        httpd.drop_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        deadline = time.monotonic() + 2.0
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def restart(self) -> None:
        """Stop, then start again on the same port with the same state."""
        self.stop()
        self.start()

    def __enter__(self) -> ConsulServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, **kwargs: Any) -> Any:
        """A ``consul.Consul`` (py-consul) client for this server; its token defaults to ``acl_token``."""
        import consul

        if self.acl_token is not None:
            kwargs.setdefault("token", self.acl_token)
        return consul.Consul(host=self.host, port=self.port, **kwargs)

    # -- test hooks (not part of Consul) -----------------------------------------------------------

    def fail_next(
        self, count: int = 1, status: int = 500, body: str = "rpc error making call: injected failure"
    ) -> None:
        """Answer the next ``count`` requests with ``status`` and ``body`` (test hook)."""
        with self._hooks:
            self._faults.extend([(status, body, False)] * count)

    def garbage_next(self, count: int = 1) -> None:
        """Answer the next ``count`` requests 200 with a valid index and a non-JSON body (test hook)."""
        with self._hooks:
            self._faults.extend([(200, "<html>not json", True)] * count)

    def set_delay(self, seconds: float) -> None:
        """Hold every response for ``seconds`` before answering (test hook); 0 turns it off."""
        with self._hooks:
            self._delay = max(0.0, float(seconds))

    @property
    def requests(self) -> list[RecordedRequest]:
        """The last 1000 requests received, oldest first (test hook)."""
        with self._hooks:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests (test hook)."""
        with self._hooks:
            self._requests.clear()

    # -- request handling --------------------------------------------------------------------------

    def _serve(self, req: _Request) -> _Response:
        with self._hooks:
            self._requests.append(RecordedRequest(req.method, req.path, req.query, dict(req.headers)))
            delay = self._delay
            fault = self._faults.popleft() if self._faults else None
        if delay:
            time.sleep(delay)
        if fault is not None:
            status, body, garbage = fault
            headers = {"X-Consul-Index": str(max(1, self.index))} if garbage else {}
            return _Response(status, body.encode(), "application/json" if garbage else _TEXT, headers)
        route = _match(req.path)
        if route is None:
            return _Response(404)
        pattern, methods, handler = route
        if req.method == "OPTIONS":
            return _Response(200, headers={"Allow": ",".join(["OPTIONS", *methods])})
        if req.method not in methods:
            allow = ",".join(["OPTIONS", *methods])
            return _Response(405, f"method {req.method} not allowed".encode(), _TEXT, {"Allow": allow})
        req.rest = req.path[len(pattern) :]
        try:
            return handler(self, req)
        except ApiError as exc:
            return _Response(exc.status, exc.message.encode(), _TEXT)
        except FilterError as exc:
            return _Response(400, str(exc).encode(), _TEXT)

    # -- ACLs: default_policy "deny" and one management token ---------------------------------------

    def _authorize(self, req: _Request, permission: str, resource: str) -> None:
        if self.acl_token is None or req.token == self.acl_token:
            return
        if req.token:
            raise ApiError(403, "ACL not found")
        raise ApiError(
            403,
            f"Permission denied: anonymous token lacks permission '{permission}' on \"{resource}\". "
            "The anonymous token is used implicitly when a request does not specify a token.",
        )

    def _may_read(self, req: _Request) -> bool:
        """False for the anonymous token: Consul filters what it may not read out of list results."""
        if self.acl_token is None or req.token == self.acl_token:
            return True
        if req.token:
            raise ApiError(403, "ACL not found")
        return False

    # -- blocking queries ---------------------------------------------------------------------------

    def _blocking(self, req: _Request, index: Callable[[], int], render: Callable[[], Any]) -> _Response:
        min_index, wait = _parse_wait(req)
        if "stale" in req.query and "consistent" in req.query:
            raise ApiError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
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
                return _Response(drop=True)
            current = max(1, index())
            data = render()
        consistency = (
            "stale" if "stale" in req.query else "consistent" if "consistent" in req.query else "leader"
        )
        return _json(
            data,
            {
                "X-Consul-Index": str(current),
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
                "X-Consul-Effective-Consistency": consistency,
            },
        )

    # -- agent endpoints ----------------------------------------------------------------------------

    def _agent_self(self, req: _Request) -> _Response:
        self._authorize(req, "agent:read", self.node_name)
        st = self._state
        with st.lock:
            n_services, n_checks = len(st.services), len(st.checks)
            ttls = sum(1 for c in st.checks.values() if c.spec.ttl > 0)
        addr = st.node_address
        return _json(
            {
                "Config": {
                    "Datacenter": self.datacenter,
                    "PrimaryDatacenter": self.datacenter,
                    "NodeName": self.node_name,
                    "NodeID": st.node_id,
                    "Revision": "lbkit",
                    "Server": True,
                    "Version": VERSION,
                    "BuildDate": "1970-01-01T00:00:00Z",
                },
                "DebugConfig": {"ACLsEnabled": self.acl_token is not None, "DevMode": True},
                "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
                "Member": {
                    "Name": self.node_name,
                    "Addr": addr,
                    "Port": 8301,
                    "Tags": {
                        "dc": self.datacenter,
                        "role": "consul",
                        "build": VERSION,
                        "port": "8300",
                        "id": st.node_id,
                    },
                    "Status": 1,
                    "ProtocolMin": 1,
                    "ProtocolMax": 5,
                    "ProtocolCur": 2,
                    "DelegateMin": 2,
                    "DelegateMax": 5,
                    "DelegateCur": 4,
                },
                "Stats": {
                    "agent": {"services": str(n_services), "checks": str(n_checks), "check_ttls": str(ttls)},
                    "consul": {"leader": "true", "server": "true", "known_datacenters": "1"},
                },
                "Meta": {"consul-network-segment": "", "consul-version": VERSION},
            }
        )

    def _agent_services(self, req: _Request) -> _Response:
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "agent_service") if req.param("filter") else None
        with self._state.lock:
            views = (
                {s.id: self._state.agent_service_json(s) for s in self._state.services.values()}
                if visible
                else {}
            )
        return _json({k: v for k, v in sorted(views.items()) if pred is None or pred(v)})

    def _agent_service(self, req: _Request) -> _Response:
        min_wait = _parse_wait(req)[1] if "wait" in req.query else DEFAULT_WAIT
        if self.acl_token is not None and req.token and req.token != self.acl_token:
            raise ApiError(403, "ACL not found")
        st = self._state
        want = req.param("hash")
        with st.lock:
            deadline = time.monotonic() + min_wait
            while True:
                spec = st.services.get(req.rest)
                if spec is None:
                    raise ApiError(404, f"unknown service ID: {req.rest}")
                view = st.agent_service_json(spec)
                digest = st.content_hash(view)
                remaining = deadline - time.monotonic()
                if not want or digest != want or remaining <= 0 or not st.running:
                    break
                st.changed.wait(remaining)
            if not st.running:
                return _Response(drop=True)
        self._authorize(req, "service:read", spec.name)
        view["ContentHash"] = digest
        return _json(view, {"X-Consul-ContentHash": digest})

    def _register_service(self, req: _Request) -> _Response:
        spec = parse_service(_body_json(req))
        if any(c.script for c in spec.checks):
            raise ApiError(500, _SCRIPTS_DISABLED)
        st = self._state
        with st.lock:
            old = st.services.get(spec.id)
        self._authorize(req, "service:write", spec.name)
        if old is not None and old.name != spec.name:
            self._authorize(req, "service:write", old.name)
        replace = "replace-existing-checks" in req.query and req.param("replace-existing-checks") in (
            "",
            "true",
        )
        with st.lock:
            st.register_service(spec, replace)
        return _Response()

    def _service_for_update(self, req: _Request, service_id: str) -> ServiceSpec:
        with self._state.lock:
            spec = self._state.services.get(service_id)
        if spec is None:
            self._may_read(req)
            raise ApiError(
                404,
                f'Unknown service ID "{service_id}". '
                "Ensure that the service ID is passed, not the service name.",
            )
        self._authorize(req, "service:write", spec.name)
        return spec

    def _deregister_service(self, req: _Request) -> _Response:
        self._service_for_update(req, req.rest)
        with self._state.lock:
            if req.rest in self._state.services:
                self._state.deregister_service(req.rest)
        return _Response()

    def _agent_checks(self, req: _Request) -> _Response:
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "check") if req.param("filter") else None
        st = self._state
        with st.lock:
            views = (
                {c.check_id: st.check_json(c, catalog=False) for c in st.checks.values()} if visible else {}
            )
        return _json({k: v for k, v in sorted(views.items()) if pred is None or pred(v)})

    def _check_for_update(self, req: _Request, check_id: str) -> None:
        with self._state.lock:
            check = self._state.checks.get(check_id)
        if check is None:
            self._may_read(req)
            raise ApiError(
                404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        if check.service_name:
            self._authorize(req, "service:write", check.service_name)
        else:
            self._authorize(req, "node:write", self.node_name)

    def _register_check(self, req: _Request) -> _Response:
        spec = parse_check(_body_json(req))
        if not spec.name:
            raise ApiError(400, "Missing check name")
        if spec.status and spec.status not in (PASSING, WARNING, CRITICAL):
            raise ApiError(400, "Bad check status")
        spec.validate()
        st = self._state
        with st.lock:
            svc = st.services.get(spec.service_id) if spec.service_id else None
        if spec.service_id and svc is None:
            self._may_read(req)
            raise ApiError(404, f'ServiceID "{spec.service_id}" does not exist')
        if svc is not None:
            self._authorize(req, "service:write", svc.name)
        else:
            self._authorize(req, "node:write", self.node_name)
        if spec.script:
            raise ApiError(500, _SCRIPTS_DISABLED)
        with st.lock:
            st.register_check(spec)
        return _Response()

    def _deregister_check(self, req: _Request) -> _Response:
        self._check_for_update(req, req.rest)
        with self._state.lock:
            if req.rest in self._state.checks:
                self._state.deregister_check(req.rest)
        return _Response()

    def _ttl_update(self, req: _Request, status: str, output: str) -> _Response:
        self._check_for_update(req, req.rest)
        with self._state.lock:
            if req.rest not in self._state.checks:
                raise ApiError(404, f'Unknown check ID "{req.rest}"')
            self._state.update_ttl(req.rest, status, output)
        return _Response()

    def _check_pass(self, req: _Request) -> _Response:
        return self._ttl_update(req, PASSING, req.param("note"))

    def _check_warn(self, req: _Request) -> _Response:
        return self._ttl_update(req, WARNING, req.param("note"))

    def _check_fail(self, req: _Request) -> _Response:
        return self._ttl_update(req, CRITICAL, req.param("note"))

    def _check_update(self, req: _Request) -> _Response:
        raw = _body_json(req)
        body = {str(k).lower(): v for k, v in raw.items()} if isinstance(raw, dict) else {}
        status, output = body.get("status", ""), body.get("output", "")
        if not isinstance(raw, dict) or not isinstance(status, str) or not isinstance(output, str):
            raise ApiError(400, 'Request decode failed: expected {"Status": string, "Output": string}')
        if status not in (PASSING, WARNING, CRITICAL):
            raise ApiError(400, f"Invalid check status: '{status}'")
        return self._ttl_update(req, status, output)

    # -- catalog and health endpoints ---------------------------------------------------------------

    def _catalog_services(self, req: _Request) -> _Response:
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "service_node") if req.param("filter") else None
        st = self._state

        def render() -> dict[str, list[str]]:
            out: dict[str, set[str]] = {}
            for spec in st.all_services() if visible else []:
                if pred is None or pred(st.service_node_json(spec)):
                    out.setdefault(spec.name, set()).update(spec.tags or [])
            return {name: sorted(tags) for name, tags in sorted(out.items())}

        return self._blocking(req, lambda: st.tables["services"], render)

    def _catalog_service(self, req: _Request) -> _Response:
        name = _required_name(req)
        visible = self._may_read(req)
        tags = req.query.get("tag", [])
        pred = compile_filter(req.param("filter"), "service_node") if req.param("filter") else None
        st = self._state

        def render() -> list[dict[str, Any]]:
            views = [st.service_node_json(s) for s in st.all_services() if s.name == name] if visible else []
            views = [v for v in views if _has_tags(v["ServiceTags"], tags)]
            return [v for v in views if pred is None or pred(v)]

        return self._blocking(req, lambda: st.service_name_index(name), render)

    def _catalog_nodes(self, req: _Request) -> _Response:
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "node") if req.param("filter") else None
        st = self._state

        def render() -> list[dict[str, Any]]:
            views = [st.node_json()] if visible else []
            return [v for v in views if pred is None or pred(v)]

        return self._blocking(req, lambda: st.tables["nodes"], render)

    def _health_service(self, req: _Request) -> _Response:
        name = _required_name(req)
        visible = self._may_read(req)
        tags = req.query.get("tag", [])
        passing = False
        if "passing" in req.query:
            raw = req.param("passing")
            if raw and raw not in _GO_BOOLS:
                raise ApiError(400, "Invalid value for ?passing")
            passing = _GO_BOOLS.get(raw, True)
        pred = compile_filter(req.param("filter"), "health_entry") if req.param("filter") else None
        st = self._state

        def render() -> list[dict[str, Any]]:
            entries = st.health_entries(name) if visible else []
            entries = [e for e in entries if _has_tags(e["Service"]["Tags"], tags)]
            entries = [e for e in entries if pred is None or pred(e)]
            if passing:
                entries = [e for e in entries if all(c["Status"] == PASSING for c in e["Checks"])]
            return entries

        return self._blocking(req, lambda: st.service_name_index(name), render)

    def _health_checks(self, req: _Request) -> _Response:
        name = _required_name(req)
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "check") if req.param("filter") else None
        st = self._state

        def render() -> list[dict[str, Any]]:
            views = [c for c in st.catalog_checks() if c["ServiceName"] == name] if visible else []
            return [v for v in views if pred is None or pred(v)]

        return self._blocking(req, lambda: st.tables["checks"], render)

    def _health_state(self, req: _Request) -> _Response:
        state = req.rest
        if not state:
            raise ApiError(400, "Missing check state")
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "check") if req.param("filter") else None
        st = self._state

        def render() -> list[dict[str, Any]]:
            views = st.catalog_checks() if visible else []
            views = [v for v in views if state == "any" or v["Status"] == state]
            return [v for v in views if pred is None or pred(v)]

        return self._blocking(req, lambda: st.tables["checks"], render)

    def _status_leader(self, req: _Request) -> _Response:
        return _json(f"{self._state.node_address}:8300")

    def _status_peers(self, req: _Request) -> _Response:
        return _json([f"{self._state.node_address}:8300"])


_SCRIPTS_DISABLED = (
    "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' or "
    "'enable_local_script_checks' to true"
)

_ROUTES: dict[str, tuple[tuple[str, ...], Handler]] = {
    "/v1/agent/self": (("GET",), ConsulServer._agent_self),
    "/v1/agent/services": (("GET",), ConsulServer._agent_services),
    "/v1/agent/service/": (("GET",), ConsulServer._agent_service),
    "/v1/agent/service/register": (("PUT",), ConsulServer._register_service),
    "/v1/agent/service/deregister/": (("PUT",), ConsulServer._deregister_service),
    "/v1/agent/checks": (("GET",), ConsulServer._agent_checks),
    "/v1/agent/check/register": (("PUT",), ConsulServer._register_check),
    "/v1/agent/check/deregister/": (("PUT",), ConsulServer._deregister_check),
    "/v1/agent/check/pass/": (("PUT",), ConsulServer._check_pass),
    "/v1/agent/check/warn/": (("PUT",), ConsulServer._check_warn),
    "/v1/agent/check/fail/": (("PUT",), ConsulServer._check_fail),
    "/v1/agent/check/update/": (("PUT",), ConsulServer._check_update),
    "/v1/catalog/services": (("GET",), ConsulServer._catalog_services),
    "/v1/catalog/service/": (("GET",), ConsulServer._catalog_service),
    "/v1/catalog/nodes": (("GET",), ConsulServer._catalog_nodes),
    "/v1/health/service/": (("GET",), ConsulServer._health_service),
    "/v1/health/checks/": (("GET",), ConsulServer._health_checks),
    "/v1/health/state/": (("GET",), ConsulServer._health_state),
    "/v1/status/leader": (("GET",), ConsulServer._status_leader),
    "/v1/status/peers": (("GET",), ConsulServer._status_peers),
}


def _match(path: str) -> tuple[str, tuple[str, ...], Handler] | None:
    """Go ServeMux matching: an exact pattern, else the longest "/"-ending pattern that prefixes ``path``."""
    if path in _ROUTES:
        return (path, *_ROUTES[path])
    best = max((p for p in _ROUTES if p.endswith("/") and path.startswith(p)), key=len, default=None)
    return None if best is None else (best, *_ROUTES[best])


def _parse_wait(req: _Request) -> tuple[int, float]:
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


def _body_json(req: _Request) -> Any:
    if not req.body.strip():
        raise ApiError(400, "Request decode failed: EOF")
    try:
        return json.loads(req.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Request decode failed: {exc}") from None


def _required_name(req: _Request) -> str:
    if not req.rest:
        raise ApiError(400, "Missing service name")
    return req.rest


def _has_tags(service_tags: list[str], wanted: list[str]) -> bool:
    have = {t.lower() for t in service_tags}
    return all(t.lower() in have for t in wanted)
