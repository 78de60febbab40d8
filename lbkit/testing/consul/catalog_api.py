"""The catalog, health and status endpoints of :class:`ConsulServer` (``/v1/catalog/...``,
``/v1/health/...``, ``/v1/status/...``): reads with blocking queries, filters, tags, peers, namespaces
and partitions, and catalog registration of external nodes and services."""

from __future__ import annotations

from typing import Any

from lbkit.testing.consul.api import (
    ApiBase,
    RawJSON,
    Request,
    Response,
    body_json,
    has_tags,
    json_response,
    parse_go_bool,
    required_name,
)
from lbkit.testing.consul.checks import CRITICAL, PASSING, WARNING
from lbkit.testing.consul.filter import compile_filter
from lbkit.testing.consul.specs import ApiError, parse_deregister, parse_register

__all__ = ["CatalogApi"]

_STATES = ("any", PASSING, WARNING, CRITICAL)


def _node_meta_filter(req: Request) -> dict[str, str]:
    """``?node-meta=key:value`` (repeatable): nodes must carry every pair."""
    pairs = {}
    for raw in req.query.get("node-meta", []):
        key, _, value = raw.partition(":")
        pairs[key] = value
    return pairs


class CatalogApi(ApiBase):
    """Handlers of the catalog, health and status endpoints."""

    def _datacenters(self) -> list[str]:
        return [self.datacenter]

    # -- catalog reads ------------------------------------------------------------------------------

    def _catalog_datacenters(self, req: Request) -> Response:
        return json_response(self._datacenters())

    def _catalog_services(self, req: Request) -> Response:
        partition, ns = self._scope(req)
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "service_node") if req.param("filter") else None
        st = self._state

        def render() -> dict[str, list[str]]:
            out: dict[str, set[str]] = {}
            for spec in st.services_of(partition, ns) if visible else []:
                if pred is None or pred(st.service_node_json(spec)):
                    out.setdefault(spec.name, set()).update(spec.tags or [])
            return {name: sorted(tags) for name, tags in sorted(out.items())}

        return self._blocking(req, lambda: st.tables["services"], render)

    def _catalog_service(self, req: Request) -> Response:
        name = required_name(req)
        partition, ns = self._scope(req)
        visible = self._may_read(req) and not req.param("peer")
        tags = req.query.get("tag", [])
        pred = compile_filter(req.param("filter"), "service_node") if req.param("filter") else None
        meta = _node_meta_filter(req)
        st = self._state

        def render() -> list[dict[str, Any]]:
            specs = st.instances((partition, ns, name)) if visible else []
            specs = [s for s in specs if st.node_has_meta(s, meta)]
            views = [st.service_node_json(s) for s in specs if has_tags(s.tags or [], tags)]
            return [v for v in views if pred is None or pred(v)]

        return self._blocking(req, lambda: st.service_name_index((partition, ns, name)), render)

    def _catalog_nodes(self, req: Request) -> Response:
        partition, _ = self._scope(req)
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "node") if req.param("filter") else None
        st = self._state

        def render() -> list[dict[str, Any]]:
            views = [st.node_json(n) for n in st.all_nodes(partition)] if visible else []
            return [v for v in views if pred is None or pred(v)]

        return self._blocking(req, lambda: st.tables["nodes"], render)

    # -- catalog writes -----------------------------------------------------------------------------

    def _catalog_register(self, req: Request) -> Response:
        reg = parse_register(body_json(req))
        if reg.datacenter and reg.datacenter != self.datacenter:
            return self._forward(reg.datacenter, req)
        partition, ns = self._scope(
            req,
            reg.namespace or (reg.service.namespace if reg.service else ""),
            reg.partition or (reg.service.partition if reg.service else ""),
        )
        self._authorize(req, "node:write", reg.node)
        if reg.service is not None:
            self._authorize(req, "service:write", reg.service.name)
        with self._state.lock:
            self._state.catalog_register(reg, partition, ns)
        return json_response(True)

    def _catalog_deregister(self, req: Request) -> Response:
        dereg = parse_deregister(body_json(req))
        if dereg.datacenter and dereg.datacenter != self.datacenter:
            return self._forward(dereg.datacenter, req)
        partition, ns = self._scope(req, dereg.namespace, dereg.partition)
        self._authorize(req, "node:write", dereg.node)
        with self._state.lock:
            self._state.catalog_deregister(dereg, partition, ns)
        return json_response(True)

    # -- health reads -------------------------------------------------------------------------------

    def _health_service(self, req: Request) -> Response:
        name = required_name(req)
        partition, ns = self._scope(req)
        visible = self._may_read(req) and not req.param("peer")  # no peering: an unknown peer has nothing
        tags = req.query.get("tag", [])
        passing = False
        if "passing" in req.query:
            raw = req.param("passing")
            parsed = parse_go_bool(raw) if raw else True
            if parsed is None:
                raise ApiError(400, "Invalid value for ?passing")
            passing = parsed
        pred = compile_filter(req.param("filter"), "health_entry") if req.param("filter") else None
        meta = _node_meta_filter(req)
        st = self._state

        def render() -> RawJSON:
            parts: list[bytes] = []
            for spec in st.instances((partition, ns, name)) if visible else []:
                if (tags and not has_tags(spec.tags or [], tags)) or not st.node_has_meta(spec, meta):
                    continue
                entry = st.health_entry(spec)
                if (passing and not entry.passing) or (pred is not None and not pred(entry.view)):
                    continue
                parts.append(entry.json)
            return RawJSON(b"[" + b",".join(parts) + b"]")

        return self._blocking(req, lambda: st.service_name_index((partition, ns, name)), render)

    def _health_checks(self, req: Request) -> Response:
        name = required_name(req)
        partition, ns = self._scope(req)
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "check") if req.param("filter") else None
        st = self._state

        def render() -> list[dict[str, Any]]:
            views: list[dict[str, Any]] = []
            for spec in st.instances((partition, ns, name)) if visible else []:
                views.extend(
                    st.check_json(c, catalog=True) for c in st.checks_of_service(spec) if c.service_id
                )
            return [v for v in views if pred is None or pred(v)]

        return self._blocking(req, lambda: st.tables["checks"], render)

    def _health_node(self, req: Request) -> Response:
        node = required_name(req, "node name")
        partition, _ = self._scope(req)
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "check") if req.param("filter") else None
        st = self._state

        def render() -> list[dict[str, Any]]:
            views = (
                [st.check_json(c, catalog=True) for c in st.checks_of_node(partition, node)]
                if visible
                else []
            )
            return [v for v in views if pred is None or pred(v)]

        return self._blocking(req, lambda: st.tables["checks"], render)

    def _health_state(self, req: Request) -> Response:
        state = req.rest
        if not state:
            raise ApiError(400, "Missing check state")
        if state not in _STATES:
            raise ApiError(400, f"Invalid check state: {state!r}")
        partition, ns = self._scope(req)
        visible = self._may_read(req)
        pred = compile_filter(req.param("filter"), "check") if req.param("filter") else None
        st = self._state

        def render() -> list[dict[str, Any]]:
            views = st.catalog_checks(partition, ns) if visible else []
            views = [v for v in views if state == "any" or v["Status"] == state]
            return [v for v in views if pred is None or pred(v)]

        return self._blocking(req, lambda: st.tables["checks"], render)

    # -- status -------------------------------------------------------------------------------------

    def _status_leader(self, req: Request) -> Response:
        with self._raft_lock:
            leader = self._leader
        return json_response(f"{self._state.node_address}:8300" if leader else "")

    def _status_peers(self, req: Request) -> Response:
        return json_response([f"{self._state.node_address}:8300"])
