"""Helpers for tests: a real model server, and (in their own modules) a Consul-compatible server."""

from lbkit.testing.model_server import Behavior, ModelServer

__all__ = ["Behavior", "ModelServer"]
