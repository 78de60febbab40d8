"""What the tests of the Consul test server share: the agent under test (the test server, or a real agent
at CONSUL_HTTP_ADDR), raw HTTP to it, and fixtures."""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import consul
import pytest

from lbkit.testing.consul import ConsulServer, ConsulTimings

__all__ = ["FAST", "PREFIX", "Agent", "agent", "name", "server", "wait_for"]

T = TypeVar("T")
FAST = ConsulTimings(min_check_interval=0.05, check_reap_interval=0.05, check_deregister_interval_min=0.2)
PREFIX = "lbkit-test-"


@dataclass
class Agent:
    """Where the agent under test listens, a py-consul client for it, and the test server if it is one."""

    host: str
    port: int
    client: Any
    server: ConsulServer | None
    token: str | None = None

    def call(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], str]:
        """One raw HTTP request; returns status, headers and body text."""
        all_headers = {"X-Consul-Token": self.token} if self.token else {}
        all_headers.update(headers or {})
        data = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
        try:
            conn.request(method, path, body=data, headers=all_headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read().decode()
        finally:
            conn.close()


@pytest.fixture(params=["test_server", pytest.param("real_agent", marks=pytest.mark.consul_agent)])
def agent(request: pytest.FixtureRequest) -> Iterator[Agent]:
    """The test server, or a real agent at CONSUL_HTTP_ADDR (skipped when it is unset)."""
    if request.param == "test_server":
        with ConsulServer(timings=FAST) as server:
            yield Agent(server.host, server.port, server.client(), server)
        return
    addr = os.environ.get("CONSUL_HTTP_ADDR")
    if not addr:
        pytest.skip("CONSUL_HTTP_ADDR is not set: no real Consul agent to compare with")
    parts = urllib.parse.urlsplit(addr if "//" in addr else f"//{addr}")
    client = consul.Consul()
    yield Agent(
        parts.hostname or "127.0.0.1", parts.port or 8500, client, None, os.environ.get("CONSUL_HTTP_TOKEN")
    )
    for sid, svc in client.agent.services().items():
        if svc["Service"].startswith(PREFIX):
            client.agent.service.deregister(sid)


@pytest.fixture
def server() -> Iterator[ConsulServer]:
    """The test server alone, for tests of its hooks."""
    with ConsulServer(timings=FAST) as s:
        yield s


@pytest.fixture
def name() -> str:
    """A service name no other test uses."""
    return PREFIX + uuid.uuid4().hex[:8]


def wait_for(condition: Callable[[], T], timeout: float = 5.0) -> T:
    """Poll ``condition`` every 20 ms until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        time.sleep(0.02)
