"""A Consul agent's HTTP API in a local thread, for tests, the demo and users' tests of lbkit.

It follows Consul's documented HTTP API for the endpoints it covers (service and check registration,
maintenance mode, TTL and active checks, catalog and health reads and catalog registration, blocking
queries, filtering, consistency modes and the agent cache, ACL tokens, Enterprise namespaces and
partitions, datacenters joined over the WAN, HTTPS with client certificates), so code tested against it
works against a real agent. What it covers and what not is in ``docs/consul-test-server.md``. Run it
alone with ``python -m lbkit.testing.consul [--port N]``.

Test hooks that Consul does not have (``fail_next``, ``garbage_next``, ``set_delay``, ``set_raft``,
``requests``) let tests inject faults and see what a client sent.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from lbkit.testing.consul.agent_api import AgentApi
from lbkit.testing.consul.api import TEXT, Request, Response
from lbkit.testing.consul.catalog_api import CatalogApi
from lbkit.testing.consul.checks import is_loopback_host
from lbkit.testing.consul.filter import FilterError
from lbkit.testing.consul.specs import ApiError
from lbkit.testing.consul.state import DEFAULT, ConsulState, ConsulTimings
from lbkit.testing.consul.tls import ServerTLS

__all__ = ["ConsulServer", "ConsulTimings", "RecordedRequest", "ServerTLS"]

_HANDSHAKE_TIMEOUT = 10.0


class RecordedRequest(NamedTuple):
    """One request the server received. Header names are canonical ("X-Consul-Token")."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


def _canonical(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))


