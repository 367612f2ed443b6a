"""Retry delays: doubling from a base, jittered, capped (one policy for every retry loop)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator


def delays(base: float, cap: float, jitter: Callable[[float, float], float] = random.uniform) -> Iterator[float]:
    """base, 2·base, 4·base … up to cap, each scaled by a factor in [0.5, 1.5) so that
    many nodes retrying the same upstream do not come back in step."""
    delay = base
    while True:
        yield min(cap, delay) * jitter(0.5, 1.5)
        delay = min(delay * 2, cap)
