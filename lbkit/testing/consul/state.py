"""The agent and catalog state behind :class:`ConsulServer`: registrations, checks, Raft-like indexes.

Everything here runs under one lock. Writes that Consul would commit to its catalog bump one
index counter and the index of each table they touch, and wake every waiting blocking query
through :attr:`ConsulState.changed`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lbkit._config import check_float, config
from lbkit.testing.consul.checks import (
    CRITICAL,
    OUTPUT_MAX,
    PASSING,
    WARNING,
    CheckRunner,
    format_duration,
    parse_duration,
    probe_grpc,
    probe_http,
    probe_tcp,
)

__all__ = [
    "VERSION",
    "ApiError",
    "CheckSpec",
    "ConsulState",
    "ConsulTimings",
    "ServiceSpec",
    "parse_check",
    "parse_service",
]

VERSION = "1.20.0"
STATUSES = (PASSING, WARNING, CRITICAL)
_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
_ANY_ADDRESSES = ("0.0.0.0", "::", "[::]")


class ApiError(Exception):
    """An HTTP error answer: status code and Consul's plain-text message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---- request decoding: Consul accepts any key case and snake_case aliases -------------------------


def _norm(raw: object, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ApiError(400, f"Request decode failed: {what} must be a JSON object, got {type(raw).__name__}")
    return {str(k).lower().replace("_", ""): v for k, v in raw.items()}


def _field(d: dict[str, Any], key: str, kind: type, default: Any, name: str) -> Any:
    value = d.get(key)
    if value is None:
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"Request decode failed: '{name}' expected type '{kind.__name__}', got {value!r}")
    return value


def _duration(d: dict[str, Any], key: str, name: str) -> float:
    value = d.get(key)
    if value is None or value == "":
        return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) / 1e9  # JSON numbers are nanoseconds, as in Consul
    if not isinstance(value, str):
        raise ApiError(400, f"Request decode failed: '{name}' expected a duration, got {value!r}")
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ApiError(400, f"Request decode failed: {exc}") from None


