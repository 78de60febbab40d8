"""The demo's cluster: a Consul-compatible server (embedded, or a real agent), four model servers in a
child process, each registered with a gRPC health check and a weight, and the faults the demo injects.

Every port is an ephemeral one the OS hands out on 127.0.0.1, so nothing collides. :meth:`Cluster.close`
deregisters every instance, stops the model servers' process and the embedded server; it is safe to
call at any point of :meth:`Cluster.start` and more than once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lbkit.discovery.consul import ConsulDiscovery
from lbkit.registration import GrpcCheck, Registration
from lbkit.testing.server_process import ServerProcess

__all__ = ["ROLES", "Cluster", "Instance", "Role"]


@dataclass(frozen=True, slots=True)
class Role:
    """What one model server does in the demo."""

    name: str
    """slow, failing, leaving or steady."""
    weight: int
    """Its Consul weight (Weights.Passing), which the weighted selector follows."""
    describe: str
    """A short phrase for tables."""


ROLES = (
    Role("slow", 1, "2x slower all along, weight 1"),
    Role("failing", 2, "fails every call from half way"),
    Role("leaving", 2, "deregistered, then registered again"),
    Role("steady", 2, "healthy all along"),
)
"""The four servers, by index."""


@dataclass(slots=True)
class Instance:
    """One model server: its index, address, role and Consul registration."""

    index: int
    address: str
    role: Role
    registration: Registration


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT while a child process starts, so it inherits the block and a Ctrl-C at the terminal
    reaches only this process, which then stops the child in order (a pending SIGINT arrives after)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _refused(exc: BaseException) -> bool:
    """Whether a ConnectionRefusedError is among ``exc``'s causes (requests and urllib3 chain them)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConnectionRefusedError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _short(exc: BaseException) -> str:
    if _refused(exc):
        return "connection refused (is a Consul agent listening there?)"
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


class Cluster:
    """The demo's servers and their registrations; use as a context manager."""

    def __init__(
        self,
        *,
        service: str,
        consul: str | None = None,
        delay_ms: float = 10.0,
        check_interval: float = 1.0,
    ) -> None:
        self.service = service
        self.embedded = consul is None
        """Whether the Consul server is the embedded one (else ``consul`` is a real agent's address)."""
        self.consul_address = consul or ""
        self.delay_ms = delay_ms
        self.check = GrpcCheck(interval=check_interval, timeout=check_interval, deregister_after=60.0)
        self.instances: list[Instance] = []
        self._consul_server: Any = None
        self._servers: ServerProcess | None = None
        # An embedded server ignores the user's CONSUL_* variables (a token meant for a real agent).
        self._env: dict[str, str] | None = {} if self.embedded else None

    # ----------------------------------------------------------------- lifetime

    def start(self) -> Cluster:
        """Start the Consul server (if embedded) and the model servers; register every instance."""
        try:
            if self.embedded:
                from lbkit.testing.consul import ConsulServer

                self._consul_server = ConsulServer()
                self._consul_server.start()
                self.consul_address = str(self._consul_server.address)
            servers = ServerProcess(
                len(ROLES), delay_ms=self.delay_ms, slow={0: 2 * self.delay_ms}, command_timeout=5.0
            )
            with _sigint_blocked():
                servers.start()
            self._servers = servers
            for index, (address, role) in enumerate(zip(servers.addresses, ROLES, strict=True)):
                registration = Registration(
                    self.service,
                    address,
                    service_id=f"{self.service}-{index}-{address.rpartition(':')[2]}",
                    weight=role.weight,
                    meta={"role": role.name},
                    check=self.check,
                    consul_address=self.consul_address,
                    env=self._env,
                )
                self.instances.append(Instance(index, address, role, registration))
                try:
                    registration.register()
                except Exception as exc:
                    raise RuntimeError(
                        f"could not register {address} with Consul at {self.consul_address}: {_short(exc)}"
                    ) from exc
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Deregister every instance and stop every process and server this cluster started."""
        for instance in self.instances:
            with contextlib.suppress(Exception):
                instance.registration.close()
        self.instances = []
        servers, self._servers = self._servers, None
        if servers is not None:
            servers.close()
        consul_server, self._consul_server = self._consul_server, None
        if consul_server is not None:
            consul_server.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- queries

    @property
    def server_pid(self) -> int | None:
        """The model servers' process id while it runs."""
        return self._servers.pid if self._servers is not None else None

    def by_role(self, name: str) -> Instance:
        """The instance playing role ``name``."""
        for instance in self.instances:
            if instance.role.name == name:
                return instance
        raise KeyError(name)

    def discovery(self) -> ConsulDiscovery:
        """A discovery of the demo service at this cluster's Consul server."""
        return ConsulDiscovery(self.service, address=self.consul_address, env=self._env, wait=30.0)

    def _command(self, text: str) -> str:
        if self._servers is None:
            raise RuntimeError("the cluster is not running")
        return self._servers.command(text)

    def calls(self) -> list[int]:
        """Calls each server received since the last :meth:`reset_calls`, by index."""
        if self._servers is None:
            raise RuntimeError("the cluster is not running")
        return self._servers.calls()

    # ----------------------------------------------------------------- faults

    def reset_calls(self) -> None:
        """Zero the servers' call counts."""
        self._command("reset")

    def set_failing(self, instance: Instance, rate: float) -> None:
        """Make ``instance`` fail that share of its calls with UNAVAILABLE (its health stays SERVING)."""
        self._command(f"fail {instance.index} {rate}")

    def leave(self, instance: Instance) -> None:
        """Deregister ``instance`` from Consul (the server keeps running)."""
        instance.registration.deregister()

    def rejoin(self, instance: Instance) -> None:
        """Register ``instance`` again; Consul lists it once its gRPC check passes."""
        if not instance.registration.registered:
            instance.registration.register()

    def restore(self) -> None:
        """Undo every fault: nobody fails, everybody is registered."""
        for instance in self.instances:
            self.set_failing(instance, 0.0)
            self.rejoin(instance)
