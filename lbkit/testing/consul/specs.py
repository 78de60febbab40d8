"""Decoding and validating what clients send the test server: service, check and catalog registrations.

Consul accepts any key case and snake_case aliases in request bodies; so does this module. Errors are
:class:`ApiError` with Consul's status and text.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from lbkit.testing.consul.checks import CRITICAL, PASSING, WARNING, parse_duration

__all__ = [
    "STATUSES",
    "VERSION",
    "ApiError",
    "CheckSpec",
    "DeregisterRequest",
    "RegisterRequest",
    "ServiceSpec",
    "parse_check",
    "parse_deregister",
    "parse_register",
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
    locality: dict[str, str] | None = None
    """``{"Region": ..., "Zone": ...}`` when registered with a Locality."""
    namespace: str = "default"
    partition: str = "default"
    node: str = ""
    """The node it runs on (the agent's own for agent registrations)."""
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
            self.locality,
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


def _locality(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    loc = _norm(value, "Locality")
    region, zone = _field(loc, "region", str, "", "Region"), _field(loc, "zone", str, "", "Zone")
    return {"Region": region, "Zone": zone} if region or zone else None


def parse_service(raw: object, *, what: str = "request body") -> ServiceSpec:
    """Decode and validate a /v1/agent/service/register body (or the ``Service`` of a catalog
    registration) as Consul does, in Consul's order."""
    d = _norm(raw, what)
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
        locality=_locality(d.get("locality")),
        namespace=_field(d, "namespace", str, "", "Namespace"),
        partition=_field(d, "partition", str, "", "Partition"),
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


@dataclass
class RegisterRequest:
    """A ``PUT /v1/catalog/register`` body: a node, and optionally a service and checks on it."""

    node: str
    address: str
    node_id: str = ""
    datacenter: str = ""
    node_meta: dict[str, str] | None = None
    tagged_addresses: dict[str, str] | None = None
    locality: dict[str, str] | None = None
    service: ServiceSpec | None = None
    checks: list[tuple[CheckSpec, str]] = field(default_factory=list)
    """Each check with its ``Output``."""
    skip_node_update: bool = False
    namespace: str = ""
    partition: str = ""


@dataclass
class DeregisterRequest:
    """A ``PUT /v1/catalog/deregister`` body: a node, or one service or check on it."""

    node: str
    service_id: str = ""
    check_id: str = ""
    datacenter: str = ""
    namespace: str = ""
    partition: str = ""


def _catalog_check(raw: object) -> tuple[CheckSpec, str]:
    d = _norm(raw, "Check")
    definition = d.get("definition")
    spec = parse_check(definition) if isinstance(definition, dict) else CheckSpec()
    spec.check_id = _field(d, "checkid", str, "", "CheckID") or _field(d, "id", str, "", "ID")
    spec.name = _field(d, "name", str, "", "Name")
    spec.check_id = spec.check_id or spec.name  # as Consul's checkPreApply
    spec.status = _field(d, "status", str, "", "Status") or CRITICAL
    spec.notes = _field(d, "notes", str, "", "Notes")
    spec.service_id = _field(d, "serviceid", str, "", "ServiceID")
    if spec.status not in STATUSES:
        raise ApiError(500, f"Invalid check status: '{spec.status}'")
    return spec, _field(d, "output", str, "", "Output")


def parse_register(raw: object) -> RegisterRequest:
    """Decode and validate a catalog registration as Consul's Catalog.Register does (errors are 500
    with Consul's text, as the agent passes the server's error on)."""
    d = _norm(raw, "request body")
    req = RegisterRequest(
        node=_field(d, "node", str, "", "Node"),
        address=_field(d, "address", str, "", "Address"),
        node_id=_field(d, "id", str, "", "ID"),
        datacenter=_field(d, "datacenter", str, "", "Datacenter"),
        node_meta=_str_map(d.get("nodemeta"), "NodeMeta"),
        tagged_addresses=_str_map(d.get("taggedaddresses"), "TaggedAddresses"),
        locality=_locality(d.get("locality")),
        skip_node_update=_field(d, "skipnodeupdate", bool, False, "SkipNodeUpdate"),
        namespace=_field(d, "namespace", str, "", "Namespace"),
        partition=_field(d, "partition", str, "", "Partition"),
    )
    if not req.node:
        raise ApiError(500, "Must provide node")
    if req.node_id:
        try:
            uuid_text = req.node_id.replace("-", "")
            if len(uuid_text) != 32:
                raise ValueError(req.node_id)
            int(uuid_text, 16)
        except ValueError:
            raise ApiError(500, f"Bad node ID: uuid string is wrong length: {req.node_id!r}") from None
    if not req.address and not req.skip_node_update:
        raise ApiError(500, "Must provide address if SkipNodeUpdate is not set")
    service = d.get("service")
    if service is not None:
        sd = _norm(service, "Service")
        name = _field(sd, "service", str, "", "Service") or _field(sd, "name", str, "", "Name")
        sid = _field(sd, "id", str, "", "ID") or name
        if sid and not name:
            raise ApiError(500, "Must provide service name with ID")
        if name:
            body = {k: v for k, v in service.items() if str(k).lower() not in ("service", "name", "id")}
            body.update(Name=name, ID=sid)
            req.service = parse_service(body, what="Service")
            req.service.checks = []
    raw_checks = []
    if d.get("check"):
        raw_checks.append(d["check"])
    extra = d.get("checks") or []
    if not isinstance(extra, list):
        raise ApiError(400, f"Request decode failed: 'Checks' expected a list, got {extra!r}")
    raw_checks.extend(extra)
    req.checks = [_catalog_check(c) for c in raw_checks]
    return req


def parse_deregister(raw: object) -> DeregisterRequest:
    """Decode a catalog deregistration (a missing node is 500 ``Must provide node``)."""
    d = _norm(raw, "request body")
    req = DeregisterRequest(
        node=_field(d, "node", str, "", "Node"),
        service_id=_field(d, "serviceid", str, "", "ServiceID"),
        check_id=_field(d, "checkid", str, "", "CheckID"),
        datacenter=_field(d, "datacenter", str, "", "Datacenter"),
        namespace=_field(d, "namespace", str, "", "Namespace"),
        partition=_field(d, "partition", str, "", "Partition"),
    )
    if not req.node:
        raise ApiError(500, "Must provide node")
    return req