Handler = Callable[["ConsulServer", Request], Response]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], owner: ConsulServer, tls: ssl.SSLContext | None) -> None:
        self.owner = owner
        self.tls = tls
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _RequestHandler)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:  # the handshake runs in the request's thread, not the accept loop
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

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

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(_HANDSHAKE_TIMEOUT)
            self.request.do_handshake()  # an SSLError (an OSError) ends the connection quietly
            self.request.settimeout(None)
        super().setup()

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
        req = Request(
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


class ConsulServer(AgentApi, CatalogApi):
    """A Consul agent's HTTP API (a dev-mode server, its own leader, in datacenter ``datacenter``) on
    ``host:port``.

    Port 0 picks a free port at :meth:`start`; later restarts keep it. With ``acl_token`` set, ACLs
    behave as an agent's with ``default_policy = "deny"`` and that one management token. ``timings``
    overrides Consul's built-in check timings (lower them in tests). ``node_meta`` is the agent node's
    metadata (``node_meta`` in an agent's configuration). ``enterprise=True`` serves Enterprise
    namespaces and admin partitions (``partition`` is the agent's own); without it, ``ns`` and
    ``partition`` are refused as a CE agent refuses them. ``tls`` serves HTTPS instead of HTTP.
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
        node_meta: dict[str, str] | None = None,
        enterprise: bool = False,
        partition: str = DEFAULT,
        tls: ServerTLS | None = None,
    ) -> None:
        if not enterprise and partition != DEFAULT:
            raise ValueError("ConsulServer: partitions other than 'default' need enterprise=True")
        self.host = host
        self.port = port
        self.datacenter = datacenter
        self.node_name = node_name
        self.acl_token = acl_token
        self.enterprise = enterprise
        self.tls = tls
        node_address = host if is_loopback_host(host) and host != "localhost" else "127.0.0.1"
        self._state = ConsulState(
            datacenter=datacenter,
            node_name=node_name,
            node_address=node_address,
            timings=timings or ConsulTimings(),
            partition=partition,
            enterprise=enterprise,
            node_meta=node_meta,
        )
        self._init_api()
        self._hooks = threading.Lock()
        self._faults: collections.deque[tuple[int, str, bool]] = collections.deque()
        self._delay = 0.0
        self._requests: collections.deque[RecordedRequest] = collections.deque(maxlen=1000)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._wan: dict[str, ConsulServer] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port``, as CONSUL_HTTP_ADDR takes it (``[v6]:port`` for IPv6)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def http_addr(self) -> str:
        """``http://host:port``, or ``https://host:port`` when serving TLS."""
        return f"{'https' if self.tls else 'http'}://{self.address}"

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
        httpd = _HTTPServer((self.host, self.port), self, self.tls.context() if self.tls else None)
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
        """A ``consul.Consul`` (py-consul) client for this server; its token defaults to ``acl_token``,
        its scheme to ``https`` when serving TLS (pass ``verify=`` and ``cert=`` for it)."""
        import consul

        if self.acl_token is not None:
            kwargs.setdefault("token", self.acl_token)
        if self.tls is not None:
            kwargs.setdefault("scheme", "https")
        return consul.Consul(host=self.host, port=self.port, **kwargs)

    def join_wan(self, *others: ConsulServer) -> None:
        """Federate datacenters, as ``consul join -wan`` does: each server then answers ``?dc=`` for the
        others (while they run) and lists them in ``catalog/datacenters`` and ``agent/members?wan``."""
        for other in others:
            if other.datacenter == self.datacenter:
                raise ValueError(f"join_wan: {other.datacenter!r} is this server's own datacenter")
            self._wan[other.datacenter] = other
            other._wan[self.datacenter] = self
            for third in list(self._wan.values()):
                if third is not other:
                    third._wan[other.datacenter] = other
                    other._wan[third.datacenter] = third

    def _peers(self) -> list[Any]:
        return [self._wan[dc] for dc in sorted(self._wan)]

    def _datacenters(self) -> list[str]:
        return [self.datacenter, *sorted(self._wan)]

    def _forward(self, datacenter: str, req: Request) -> Response:
        other = self._wan.get(datacenter)
        if other is None or not other.running:
            raise ApiError(500, "No path to datacenter")
        return other._dispatch(req)

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

    def _serve(self, req: Request) -> Response:
        with self._hooks:
            self._requests.append(RecordedRequest(req.method, req.path, req.query, dict(req.headers)))
            delay = self._delay
            fault = self._faults.popleft() if self._faults else None
        if delay:
            time.sleep(delay)
        if fault is not None:
            status, body, garbage = fault
            headers = {"X-Consul-Index": str(max(1, self.index))} if garbage else {}
            return Response(status, body.encode(), "application/json" if garbage else TEXT, headers)
        dc = req.param("dc")
        if dc and dc != self.datacenter and req.path.startswith(("/v1/catalog/", "/v1/health/")):
            try:
                return self._forward(dc, req)
            except ApiError as exc:
                return Response(exc.status, exc.message.encode(), TEXT)
        return self._dispatch(req)

    def _dispatch(self, req: Request) -> Response:
        route = _match(req.path)
        if route is None:
            return Response(404)
        pattern, methods, handler = route
        if req.method == "OPTIONS":
            return Response(200, headers={"Allow": ",".join(["OPTIONS", *methods])})
        if req.method not in methods:
            allow = ",".join(["OPTIONS", *methods])
            return Response(405, f"method {req.method} not allowed".encode(), TEXT, {"Allow": allow})
        req.rest = req.path[len(pattern) :]
        try:
            return handler(self, req)
        except ApiError as exc:
            return Response(exc.status, exc.message.encode(), TEXT)
        except FilterError as exc:
            return Response(400, str(exc).encode(), TEXT)


_ROUTES: dict[str, tuple[tuple[str, ...], Handler]] = {
    "/v1/agent/self": (("GET",), ConsulServer._agent_self),
    "/v1/agent/members": (("GET",), ConsulServer._agent_members),
    "/v1/agent/maintenance": (("PUT",), ConsulServer._node_maintenance),
    "/v1/agent/services": (("GET",), ConsulServer._agent_services),
    "/v1/agent/service/": (("GET",), ConsulServer._agent_service),
    "/v1/agent/service/register": (("PUT",), ConsulServer._register_service),
    "/v1/agent/service/deregister/": (("PUT",), ConsulServer._deregister_service),
    "/v1/agent/service/maintenance/": (("PUT",), ConsulServer._service_maintenance),
    "/v1/agent/checks": (("GET",), ConsulServer._agent_checks),
    "/v1/agent/check/register": (("PUT",), ConsulServer._register_check),
    "/v1/agent/check/deregister/": (("PUT",), ConsulServer._deregister_check),
    "/v1/agent/check/pass/": (("PUT",), ConsulServer._check_pass),
    "/v1/agent/check/warn/": (("PUT",), ConsulServer._check_warn),
    "/v1/agent/check/fail/": (("PUT",), ConsulServer._check_fail),
    "/v1/agent/check/update/": (("PUT",), ConsulServer._check_update),
    "/v1/catalog/datacenters": (("GET",), ConsulServer._catalog_datacenters),
    "/v1/catalog/register": (("PUT",), ConsulServer._catalog_register),
    "/v1/catalog/deregister": (("PUT",), ConsulServer._catalog_deregister),
    "/v1/catalog/services": (("GET",), ConsulServer._catalog_services),
    "/v1/catalog/service/": (("GET",), ConsulServer._catalog_service),
    "/v1/catalog/nodes": (("GET",), ConsulServer._catalog_nodes),
    "/v1/health/service/": (("GET",), ConsulServer._health_service),
    "/v1/health/checks/": (("GET",), ConsulServer._health_checks),
    "/v1/health/node/": (("GET",), ConsulServer._health_node),
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
