"""Slow start: a new or returning endpoint's weight ramps up over a window, as in Envoy."""

from __future__ import annotations

from lbkit._config import check_float, config

__all__ = ["SlowStart"]


@config
class SlowStart:
    """Ramp an endpoint's weight from ``min_weight_percent`` to full over ``window`` seconds.

    The share at ``elapsed`` seconds is ``(elapsed / window) ** (1 / aggression)``, never below
    ``min_weight_percent / 100``: ``aggression`` 1 is a straight line, above 1 gives the endpoint
    more traffic early, below 1 less.
    """

    window: float = 30.0
    """Seconds until the endpoint gets its full weight."""
    min_weight_percent: float = 10.0
    """The smallest share of its weight an endpoint gets, in (0, 100]."""
    aggression: float = 1.0
    """The curve's shape, > 0."""

    def __post_init__(self) -> None:
        check_float("SlowStart", "window", self.window, minimum=0.0, strict_min=True)
        check_float(
            "SlowStart",
            "min_weight_percent",
            self.min_weight_percent,
            minimum=0.0,
            maximum=100.0,
            strict_min=True,
        )
        check_float("SlowStart", "aggression", self.aggression, minimum=0.0, strict_min=True)

    def factor(self, elapsed: float) -> float:
        """The share of its weight an endpoint gets ``elapsed`` seconds into the window, in [min, 1]."""
        if elapsed >= self.window:
            return 1.0
        floor = self.min_weight_percent / 100.0
        if elapsed <= 0.0:
            return floor
        share: float = (elapsed / self.window) ** (1.0 / self.aggression)
        return max(floor, share)
