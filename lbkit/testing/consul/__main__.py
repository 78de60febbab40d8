"""``python -m lbkit.testing.consul``: the Consul-compatible test server, standalone."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from lbkit.testing.consul.server import ConsulServer
from lbkit.testing.consul.tls import ServerTLS

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM; print ``CONSUL_HTTP_ADDR=host:port`` (``https://host:port`` with
    TLS) once listening."""
    parser = argparse.ArgumentParser(
        prog="python -m lbkit.testing.consul",
        description="A Consul-compatible HTTP server on loopback, for development and tests.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--datacenter", default="dc1")
    parser.add_argument("--node-name", default="lbkit-node")
    parser.add_argument("--acl-token", default=None, help="require this token (default_policy deny)")
    parser.add_argument(
        "--node-meta",
        action="append",
        default=[],
        metavar="KEY:VALUE",
        help="agent node metadata (repeatable)",
    )
    parser.add_argument("--enterprise", action="store_true", help="serve namespaces and admin partitions")
    parser.add_argument("--partition", default="default", help="the agent's partition (with --enterprise)")
    parser.add_argument("--tls-cert", default=None, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    parser.add_argument("--tls-ca", default=None, help="CA bundle client certificates are verified against")
    parser.add_argument("--verify-incoming", action="store_true", help="require a client certificate")
    args = parser.parse_args(argv)
    meta = {}
    for pair in args.node_meta:
        key, sep, value = pair.partition(":")
        if not sep or not key:
            parser.error(f"--node-meta takes KEY:VALUE, got {pair!r}")
        meta[key] = value
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            parser.error("--tls-cert and --tls-key go together")
        try:
            tls = ServerTLS(args.tls_cert, args.tls_key, args.tls_ca, args.verify_incoming)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        server = ConsulServer(
            args.host,
            args.port,
            datacenter=args.datacenter,
            node_name=args.node_name,
            acl_token=args.acl_token,
            node_meta=meta,
            enterprise=args.enterprise,
            partition=args.partition,
            tls=tls,
        )
    except ValueError as exc:
        parser.error(str(exc))
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    server.start()
    print(f"CONSUL_HTTP_ADDR={server.http_addr if tls else server.address}", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
