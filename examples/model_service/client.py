"""An asyncio client of the inference service: finds servers in Consul, streams tokens through lbkit.aio."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import lbkit
import lbkit.aio
from lbkit.testing.proto import model_service_pb2 as pb2
from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

__all__ = ["balancer", "stream_completion", "stream_completions", "update_features"]


def balancer(consul_address: str) -> lbkit.aio.Balancer:
    """A least-connections balancer over the passing instances of "inference" in Consul.

    Least connections counts a token stream as one call in flight until it ends, so concurrent
    streams spread over the servers.
    """
    return lbkit.aio.Balancer(
        lbkit.ConsulDiscovery("inference", address=consul_address), selector="least_connections"
    )


async def stream_completion(stub: Any, prompt: int, tokens: int) -> tuple[str, str, float, float]:
    """Stream one completion: (text, server, seconds to the first token, seconds in all)."""
    start = time.perf_counter()
    words: list[str] = []
    server = ""
    first = 0.0
    async for token in stub.StreamPredict(
        pb2.PredictRequest(features=[float(prompt)], max_tokens=tokens), timeout=10.0
    ):
        if not words:
            first = time.perf_counter() - start
        words.append(token.token)
        server = token.served_by
    return " ".join(words), server, first, time.perf_counter() - start


async def stream_completions(lb: lbkit.aio.Balancer, prompts: int, tokens: int) -> Counter[str]:
    """Stream ``prompts`` completions at once; print each; return the streams per server."""
    stub = pb2_grpc.ModelServiceStub(lb.channel())
    results = await asyncio.gather(*(stream_completion(stub, p, tokens) for p in range(prompts)))
    for p, (text, server, first, total) in enumerate(results):
        timing = f"first token after {first * 1e3:.0f} ms, {total * 1e3:.0f} ms in all"
        print(f"  prompt {p} <- {server}: {timing}: {text}")
    return Counter(server for _, server, _, _ in results)


async def _updates(entity: str, count: int) -> AsyncIterator[Any]:
    for seq in range(count):
        yield pb2.FeatureUpdate(entity_id=entity, features={"clicks": float(seq)}, sequence=seq)
        await asyncio.sleep(0.005)


async def update_features(lb: lbkit.aio.Balancer, entity: str, count: int) -> list[int]:
    """Send ``count`` feature updates over one bidirectional stream; return the acknowledged sequences."""
    stub = pb2_grpc.ModelServiceStub(lb.channel())
    acked: list[int] = []
    server = ""
    async for ack in stub.UpdateFeatures(_updates(entity, count), timeout=10.0):
        acked.append(ack.sequence)
        server = ack.served_by
    print(f"  {entity}: {len(acked)} feature updates acknowledged by {server}")
    return acked
