"""A/B testing by user id with consistent hashing.

Three model servers: two run model version "a" (weight 3 each), one runs version "b" (weight 2), so
version "b" should get 2 / 8 = 25% of the users. Each call carries the user id as its hash key (the
``lb-key`` metadata header), and ConsistentHash maps the same key to the same endpoint: a user
always reaches the same model version, and the share of users per version follows the weights.

Run: python examples/ab_routing.py
"""

from __future__ import annotations

from collections import Counter

import lbkit
from lbkit.testing import Behavior, ModelServer
from lbkit.testing.proto import model_service_pb2 as pb2
from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

USERS = 1500
CALLS_PER_USER = 3


def main() -> None:
    plan = [("a", 3), ("a", 3), ("b", 2)]  # (model version, weight) per server
    servers = [ModelServer(behavior=Behavior(model_version=version)).start() for version, _ in plan]
    endpoints = [lbkit.Endpoint(s.address, weight=w) for s, (_, w) in zip(servers, plan, strict=True)]
    expected = {v: sum(w for vv, w in plan if vv == v) / sum(w for _, w in plan) for v, _ in plan}
    try:
        # bounded_load=None: a key never spills to another endpoint, so the split is exact.
        selector = lbkit.ConsistentHash(bounded_load=None)
        with lbkit.Balancer(endpoints, selector=selector) as lb:
            lb.wait_ready(count=len(servers))
            stub = pb2_grpc.ModelServiceStub(lb.channel())
            seen: dict[str, set[str]] = {}
            for user in range(USERS):
                user_id = f"user-{user}"
                for _ in range(CALLS_PER_USER):
                    reply = stub.Predict(
                        pb2.PredictRequest(features=[1.0]), metadata=[("lb-key", user_id)], timeout=5.0
                    )
                    seen.setdefault(user_id, set()).add(reply.model_version)
    finally:
        for s in servers:
            s.stop(0)

    sticky = sum(1 for versions in seen.values() if len(versions) == 1)
    users_per_version = Counter(next(iter(v)) for v in seen.values() if len(v) == 1)
    print(f"{USERS} users, {CALLS_PER_USER} calls each, keyed by user id (lb-key header)")
    for version in sorted(expected):
        share = users_per_version[version] / USERS
        users = users_per_version[version]
        print(f"  version {version}: {users:5d} users = {share:6.1%}  (weights: {expected[version]:.1%})")
    if sticky != USERS:
        raise SystemExit(f"{USERS - sticky} users saw more than one version")
    worst = max(abs(users_per_version[v] / USERS - expected[v]) for v in expected)
    if worst > 0.05:
        raise SystemExit(f"the split is {worst:.1%} off the weights")
    print(f"every user stayed on one model version; the split is within {worst:.1%} of the weights")


if __name__ == "__main__":
    main()
