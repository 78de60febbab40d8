"""The agent endpoints of :class:`ConsulServer` (``/v1/agent/...``): self, members, services, checks, TTL
updates and maintenance mode. Agent endpoints act on the agent's own node and are never forwarded to
another datacenter."""

from __future__ import annotations

import time
from typing import Any

from lbkit.testing.consul.api import (
    DEFAULT_WAIT,
    ApiBase,
    Request,
    Response,
    body_json,
    json_response,
    parse_go_bool,
    parse_wait,
)
from lbkit.testing.consul.checks import CRITICAL, PASSING, WARNING
from lbkit.testing.consul.filter import compile_filter
from lbkit.testing.consul.specs import VERSION, ApiError, ServiceSpec, parse_check, parse_service
from lbkit.testing.consul.state import Check

__all__ = ["ENVOY_VERSIONS", "AgentApi"]

ENVOY_VERSIONS = ("1.32.1", "1.31.4", "1.30.8", "1.29.11")
"""The Envoy versions Consul 1.20 lists as supported proxies in ``agent/self``'s ``xDS``."""
GRPC_PORT = 8502

_SCRIPTS_DISABLED = (
    "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' or "
    "'enable_local_script_checks' to true"
)


class AgentApi(ApiBase):
    """Handlers of the agent's own endpoints."""

    def _peers(self) -> list[Any]:
        """Other datacenters' servers joined over the WAN (the federation of ConsulServer)."""
        return []

    def _member_json(self, name: str, dc: str, node_id: str, address: str) -> dict[str, Any]:
        return {
            "Name": name,
            "Addr": address,
            "Port": 8301,
            "Tags": {
                "dc": dc,
                "role": "consul",
                "build": VERSION,
                "port": "8300",
                "id": node_id,
                "vsn": "2",
                "grpc_port": str(GRPC_PORT),
            },
            "Status": 1,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        }

    def _agent_self(self, req: Request) -> Response:
        self._authorize(req, "agent:read", self.node_name)
        st = self._state
        with st.lock:
            services = len(st.agent_services())
            checks = st.agent_checks()
            node = st.agent_node
            node_id, addr, meta = node.id, node.address, dict(node.meta)
        with self._raft_lock:
            leader = self._leader
        config: dict[str, Any] = {
            "Datacenter": self.datacenter,
            "PrimaryDatacenter": self.datacenter,
            "NodeName": self.node_name,
            "NodeID": node_id,
            "Revision": "lbkit",
            "Server": True,
            "Version": VERSION,
            "BuildDate": "1970-01-01T00:00:00Z",
        }
        if self.enterprise:
            config["Partition"] = st.partition
        return json_response(
            {
                "Config": config,
                "DebugConfig": {"ACLsEnabled": self.acl_token is not None, "DevMode": True},
                "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
                "Member": self._member_json(self.node_name, self.datacenter, node_id, addr),
                "Stats": {
                    "agent": {
                        "services": str(services),
                        "checks": str(len(checks)),
                        "check_ttls": str(sum(1 for c in checks if c.spec.ttl > 0)),
                        "check_monitors": "0",
                    },
                    "consul": {
                        "leader": "true" if leader else "false",
                        "leader_addr": f"{addr}:8300" if leader else "",
                        "server": "true",
                        "bootstrap": "true",
                        "known_datacenters": str(1 + len(self._peers())),
                    },
                },
                "Meta": meta,
                "xDS": {
                    "SupportedProxies": {"envoy": list(ENVOY_VERSIONS)},
                    "Port": GRPC_PORT,
                    "Ports": {"Plaintext": GRPC_PORT, "TLS": -1},
                },
            }
        )

    def _agent_members(self, req: Request) -> Response:
        visible = self._may_read(req)
        wan = parse_go_bool(req.param("wan")) if req.param("wan") else False
        if wan is None:
            raise ApiError(400, "Invalid value for ?wan")
        st = self._state
        with st.lock:
            node_id, addr = st.node_id, st.agent_node.address
        if not wan:
            members = [self._member_json(self.node_name, self.datacenter, node_id, addr)]
        else:
            members = [
                self._member_json(f"{self.node_name}.{self.datacenter}", self.datacenter, node_id, addr)
            ]
            for other in self._peers():
                if other.running:
                    with other._state.lock:
                        oid, oaddr = other._state.node_id, other._state.agent_node.address
                    members.append(
                        self._member_json(
                            f"{other.node_name}.{other.datacenter}", other.datacenter, oid, oaddr
                        )
                    )
        return json_response(members if visible else [])

    def _agent_services(self, req: Request) -> Response:
        ns = self._agent_scope(req)
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "agent_service") if req.param("filter") else None
        st = self._state
        with st.lock:
            views = {s.id: st.agent_service_json(s) for s in st.agent_services(ns)} if visible else {}
        return json_response({k: v for k, v in sorted(views.items()) if pred is None or pred(v)})

    def _agent_service(self, req: Request) -> Response:
        ns = self._agent_scope(req)
        min_wait = parse_wait(req)[1] if "wait" in req.query else DEFAULT_WAIT
        if self.acl_token is not None and req.token and req.token != self.acl_token:
            raise ApiError(403, "ACL not found")
        st = self._state
        want = req.param("hash")
        with st.lock:
            deadline = time.monotonic() + min_wait
            while True:
                spec = st.agent_service(req.rest, ns)
                if spec is None:
                    raise ApiError(404, f"unknown service ID: {req.rest}")
                view = st.agent_service_json(spec)
                digest = st.content_hash(view)
                remaining = deadline - time.monotonic()
                if not want or digest != want or remaining <= 0 or not st.running:
                    break
                st.changed.wait(remaining)
            if not st.running:
                return Response(drop=True)
        self._authorize(req, "service:read", spec.name)
        view["ContentHash"] = digest
        return json_response(view, {"X-Consul-ContentHash": digest})

    def _register_service(self, req: Request) -> Response:
        spec = parse_service(body_json(req))
        spec.namespace = self._agent_scope(req, spec.namespace, spec.partition)
        if any(c.script for c in spec.checks):
            raise ApiError(500, _SCRIPTS_DISABLED)
        st = self._state
        with st.lock:
            old = st.agent_service(spec.id, spec.namespace)
        self._authorize(req, "service:write", spec.name)
        if old is not None and old.name != spec.name:
            self._authorize(req, "service:write", old.name)
        replace = "replace-existing-checks" in req.query and req.param("replace-existing-checks") in (
            "",
            "true",
        )
        with st.lock:
            st.register_service(spec, replace)
        return Response()

    def _service_for_update(self, req: Request, service_id: str) -> ServiceSpec:
        ns = self._agent_scope(req)
        with self._state.lock:
            spec = self._state.agent_service(service_id, ns)
        if spec is None:
            self._may_read(req)
            raise ApiError(
                404,
                f'Unknown service ID "{service_id}". '
                "Ensure that the service ID is passed, not the service name.",
            )
        self._authorize(req, "service:write", spec.name)
        return spec

    def _deregister_service(self, req: Request) -> Response:
        spec = self._service_for_update(req, req.rest)
        st = self._state
        with st.lock:
            key = st.agent_key(spec.id, spec.namespace)
            if key in st.services:
                st.deregister_service(key)
        return Response()

    @staticmethod
    def _enable_param(req: Request) -> bool:
        if "enable" not in req.query:
            raise ApiError(400, "Missing value for enable")
        enable = parse_go_bool(req.param("enable"))
        if enable is None:
            raise ApiError(400, f'Invalid value for enable: "{req.param("enable")}"')
        return enable

    def _service_maintenance(self, req: Request) -> Response:
        if not req.rest:
            raise ApiError(400, "Missing service ID")
        enable = self._enable_param(req)
        ns = self._agent_scope(req)
        st = self._state
        with st.lock:
            spec = st.agent_service(req.rest, ns)
        if spec is None:
            self._may_read(req)
            raise ApiError(404, f'No service registered with ID "{req.rest}"')
        self._authorize(req, "service:write", spec.name)
        with st.lock:
            if st.agent_service(req.rest, ns) is spec:
                st.service_maintenance(spec, enable, req.param("reason"))
        return Response()

    def _node_maintenance(self, req: Request) -> Response:
        enable = self._enable_param(req)
        self._authorize(req, "node:write", self.node_name)
        with self._state.lock:
            self._state.node_maintenance(enable, req.param("reason"))
        return Response()

    def _agent_checks(self, req: Request) -> Response:
        ns = self._agent_scope(req)
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "check") if req.param("filter") else None
        st = self._state
        with st.lock:
            views = (
                {c.check_id: st.check_json(c, catalog=False) for c in st.agent_checks(ns)} if visible else {}
            )
        return json_response({k: v for k, v in sorted(views.items()) if pred is None or pred(v)})

    def _check_for_update(self, req: Request, check_id: str) -> Check:
        ns = self._agent_scope(req)
        with self._state.lock:
            check = self._state.agent_check(check_id, ns)
        if check is None:
            self._may_read(req)
            raise ApiError(
                404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        if check.service_name:
            self._authorize(req, "service:write", check.service_name)
        else:
            self._authorize(req, "node:write", self.node_name)
        return check

    def _register_check(self, req: Request) -> Response:
        spec = parse_check(body_json(req))
        if not spec.name:
            raise ApiError(400, "Missing check name")
        if spec.status and spec.status not in (PASSING, WARNING, CRITICAL):
            raise ApiError(400, "Bad check status")
        spec.validate()
        ns = self._agent_scope(req)
        st = self._state
        with st.lock:
            svc = st.agent_service(spec.service_id, ns) if spec.service_id else None
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
            st.register_check(spec, ns)
        return Response()

    def _deregister_check(self, req: Request) -> Response:
        check = self._check_for_update(req, req.rest)
        with self._state.lock:
            if self._state.checks.get(check.key) is check:
                self._state.deregister_check(check.key)
        return Response()

    def _ttl_update(self, req: Request, status: str, output: str) -> Response:
        check = self._check_for_update(req, req.rest)
        with self._state.lock:
            if self._state.checks.get(check.key) is not check:
                raise ApiError(404, f'Unknown check ID "{req.rest}"')
            self._state.update_ttl(check.key, status, output)
        return Response()

    def _check_pass(self, req: Request) -> Response:
        return self._ttl_update(req, PASSING, req.param("note"))

    def _check_warn(self, req: Request) -> Response:
        return self._ttl_update(req, WARNING, req.param("note"))

    def _check_fail(self, req: Request) -> Response:
        return self._ttl_update(req, CRITICAL, req.param("note"))

    def _check_update(self, req: Request) -> Response:
        raw = body_json(req)
        body = {str(k).lower(): v for k, v in raw.items()} if isinstance(raw, dict) else {}
        status, output = body.get("status", ""), body.get("output", "")
        if not isinstance(raw, dict) or not isinstance(status, str) or not isinstance(output, str):
            raise ApiError(400, 'Request decode failed: expected {"Status": string, "Output": string}')
        if status not in (PASSING, WARNING, CRITICAL):
            raise ApiError(400, f"Invalid check status: '{status}'")
        return self._ttl_update(req, status, output)
