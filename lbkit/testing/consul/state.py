"""The catalog and agent state behind :class:`ConsulServer`: nodes, services, checks, Raft-like indexes.

Everything here runs under one lock. Writes that Consul would commit to its catalog bump one index
counter and the index of each table they touch, and wake every waiting blocking query through
:attr:`ConsulState.changed`. The agent's own node runs its checks (TTL, gRPC, TCP, HTTP); nodes
registered through the catalog are external: their checks only change when a client writes them.

Services are keyed by (partition, node, namespace, ID) and checks by (partition, node, namespace, check
ID), as Consul Enterprise keys them; without Enterprise every partition and namespace is ``default``.
"""

from __future__ import annotations

import hashlib
import heapq
import json
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
    CheckRunner,
    format_duration,
    probe_grpc,
    probe_http,
    probe_tcp,
)
from lbkit.testing.consul.specs import (
    STATUSES,
    VERSION,
    ApiError,
    CheckSpec,
    DeregisterRequest,
    RegisterRequest,
    ServiceSpec,
)

__all__ = [
    "DEFAULT",
    "NODE_MAINT_CHECK_ID",
    "SERVICE_MAINT_PREFIX",
    "STATUSES",
    "VERSION",
    "Check",
    "ConsulState",
    "ConsulTimings",
    "HealthEntry",
    "Node",
]

DEFAULT = "default"
SERVICE_MAINT_PREFIX = "_service_maintenance:"
NODE_MAINT_CHECK_ID = "_node_maintenance"
_DEFAULT_SERVICE_MAINT_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)
_DEFAULT_NODE_MAINT_REASON = (
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
)

SvcKey = tuple[str, str, str, str]
"""(partition, node, namespace, service ID)."""
CheckKey = tuple[str, str, str, str]
"""(partition, node, namespace, check ID); node checks are in the default namespace."""
NameKey = tuple[str, str, str]
"""(partition, namespace, service name)."""
NodeKey = tuple[str, str]
"""(partition, node name)."""


@dataclass
class Node:
    """A node of the catalog: the agent's own, or one registered through ``catalog/register``."""

    name: str
    address: str
    id: str
    partition: str = DEFAULT
    meta: dict[str, str] = field(default_factory=dict)
    tagged_addresses: dict[str, str] = field(default_factory=dict)
    locality: dict[str, str] | None = None
    agent: bool = False
    """The agent's own node: its checks run here, and only agent endpoints change it."""
    create_index: int = 0
    modify_index: int = 0


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
    node: str = ""
    partition: str = DEFAULT
    namespace: str = DEFAULT
    output: str = ""
    catalog_output: str = ""
    create_index: int = 0
    modify_index: int = 0
    critical_since: float | None = None
    ttl_deadline: float | None = None
    runner: CheckRunner | None = None
    catalog_only: bool = False
    """Not one of the agent's checks (serfHealth, maintenance-free catalog checks of external nodes)."""

    @property
    def key(self) -> CheckKey:
        return (self.partition, self.node, self.namespace, self.check_id)

    def catalog_view(self) -> tuple[Any, ...]:
        return (
            self.name,
            self.service_id,
            self.service_name,
            self.service_tags,
            self.spec.notes,
            self.spec.kind,
        )


