"""``python -m lbkit.testing.consul``: the Consul-compatible test server, standalone."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from lbkit.testing.consul.server import ConsulServer

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM; print ``CONSUL_HTTP_ADDR=host:port`` once listening."""
    parser = argparse.ArgumentParser(
        prog="python -m lbkit.testing.consul",
        description="A Consul-compatible HTTP server on loopback, for development and tests.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--datacenter", default="dc1")
    parser.add_argument("--node-name", default="lbkit-node")
    parser.add_argument("--acl-token", default=None, help="require this token (default_policy deny)")
    args = parser.parse_args(argv)
    server = ConsulServer(
        args.host, args.port, datacenter=args.datacenter, node_name=args.node_name, acl_token=args.acl_token
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    server.start()
    print(f"CONSUL_HTTP_ADDR={server.address}", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
