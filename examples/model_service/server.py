"""An inference server: Predict, StreamPredict (tokens as they are generated) and UpdateFeatures
(bidirectional), with grpc.health.v1, announced in Consul with a gRPC health check.

It reuses the ModelService proto and generated code shipped in ``lbkit.testing.proto``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import lbkit.registration
from lbkit.testing.proto import model_service_pb2 as pb2
from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

__all__ = ["InferenceServer"]

SERVICE = "inference"
VOCABULARY = ("the", "model", "streams", "each", "token", "as", "soon", "as", "it", "is", "ready")


class InferenceServicer(pb2_grpc.ModelServiceServicer):
    """A stand-in model: a sum for Predict, words for StreamPredict, a feature store for UpdateFeatures."""

    def __init__(self, address: str, token_delay: float) -> None:
        self.address = address
        self.token_delay = token_delay
        self.features: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        return pb2.PredictResponse(
            predictions=[sum(request.features)],
            latency_ms=(time.perf_counter() - start) * 1e3,
            served_by=self.address,
            model_version=request.model_version or "v1",
        )

    def StreamPredict(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        count = request.max_tokens or 8
        seed = int(sum(request.features))
        for i in range(count):
            if not context.is_active():  # the client went away: stop generating
                return
            time.sleep(self.token_delay)  # "generating" the next token
            word = VOCABULARY[(seed + i) % len(VOCABULARY)]
            yield pb2.TokenResponse(token=word, is_finished=i == count - 1, served_by=self.address)

    def UpdateFeatures(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for update in request_iterator:
            with self._lock:
                self.features.setdefault(update.entity_id, {}).update(update.features)
            yield pb2.AckResponse(
                entity_id=update.entity_id, sequence=update.sequence, accepted=True, served_by=self.address
            )


class InferenceServer:
    """A gRPC server on 127.0.0.1 (ephemeral port) registered in Consul while it runs."""

    def __init__(
        self, consul_address: str, *, token_delay: float = 0.02, check_interval: float = 0.2
    ) -> None:
        self.consul_address = consul_address
        self.token_delay = token_delay
        self.check_interval = check_interval
        self.address = ""
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        self._registration: lbkit.registration.Registration | None = None

    def start(self) -> InferenceServer:
        """Serve, report SERVING, and register in Consul with a gRPC check the agent runs."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        port = server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        pb2_grpc.add_ModelServiceServicer_to_server(InferenceServicer(self.address, self.token_delay), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.set_serving(True)
        server.start()
        self._server = server
        self._registration = lbkit.registration.register(
            SERVICE,
            self.address,
            check=lbkit.registration.GrpcCheck(interval=self.check_interval, timeout=1.0),
            meta={"model_version": "v1"},
            consul_address=self.consul_address,
        )
        return self

    def set_serving(self, serving: bool) -> None:
        """What grpc.health.v1 answers (Consul's gRPC check asks about the whole server, "")."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._health.set("", status)

    def stop(self) -> None:
        """Deregister from Consul, then stop serving."""
        if self._registration is not None:
            self._registration.close()
            self._registration = None
        if self._server is not None:
            self._server.stop(0).wait()
            self._server = None
