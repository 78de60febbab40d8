"""A pool of fast and slow GPU servers three ways: static weights, peak EWMA, the servers' own load reports.

Four model servers register in Consul (the embedded, Consul-compatible lbkit.testing server): two "fast"
GPUs (A100s) with service weight 8 and two "slow" ones (V100s) with weight 4, the slow ones taking five
times as long per call. Each server also reports its load to its clients (``lbkit.server``): an
interceptor attaches an ORCA load report to every response, with the calls per second it serves and how
busy its 4 batch slots are. ConsulDiscovery reads the weights (``Service.Weights.Passing``):

1. ``Weighted`` sends calls in proportion to the Consul weights: 2 of every 3 to the fast GPUs, whatever
   their real speed.
2. ``PeakEwma`` ignores the weights and learns the speeds from each call's latency.
3. ``WeightedRoundRobin`` (gRFC A58) ignores them too and weighs each server by what it reports:
   ``qps / utilization``, the calls per second it could serve at full load. No one configures a weight,
   and a server whose GPU slows down (thermal throttling, a noisy neighbour) loses its share by itself.

Run: python examples/gpu_pool.py
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import lbkit
import lbkit.registration
from lbkit.server import LoadReportInterceptor, ServerLoad
from lbkit.testing import Behavior, ModelServer
from lbkit.testing.consul import ConsulServer
from lbkit.testing.proto import model_service_pb2 as pb2
from lbkit.testing.proto import model_service_pb2_grpc as pb2_grpc

FAST_DELAY = 0.005
SLOW_DELAY = 0.025
SLOTS = 4
CALLS = 600
CONCURRENCY = 6
REPORTED = lbkit.WeightedRoundRobin(blackout_period=0.5, weight_update_period=0.2)
"""Short periods so the example is quick (gRFC A58's defaults: a 10 s blackout, 1 s updates)."""


def run_load(lb: lbkit.Balancer, calls: int = CALLS) -> tuple[Counter[str], float]:
    """``calls`` calls from CONCURRENCY threads; calls per server and the mean latency in ms."""
    stub = pb2_grpc.ModelServiceStub(lb.channel())

    def worker(n: int) -> tuple[Counter[str], float]:
        served: Counter[str] = Counter()
        spent = 0.0
        for _ in range(n):
            start = time.perf_counter()
            reply = stub.Predict(pb2.PredictRequest(features=[1.0]), timeout=5.0)
            spent += time.perf_counter() - start
            served[reply.served_by] += 1
        return served, spent

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(worker, [calls // CONCURRENCY] * CONCURRENCY))
    served = sum((r[0] for r in results), Counter())
    return served, 1e3 * sum(r[1] for r in results) / sum(served.values())


def report(title: str, served: Counter[str], mean_ms: float, kind: dict[str, str]) -> float:
    total = sum(served.values())
    fast = sum(n for address, n in served.items() if kind[address] == "fast") / total
    print(f"{title}: fast GPUs got {fast:.0%} of {total} calls, mean latency {mean_ms:.1f} ms")
    for address in sorted(served, key=lambda a: (kind[a], a)):
        print(f"  {kind[address]:4s} {address}  {served[address]:4d} calls")
    return fast


def main() -> None:
    with ConsulServer() as consul:
        servers = []
        for delay in (FAST_DELAY, FAST_DELAY, SLOW_DELAY, SLOW_DELAY):
            # Each server measures its own load: calls per second, and its slots' use over 0.25 s windows.
            load = ServerLoad(capacity=SLOTS, window=0.25)
            servers.append(
                ModelServer(
                    behavior=Behavior(delay=delay), interceptors=[LoadReportInterceptor(load)]
                ).start()
            )
        kind = {s.address: "fast" if s.behavior.delay == FAST_DELAY else "slow" for s in servers}
        registrations = [
            lbkit.registration.register(
                "gpu-pool",
                s.address,
                weight=8 if kind[s.address] == "fast" else 4,
                consul_address=consul.address,
            )
            for s in servers
        ]
        try:
            discovery = lbkit.ConsulDiscovery("gpu-pool", address=consul.address)
            with lbkit.Balancer(discovery, selector="weighted") as lb:
                lb.wait_ready(count=len(servers))
                weights = {r.address: r.definition["Weights"]["Passing"] for r in registrations}
                print(f"registered in Consul with weights {sorted(weights.values())}")
                weighted_fast = report("Weighted", *run_load(lb), kind)

            discovery = lbkit.ConsulDiscovery("gpu-pool", address=consul.address)
            # A 1 s decay window (the default is 10 s) for a run of a few seconds: one latency spike
            # (a busy machine) then marks a fast server slow for about a second, not for the whole run.
            with lbkit.Balancer(discovery, selector=lbkit.PeakEwma(), latency_decay=1.0) as lb:
                lb.wait_ready(count=len(servers))
                ewma_fast = report("PeakEwma", *run_load(lb), kind)

            discovery = lbkit.ConsulDiscovery("gpu-pool", address=consul.address)
            with lbkit.Balancer(discovery, selector=REPORTED) as lb:
                lb.wait_ready(count=len(servers))
                run_load(lb, CALLS // 2)  # reports arrive; the blackout passes
                reported_fast = report("WeightedRoundRobin", *run_load(lb), kind)
                picker = lb.core.picker
                learned = dict(zip((e.address for e in picker.endpoints), picker.weights, strict=True))
                for address in sorted(learned, key=lambda a: (kind[a], a)):
                    print(f"  {kind[address]:4s} {address}  weight {learned[address]:5.0f}", end="")
                    r = lb.stats[address].load_report
                    if r is not None:
                        print(
                            f"  (last report: {r.qps:.0f} calls/s, {r.application_utilization:.0%} busy)",
                            end="",
                        )
                    print()
        finally:
            for r in registrations:
                r.close()
            for s in servers:
                s.stop(0)

    if not 0.6 <= weighted_fast <= 0.73:
        raise SystemExit(f"Weighted gave the fast GPUs {weighted_fast:.0%}, expected about 67% (8:4)")
    if ewma_fast <= weighted_fast:
        raise SystemExit("PeakEwma did not send more calls to the fast GPUs than their weight share")
    if reported_fast <= weighted_fast:
        raise SystemExit(
            "WeightedRoundRobin did not send more calls to the fast GPUs than their weight share"
        )
    print(
        f"Weighted followed the Consul weights (8:4 -> {weighted_fast:.0%} fast); "
        f"PeakEwma learned the speeds ({ewma_fast:.0%} fast); "
        f"WeightedRoundRobin took them from the servers' load reports ({reported_fast:.0%} fast)"
    )


if __name__ == "__main__":
    main()
