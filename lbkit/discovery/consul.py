"""Consul discovery: :class:`ConsulDiscovery`, its sync loop (threads, ``requests``) and its asyncio loop
(tasks, ``aiohttp``), both driving :class:`~lbkit.discovery.consul_core.ConsulWatchCore` per datacenter
and :class:`~lbkit.discovery.consul_core.DatacenterFailover` across them.

In asyncio, answers are decoded in a worker thread (:func:`lbkit._offloop.off_loop`: the asyncio balancer's
own, else ``asyncio.to_thread``) and published on the loop;
the decoder hands the interpreter over every millisecond or so, so a big answer never stalls the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

import aiohttp

from lbkit._offloop import off_loop
from lbkit.discovery.base import Discovery, DiscoveryStatus, OnUpdate
from lbkit.discovery.consul_connection import ConsulConnection, resolve_connection
from lbkit.discovery.consul_core import (
    ConsulOptions,
    ConsulQuery,
    ConsulWatchCore,
    DatacenterFailover,
    logger,
)
from lbkit.discovery.consul_http import AbortableSession, async_client, async_session, sync_client
from lbkit.endpoint import EndpointSet
from lbkit.errors import ConfigError

__all__ = ["AbortableSession", "ConsulDiscovery", "ConsulOptions", "async_client", "sync_client"]

_STOP_POLL = 0.5
_SELF_TIMEOUT = 5.0


class ConsulDiscovery(Discovery):
    """Endpoints of one Consul service, watched with blocking queries on ``/v1/health/service/<service>``.

    Keyword options are those of :class:`~lbkit.discovery.consul_core.ConsulOptions` (or pass
    ``options=``); connection options left unset come from ``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN``
    and the other variables Consul's own tools read (see
    :func:`~lbkit.discovery.consul_connection.resolve_connection`). Every instance is published with its
    health (:class:`~lbkit.endpoint.EndpointHealth`): passing, critical (a state not accepted) or in
    maintenance. Each published :class:`EndpointSet` has the Consul index of its datacenter as its
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
        env = os.environ if env is None else env
        self.service = service
        self.options = options if options is not None else ConsulOptions(**kwargs)
        o = self.options
        self.connection: ConsulConnection = resolve_connection(
            address=o.address,
            token=o.token,
            token_file=o.token_file,
            ca_file=o.ca_file,
            ca_path=o.ca_path,
            cert_file=o.cert_file,
            key_file=o.key_file,
            verify=o.verify,
            tls_server_name=o.tls_server_name,
            namespace=o.namespace,
            partition=o.partition,
            env=env,
            owner="ConsulDiscovery",
        )
        self.status = DiscoveryStatus()
        self.local_zone = o.zone or env.get("CONSUL_ZONE", "").strip()
        self._zone_from_agent = not self.local_zone and o.zone_from_agent

    # -- what both loops share ------------------------------------------------------------------------

    def _core(self, datacenter: str) -> ConsulWatchCore:
        """The watch of one datacenter: the local one reports in :attr:`status`, others privately."""
        primary = datacenter == self.options.datacenters[0]
        status = self.status if primary else DiscoveryStatus()
        return ConsulWatchCore(
            self.service, self.options, self.connection, datacenter=datacenter, status=status
        )

    def _url(self, query: ConsulQuery) -> str:
        return f"{self.connection.address}{query.path}?{urllib.parse.urlencode(query.params)}"

    def _take_zone(self, status: int, body: bytes) -> None:
        """This client's zone from ``/v1/agent/self``: the node metadata under ``zone_key``."""
        if status != 200:
            text = " ".join(body[:200].decode("utf-8", "replace").split())
            logger.info(
                "consul service %r: cannot read the local agent's node metadata for this client's zone "
                "(HTTP %d: %s); zone unknown",
                self.service,
                status,
                self.connection.redact(text),
            )
            return
        try:
            meta = json.loads(body).get("Meta")
        except (ValueError, AttributeError, RecursionError):
            meta = None
        zone = meta.get(self.options.zone_key) if isinstance(meta, dict) else None
        if isinstance(zone, str) and zone:
            self.local_zone = zone
            logger.info(
                "consul service %r: this client's zone is %r (agent node metadata)", self.service, zone
            )

    def _publish(self, on_update: OnUpdate, failover: DatacenterFailover, snapshot: EndpointSet) -> None:
        self.status.updates += 1
        self.status.datacenter = failover.current
        try:
            on_update(snapshot)
        except Exception:
            logger.exception("consul service %r: the update callback failed", self.service)

    # -- the sync loop ----------------------------------------------------------------------------------

    def run(self, on_update: OnUpdate, stop: threading.Event) -> None:
        """Watch the service, calling ``on_update`` on changes, until ``stop`` is set; return within
        about a second of it, even while a blocking query is pending. One thread per datacenter watched
        (the calling thread for the local one)."""
        _SyncRun(self, on_update, stop).run()

    # -- the asyncio loop -------------------------------------------------------------------------------

    async def arun(self, on_update: OnUpdate) -> None:
        """Watch the service, calling ``on_update`` on changes, until cancelled (one task per datacenter
        watched; the HTTP session is then closed)."""
        await _AsyncRun(self, on_update).run()

    def __repr__(self) -> str:
        o = self.options
        extra = "".join(
            f", {name}={value!r}"
            for name, value in (
                ("datacenter", o.datacenter),
                ("failover", list(o.failover) or None),
                ("tags", list(o.tags) or None),
                ("health", o.health),
            )
            if value is not None
        )
        return f"ConsulDiscovery({self.service!r}, address={self.connection.address!r}{extra})"