def _str_map(value: object, name: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ApiError(400, f"Request decode failed: '{name}' expected a map of strings, got {value!r}")
    return {str(k): v for k, v in value.items()}


@dataclass
class CheckSpec:
    """A check as registered: its identity and its type (what to run, how often)."""

    check_id: str = ""
    name: str = ""
    status: str = ""
    notes: str = ""
    service_id: str = ""
    ttl: float = 0.0
    interval: float = 0.0
    timeout: float = 0.0
    deregister_after: float = 0.0
    http: str = ""
    header: dict[str, list[str]] | None = None
    method: str = ""
    body: str = ""
    tls_server_name: str = ""
    tls_skip_verify: bool = False
    tcp: str = ""
    tcp_use_tls: bool = False
    grpc: str = ""
    grpc_use_tls: bool = False
    udp: str = ""
    h2ping: str = ""
    os_service: str = ""
    alias: str = ""
    script: bool = False

    @property
    def kind(self) -> str:
        """Consul's check Type."""
        for kind, set_ in (
            ("ttl", self.ttl > 0),
            ("http", self.http),
            ("tcp", self.tcp),
            ("grpc", self.grpc),
            ("udp", self.udp),
            ("h2ping", self.h2ping),
            ("os_service", self.os_service),
            ("alias", self.alias),
            ("script", self.script),
        ):
            if set_:
                return kind
        return ""

    def validate(self) -> None:
        """Consul's CheckType.Validate, as 400 'Invalid check: ...'."""
        periodic = self.script or any(
            (self.http, self.tcp, self.udp, self.grpc, self.h2ping, self.os_service)
        )
        problem = ""
        if self.interval > 0 and self.ttl > 0:
            problem = "Interval and TTL cannot both be specified"
        elif periodic and self.interval <= 0:
            problem = "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"
        elif periodic and self.alias:
            problem = "Interval cannot be set for Alias checks"
        elif self.alias and self.ttl > 0:
            problem = "TTL must be not be set for Alias checks"
        elif not periodic and not self.alias and self.ttl <= 0:
            problem = "TTL must be > 0 for TTL checks"
        if problem:
            raise ApiError(400, f"Invalid check: {problem}")


def parse_check(raw: object) -> CheckSpec:
    """Decode one check definition (any key case, snake_case accepted)."""
    d = _norm(raw, "Check")
    header = d.get("header")
    if header is not None and not (
        isinstance(header, dict)
        and all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in header.values())
    ):
        raise ApiError(400, f"Request decode failed: 'Header' expected a map of string lists, got {header!r}")
    script = bool(d.get("args") or d.get("scriptargs") or d.get("script") or d.get("dockercontainerid"))
    return CheckSpec(
        check_id=_field(d, "checkid", str, "", "CheckID") or _field(d, "id", str, "", "ID"),
        name=_field(d, "name", str, "", "Name"),
        status=_field(d, "status", str, "", "Status"),
        notes=_field(d, "notes", str, "", "Notes"),
        service_id=_field(d, "serviceid", str, "", "ServiceID"),
        ttl=_duration(d, "ttl", "TTL"),
        interval=_duration(d, "interval", "Interval"),
        timeout=_duration(d, "timeout", "Timeout"),
        deregister_after=_duration(d, "deregistercriticalserviceafter", "DeregisterCriticalServiceAfter"),
        http=_field(d, "http", str, "", "HTTP"),
        header=header,
        method=_field(d, "method", str, "", "Method"),
        body=_field(d, "body", str, "", "Body"),
        tls_server_name=_field(d, "tlsservername", str, "", "TLSServerName"),
        tls_skip_verify=_field(d, "tlsskipverify", bool, False, "TLSSkipVerify"),
        tcp=_field(d, "tcp", str, "", "TCP"),
        tcp_use_tls=_field(d, "tcpusetls", bool, False, "TCPUseTLS"),
        grpc=_field(d, "grpc", str, "", "GRPC"),
        grpc_use_tls=_field(d, "grpcusetls", bool, False, "GRPCUseTLS"),
        udp=_field(d, "udp", str, "", "UDP"),
        h2ping=_field(d, "h2ping", str, "", "H2PING"),
        os_service=_field(d, "osservice", str, "", "OSService"),
        alias=_field(d, "aliasservice", str, "", "AliasService")
        or _field(d, "aliasnode", str, "", "AliasNode"),
        script=script,
    )


@dataclass
class ServiceSpec:
    """A service as registered, plus its checks."""

    id: str
    name: str
    tags: list[str] | None = None
    address: str = ""
    port: int = 0
    meta: dict[str, str] | None = None
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    enable_tag_override: bool = False
    tagged_addresses: dict[str, dict[str, Any]] = field(default_factory=dict)
    kind: str = ""
    checks: list[CheckSpec] = field(default_factory=list)
    create_index: int = 0
    modify_index: int = 0

    def catalog_view(self) -> tuple[Any, ...]:
        """What the catalog stores of the service: a change here is a catalog write."""
        return (
            self.name,
            self.tags,
            self.address,
            self.port,
            self.meta,
            self.weights,
            self.enable_tag_override,
            self.tagged_addresses,
            self.kind,
        )


def _validate_meta(meta: dict[str, str] | None) -> None:
    if not meta:
        return
    if len(meta) > 64:
        raise ApiError(
            400, "Invalid Service Meta: Service metadata cannot contain more than 64 key/value pairs"
        )
    for key, value in meta.items():
        problem = ""
        if not key:
            problem = "Key cannot be blank"
        elif not _META_KEY.match(key):
            problem = "Key contains invalid characters"
        elif len(key) > 128:
            problem = "Key is too long (limit: 128 characters)"
        elif key.startswith("consul-"):
            problem = "Key prefix 'consul-' is reserved for internal use"
        elif len(value) > 512:
            problem = "Value is too long (limit: 512 characters)"
        if problem:
            raise ApiError(
                400, f"Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): {problem}"
            )


