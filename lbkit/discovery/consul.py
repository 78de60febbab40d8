"""Consul discovery: the sync loop over ``consul.Consul`` and the asyncio loop over ``consul.aio.Consul``,
both driven by :class:`~lbkit.discovery.consul_core.ConsulWatchCore`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Mapping
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from lbkit.discovery.base import Discovery, DiscoveryStatus, OnUpdate
from lbkit.discovery.consul_core import (
    ConsulConnection,
    ConsulOptions,
    ConsulQuery,
    ConsulWatchCore,
    logger,
    resolve_connection,
)
from lbkit.endpoint import EndpointSet
from lbkit.errors import ConfigError

__all__ = ["AbortableSession", "ConsulDiscovery", "ConsulOptions", "async_client", "sync_client"]

_STOP_POLL = 0.5


class AbortableSession(requests.Session):
    """A requests session whose sockets :meth:`abort` can shut down from another thread.

    A blocking query holds a socket in ``recv`` for up to its whole wait; shutting the socket down wakes
    that ``recv`` at once, so a watcher stops promptly. Sockets opened after :meth:`abort` are shut down
    as soon as they connect.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.aborted = False
        tracker = self

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
        host=connection.host,
        port=connection.port,
        scheme=connection.scheme,
        verify=connection.http_verify,
        cert=connection.http_cert,
    )
    client.token = connection.token
    if session is not None:
        client.http.session = session
    return client


def async_client(connection: ConsulConnection) -> Any:
    """A ``consul.aio.Consul`` for ``connection``; call inside a running event loop."""
    import consul.aio

    client = consul.aio.Consul(
        host=connection.host,
        port=connection.port,
        scheme=connection.scheme,
        verify=connection.http_verify,
        cert=connection.http_cert,
    )
    client.token = connection.token
    return client


def _raw(response: Any) -> Any:
    return response


class ConsulDiscovery(Discovery):
    """Endpoints of one Consul service, watched with blocking queries on ``/v1/health/service/<service>``.

    Keyword options are those of :class:`~lbkit.discovery.consul_core.ConsulOptions` (or pass ``options=``);
    connection options left unset come from ``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN`` and the other
    variables Consul's own tools read. Each published :class:`EndpointSet` has the Consul index as its
    version; a set is published only when it differs from the last one, the first answer always.
    """

    def __init__(
        self,
        service: str,
        *,
        options: ConsulOptions | None = None,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(service, str) or not service or service != service.strip() or "/" in service:
            raise ConfigError(
                f"ConsulDiscovery: service must be a non-empty name without '/', got {service!r}"
            )
        if options is not None and kwargs:
            raise ConfigError(
                f"ConsulDiscovery: pass options= or keyword options, not both; got {sorted(kwargs)}"
            )
        self.service = service
        self.options = options if options is not None else ConsulOptions(**kwargs)
        o = self.options
        self.connection = resolve_connection(
            address=o.address,
            token=o.token,
            ca_file=o.ca_file,
            cert_file=o.cert_file,
            key_file=o.key_file,
            verify=o.verify,
            env=os.environ if env is None else env,
            owner="ConsulDiscovery",
        )
        self.status = DiscoveryStatus()

    def _core(self) -> ConsulWatchCore:
        return ConsulWatchCore(self.service, self.options, self.connection, status=self.status)

    def _publish(self, on_update: OnUpdate, snapshot: EndpointSet) -> None:
        try:
            on_update(snapshot)
        except Exception:
            logger.exception("consul service %r: the update callback failed", self.service)

    def run(self, on_update: OnUpdate, stop: threading.Event) -> None:
        """Watch the service, calling ``on_update`` on changes, until ``stop`` is set; return within
        about a second of it, even while a blocking query is pending."""
        core = self._core()
        session = AbortableSession()
        client = sync_client(self.connection, timeout=self.options.request_timeout, session=session)
        finished = threading.Event()

        def abort_on_stop() -> None:
            while not stop.wait(_STOP_POLL):
                if finished.is_set():
                    return
            session.abort()

        guard = threading.Thread(target=abort_on_stop, name=f"lbkit-consul-stop-{self.service}", daemon=True)
        guard.start()
        try:
            while not stop.is_set():
                delay = core.delay()
                if delay > 0 and stop.wait(delay):
                    break
                query = core.next_query()
                try:
                    response = self._get(client, query)
                except Exception as exc:
                    if stop.is_set():
                        break
                    core.on_error(exc)
                    continue
                if stop.is_set():
                    break
                snapshot = core.on_response(response.code, response.headers, response.body)
                if snapshot is not None:
                    self._publish(on_update, snapshot)
        finally:
            finished.set()
            session.close()

    @staticmethod
    def _get(client: Any, query: ConsulQuery) -> Any:
        # py-consul's sync client sets the HTTP timeout itself, from the same rule: the query's wait,
        # plus wait/16 of jitter, plus its connection timeout.
        return client.http.get(_raw, query.path, params=query.params, headers=query.headers)

    async def arun(self, on_update: OnUpdate) -> None:
        """Watch the service, calling ``on_update`` on changes, until cancelled (the HTTP session is then
        closed)."""
        core = self._core()
        client = async_client(self.connection)
        try:
            while True:
                delay = core.delay()
                if delay > 0:
                    await asyncio.sleep(delay)
                query = core.next_query()
                try:
                    response = await client.http.get(
                        _raw,
                        query.path,
                        params=query.params,
                        headers=query.headers,
                        connections_timeout=query.timeout,
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    core.on_error(exc)
                    continue
                snapshot = core.on_response(response.code, response.headers, response.body)
                if snapshot is not None:
                    self._publish(on_update, snapshot)
        finally:
            await asyncio.shield(client.close())

    def __repr__(self) -> str:
        o = self.options
        extra = "".join(
            f", {name}={value!r}"
            for name, value in (("datacenter", o.datacenter), ("tags", o.tags or None), ("health", o.health))
            if value is not None
        )
        return f"ConsulDiscovery({self.service!r}, address={self.connection.address!r}{extra})"
