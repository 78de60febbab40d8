"""The ``lbkit`` command: ``lbkit demo [...]`` runs the demo, ``lbkit bench [...]`` the benchmark suite."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _bench(args: Sequence[str]) -> int:
    """Run ``python -m benchmarks ARGS`` from the current directory, if it holds the benchmarks package."""
    cwd = os.getcwd()
    if not os.path.isfile(os.path.join(cwd, "benchmarks", "__main__.py")):
        print(
            f"lbkit bench: no benchmarks package in {cwd}.\n"
            "The benchmarks live in lbkit's source tree, not in the installed package: from a checkout, run\n"
            "  cd lbkit && pip install -e '.[bench]' && python -m benchmarks --quick",
            file=sys.stderr,
        )
        return 2
    try:
        return subprocess.call([sys.executable, "-m", "benchmarks", *args], cwd=cwd)
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lbkit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="lbkit", description="Client-side load balancing for gRPC.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run lbkit against local model servers and an embedded Consul-compatible server",
        description="Run lbkit against four local model servers registered in an embedded Consul-compatible "
        "server: each selector in turn, with a slow, a failing and a leaving server.",
    )
    from lbkit._demo.command import add_arguments

    add_arguments(demo)
    commands.add_parser(
        "bench",
        help="run the benchmark suite (python -m benchmarks) from a source checkout",
        add_help=False,
    )
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from lbkit._demo.command import options_from_args, run_demo
    from lbkit.errors import ConfigError

    try:
        opts = options_from_args(args)
    except ConfigError as exc:
        demo.error(str(exc))
    return run_demo(opts)


if __name__ == "__main__":
    sys.exit(main())