def parse_service(raw: object) -> ServiceSpec:
    """Decode and validate a /v1/agent/service/register body as Consul does, in Consul's order."""
    d = _norm(raw, "request body")
    name = _field(d, "name", str, "", "Name")
    if not name:
        raise ApiError(400, "Missing service name")
    address = _field(d, "address", str, "", "Address")
    if address in _ANY_ADDRESSES:
        raise ApiError(400, "Invalid service address")
    port = _field(d, "port", int, 0, "Port")
    tags = d.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise ApiError(400, f"Request decode failed: 'Tags' expected a list of strings, got {tags!r}")
    spec = ServiceSpec(
        id=_field(d, "id", str, "", "ID") or name,
        name=name,
        tags=list(tags) if tags is not None else None,
        address=address,
        port=port,
        meta=_str_map(d.get("meta"), "Meta"),
        enable_tag_override=_field(d, "enabletagoverride", bool, False, "EnableTagOverride"),
        kind=_field(d, "kind", str, "", "Kind"),
    )
    tagged = d.get("taggedaddresses")
    if tagged is not None:
        if not isinstance(tagged, dict):
            raise ApiError(400, f"Request decode failed: 'TaggedAddresses' expected a map, got {tagged!r}")
        for key, value in tagged.items():
            v = _norm(value, f"TaggedAddresses[{key!r}]")
            spec.tagged_addresses[str(key)] = {
                "Address": _field(v, "address", str, "", "Address"),
                "Port": _field(v, "port", int, 0, "Port"),
            }
    if "weights" in d and d["weights"] is not None:
        w = _norm(d["weights"], "Weights")
        passing, warning = _field(w, "passing", int, 0, "Passing"), _field(w, "warning", int, 0, "Warning")
        if passing < 1:
            raise ApiError(400, "Invalid Weights: Passing must be greater than 0")
        if warning < 0:
            raise ApiError(400, "Invalid Weights: Warning must be greater or equal than 0")
        spec.weights = {"Passing": passing, "Warning": warning}
    _validate_meta(spec.meta)
    raw_checks = []
    if d.get("check"):
        raw_checks.append(d["check"])
    extra = d.get("checks") or []
    if not isinstance(extra, list):
        raise ApiError(400, f"Request decode failed: 'Checks' expected a list, got {extra!r}")
    raw_checks.extend(extra)
    for raw_check in raw_checks:
        check = parse_check(raw_check)
        check.validate()
        spec.checks.append(check)
    for check in spec.checks:
        if check.status and check.status not in STATUSES:
            raise ApiError(400, "Status for checks must 'passing', 'warning', 'critical'")
    # As Consul's agent does: an IP address gets lan/wan tagged addresses of its family.
    try:
        family = f"ipv{ipaddress.ip_address(address).version}"
    except ValueError:
        family = ""
    if family:
        for scope in ("lan", "wan"):
            spec.tagged_addresses.setdefault(f"{scope}_{family}", {"Address": address, "Port": port})
    return spec


# ---- state -------------------------------------------------------------------------------------


@dataclass
class Check:
    """A registered check and its current state."""

    spec: CheckSpec
    check_id: str
    name: str
    service_id: str
    service_name: str
    service_tags: list[str]
    status: str
    output: str = ""
    catalog_output: str = ""
    create_index: int = 0
    modify_index: int = 0
    critical_since: float | None = None
    ttl_deadline: float | None = None
    runner: CheckRunner | None = None

    def catalog_view(self) -> tuple[Any, ...]:
        return (
            self.name,
            self.service_id,
            self.service_name,
            self.service_tags,
            self.spec.notes,
            self.spec.kind,
        )


@config
class ConsulTimings:
    """Timings Consul's agent builds in; their defaults are Consul's. Lower them to make tests fast."""

    min_check_interval: float = 1.0
    """Shortest Interval an HTTP, TCP or gRPC check runs at (Consul's ``checks.MinInterval``)."""
    check_reap_interval: float = 30.0
    """How often services with a long-critical check are reaped (Consul's ``check_reap_interval``)."""
    check_deregister_interval_min: float = 60.0
    """Floor of DeregisterCriticalServiceAfter (Consul's ``check_deregister_interval_min``)."""

    def __post_init__(self) -> None:
        for name in ("min_check_interval", "check_reap_interval", "check_deregister_interval_min"):
            check_float("ConsulTimings", name, getattr(self, name), minimum=0.0, strict_min=True)


