"""A multimodal pipeline: image encoder, text encoder and fusion, each behind its own balancer.

Each request streams through three services, two servers each, all speaking the ModelService proto:

* the image and text encoders stream embedding chunks as they compute them (StreamPredict), each
  pool behind a least-connections balancer;
* every chunk is forwarded at once, while the encoders are still working, to a fusion server over
  a bidirectional stream (UpdateFeatures) that acknowledges each one;
* a final Predict on the fusion service returns the fused score.

The fusion balancer hashes on the request id (``lb-key``) without bounded loads, so a request's
stream of chunks and its final Predict reach the same fusion server, the one holding its partial state.

Run: python examples/pipeline.py
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc

import lbkit
import lbkit.aio
from lbkit.testing.proto import model_service_pb2 as pb2
from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

REQUESTS = 8
CHUNKS = 4


class Encoder(pb2_grpc.ModelServiceServicer):
    """Streams ``max_tokens`` embedding chunks ("kind:value"), one every few milliseconds."""

    def __init__(self, kind: str, address: str, delay: float) -> None:
        self.kind, self.address, self.delay = kind, address, delay

    def StreamPredict(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        rng = random.Random(sum(request.features))
        for i in range(request.max_tokens):
            time.sleep(self.delay)
            chunk = f"{self.kind}{i}:{rng.random():.3f}"
            yield pb2.TokenResponse(
                token=chunk, is_finished=i == request.max_tokens - 1, served_by=self.address
            )


class Fusion(pb2_grpc.ModelServiceServicer):
    """Collects a request's chunks (UpdateFeatures), then fuses them (Predict); keyed by ``lb-key``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.partial: dict[str, dict[str, float]] = {}
        self.lock = threading.Lock()

    def UpdateFeatures(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for update in request_iterator:
            with self.lock:
                self.partial.setdefault(update.entity_id, {}).update(update.features)
            yield pb2.AckResponse(
                entity_id=update.entity_id, sequence=update.sequence, accepted=True, served_by=self.address
            )

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        request_id = dict(context.invocation_metadata()).get("lb-key", "")
        with self.lock:
            features = self.partial.pop(request_id, None)
        if not features:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"{self.address} holds no chunks of {request_id}"
            )
            raise AssertionError("context.abort raises")
        score = sum(features.values()) / len(features)
        return pb2.PredictResponse(predictions=[score, float(len(features))], served_by=self.address)


def start_pool(make: Any, count: int) -> tuple[list[grpc.Server], list[str]]:
    """``count`` servers on 127.0.0.1 ephemeral ports, each serving ``make(address)``."""
    servers, addresses = [], []
    for _ in range(count):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        pb2_grpc.add_ModelServiceServicer_to_server(make(address), server)
        server.start()
        servers.append(server)
        addresses.append(address)
    return servers, addresses


async def encode(stub: Any, request_id: int, out: asyncio.Queue[Any], prefix: str) -> str:
    """Stream one encoder's chunks into ``out`` as they arrive; the server that encoded them."""
    server = ""
    request = pb2.PredictRequest(features=[float(request_id)], max_tokens=CHUNKS)
    async for chunk in stub.StreamPredict(request, timeout=10.0):
        name, value = chunk.token.split(":")
        await out.put(pb2.FeatureUpdate(entity_id=f"req-{request_id}", features={name: float(value)}))
        server = chunk.served_by
    return f"{prefix}@{server}"


async def handle(request_id: int, image: Any, text: Any, fusion: Any) -> dict[str, Any]:
    """One request through the pipeline; where each stage ran and the fused score."""
    key = f"req-{request_id}"
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def chunks() -> AsyncIterator[Any]:
        sequence = 0
        while (update := await queue.get()) is not None:
            update.sequence = sequence
            sequence += 1
            yield update

    acks = fusion.UpdateFeatures(chunks(), metadata=[("lb-key", key)], timeout=10.0)

    async def read_acks() -> list[str]:
        return [ack.served_by async for ack in acks]

    reader = asyncio.create_task(read_acks())
    stages = await asyncio.gather(
        encode(image, request_id, queue, "image"), encode(text, request_id, queue, "text")
    )
    await queue.put(None)
    ack_servers = await reader
    reply = await fusion.Predict(pb2.PredictRequest(), metadata=[("lb-key", key)], timeout=10.0)
    return {
        "id": key,
        "stages": stages,
        "acks": len(ack_servers),
        "fusion": set(ack_servers) | {reply.served_by},
        "score": reply.predictions[0],
        "chunks": int(reply.predictions[1]),
    }


async def run(pools: dict[str, list[str]]) -> list[dict[str, Any]]:
    async with (
        lbkit.aio.Balancer(pools["image"], selector="least_connections", service="image-encoder") as image_lb,
        lbkit.aio.Balancer(pools["text"], selector="least_connections", service="text-encoder") as text_lb,
        # The fusion servers hold partial state per request: a key must never spill to another server,
        # so bounded loads are off (with them on, a busy owner would pass keys to its neighbour). The
        # servers read the request id from the key header, so it is forwarded to them.
        lbkit.aio.Balancer(
            pools["fusion"],
            selector=lbkit.ConsistentHash(bounded_load=None),
            service="fusion",
            forward_key_header=True,
        ) as fusion_lb,
    ):
        for lb, n in ((image_lb, 2), (text_lb, 2), (fusion_lb, 2)):
            await lb.wait_ready(timeout=10.0, count=n)
        image = pb2_grpc.ModelServiceStub(image_lb.channel())
        text = pb2_grpc.ModelServiceStub(text_lb.channel())
        fusion = pb2_grpc.ModelServiceStub(fusion_lb.channel())
        return list(await asyncio.gather(*(handle(i, image, text, fusion) for i in range(REQUESTS))))


def main() -> None:
    servers: list[grpc.Server] = []
    pools: dict[str, list[str]] = {}
    try:
        for name, make in (
            ("image", lambda a: Encoder("img", a, 0.01)),
            ("text", lambda a: Encoder("txt", a, 0.005)),
            ("fusion", Fusion),
        ):
            started, pools[name] = start_pool(make, 2)
            servers += started
        results = asyncio.run(run(pools))
    finally:
        for s in servers:
            s.stop(0)

    encoders: Counter[str] = Counter()
    for r in results:
        stages = " + ".join(r["stages"])
        fused_on = min(r["fusion"])
        print(
            f"{r['id']}: {stages} -> {r['acks']} chunks streamed to fusion@{fused_on}, score {r['score']:.3f}"
        )
        encoders.update(s.split("@")[1] for s in r["stages"])
        if len(r["fusion"]) != 1 or r["chunks"] != 2 * CHUNKS or r["acks"] != 2 * CHUNKS:
            raise SystemExit(f"{r['id']}: chunks and Predict did not all reach one fusion server: {r}")
    if len(encoders) != 4:
        raise SystemExit(f"expected both servers of each encoder pool to work, got {dict(encoders)}")
    print(
        f"{REQUESTS} requests: encoders spread over {len(encoders)} servers, each request fused on one server"
    )


if __name__ == "__main__":
    main()
