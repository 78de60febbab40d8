"""Round robin: exact rotation from a random offset per build."""

from __future__ import annotations

from typing import ClassVar

from lbkit._config import config
from lbkit.endpoint import Endpoint
from lbkit.selectors.base import Picker, Selector
from lbkit.selectors.weighted import AliasPicker, TablePicker
from lbkit.stats import Stats

__all__ = ["RoundRobin"]


@config
class RoundRobin(Selector):
    """Each endpoint in turn, starting at a random endpoint so that many clients do not stampede the first.

    While some endpoint is in slow start (its ``weight_factor`` below 1 when the picker is built), the
    rotation is weighted by the factors instead; endpoint weights are ignored.
    """

    name: ClassVar[str] = "round_robin"
    slow_start: ClassVar[bool] = True

    def _build(self, endpoints: tuple[Endpoint, ...], stats: Stats) -> Picker:
        factors = [stats[e.address].weight_factor for e in endpoints]
        if all(f >= 1.0 for f in factors):
            return TablePicker(endpoints, endpoints)
        return AliasPicker(endpoints, [min(max(f, 1e-9), 1.0) for f in factors])
