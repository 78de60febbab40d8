"""The asyncio twin of lbkit: ``lbkit.aio.Balancer`` over ``grpc.aio`` channels."""

from lbkit.aio.balancer import Balancer

__all__ = ["Balancer"]
