"""HTTP to the Consul agent for discovery and registration: py-consul's sync (``requests``) and asyncio
(``aiohttp``) clients, wired to the connection's TLS settings (CA file or directory, client certificate,
verification, server name), and a sync session whose sockets another thread can cut."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

import aiohttp
import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from lbkit.discovery.consul_connection import ConsulConnection

__all__ = ["AbortableSession", "async_client", "async_session", "sync_client"]


def _uri_host(connection: ConsulConnection) -> str:
    return f"[{connection.host}]" if ":" in connection.host else connection.host


class AbortableSession(requests.Session):
    """A requests session for one Consul connection whose sockets :meth:`abort` can shut down from
    another thread.

    A blocking query holds a socket in ``recv`` for up to its whole wait; shutting the socket down wakes
    that ``recv`` at once, so a watcher stops promptly. Sockets opened after :meth:`abort` are shut down
    as soon as they connect. For https, connections use the connection's SSL context and server name
    (the ``verify`` and ``cert`` that requests is given per request are not used).
    """

    def __init__(self, connection: ConsulConnection | None = None) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.aborted = False
        tracker = self
        tls = connection if connection is not None and connection.ssl_context is not None else None

        class _Tracked:
            def connect(self: Any) -> None:
                super().connect()  # type: ignore[misc]
                tracker._track(self.sock)

        class _Conn(_Tracked, HTTPConnection):
            pass

        class _TLSConn(_Tracked, HTTPSConnection):
            pass

        class _Pool(HTTPConnectionPool):
            ConnectionCls = _Conn

        class _TLSPool(HTTPSConnectionPool):
            ConnectionCls = _TLSConn

        class _Adapter(HTTPAdapter):
            def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
                super().init_poolmanager(*args, **kwargs)
                self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}

            def build_connection_pool_key_attributes(
                self, request: Any, verify: Any, cert: Any = None
            ) -> Any:
                host, default = super().build_connection_pool_key_attributes(request, verify, cert)
                pool: dict[str, Any] = dict(default)
                if tls is not None and host.get("scheme") == "https":
                    pool = {
                        "ssl_context": tls.ssl_context,
                        "cert_reqs": "CERT_REQUIRED" if tls.verify else "CERT_NONE",
                    }
                    if tls.tls_server_name:
                        pool["server_hostname"] = tls.tls_server_name
                return host, pool

        self.mount("http://", _Adapter())
        self.mount("https://", _Adapter())

    def _track(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets = {s for s in self._sockets if s.fileno() >= 0}
            self._sockets.add(sock)
            aborted = self.aborted
        if aborted:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def abort(self) -> None:
        """Shut down every socket of the session, waking any request blocked on one."""
        with self._lock:
            self.aborted = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._shutdown(sock)


def sync_client(
    connection: ConsulConnection, *, timeout: float = 10.0, session: requests.Session | None = None
) -> Any:
    """A ``consul.Consul`` for ``connection`` (the token goes in explicitly, never from the environment).

    ``timeout`` is the seconds allowed to connect and answer; py-consul adds a blocking query's wait and
    its jitter (wait/16) to it.
    """
    import consul

    client = consul.Consul(
        connections_timeout=timeout,
        host=_uri_host(connection),
        port=connection.port,
        scheme=connection.scheme,
        verify=connection.verify,
    )
    client.token = connection.token
    client.http.session = session if session is not None else AbortableSession(connection)
    return client


def async_session(connection: ConsulConnection) -> aiohttp.ClientSession:
    """An aiohttp session for ``connection`` (its SSL context for https); call in a running loop."""
    ssl_arg: Any = connection.ssl_context if connection.ssl_context is not None else False
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_arg))


def async_client(connection: ConsulConnection) -> Any:
    """A ``consul.aio.Consul`` for ``connection`` (its TLS settings and token); call inside a running
    event loop."""
    import consul.aio
    import consul.base

    server_name = connection.tls_server_name if connection.scheme == "https" else None

    class _HTTPClient(consul.aio.HTTPClient):  # type: ignore[misc]
        def __init__(self) -> None:  # not the base's: it would make a session without our TLS
            consul.base.HTTPClient.__init__(self, _uri_host(connection), connection.port, connection.scheme)
            self.loop = None
            self._session = async_session(connection)

        async def _request(
            self,
            callback: Any,
            method: str,
            uri: str,
            headers: dict[str, str] | None,
            data: Any = None,
            connections_timeout: float | None = None,
            raw: bool = False,
        ) -> Any:
            kwargs: dict[str, Any] = {"headers": headers, "data": data}
            if connections_timeout:
                kwargs["timeout"] = aiohttp.ClientTimeout(total=connections_timeout)
            if server_name:
                kwargs["server_hostname"] = server_name
            async with self._session.request(method, uri, **kwargs) as resp:
                body = await resp.read() if raw else await resp.text(encoding="utf-8")
                return callback(consul.base.Response(resp.status, resp.headers, body))

    class _Consul(consul.aio.Consul):  # type: ignore[misc]
        def http_connect(self, *args: Any, **kwargs: Any) -> Any:
            return _HTTPClient()

    client = _Consul()
    client.token = connection.token
    return client