class _Watch:
    """One datacenter's running sync loop."""

    def __init__(self, session: AbortableSession) -> None:
        self.halt = threading.Event()
        self.session = session
        self.thread: threading.Thread | None = None

    def end(self) -> None:
        self.halt.set()
        self.session.abort()


class _SyncRun:
    """One :meth:`ConsulDiscovery.run`: the local datacenter's loop in the calling thread, the others in
    threads of their own while the failover wants them."""

    def __init__(self, discovery: ConsulDiscovery, on_update: OnUpdate, stop: threading.Event) -> None:
        self.d = discovery
        self.on_update = on_update
        self.stop = stop
        self.order = discovery.options.datacenters
        self.failover = DatacenterFailover(
            discovery.service, self.order, warm=discovery.options.failover_warm
        )
        self.lock = threading.Lock()
        self.watches: dict[str, _Watch] = {}
        self.threads: list[threading.Thread] = []

    def run(self) -> None:
        finished = threading.Event()
        primary = _Watch(AbortableSession(self.d.connection))
        self.watches[self.order[0]] = primary

        def abort_on_stop() -> None:
            while not self.stop.wait(_STOP_POLL):
                if finished.is_set():
                    return
            with self.lock:
                watches = list(self.watches.values())
            for watch in watches:
                watch.end()

        guard = threading.Thread(
            target=abort_on_stop, name=f"lbkit-consul-stop-{self.d.service}", daemon=True
        )
        guard.start()
        try:
            if self.d._zone_from_agent:
                self._read_zone(primary.session)
            with self.lock:
                self._reconcile()  # warm failover: the other datacenters are watched from the start
            self._loop(self.order[0], primary)
        finally:
            finished.set()
            with self.lock:
                watches = list(self.watches.values())
                self.watches.clear()
            for watch in watches:
                watch.end()
            for thread in self.threads:
                thread.join(5.0)
            primary.session.close()

    def _read_zone(self, session: AbortableSession) -> None:
        conn = self.d.connection
        try:
            response = session.get(
                f"{conn.address}/v1/agent/self", headers=conn.headers(), timeout=_SELF_TIMEOUT
            )
        except Exception as exc:
            logger.info(
                "consul service %r: cannot reach the local agent for this client's zone: %s",
                self.d.service,
                conn.redact(f"{type(exc).__name__}: {exc}"),
            )
            return
        self.d._take_zone(response.status_code, response.content)

    def _loop(self, dc: str, watch: _Watch) -> None:
        core = self.d._core(dc)
        session = watch.session
        while not self.stop.is_set() and not watch.halt.is_set():
            delay = core.delay()
            if delay > 0 and watch.halt.wait(delay):
                break
            if self.stop.is_set():
                break
            query = core.next_query()
            try:
                response = session.get(self.d._url(query), headers=query.headers, timeout=query.timeout)
                status, headers, body = response.status_code, response.headers, response.content
            except Exception as exc:
                if self.stop.is_set() or watch.halt.is_set():
                    break
                core.on_error(exc)
                self._settle(dc, None, failed=True)
                continue
            if self.stop.is_set() or watch.halt.is_set():
                break
            snapshot = core.on_response(status, headers, body)
            self._settle(dc, snapshot, failed=core.status.consecutive_errors > 0)

    def _settle(self, dc: str, snapshot: EndpointSet | None, *, failed: bool) -> None:
        """Hand a datacenter's answer to the failover; publish what it decides; start and end watches."""
        with self.lock:
            if self.stop.is_set() or (dc not in self.watches):
                return
            decided = self.failover.on_failure(dc) if failed else self.failover.on_answer(dc, snapshot)
            self._reconcile()
            if decided is not None:
                self.d._publish(self.on_update, self.failover, decided)

    def _reconcile(self) -> None:
        wanted = set(self.failover.wanted)
        for dc in [dc for dc in self.watches if dc not in wanted and dc != self.order[0]]:
            self.watches.pop(dc).end()
            self.failover.forget(dc)
        for dc in self.failover.wanted:
            if dc not in self.watches:
                watch = _Watch(AbortableSession(self.d.connection))
                watch.thread = threading.Thread(
                    target=self._run_secondary, args=(dc, watch), name=f"lbkit-consul-{dc}", daemon=True
                )
                self.watches[dc] = watch
                self.threads.append(watch.thread)
                watch.thread.start()

    def _run_secondary(self, dc: str, watch: _Watch) -> None:
        try:
            self._loop(dc, watch)
        except Exception:
            logger.exception("consul service %r: the watch of %r stopped", self.d.service, dc)
        finally:
            watch.session.close()


