"""Go durations and the active health checks (gRPC, TCP, HTTP) of :class:`ConsulServer`.

Probes only ever reach loopback addresses: any other target is reported critical with an
Output saying why, so tests can never send traffic off the machine.
"""

from __future__ import annotations

import ipaddress
import random
import re
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

__all__ = [
    "CRITICAL",
    "PASSING",
    "WARNING",
    "CheckRunner",
    "format_duration",
    "is_loopback_host",
    "parse_duration",
    "probe_grpc",
    "probe_http",
    "probe_tcp",
]

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
OUTPUT_MAX = 4096
"""Bytes of output a check keeps, as Consul's default ``DefaultBufSize``."""

_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9}
_UNITS["h"] = 3600 * 10**9
_PART = re.compile(r"(\d*\.?\d*)([^\d.]*)")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string ("300ms", "1m30s", "0"); ValueError with Go's message if bad."""
    s = text
    sign = 1
    if s[:1] in "+-" and s:
        sign, s = (-1 if s[0] == "-" else 1), s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f'time: invalid duration "{text}"')
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None or m.end() == pos or m.group(1) in ("", "."):
            raise ValueError(f'time: invalid duration "{text}"')
        number, unit = m.groups()
        if not unit:
            raise ValueError(f'time: missing unit in duration "{text}"')
        if unit not in _UNITS:
            raise ValueError(f'time: unknown unit "{unit}" in duration "{text}"')
        total += float(number) * _UNITS[unit]
        pos = m.end()
    return sign * total / 1e9


def _fraction(value: int, scale: int) -> str:
    whole, rest = divmod(value, scale)
    if not rest:
        return str(whole)
    digits = str(rest).rjust(len(str(scale)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def format_duration(seconds: float) -> str:
    """``seconds`` written as Go's ``time.Duration.String`` writes it ("10s", "1m30s", "500ms")."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_fraction(ns, 1_000)}µs"
    if ns < 10**9:
        return f"{sign}{_fraction(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    text = f"{_fraction(rest, 10**9)}s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return sign + text


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    h = host.strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _refusal(target: str) -> tuple[str, str]:
    return CRITICAL, (
        f"lbkit ConsulServer probes only loopback addresses; refusing to probe {target!r} "
        "(register the check against 127.0.0.1, ::1 or localhost)"
    )


def _host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {addr} missing port")
    return host.strip("[]"), int(port)


def probe_tcp(addr: str, timeout: float) -> tuple[str, str]:
    """Passing if a TCP connection to ``addr`` (host:port) opens within ``timeout``."""
    try:
        host, port = _host_port(addr)
    except ValueError as exc:
        return CRITICAL, f"dial tcp {addr}: {exc}"
    if not is_loopback_host(host):
        return _refusal(addr)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return CRITICAL, f"dial tcp {addr}: connect: {reason.lower()}"
    return PASSING, f"TCP connect {addr}: Success"


class _LoopbackRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        host = urllib.parse.urlsplit(newurl).hostname or ""
        if not is_loopback_host(host):
            raise urllib.error.URLError(f"refusing to follow a redirect to non-loopback {newurl!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def probe_http(
    url: str,
    *,
    method: str,
    header: dict[str, list[str]],
    body: str,
    timeout: float,
    tls_skip_verify: bool,
) -> tuple[str, str]:
    """Passing on 2xx, warning on 429, critical otherwise; Output as Consul writes it."""
    method = method or "GET"
    host = urllib.parse.urlsplit(url).hostname or ""
    if not is_loopback_host(host):
        return _refusal(url)
    headers = {"User-Agent": "Consul Health Check", "Accept": "text/plain, text/*, */*"}
    headers.update({k: ", ".join(v) for k, v in header.items()})
    req = urllib.request.Request(url, data=body.encode() if body else None, method=method, headers=headers)
    handlers: list[Any] = [urllib.request.ProxyHandler({}), _LoopbackRedirects()]
    if tls_skip_verify:
        handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(req, timeout=timeout) as resp:
            code, reason, text = resp.status, resp.reason, resp.read(OUTPUT_MAX)
    except urllib.error.HTTPError as exc:
        code, reason, text = exc.code, exc.reason, exc.read(OUTPUT_MAX)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        cause = getattr(exc, "reason", exc)
        return CRITICAL, f'{method.capitalize()} "{url}": {cause}'
    output = f"HTTP {method} {url}: {code} {reason} Output: {text.decode(errors='replace')}"
    if 200 <= code <= 299:
        return PASSING, output
    return (WARNING if code == 429 else CRITICAL), output


def _go_code(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def probe_grpc(target: str, *, use_tls: bool, timeout: float) -> tuple[str, str]:
    """grpc.health.v1 Check of ``host:port[/service]``: passing only when it answers SERVING."""
    server, _, service = target.partition("/")
    try:
        host, _port = _host_port(server)
    except ValueError as exc:
        return CRITICAL, str(exc)
    if not is_loopback_host(host):
        return _refusal(target)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = (
        grpc.secure_channel(server, grpc.ssl_channel_credentials())
        if use_tls
        else grpc.insecure_channel(server)
    )
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        return CRITICAL, f"rpc error: code = {_go_code(exc.code().name)} desc = {exc.details()}"
    finally:
        channel.close()
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return CRITICAL, "gRPC application didn't report service healthy"
    return PASSING, f"gRPC check {target}: success"


class CheckRunner:
    """Runs ``probe`` every ``interval`` seconds in a daemon thread and hands each result to ``report``.

    As Consul does, the first probe comes after a random pause of up to one interval.
    """

    def __init__(
        self,
        name: str,
        probe: Callable[[], tuple[str, str]],
        interval: float,
        report: Callable[[str, str], None],
    ) -> None:
        self._probe = probe
        self._interval = interval
        self._report = report
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"consul-check-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        delay = random.uniform(0.0, self._interval)
        while not self._stopped.wait(delay):
            status, output = self._probe()
            if self._stopped.is_set():
                return
            self._report(status, output[:OUTPUT_MAX])
            delay = self._interval

    def stop(self) -> None:
        """Ask the thread to end; it ends at once unless a probe is in flight (bounded by its timeout)."""
        self._stopped.set()