class ConsulState:
    """One node's agent-local state and the catalog built from it, under one lock."""

    def __init__(self, *, datacenter: str, node_name: str, node_address: str, timings: ConsulTimings) -> None:
        self.datacenter = datacenter
        self.node_name = node_name
        self.node_address = node_address
        self.node_id = str(uuid.uuid4())
        self.timings = timings
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._timer_wake = threading.Condition(self.lock)
        self.index = 0
        self.tables = {"nodes": 0, "services": 0, "checks": 0}
        self.service_index: dict[str, int] = {}
        self.extinction_index = 0
        self.services: dict[str, ServiceSpec] = {}
        self.checks: dict[str, Check] = {}
        self.running = False
        self._timer: threading.Thread | None = None
        self.consul_service = ServiceSpec(
            id="consul", name="consul", port=8300, meta={"raft_version": "3", "version": VERSION}, tags=[]
        )
        with self.lock:
            self.node_index = self._write(("nodes", "checks"), ())
            self.consul_service.create_index = self._write(("services",), ("consul",))
            self.consul_service.modify_index = self.consul_service.create_index

    # -- indexes ---------------------------------------------------------------------------------

    def _names(self) -> set[str]:
        return {"consul"} | {s.name for s in self.services.values()}

    def _write(self, tables: Iterable[str], names: Iterable[str]) -> int:
        """Commit a catalog change touching ``tables`` and service ``names``; wake blocking queries."""
        self.index += 1
        for table in tables:
            self.tables[table] = self.index
        live = self._names()
        for name in names:
            if name in live:
                self.service_index[name] = self.index
            else:
                self.service_index.pop(name, None)
                self.extinction_index = self.index
        self.changed.notify_all()
        return self.index

    def service_name_index(self, name: str) -> int:
        """Index of the last change to service ``name`` or its health, as Consul's per-service index."""
        if name in self.service_index:
            return self.service_index[name]
        return self.extinction_index or max(self.tables.values())

    # -- writes ----------------------------------------------------------------------------------

    def register_service(self, spec: ServiceSpec, replace_existing_checks: bool) -> None:
        """Add or update a service and its checks; a catalog write only if something changed."""
        old = self.services.get(spec.id)
        tags = list(spec.tags or [])
        wanted: dict[str, Check] = {}
        for i, cs in enumerate(spec.checks):
            cid = cs.check_id or f"service:{spec.id}" + (f":{i + 1}" if len(spec.checks) > 1 else "")
            prev = self.checks.get(cid)
            check = Check(
                spec=cs,
                check_id=cid,
                name=cs.name or f"Service '{spec.name}' check",
                service_id=spec.id,
                service_name=spec.name,
                service_tags=tags,
                status=prev.status if prev else (cs.status or CRITICAL),
                output=prev.output if prev else "",
                catalog_output=prev.catalog_output if prev else "",
                critical_since=prev.critical_since if prev else None,
            )
            wanted[cid] = check
        dropped = [
            c.check_id
            for c in self.checks.values()
            if (c.service_id == spec.id and replace_existing_checks and c.check_id not in wanted)
            or (
                old is not None
                and old.name != spec.name
                and c.service_id == spec.id
                and c.check_id not in wanted
            )
        ]
        service_changed = old is None or old.catalog_view() != spec.catalog_view()
        checks_changed = bool(dropped) or any(
            cid not in self.checks
            or self.checks[cid].catalog_view() != c.catalog_view()
            or self.checks[cid].status != c.status
            for cid, c in wanted.items()
        )
        for cid in dropped:
            self._drop_check(cid)
        for check in self.checks.values():
            if check.service_id == spec.id and check.check_id not in wanted:
                check.service_tags = tags
        self.services[spec.id] = spec
        spec.create_index = old.create_index if old else 0
        spec.modify_index = old.modify_index if old else 0
        for cid, check in wanted.items():
            prev = self.checks.get(cid)
            if prev is not None:
                check.create_index, check.modify_index = prev.create_index, prev.modify_index
                self._stop_runner(prev)
            self.checks[cid] = check
            self._arm(check)
        if service_changed or checks_changed:
            names = {spec.name} | ({old.name} if old else set())
            tables = ("services", "checks") if checks_changed else ("services",)
            idx = self._write(tables, names)
            if service_changed:
                spec.modify_index = idx
                spec.create_index = spec.create_index or idx
            for check in wanted.values():
                check.create_index = check.create_index or idx
                check.modify_index = idx
        self._timer_wake.notify_all()

    def deregister_service(self, service_id: str) -> None:
        """Remove a service and its checks."""
        spec = self.services.pop(service_id)
        for cid in [c.check_id for c in self.checks.values() if c.service_id == service_id]:
            self._drop_check(cid)
        self._write(("services", "checks"), (spec.name,))

    def register_check(self, cs: CheckSpec) -> None:
        """Add or replace a check (a node check, or one of an existing service)."""
        svc = self.services.get(cs.service_id) if cs.service_id else None
        cid = cs.check_id or cs.name
        prev = self.checks.get(cid)
        if prev is not None:
            self._stop_runner(prev)
        check = Check(
            spec=cs,
            check_id=cid,
            name=cs.name,
            service_id=svc.id if svc else "",
            service_name=svc.name if svc else "",
            service_tags=list(svc.tags or []) if svc else [],
            status=cs.status or CRITICAL,
        )
        check.critical_since = time.monotonic() if check.status == CRITICAL else None
        self.checks[cid] = check
        self._arm(check)
        idx = self._write(("checks",), self._names_for(check))
        check.create_index = prev.create_index if prev else idx
        check.modify_index = idx
        self._timer_wake.notify_all()

    def deregister_check(self, check_id: str) -> None:
        """Remove a check."""
        check = self._drop_check(check_id)
        self._write(("checks",), self._names_for(check))

    def update_ttl(self, check_id: str, status: str, output: str) -> None:
        """Set a TTL check's status and output and restart its TTL; ApiError 500 if it has no TTL."""
        check = self.checks[check_id]
        if check.spec.ttl <= 0:
            raise ApiError(500, f'CheckID "{check_id}" does not have associated TTL')
        if len(output) > OUTPUT_MAX:
            output = f"{output[:OUTPUT_MAX]} ... (captured {OUTPUT_MAX} of {len(output)} bytes)"
        check.ttl_deadline = time.monotonic() + check.spec.ttl
        self._set_status(check, status, output)
        self._timer_wake.notify_all()

    def _names_for(self, check: Check) -> Iterable[str]:
        return (check.service_name,) if check.service_name else self._names()

    def _drop_check(self, check_id: str) -> Check:
        check = self.checks.pop(check_id)
        self._stop_runner(check)
        return check

    def _set_status(self, check: Check, status: str, output: str) -> None:
        """Record a check result. As Consul's agent does, only a status change is synced to the catalog
        at once (an output-only change stays agent-local)."""
        check.output = output
        if status == check.status:
            return
        check.status = status
        check.catalog_output = output
        check.critical_since = time.monotonic() if status == CRITICAL else None
        check.modify_index = self._write(("checks",), self._names_for(check))

    # -- active checks, TTLs and the critical-service reaper ---------------------------------------

    def _arm(self, check: Check) -> None:
        cs = check.spec
        if cs.ttl > 0:
            check.ttl_deadline = time.monotonic() + cs.ttl
        if check.status == CRITICAL and check.critical_since is None:
            check.critical_since = time.monotonic()
        if not self.running or cs.interval <= 0:
            return
        probe = self._probe_for(cs)
        if probe is None:
            self._set_status(check, CRITICAL, f"{cs.kind} checks are not run by lbkit ConsulServer")
            return
        interval = max(cs.interval, self.timings.min_check_interval)
        check.runner = CheckRunner(check.check_id, probe, interval, self._reporter(check))

    def _probe_for(self, cs: CheckSpec) -> Callable[[], tuple[str, str]] | None:
        timeout = cs.timeout or 10.0
        if cs.grpc:
            return lambda: probe_grpc(cs.grpc, use_tls=cs.grpc_use_tls, timeout=timeout)
        if cs.tcp:
            return lambda: probe_tcp(cs.tcp, timeout)
        if cs.http:
            return lambda: probe_http(
                cs.http,
                method=cs.method,
                header=cs.header or {},
                body=cs.body,
                timeout=timeout,
                tls_skip_verify=cs.tls_skip_verify,
            )
        return None

    def _reporter(self, check: Check) -> Callable[[str, str], None]:
        def report(status: str, output: str) -> None:
            with self.lock:
                if self.checks.get(check.check_id) is check and self.running:
                    self._set_status(check, status, output)

        return report

    @staticmethod
    def _stop_runner(check: Check) -> None:
        if check.runner is not None:
            check.runner.stop()
            check.runner = None

    def start(self) -> None:
        """Start active checks, TTL timers and the reaper (call with the lock held)."""
        self.running = True
        for check in self.checks.values():
            self._arm(check)
        self._timer = threading.Thread(target=self._timer_loop, name="consul-ttl-reaper", daemon=True)
        self._timer.start()

    def stop(self) -> list[threading.Thread]:
        """Stop them (call with the lock held); returns the threads to join after releasing it."""
        self.running = False
        threads = []
        for check in self.checks.values():
            if check.runner is not None:
                threads.append(check.runner.thread)
            self._stop_runner(check)
        if self._timer is not None:
            threads.append(self._timer)
        self._timer_wake.notify_all()
        self.changed.notify_all()
        return threads

    def _timer_loop(self) -> None:
        with self.lock:
            next_reap = time.monotonic() + self.timings.check_reap_interval
            while self.running:
                now = time.monotonic()
                for check in list(self.checks.values()):
                    if check.ttl_deadline is not None and check.ttl_deadline <= now:
                        check.ttl_deadline = None
                        last = check.output
                        expired = (
                            f"TTL expired (last output before timeout follows): {last}"
                            if last
                            else "TTL expired"
                        )
                        self._set_status(check, CRITICAL, expired)
                if now >= next_reap:
                    self._reap(now)
                    next_reap = now + self.timings.check_reap_interval
                deadlines = [c.ttl_deadline for c in self.checks.values() if c.ttl_deadline is not None]
                self._timer_wake.wait(max(0.0, min([next_reap, *deadlines]) - time.monotonic()))

    def _reap(self, now: float) -> None:
        for check in list(self.checks.values()):
            after = check.spec.deregister_after
            if after <= 0 or check.critical_since is None or check.service_id not in self.services:
                continue
            if now - check.critical_since >= max(after, self.timings.check_deregister_interval_min):
                self.deregister_service(check.service_id)

    # -- JSON views --------------------------------------------------------------------------------

    def node_json(self) -> dict[str, Any]:
        a = self.node_address
        return {
            "ID": self.node_id,
            "Node": self.node_name,
            "Address": a,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": a, "lan_ipv4": a, "wan": a, "wan_ipv4": a},
            "Meta": {"consul-network-segment": "", "consul-version": VERSION},
            "CreateIndex": self.node_index,
            "ModifyIndex": self.node_index,
        }

    def all_services(self) -> list[ServiceSpec]:
        """Catalog services (the agent's plus the built-in ``consul``), in Consul's order."""
        return sorted([self.consul_service, *self.services.values()], key=lambda s: s.id)

    @staticmethod
    def _tagged(spec: ServiceSpec) -> dict[str, Any]:
        return {k: dict(v) for k, v in spec.tagged_addresses.items()}

    def service_json(self, spec: ServiceSpec) -> dict[str, Any]:
        """A NodeService as the catalog and health endpoints return it."""
        out: dict[str, Any] = {
            "ID": spec.id,
            "Service": spec.name,
            "Tags": list(spec.tags or []),
            "Address": spec.address,
            "Meta": dict(spec.meta) if spec.meta is not None else None,
            "Port": spec.port,
            "Weights": dict(spec.weights),
            "EnableTagOverride": spec.enable_tag_override,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "CreateIndex": spec.create_index,
            "ModifyIndex": spec.modify_index,
        }
        if spec.kind:
            out["Kind"] = spec.kind
        if spec.tagged_addresses:
            out["TaggedAddresses"] = self._tagged(spec)
        return out

    def agent_service_json(self, spec: ServiceSpec) -> dict[str, Any]:
        """A service as /v1/agent/services returns it."""
        out: dict[str, Any] = {
            "ID": spec.id,
            "Service": spec.name,
            "Tags": list(spec.tags or []),
            "Meta": dict(spec.meta or {}),
            "Port": spec.port,
            "Address": spec.address,
            "Weights": dict(spec.weights),
            "EnableTagOverride": spec.enable_tag_override,
            "Datacenter": self.datacenter,
        }
        if spec.kind:
            out["Kind"] = spec.kind
        if spec.tagged_addresses:
            out["TaggedAddresses"] = self._tagged(spec)
        return out

    @staticmethod
    def content_hash(view: dict[str, Any]) -> str:
        return hashlib.blake2b(json.dumps(view, sort_keys=True).encode(), digest_size=8).hexdigest()

    def check_json(self, check: Check, *, catalog: bool) -> dict[str, Any]:
        """A HealthCheck; ``catalog`` picks the output last synced to the catalog."""
        cs = check.spec
        periodic = cs.interval > 0
        return {
            "Node": self.node_name,
            "CheckID": check.check_id,
            "Name": check.name,
            "Status": check.status,
            "Notes": cs.notes,
            "Output": check.catalog_output if catalog else check.output,
            "ServiceID": check.service_id,
            "ServiceName": check.service_name,
            "ServiceTags": list(check.service_tags),
            "Type": cs.kind,
            "Interval": format_duration(cs.interval) if periodic else "",
            "Timeout": format_duration(cs.timeout) if periodic and cs.timeout else "",
            "ExposedPort": 0,
            "Definition": {
                "Interval": format_duration(cs.interval),
                "Timeout": format_duration(cs.timeout),
                "DeregisterCriticalServiceAfter": format_duration(cs.deregister_after),
                "HTTP": cs.http,
                "Header": cs.header,
                "Method": cs.method,
                "Body": cs.body,
                "TLSServerName": cs.tls_server_name,
                "TLSSkipVerify": cs.tls_skip_verify,
                "TCP": cs.tcp,
                "TCPUseTLS": cs.tcp_use_tls,
                "GRPC": cs.grpc,
                "GRPCUseTLS": cs.grpc_use_tls,
            },
            "CreateIndex": check.create_index if catalog else 0,
            "ModifyIndex": check.modify_index if catalog else 0,
        }

    def serf_check_json(self) -> dict[str, Any]:
        """The node's serfHealth check, always passing."""
        return {
            "Node": self.node_name,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": PASSING,
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.node_index,
            "ModifyIndex": self.node_index,
        }

    def catalog_checks(self) -> list[dict[str, Any]]:
        """Every check in the catalog (serfHealth included), in Consul's order."""
        views = [self.serf_check_json(), *(self.check_json(c, catalog=True) for c in self.checks.values())]
        return sorted(views, key=lambda v: v["CheckID"])

    def service_node_json(self, spec: ServiceSpec) -> dict[str, Any]:
        """A ServiceNode as /v1/catalog/service/<name> returns it."""
        node = self.node_json()
        svc = self.service_json(spec)
        out: dict[str, Any] = {
            "ID": node["ID"],
            "Node": node["Node"],
            "Address": node["Address"],
            "Datacenter": node["Datacenter"],
            "TaggedAddresses": node["TaggedAddresses"],
            "NodeMeta": node["Meta"],
            "ServiceKind": spec.kind,
            "ServiceID": spec.id,
            "ServiceName": spec.name,
            "ServiceTags": svc["Tags"],
            "ServiceAddress": spec.address,
            "ServiceWeights": svc["Weights"],
            "ServiceMeta": svc["Meta"],
            "ServicePort": spec.port,
            "ServiceSocketPath": "",
            "ServiceEnableTagOverride": spec.enable_tag_override,
            "ServiceProxy": svc["Proxy"],
            "ServiceConnect": {},
            "CreateIndex": spec.create_index,
            "ModifyIndex": spec.modify_index,
        }
        if spec.tagged_addresses:
            out["ServiceTaggedAddresses"] = self._tagged(spec)
        return out

    def health_entries(self, name: str) -> list[dict[str, Any]]:
        """/v1/health/service/<name> entries: Node, Service and the node's and the service's checks."""
        checks = self.catalog_checks()
        return [
            {
                "Node": self.node_json(),
                "Service": self.service_json(spec),
                "Checks": [c for c in checks if c["ServiceID"] in ("", spec.id)],
            }
            for spec in self.all_services()
            if spec.name == name
        ]
