"""Put an existing generated stub behind lbkit: the one-line change.

Before, the stub talks to one server through one channel:

    stub = ModelServiceStub(grpc.insecure_channel("10.0.0.1:50051"))

After, it talks to every server, one picked per call:

    stub = ModelServiceStub(lb.channel())

The rest of the code (requests, metadata, timeouts, error handling, streaming) stays as it was.
Run: python examples/wrap_existing_stub.py
"""

from __future__ import annotations

from collections import Counter

import grpc

import lbkit
from lbkit.testing import ModelServer
from lbkit.testing.proto import model_service_pb2 as pb2
from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc


def business_logic(stub: pb2_grpc.ModelServiceStub, calls: int) -> Counter[str]:
    """Code that already exists and takes a stub: it does not change."""
    served: Counter[str] = Counter()
    for i in range(calls):
        reply = stub.Predict(pb2.PredictRequest(features=[float(i), 1.0]), timeout=5.0)
        served[reply.served_by] += 1
    tokens = [t.token for t in stub.StreamPredict(pb2.PredictRequest(max_tokens=4), timeout=5.0)]
    print(f"  streamed tokens: {' '.join(tokens)}")
    return served


def main() -> None:
    servers = [ModelServer().start() for _ in range(3)]
    try:
        print("before: one channel, one server")
        with grpc.insecure_channel(servers[0].address) as channel:
            before = business_logic(pb2_grpc.ModelServiceStub(channel), 30)
        print(f"  calls per server: {dict(before)}")

        print("after: the same stub class over lb.channel()")
        with lbkit.Balancer([s.address for s in servers]) as lb:
            lb.wait_ready(count=len(servers))
            after = business_logic(pb2_grpc.ModelServiceStub(lb.channel()), 30)  # the one-line change
        print(f"  calls per server: {dict(after)}")
        if len(after) != len(servers):
            raise SystemExit(f"expected calls on all {len(servers)} servers, got {dict(after)}")
        print(f"the unchanged stub now spreads its calls over {len(after)} servers")
    finally:
        for s in servers:
            s.stop(0)


if __name__ == "__main__":
    main()
