"""Retry delays, one policy for every loop that tries again (pure: no clock, no sleep).

`delays` spaces the tries of one operation (a chunk fetch, a configured repo that
does not resolve); `proof_backoff` is how long a blob whose bytes failed their
proof rests before it is fetched again. Windows that open on a failure and close
by themselves (a failed peer, the mirror's upstream, a rescan) are `expiring.Window`.
"""

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


def proof_backoff(failures: int, base: float, cap: float = 300.0) -> float:
    """Seconds before a blob whose proof failed `failures` times in a row is fetched again:
    base, 4x per failure, capped (a source that keeps sending wrong bytes is not hammered)."""
    return min(cap, base * 4 ** max(0, failures - 1))