def _decode(core: ConsulWatchCore, status: int, headers: Any, chunks: list[bytes]) -> EndpointSet | None:
    """An answer's chunks joined and handed to the core (in a worker thread)."""
    return core.on_response(status, headers, b"".join(chunks))


class _AsyncRun:
    """One :meth:`ConsulDiscovery.arun`: a task per datacenter the failover wants, one HTTP session."""

    def __init__(self, discovery: ConsulDiscovery, on_update: OnUpdate) -> None:
        self.d = discovery
        self.on_update = on_update
        self.order = discovery.options.datacenters
        self.failover = DatacenterFailover(
            discovery.service, self.order, warm=discovery.options.failover_warm
        )
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.session: aiohttp.ClientSession | None = None
        conn = discovery.connection
        self.server_name = conn.tls_server_name if conn.scheme == "https" else None

    async def run(self) -> None:
        self.session = async_session(self.d.connection)
        try:
            if self.d._zone_from_agent:
                await self._read_zone()
            primary = asyncio.create_task(self._loop(self.order[0]), name=f"lbkit-consul-{self.d.service}")
            self.tasks[self.order[0]] = primary
            self._start_wanted()
            await primary
        finally:
            tasks = list(self.tasks.values())
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            await asyncio.shield(self.session.close())

    def _request_kwargs(self, timeout: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"timeout": aiohttp.ClientTimeout(total=timeout)}
        if self.server_name:
            kwargs["server_hostname"] = self.server_name
        return kwargs

    async def _read_zone(self) -> None:
        assert self.session is not None
        conn = self.d.connection
        try:
            async with self.session.get(
                f"{conn.address}/v1/agent/self", headers=conn.headers(), **self._request_kwargs(_SELF_TIMEOUT)
            ) as resp:
                status, body = resp.status, await resp.read()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.info(
                "consul service %r: cannot reach the local agent for this client's zone: %s",
                self.d.service,
                conn.redact(f"{type(exc).__name__}: {exc}"),
            )
            return
        self.d._take_zone(status, body)

    async def _loop(self, dc: str) -> None:
        assert self.session is not None
        core = self.d._core(dc)
        while True:
            delay = core.delay()
            if delay > 0:
                await asyncio.sleep(delay)
            query = core.next_query()
            try:
                async with self.session.get(
                    self.d._url(query), headers=query.headers, **self._request_kwargs(query.timeout)
                ) as resp:
                    status, headers = resp.status, resp.headers
                    chunks = [chunk async for chunk in resp.content.iter_any()]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                core.on_error(exc)
                self._settle(dc, None, failed=True)
                continue
            # Joining and decoding a big answer takes tens of milliseconds: off the loop, published on it.
            snapshot = await off_loop(_decode, core, status, headers, chunks)
            self._settle(dc, snapshot, failed=core.status.consecutive_errors > 0)

    def _start_wanted(self) -> None:
        for other in self.failover.wanted:
            if other not in self.tasks:
                self.tasks[other] = asyncio.create_task(self._loop(other), name=f"lbkit-consul-{other}")

    def _settle(self, dc: str, snapshot: EndpointSet | None, *, failed: bool) -> None:
        decided = self.failover.on_failure(dc) if failed else self.failover.on_answer(dc, snapshot)
        wanted = set(self.failover.wanted)
        for other in [o for o in self.tasks if o not in wanted and o != self.order[0]]:
            self.tasks.pop(other).cancel()
            self.failover.forget(other)
        self._start_wanted()
        if decided is not None:
            self.d._publish(self.on_update, self.failover, decided)
