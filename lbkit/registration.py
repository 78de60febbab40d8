"""Announce a gRPC server in Consul: register it with a gRPC or TTL health check, deregister on exit.

    with lbkit.registration.register("inference", "10.0.0.5:50051", check=lbkit.registration.GrpcCheck()):
        server.wait_for_termination()

A TTL check gets a heartbeat thread (or task) that refreshes it every TTL/3; a gRPC check is run by the
agent itself against ``grpc.health.v1.Health``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, cast

from lbkit._config import check_float, check_int, config
from lbkit.discovery.consul_connection import ConsulConnection, format_duration, resolve_connection
from lbkit.discovery.consul_http import async_client, sync_client
from lbkit.endpoint import parse_address
from lbkit.errors import ConfigError, RegistrationError

__all__ = [
    "TTL_STATUSES",
    "AsyncRegistration",
    "GrpcCheck",
    "Registration",
    "RegistrationError",
    "TtlCheck",
    "register",
    "service_definition",
]

logger = logging.getLogger("lbkit.registration")

TTL_STATUSES = ("passing", "warning", "critical")


def _check_deregister_after(owner: str, value: object) -> None:
    if value is not None:
        check_float(owner, "deregister_after", value, minimum=1.0)


@config
class GrpcCheck:
    """A check the agent runs itself: ``grpc.health.v1.Health/Check`` against ``target``.

    ``target`` is ``host:port`` or ``host:port/service``; None means the registered address (with
    ``service`` appended when given).
    """

    target: str | None = None
    service: str = ""
    """The name sent in the health request ("" asks about the whole server)."""
    use_tls: bool = False
    interval: float = 10.0
    timeout: float = 5.0
    deregister_after: float | None = 60.0
    """Seconds critical before the agent deregisters the instance (None: never)."""

    def __post_init__(self) -> None:
        owner = "GrpcCheck"
        if self.target is not None:
            host_port, _, _ = self.target.partition("/") if isinstance(self.target, str) else ("", "", "")
            try:
                parse_address(host_port)
            except ConfigError:
                raise ConfigError(
                    f"{owner}: target must be 'host:port' or 'host:port/service', got {self.target!r}"
                ) from None
        if not isinstance(self.service, str) or "/" in self.service:
            raise ConfigError(f"{owner}: service must be a str without '/', got {self.service!r}")
        if not isinstance(self.use_tls, bool):
            raise ConfigError(f"{owner}: use_tls must be a bool, got {self.use_tls!r}")
        check_float(owner, "interval", self.interval, minimum=0.0, strict_min=True)
        check_float(owner, "timeout", self.timeout, minimum=0.0, strict_min=True)
        _check_deregister_after(owner, self.deregister_after)

    def definition(self, address: str, check_id: str, name: str) -> dict[str, Any]:
        """The check's JSON for the agent's service registration."""
        target = self.target or address
        if self.service and "/" not in target:
            target = f"{target}/{self.service}"
        check: dict[str, Any] = {
            "CheckID": check_id,
            "Name": name,
            "GRPC": target,
            "GRPCUseTLS": self.use_tls,
            "Interval": format_duration(self.interval),
            "Timeout": format_duration(self.timeout),
        }
        if self.deregister_after is not None:
            check["DeregisterCriticalServiceAfter"] = format_duration(self.deregister_after)
        return check


@config
class TtlCheck:
    """A check the server keeps passing itself: the registration refreshes it every ``ttl / 3``."""

    ttl: float = 10.0
    deregister_after: float | None = 60.0
    """Seconds critical before the agent deregisters the instance (None: never)."""

    def __post_init__(self) -> None:
        check_float("TtlCheck", "ttl", self.ttl, minimum=0.0, strict_min=True)
        _check_deregister_after("TtlCheck", self.deregister_after)

    def definition(self, address: str, check_id: str, name: str) -> dict[str, Any]:
        """The check's JSON for the agent's service registration."""
        check: dict[str, Any] = {"CheckID": check_id, "Name": name, "TTL": format_duration(self.ttl)}
        if self.deregister_after is not None:
            check["DeregisterCriticalServiceAfter"] = format_duration(self.deregister_after)
        return check


def service_definition(
    name: str,
    address: str,
    *,
    service_id: str | None = None,
    tags: Iterable[str] = (),
    meta: Mapping[str, str] | None = None,
    weight: int = 1,
    warning_weight: int = 1,
    check: GrpcCheck | TtlCheck | None = None,
) -> dict[str, Any]:
    """The JSON body of ``PUT /v1/agent/service/register``, validated (ConfigError names a bad value)."""
    owner = "Registration"
    if not isinstance(name, str) or not name or "/" in name or name != name.strip():
        raise ConfigError(f"{owner}: name must be a non-empty service name without '/', got {name!r}")
    host, port = parse_address(address)
    if service_id is None:
        service_id = f"{name}-{host}-{port}"
    if not isinstance(service_id, str) or not service_id or "/" in service_id:
        raise ConfigError(f"{owner}: service_id must be a non-empty str without '/', got {service_id!r}")
    if isinstance(tags, str):
        tags = [tags]
    tag_list = list(tags)
    if not all(isinstance(t, str) and t for t in tag_list):
        raise ConfigError(f"{owner}: tags must be non-empty str, got {tag_list!r}")
    meta_map = dict(meta or {})
    if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in meta_map.items()):
        raise ConfigError(f"{owner}: meta must map non-empty str keys to str values, got {meta_map!r}")
    check_int(owner, "weight", weight, minimum=1)
    check_int(owner, "warning_weight", warning_weight, minimum=0)
    if check is not None and not isinstance(check, (GrpcCheck, TtlCheck)):
        raise ConfigError(f"{owner}: check must be a GrpcCheck, a TtlCheck or None, got {check!r}")
    body: dict[str, Any] = {
        "ID": service_id,
        "Name": name,
        "Address": host,
        "Port": port,
        "Tags": tag_list,
        "Meta": meta_map,
        "Weights": {"Passing": weight, "Warning": warning_weight},
    }
    if check is not None:
        body["Checks"] = [
            check.definition(address, f"service:{service_id}", f"{name} {type(check).__name__}")
        ]
    return body


class _Base:
    """What the sync and asyncio registrations share: validated definition and connection."""

    def __init__(
        self,
        name: str,
        address: str,
        *,
        service_id: str | None = None,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        weight: int = 1,
        warning_weight: int = 1,
        check: GrpcCheck | TtlCheck | None = None,
        consul_address: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
        ca_file: str | None = None,
        ca_path: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        verify: bool | None = None,
        tls_server_name: str | None = None,
        namespace: str | None = None,
        partition: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.definition = service_definition(
            name,
            address,
            service_id=service_id,
            tags=tags,
            meta=meta,
            weight=weight,
            warning_weight=warning_weight,
            check=check,
        )
        self.name = name
        self.address = address
        self.service_id: str = self.definition["ID"]
        self.check = check
        self.check_id = f"service:{self.service_id}" if check is not None else None
        self.connection: ConsulConnection = resolve_connection(
            address=consul_address,
            token=token,
            token_file=token_file,
            ca_file=ca_file,
            ca_path=ca_path,
            cert_file=cert_file,
            key_file=key_file,
            verify=verify,
            tls_server_name=tls_server_name,
            namespace=namespace,
            partition=partition,
            env=os.environ if env is None else env,
            owner=type(self).__name__,
        )
        self.registered = False
        self._status = "passing"
        self._note = ""

    @property
    def ttl_interval(self) -> float | None:
        """Seconds between heartbeats (TTL / 3), or None without a TTL check."""
        return self.check.ttl / 3 if isinstance(self.check, TtlCheck) else None

    def _check_status(self, status: str) -> None:
        if not isinstance(self.check, TtlCheck):
            raise ConfigError(
                f"{type(self).__name__}: set_status needs a TtlCheck, the check is {self.check!r}"
            )
        if status not in TTL_STATUSES:
            raise ConfigError(
                f"{type(self).__name__}: status must be one of {list(TTL_STATUSES)}, got {status!r}"
            )

    def _put_body(self) -> str:
        return json.dumps(self.definition)

    def __repr__(self) -> str:
        state = "registered" if self.registered else "not registered"
        return (
            f"{type(self).__name__}({self.name!r}, {self.address!r}, id={self.service_id!r}, "
            f"consul={self.connection.address!r}, {state})"
        )


def _raw(response: Any) -> Any:
    return response


class _HeartbeatOutage:
    """Logs a run of failed TTL heartbeats once when it starts and once when it ends."""

    def __init__(self, service_id: str, redact: Callable[[str], str]) -> None:
        self._service_id = service_id
        self._redact = redact
        self._failing = False

    def ok(self) -> None:
        if self._failing:
            logger.info("heartbeat of %s reaches consul again", self._service_id)
        self._failing = False

    def failed(self, exc: Exception) -> None:
        if not self._failing:
            logger.warning("heartbeat of %s failed, retrying: %s", self._service_id, self._redact(str(exc)))
        self._failing = True


def _ok(response: Any, what: str) -> None:
    if response.code != 200:
        text = " ".join(str(response.body).split())[:200]
        raise RegistrationError(response.code, f"{what}: HTTP {response.code}: {text}")


_TTL_PATHS = {"passing": "pass", "warning": "warn", "critical": "fail"}


class Registration(_Base):
    """A service instance registered with the local Consul agent while the context is open.

    Exiting (or :meth:`close`) stops the TTL heartbeat and deregisters the instance; a failed
    deregistration is logged, and ``deregister_after`` of the check is the safety net.
    """

    def __init__(self, name: str, address: str, **kwargs: Any) -> None:
        super().__init__(name, address, **kwargs)
        self._client: Any = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lock = threading.Lock()

    def _agent(self) -> Any:
        if self._client is None:
            self._client = sync_client(self.connection)
        return self._client

    def _put(self, path: str, *, body: str = "", params: list[tuple[str, str]] | None = None) -> None:
        try:
            response = self._agent().http.put(
                _raw,
                path,
                params=[*(params or []), *self.connection.scope_params()],
                data=body,
                headers=self.connection.headers(),
            )
        except Exception as exc:
            text = self.connection.redact(f"{path}: {type(exc).__name__}: {exc}")
            raise RegistrationError(0, f"{text} (consul at {self.connection.address})") from exc
        _ok(response, path)

    def register(self) -> Registration:
        """Register the instance (and its check); start the heartbeat for a TTL check."""
        self._put("/v1/agent/service/register", body=self._put_body())
        self.registered = True
        logger.info(
            "registered %s (%s) with consul at %s", self.service_id, self.address, self.connection.address
        )
        if self.ttl_interval is not None:
            try:
                self._refresh()
            except BaseException:
                self.deregister()
                raise
            self._stop.clear()
            self._heartbeat = threading.Thread(
                target=self._beat, name=f"lbkit-consul-ttl-{self.service_id}", daemon=True
            )
            self._heartbeat.start()
        return self

    def set_status(self, status: str, note: str = "") -> None:
        """Set the TTL check to passing, warning or critical now; the heartbeat keeps that status."""
        self._check_status(status)
        with self._lock:
            self._status, self._note = status, note
        self._refresh()

    def _refresh(self) -> None:
        with self._lock:
            status, note = self._status, self._note
        params = [("note", note)] if note else []
        self._put(f"/v1/agent/check/{_TTL_PATHS[status]}/{self.check_id}", params=params)

    def _beat(self) -> None:
        interval = cast(float, self.ttl_interval)
        outage = _HeartbeatOutage(self.service_id, self.connection.redact)
        while not self._stop.wait(interval):
            try:
                try:
                    self._refresh()
                except RegistrationError as exc:
                    if exc.status != 404:
                        raise
                    # The agent lost the check (it restarted without state): register again.
                    self._put("/v1/agent/service/register", body=self._put_body())
                    self._refresh()
                outage.ok()
            except Exception as exc:
                outage.failed(exc)

    def stop_heartbeat(self) -> None:
        """Stop refreshing the TTL check (the agent marks it critical when the TTL runs out)."""
        self._stop.set()
        thread, self._heartbeat = self._heartbeat, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def deregister(self) -> bool:
        """Stop the heartbeat and deregister the instance; False (logged) when the agent could not be told."""
        self.stop_heartbeat()
        if not self.registered:
            return True
        try:
            self._put(f"/v1/agent/service/deregister/{self.service_id}")
        except Exception as exc:
            logger.warning("could not deregister %s: %s", self.service_id, self.connection.redact(str(exc)))
            return False
        self.registered = False
        logger.info("deregistered %s from consul", self.service_id)
        return True

    def close(self) -> None:
        """Deregister and release the HTTP session."""
        self.deregister()
        client, self._client = self._client, None
        if client is not None:
            client.http.session.close()

    def __enter__(self) -> Registration:
        if not self.registered:
            self.register()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def register(name: str, address: str, **kwargs: Any) -> Registration:
    """Register ``name`` at ``address`` (``host:port``) now; use the result as a context manager to
    deregister on exit. RegistrationError if the agent refuses or cannot be reached.

    Keyword options are those of :class:`Registration`: ``service_id``, ``tags``, ``meta``, ``weight``,
    ``warning_weight``, ``check``, ``consul_address``, ``token``, ``token_file``, ``ca_file``,
    ``ca_path``, ``cert_file``, ``key_file``, ``verify``, ``tls_server_name``, ``namespace``,
    ``partition``, ``env``.
    """
    return Registration(name, address, **kwargs).register()


class AsyncRegistration(_Base):
    """The asyncio twin of :class:`Registration`: ``async with AsyncRegistration(...)``; the TTL
    heartbeat is a task."""

    def __init__(self, name: str, address: str, **kwargs: Any) -> None:
        super().__init__(name, address, **kwargs)
        self._client: Any = None
        self._heartbeat: asyncio.Task[None] | None = None

    async def _put(self, path: str, *, body: str = "", params: list[tuple[str, str]] | None = None) -> None:
        if self._client is None:
            self._client = async_client(self.connection)
        try:
            response = await self._client.http.put(
                _raw,
                path,
                params=[*(params or []), *self.connection.scope_params()],
                data=body,
                headers=self.connection.headers(),
            )
        except Exception as exc:
            text = self.connection.redact(f"{path}: {type(exc).__name__}: {exc}")
            raise RegistrationError(0, f"{text} (consul at {self.connection.address})") from exc
        _ok(response, path)

    async def register(self) -> AsyncRegistration:
        """Register the instance (and its check); start the heartbeat task for a TTL check."""
        await self._put("/v1/agent/service/register", body=self._put_body())
        self.registered = True
        logger.info(
            "registered %s (%s) with consul at %s", self.service_id, self.address, self.connection.address
        )
        if self.ttl_interval is not None:
            try:
                await self._refresh()
            except BaseException:
                await self.deregister()
                raise
            self._heartbeat = asyncio.create_task(self._beat(), name=f"lbkit-consul-ttl-{self.service_id}")
        return self

    async def set_status(self, status: str, note: str = "") -> None:
        """Set the TTL check to passing, warning or critical now; the heartbeat keeps that status."""
        self._check_status(status)
        self._status, self._note = status, note
        await self._refresh()

    async def _refresh(self) -> None:
        params = [("note", self._note)] if self._note else []
        await self._put(f"/v1/agent/check/{_TTL_PATHS[self._status]}/{self.check_id}", params=params)

    async def _beat(self) -> None:
        interval = cast(float, self.ttl_interval)
        outage = _HeartbeatOutage(self.service_id, self.connection.redact)
        while True:
            await asyncio.sleep(interval)
            try:
                try:
                    await self._refresh()
                except RegistrationError as exc:
                    if exc.status != 404:
                        raise
                    await self._put("/v1/agent/service/register", body=self._put_body())
                    await self._refresh()
                outage.ok()
            except Exception as exc:
                outage.failed(exc)

    async def stop_heartbeat(self) -> None:
        """Stop refreshing the TTL check."""
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def deregister(self) -> bool:
        """Stop the heartbeat and deregister the instance; False (logged) when the agent could not be told."""
        await self.stop_heartbeat()
        if not self.registered:
            return True
        try:
            await self._put(f"/v1/agent/service/deregister/{self.service_id}")
        except Exception as exc:
            logger.warning("could not deregister %s: %s", self.service_id, self.connection.redact(str(exc)))
            return False
        self.registered = False
        logger.info("deregistered %s from consul", self.service_id)
        return True

    async def close(self) -> None:
        """Deregister and close the HTTP session."""
        try:
            await self.deregister()
        finally:
            client, self._client = self._client, None
            if client is not None:
                await client.close()

    async def __aenter__(self) -> AsyncRegistration:
        if not self.registered:
            await self.register()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