@dataclass
class HealthEntry:
    """One /v1/health/service entry, rendered once and kept until its service, node or checks change."""

    stamp: tuple[Any, ...]
    view: dict[str, Any]
    json: bytes
    passing: bool
    """Every check of the entry passes (what ``?passing`` keeps)."""


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


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class ConsulState:
    """The catalog of one datacenter as one agent (a dev-mode server) sees it, under one lock."""

    def __init__(
        self,
        *,
        datacenter: str,
        node_name: str,
        node_address: str,
        timings: ConsulTimings,
        partition: str = DEFAULT,
        enterprise: bool = False,
        node_meta: dict[str, str] | None = None,
    ) -> None:
        self.datacenter = datacenter
        self.node_name = node_name
        self.node_address = node_address
        self.partition = partition
        """The agent's partition: where its own node and services live."""
        self.enterprise = enterprise
        self.timings = timings
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._timer_wake = threading.Condition(self.lock)
        self._ttl_heap: list[tuple[float, int, CheckKey]] = []
        """(deadline, tie-break, check) of TTLs; an entry whose check has another deadline is stale."""
        self._ttl_seq = 0
        self.index = 0
        self.tables = {"nodes": 0, "services": 0, "checks": 0}
        self.service_index: dict[NameKey, int] = {}
        self.extinction_index = 0
        self.nodes: dict[NodeKey, Node] = {}
        self.services: dict[SvcKey, ServiceSpec] = {}
        self.checks: dict[CheckKey, Check] = {}
        self._by_name: dict[NameKey, set[SvcKey]] = {}
        self._sorted: dict[NameKey, list[SvcKey]] = {}
        self._svc_checks: dict[SvcKey, dict[str, Check]] = {}
        self._node_checks: dict[NodeKey, dict[str, Check]] = {}
        self._entries: dict[SvcKey, HealthEntry] = {}
        self.running = False
        self._timer: threading.Thread | None = None
        meta = {"consul-network-segment": "", "consul-version": VERSION, **(node_meta or {})}
        with self.lock:
            agent = Node(
                node_name,
                node_address,
                str(uuid.uuid4()),
                partition,
                meta,
                _lan_wan(node_address),
                agent=True,
            )
            self._put_node(agent)
            serf = Check(
                spec=CheckSpec(),
                check_id="serfHealth",
                name="Serf Health Status",
                service_id="",
                service_name="",
                service_tags=[],
                status=PASSING,
                node=node_name,
                partition=partition,
                output="Agent alive and reachable",
                catalog_output="Agent alive and reachable",
                catalog_only=True,
            )
            self._put_check(serf)
            serf.create_index = serf.modify_index = agent.create_index
            consul = ServiceSpec(
                id="consul",
                name="consul",
                port=8300,
                meta={"raft_version": "3", "version": VERSION},
                tags=[],
                node=node_name,
                partition=partition,
            )
            self._put_service(consul)
            consul.create_index = consul.modify_index = self._write(("services",), [self._name_key(consul)])

    # -- keys and lookups ------------------------------------------------------------------------

    @property
    def agent_node(self) -> Node:
        return self.nodes[(self.partition, self.node_name)]

    @property
    def node_id(self) -> str:
        return self.agent_node.id

    def agent_key(self, service_id: str, namespace: str = DEFAULT) -> SvcKey:
        """The key of one of the agent's services."""
        return (self.partition, self.node_name, namespace or DEFAULT, service_id)

    def agent_check_key(self, check_id: str, namespace: str = DEFAULT) -> CheckKey:
        return (self.partition, self.node_name, namespace or DEFAULT, check_id)

    @staticmethod
    def _name_key(spec: ServiceSpec) -> NameKey:
        return (spec.partition, spec.namespace, spec.name)

    @staticmethod
    def _svc_key(spec: ServiceSpec) -> SvcKey:
        return (spec.partition, spec.node, spec.namespace, spec.id)

    def agent_services(self, namespace: str = DEFAULT) -> list[ServiceSpec]:
        """The agent's own services in ``namespace`` (the built-in ``consul`` left out), by ID."""
        return sorted(
            (
                s
                for k, s in self.services.items()
                if k[0] == self.partition
                and k[1] == self.node_name
                and k[2] == namespace
                and k[3] != "consul"
            ),
            key=lambda s: s.id,
        )

    def agent_service(self, service_id: str, namespace: str = DEFAULT) -> ServiceSpec | None:
        if service_id == "consul":
            return None
        return self.services.get(self.agent_key(service_id, namespace))

    def agent_checks(self, namespace: str = DEFAULT) -> list[Check]:
        """The agent's own checks: its node's and those of its services in ``namespace``."""
        return [
            c
            for c in self.checks.values()
            if c.partition == self.partition
            and c.node == self.node_name
            and not c.catalog_only
            and (c.namespace == namespace or not c.service_id)
        ]

    def agent_check(self, check_id: str, namespace: str = DEFAULT) -> Check | None:
        check = self.checks.get(self.agent_check_key(check_id, namespace))
        if check is None and namespace != DEFAULT:
            check = self.checks.get(self.agent_check_key(check_id))
            if check is not None and check.service_id:
                check = None
        return None if check is None or check.catalog_only else check

    # -- indexes ---------------------------------------------------------------------------------

    def _write(self, tables: Iterable[str], names: Iterable[NameKey]) -> int:
        """Commit a catalog change touching ``tables`` and service ``names``; wake blocking queries."""
        self.index += 1
        for table in tables:
            self.tables[table] = self.index
        for name in names:
            if self._by_name.get(name):
                self.service_index[name] = self.index
            else:
                self.service_index.pop(name, None)
                self.extinction_index = self.index
        self.changed.notify_all()
        return self.index

    def service_name_index(self, name: NameKey) -> int:
        """Index of the last change to service ``name`` or its health, as Consul's per-service index."""
        if name in self.service_index:
            return self.service_index[name]
        return self.extinction_index or max(self.tables.values())

    def _names_on_node(self, node: NodeKey) -> set[NameKey]:
        return {self._name_key(s) for k, s in self.services.items() if k[0] == node[0] and k[1] == node[1]}

    def _names_for(self, check: Check) -> Iterable[NameKey]:
        if check.service_id:
            spec = self.services.get((check.partition, check.node, check.namespace, check.service_id))
            return (self._name_key(spec),) if spec is not None else ()
        return self._names_on_node((check.partition, check.node))

    # -- raw table edits (no index bookkeeping) --------------------------------------------------

    def _put_node(self, node: Node) -> None:
        self.nodes[(node.partition, node.name)] = node
        if node.create_index == 0:
            node.create_index = node.modify_index = self._write(("nodes",), ())

    def _put_service(self, spec: ServiceSpec) -> None:
        key = self._svc_key(spec)
        self.services[key] = spec
        name = self._name_key(spec)
        members = self._by_name.setdefault(name, set())
        if key not in members:
            members.add(key)
            self._sorted.pop(name, None)

    def _pop_service(self, key: SvcKey) -> ServiceSpec:
        spec = self.services.pop(key)
        name = self._name_key(spec)
        members = self._by_name.get(name)
        if members is not None:
            members.discard(key)
            if not members:
                del self._by_name[name]
        self._sorted.pop(name, None)
        self._entries.pop(key, None)
        for check in list(self._svc_checks.get(key, {}).values()):
            self._drop_check(check.key)
        self._svc_checks.pop(key, None)
        return spec

    def _put_check(self, check: Check) -> None:
        self.checks[check.key] = check
        if check.service_id:
            owner = (check.partition, check.node, check.namespace, check.service_id)
            self._svc_checks.setdefault(owner, {})[check.check_id] = check
        else:
            self._node_checks.setdefault((check.partition, check.node), {})[check.check_id] = check

    def _drop_check(self, key: CheckKey) -> Check:
        check = self.checks.pop(key)
        self._stop_runner(check)
        if check.service_id:
            owner = (check.partition, check.node, check.namespace, check.service_id)
            self._svc_checks.get(owner, {}).pop(check.check_id, None)
        else:
            self._node_checks.get((check.partition, check.node), {}).pop(check.check_id, None)
        return check

    # -- agent writes ----------------------------------------------------------------------------

    def register_service(self, spec: ServiceSpec, replace_existing_checks: bool) -> None:
        """Add or update one of the agent's services and its checks; a catalog write only if something
        changed."""
        spec.node, spec.partition = self.node_name, self.partition
        spec.namespace = spec.namespace or DEFAULT
        key = self._svc_key(spec)
        old = self.services.get(key)
        tags = list(spec.tags or [])
        wanted: dict[str, Check] = {}
        for i, cs in enumerate(spec.checks):
            cid = cs.check_id or f"service:{spec.id}" + (f":{i + 1}" if len(spec.checks) > 1 else "")
            prev = self.checks.get((spec.partition, spec.node, spec.namespace, cid))
            wanted[cid] = Check(
                spec=cs,
                check_id=cid,
                name=cs.name or f"Service '{spec.name}' check",
                service_id=spec.id,
                service_name=spec.name,
                service_tags=tags,
                status=prev.status if prev else (cs.status or CRITICAL),
                node=spec.node,
                partition=spec.partition,
                namespace=spec.namespace,
                output=prev.output if prev else "",
                catalog_output=prev.catalog_output if prev else "",
                critical_since=prev.critical_since if prev else None,
            )
        existing = self._svc_checks.get(key, {})
        renamed = old is not None and old.name != spec.name
        dropped = [
            c.key
            for c in existing.values()
            if c.check_id not in wanted
            and (replace_existing_checks or renamed)
            and not c.check_id.startswith(SERVICE_MAINT_PREFIX)
        ]
        service_changed = old is None or old.catalog_view() != spec.catalog_view()
        checks_changed = bool(dropped) or any(
            cid not in existing
            or existing[cid].catalog_view() != c.catalog_view()
            or existing[cid].status != c.status
            for cid, c in wanted.items()
        )
        names = {self._name_key(spec)} | ({self._name_key(old)} if old else set())
        for ckey in dropped:
            self._drop_check(ckey)
        for check in existing.values():
            if check.check_id not in wanted:
                check.service_tags = tags
                check.service_name = spec.name
        if old is not None:
            spec.create_index, spec.modify_index = old.create_index, old.modify_index
            if renamed:
                kept = dict(self._svc_checks.get(key, {}))
                self._svc_checks[key] = {}
                self._pop_service(key)
                for check in kept.values():
                    self._put_check(check)
        self._put_service(spec)
        for cid, check in wanted.items():
            prev = existing.get(cid)
            if prev is not None:
                check.create_index, check.modify_index = prev.create_index, prev.modify_index
                self._stop_runner(prev)
            self._put_check(check)
            self._arm(check)
        if service_changed or checks_changed:
            tables = ("services", "checks") if checks_changed else ("services",)
            idx = self._write(tables, names)
            if service_changed:
                spec.modify_index = idx
                spec.create_index = spec.create_index or idx
            for check in wanted.values():
                check.create_index = check.create_index or idx
                check.modify_index = idx

    def deregister_service(self, key: SvcKey) -> None:
        """Remove a service and its checks."""
        spec = self._pop_service(key)
        self._write(("services", "checks"), (self._name_key(spec),))

    def register_check(self, cs: CheckSpec, namespace: str = DEFAULT) -> None:
        """Add or replace one of the agent's checks (a node check, or one of an existing service)."""
        svc = self.agent_service(cs.service_id, namespace) if cs.service_id else None
        cid = cs.check_id or cs.name
        ns = svc.namespace if svc else DEFAULT
        prev = self.checks.get((self.partition, self.node_name, ns, cid))
        if prev is not None:
            self._drop_check(prev.key)
        check = Check(
            spec=cs,
            check_id=cid,
            name=cs.name,
            service_id=svc.id if svc else "",
            service_name=svc.name if svc else "",
            service_tags=list(svc.tags or []) if svc else [],
            status=cs.status or CRITICAL,
            node=self.node_name,
            partition=self.partition,
            namespace=ns,
        )
        check.critical_since = time.monotonic() if check.status == CRITICAL else None
        self._put_check(check)
        self._arm(check)
        idx = self._write(("checks",), self._names_for(check))
        check.create_index = prev.create_index if prev else idx
        check.modify_index = idx

    def deregister_check(self, key: CheckKey) -> None:
        """Remove a check."""
        check = self._drop_check(key)
        self._write(("checks",), self._names_for(check))

    def update_ttl(self, key: CheckKey, status: str, output: str) -> None:
        """Set a TTL check's status and output and restart its TTL; ApiError 500 if it has no TTL."""
        check = self.checks[key]
        if check.spec.ttl <= 0:
            raise ApiError(500, f'CheckID "{check.check_id}" does not have associated TTL')
        if len(output) > OUTPUT_MAX:
            output = f"{output[:OUTPUT_MAX]} ... (captured {OUTPUT_MAX} of {len(output)} bytes)"
        self._set_ttl(check)
        self._set_status(check, status, output)

    def service_maintenance(self, spec: ServiceSpec, enable: bool, reason: str) -> None:
        """Put one of the agent's services in maintenance (a critical ``_service_maintenance:<id>``
        check, as Consul's agent registers) or take it out (the check deregistered)."""
        cid = SERVICE_MAINT_PREFIX + spec.id
        key = (spec.partition, spec.node, spec.namespace, cid)
        if enable:
            if key in self.checks:
                return
            cs = CheckSpec(check_id=cid, name="Service Maintenance Mode", status=CRITICAL)
            cs.notes = reason or _DEFAULT_SERVICE_MAINT_REASON
            cs.service_id = spec.id
            self.register_check(cs, spec.namespace)
        elif key in self.checks:
            self.deregister_check(key)

    def node_maintenance(self, enable: bool, reason: str) -> None:
        """Put the agent's node in maintenance (a critical ``_node_maintenance`` node check) or take it
        out."""
        key = self.agent_check_key(NODE_MAINT_CHECK_ID)
        if enable:
            if key in self.checks:
                return
            cs = CheckSpec(check_id=NODE_MAINT_CHECK_ID, name="Node Maintenance Mode", status=CRITICAL)
            cs.notes = reason or _DEFAULT_NODE_MAINT_REASON
            self.register_check(cs)
        elif key in self.checks:
            self.deregister_check(key)

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

    # -- catalog writes --------------------------------------------------------------------------

    def catalog_register(self, req: RegisterRequest, partition: str, namespace: str) -> None:
        """Apply a ``catalog/register``: the node, then its service, then its checks, in one write."""
        nkey = (partition, req.node)
        node = self.nodes.get(nkey)
        if node is not None and node.agent:
            raise ApiError(500, f"node {req.node!r} is the agent's own: register its services through it")
        tables: set[str] = set()
        names: set[NameKey] = set()
        changed_node: Node | None = None
        if node is None or not req.skip_node_update:
            new = Node(
                req.node,
                req.address or (node.address if node else ""),
                req.node_id or (node.id if node else str(uuid.uuid4())),
                partition,
                dict(req.node_meta or {}),
                dict(req.tagged_addresses or {}),
                req.locality,
            )
            if node is None or (new.address, new.id, new.meta, new.tagged_addresses, new.locality) != (
                node.address,
                node.id,
                node.meta,
                node.tagged_addresses,
                node.locality,
            ):
                if node is not None:
                    new.create_index = node.create_index
                self.nodes[nkey] = new
                changed_node = new
                tables.add("nodes")
                names |= self._names_on_node(nkey)
                node = new
        svc: ServiceSpec | None = None
        if req.service is not None:
            svc = req.service
            svc.node, svc.partition = req.node, partition
            svc.namespace = svc.namespace or namespace
            key = self._svc_key(svc)
            old = self.services.get(key)
            if old is None or old.catalog_view() != svc.catalog_view():
                if old is not None:
                    svc.create_index = old.create_index
                    kept = dict(self._svc_checks.get(key, {}))
                    self._svc_checks[key] = {}
                    self._pop_service(key)
                    names.add(self._name_key(old))
                    self._svc_checks[key] = kept
                    for c in kept.values():
                        self.checks[c.key] = c
                self._put_service(svc)
                tables.add("services")
                names.add(self._name_key(svc))
            else:
                svc = old
        new_checks: list[Check] = []
        for cs, output in req.checks:
            owner: ServiceSpec | None = None
            ns = DEFAULT
            if cs.service_id:
                ns = svc.namespace if svc is not None and svc.id == cs.service_id else namespace or DEFAULT
                owner = self.services.get((partition, req.node, ns, cs.service_id))
                if owner is None:
                    raise ApiError(500, f"Unknown service ID {cs.service_id!r} for check ID {cs.check_id!r}")
            check = Check(
                spec=cs,
                check_id=cs.check_id,
                name=cs.name,
                service_id=owner.id if owner else "",
                service_name=owner.name if owner else "",
                service_tags=list(owner.tags or []) if owner else [],
                status=cs.status or CRITICAL,
                node=req.node,
                partition=partition,
                namespace=ns,
                output=output,
                catalog_output=output,
                catalog_only=True,
            )
            prev = self.checks.get(check.key)
            if (
                prev is not None
                and prev.catalog_view() == check.catalog_view()
                and (prev.status, prev.catalog_output) == (check.status, check.catalog_output)
            ):
                continue
            if prev is not None:
                check.create_index = prev.create_index
                self._drop_check(prev.key)
            self._put_check(check)
            new_checks.append(check)
            tables.add("checks")
            names |= set(self._names_for(check))
        if not tables:
            return
        idx = self._write(tables, names)
        if changed_node is not None:
            changed_node.modify_index = idx
            changed_node.create_index = changed_node.create_index or idx
        if svc is not None and "services" in tables and svc.modify_index != idx:
            svc.modify_index = idx
            svc.create_index = svc.create_index or idx
        for check in new_checks:
            check.modify_index = idx
            check.create_index = check.create_index or idx

    def catalog_deregister(self, req: DeregisterRequest, partition: str, namespace: str) -> None:
        """Apply a ``catalog/deregister``: the whole node, one service, or one check (unknown ones are
        no-ops, as in Consul)."""
        nkey = (partition, req.node)
        node = self.nodes.get(nkey)
        if node is None:
            return
        ns = namespace or DEFAULT
        if req.service_id:
            key = (partition, req.node, ns, req.service_id)
            if key in self.services:
                self.deregister_service(key)
            return
        if req.check_id:
            for key in (
                (partition, req.node, ns, req.check_id),
                (partition, req.node, DEFAULT, req.check_id),
            ):
                if key in self.checks:
                    self.deregister_check(key)
                    return
            return
        if node.agent:
            raise ApiError(500, "cannot deregister the agent's own node")
        names = self._names_on_node(nkey)
        for key in [k for k in self.services if k[0] == partition and k[1] == req.node]:
            self._pop_service(key)
        for check in list(self._node_checks.get(nkey, {}).values()):
            self._drop_check(check.key)
        self._node_checks.pop(nkey, None)
        del self.nodes[nkey]
        self._write(("nodes", "services", "checks"), names)

    # -- active checks, TTLs and the critical-service reaper ---------------------------------------

    def _set_ttl(self, check: Check) -> None:
        """Restart a TTL check's countdown; wake the timer only if it must fire earlier than planned."""
        deadline = time.monotonic() + check.spec.ttl
        check.ttl_deadline = deadline
        earliest = self._ttl_heap[0][0] if self._ttl_heap else None
        self._ttl_seq += 1
        heapq.heappush(self._ttl_heap, (deadline, self._ttl_seq, check.key))
        if earliest is None or deadline < earliest:
            self._timer_wake.notify_all()

    def _arm(self, check: Check) -> None:
        cs = check.spec
        if cs.ttl > 0:
            self._set_ttl(check)
        if check.status == CRITICAL and check.critical_since is None:
            check.critical_since = time.monotonic()
        if not self.running or cs.interval <= 0 or check.catalog_only:
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
                if self.checks.get(check.key) is check and self.running:
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
            heap = self._ttl_heap
            while self.running:
                now = time.monotonic()
                while heap and heap[0][0] <= now:
                    deadline, _, key = heapq.heappop(heap)
                    check = self.checks.get(key)
                    if check is None or check.ttl_deadline != deadline:
                        continue  # deregistered, or refreshed since
                    check.ttl_deadline = None
                    last = check.output
                    expired = (
                        f"TTL expired (last output before timeout follows): {last}" if last else "TTL expired"
                    )
                    self._set_status(check, CRITICAL, expired)
                if now >= next_reap:
                    self._reap(now)
                    next_reap = now + self.timings.check_reap_interval
                wake = min(next_reap, heap[0][0]) if heap else next_reap
                self._timer_wake.wait(max(0.0, wake - time.monotonic()))

    def _reap(self, now: float) -> None:
        for check in list(self.checks.values()):
            after = check.spec.deregister_after
            if after <= 0 or check.critical_since is None or not check.service_id:
                continue
            key = (check.partition, check.node, check.namespace, check.service_id)
            if key not in self.services:
                continue
            if now - check.critical_since >= max(after, self.timings.check_deregister_interval_min):
                self.deregister_service(key)

    # -- JSON views --------------------------------------------------------------------------------

    def _ent(self, out: dict[str, Any], partition: str, namespace: str | None) -> dict[str, Any]:
        if self.enterprise:
            out["Partition"] = partition
            if namespace is not None:
                out["Namespace"] = namespace
        return out

    def node_json(self, node: Node | None = None) -> dict[str, Any]:
        node = node or self.agent_node
        out: dict[str, Any] = {
            "ID": node.id,
            "Node": node.name,
            "Address": node.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": dict(node.tagged_addresses) or None,
            "Meta": dict(node.meta) or None,
            "CreateIndex": node.create_index,
            "ModifyIndex": node.modify_index,
        }
        if node.locality:
            out["Locality"] = dict(node.locality)
        return self._ent(out, node.partition, None)

    def all_nodes(self, partition: str) -> list[Node]:
        return sorted((n for n in self.nodes.values() if n.partition == partition), key=lambda n: n.name)

    def services_of(self, partition: str, namespace: str) -> list[ServiceSpec]:
        """Catalog services of a partition and namespace, in Consul's order (node, then ID)."""
        return sorted(
            (s for k, s in self.services.items() if k[0] == partition and k[2] == namespace),
            key=lambda s: (s.node, s.id),
        )

    def instances(self, name: NameKey) -> list[ServiceSpec]:
        """Instances of one service, in Consul's order (node, then ID)."""
        keys = self._sorted.get(name)
        if keys is None:
            keys = sorted(self._by_name.get(name, ()), key=lambda k: (k[1], k[3]))
            self._sorted[name] = keys
        return [self.services[k] for k in keys]

    def node_has_meta(self, spec: ServiceSpec, pairs: dict[str, str]) -> bool:
        """Whether the node of ``spec`` carries every (key, value) of ``pairs``."""
        if not pairs:
            return True
        meta = self.nodes[(spec.partition, spec.node)].meta
        return all(meta.get(k) == v for k, v in pairs.items())

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
            "PeerName": "",
            "CreateIndex": spec.create_index,
            "ModifyIndex": spec.modify_index,
        }
        if spec.kind:
            out["Kind"] = spec.kind
        if spec.tagged_addresses:
            out["TaggedAddresses"] = self._tagged(spec)
        if spec.locality:
            out["Locality"] = dict(spec.locality)
        return self._ent(out, spec.partition, spec.namespace)

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
        if spec.locality:
            out["Locality"] = dict(spec.locality)
        return self._ent(out, spec.partition, spec.namespace)

    @staticmethod
    def content_hash(view: dict[str, Any]) -> str:
        return hashlib.blake2b(json.dumps(view, sort_keys=True).encode(), digest_size=8).hexdigest()

    def check_json(self, check: Check, *, catalog: bool) -> dict[str, Any]:
        """A HealthCheck; ``catalog`` picks the output last synced to the catalog."""
        cs = check.spec
        periodic = cs.interval > 0
        out = {
            "Node": check.node,
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
            }
            if check.check_id != "serfHealth"
            else {},
            "CreateIndex": check.create_index if catalog else 0,
            "ModifyIndex": check.modify_index if catalog else 0,
        }
        return self._ent(out, check.partition, check.namespace)

    def checks_of_service(self, spec: ServiceSpec) -> list[Check]:
        """The node's checks and the service's, ordered by check ID (as a health entry lists them)."""
        node = self._node_checks.get((spec.partition, spec.node), {})
        own = self._svc_checks.get(self._svc_key(spec), {})
        return sorted([*node.values(), *own.values()], key=lambda c: c.check_id)

    def checks_of_node(self, partition: str, node: str) -> list[Check]:
        """Every check on a node (its own and its services'), ordered by check ID."""
        return sorted(
            (c for k, c in self.checks.items() if k[0] == partition and k[1] == node),
            key=lambda c: c.check_id,
        )

    def catalog_checks(self, partition: str, namespace: str) -> list[dict[str, Any]]:
        """Every check of a partition (node checks and the namespace's service checks), by check ID."""
        return [
            self.check_json(c, catalog=True)
            for c in sorted(self.checks.values(), key=lambda c: (c.check_id, c.node))
            if c.partition == partition and (not c.service_id or c.namespace == namespace)
        ]

    def service_node_json(self, spec: ServiceSpec) -> dict[str, Any]:
        """A ServiceNode as /v1/catalog/service/<name> returns it."""
        node = self.node_json(self.nodes[(spec.partition, spec.node)])
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
        if spec.locality:
            out["ServiceLocality"] = dict(spec.locality)
        return self._ent(out, spec.partition, spec.namespace)

    def health_entry(self, spec: ServiceSpec) -> HealthEntry:
        """The /v1/health/service entry of one instance (Node, Service, Checks), rendered once per change."""
        key = self._svc_key(spec)
        node = self.nodes[(spec.partition, spec.node)]
        checks = self.checks_of_service(spec)
        stamp = (
            spec.modify_index,
            node.modify_index,
            tuple((c.check_id, c.modify_index, c.status) for c in checks),
        )
        entry = self._entries.get(key)
        if entry is None or entry.stamp != stamp:
            view = {
                "Node": self.node_json(node),
                "Service": self.service_json(spec),
                "Checks": [self.check_json(c, catalog=True) for c in checks],
            }
            entry = HealthEntry(stamp, view, _dumps(view), all(c.status == PASSING for c in checks))
            self._entries[key] = entry
        return entry


def _lan_wan(address: str) -> dict[str, str]:
    return {"lan": address, "lan_ipv4": address, "wan": address, "wan_ipv4": address}
