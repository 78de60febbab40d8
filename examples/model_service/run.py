"""The inference-service example: servers registered in Consul with a gRPC health check, a client
streaming tokens through lbkit.aio, and a server leaving when its health check fails.

1. An embedded Consul-compatible server (lbkit.testing) and three inference servers, each registered
   with a gRPC health check that the agent runs every 200 ms.
2. A client finds them through ConsulDiscovery and streams six completions at once: least
   connections spreads the streams over the three servers, tokens arrive as they are generated.
3. Live feature updates over a bidirectional stream.
4. One server reports NOT_SERVING: Consul's check turns critical, discovery reports the server
   critical, the balancer leaves it out, and the next completions go to the other two.

Run: python examples/model_service/run.py
"""

from __future__ import annotations

import asyncio

from client import balancer, stream_completions, update_features
from server import InferenceServer

import lbkit
from lbkit.testing.consul import ConsulServer, ConsulTimings

SERVERS = 3
PROMPTS = 6
TOKENS = 6


async def main(consul_address: str, servers: list[InferenceServer]) -> None:
    critical = asyncio.Event()
    watched: list[str] = []  # the address whose check is expected to turn critical

    def on_event(event: lbkit.Event) -> None:
        # Checks start critical until their first probe: only the leaving server's counts here.
        critical_now = event.kind is lbkit.EventKind.UNHEALTHY and event.cause is lbkit.Cause.CONSUL_CRITICAL
        if critical_now and event.address in watched:
            critical.set()

    async with balancer(consul_address) as lb:
        lb.add_listener(on_event)
        await lb.wait_ready(timeout=10.0, count=SERVERS)
        print(f"discovered {SERVERS} servers in Consul; streaming {PROMPTS} completions at once")
        before = await stream_completions(lb, PROMPTS, TOKENS)
        if len(before) != SERVERS:
            raise SystemExit(f"expected streams on all {SERVERS} servers, got {dict(before)}")

        print("live feature updates over a bidirectional stream")
        acked = await update_features(lb, "user-7", 5)
        if acked != list(range(5)):
            raise SystemExit(f"expected acks 0..4, got {acked}")

        leaving = servers[0]
        print(f"{leaving.address} reports NOT_SERVING; waiting for Consul's check and discovery")
        watched.append(leaving.address)
        leaving.set_serving(False)
        await asyncio.wait_for(critical.wait(), timeout=10.0)
        after = await stream_completions(lb, PROMPTS, TOKENS)
        if leaving.address in after or len(after) != SERVERS - 1:
            raise SystemExit(f"expected streams on the {SERVERS - 1} healthy servers only, got {dict(after)}")
        print(f"the unhealthy server got no new streams; {len(after)} servers took them all")


def run() -> None:
    # The embedded server runs checks no more often than min_check_interval, like Consul (1 s there).
    with ConsulServer(timings=ConsulTimings(min_check_interval=0.1)) as consul:
        servers = [InferenceServer(consul.address).start() for _ in range(SERVERS)]
        try:
            asyncio.run(main(consul.address, servers))
        finally:
            for s in servers:
                s.stop()


if __name__ == "__main__":
    run()
