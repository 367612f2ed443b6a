"""The node's fetch slots: at most `total` chunk requests at once (up to `reserve` more while
readers take back lent slots), readers first.

A request that waits for a slot holds a Ticket. Free slots go to the waiting
ticket of highest priority (then the oldest); a ticket's priority rises when
a reader starts waiting for what it will fetch. Read-ahead and whole-blob
fills may hold every slot, but while a reader's request holds or waits for
one they take none past `total - reserve`, and the reader takes what they
hold past that (the reserve they borrowed) at once: its requests run beside
theirs, at most `reserve` over `total`, rather than wait for one of them to
end, which at a per-connection cap is a whole run of chunks later (and a
stalled one, a read timeout later). Past `reserve` readers' requests at
once, the next waits until the lent requests have ended and one more does.

The reserve is lent, not kept idle, while no reader's request needs it: a
loader reading a model through the mount waits for the chunks its shard's
fill fetches (no request of its own), and the fills of the shards it reads
next are that fill's continuation. Kept for readers while a blob was open,
an eighth of the node's connections idled for the whole cold start: at a
per-connection cap (a CDN), an eighth of its bandwidth.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

DEMAND, AHEAD, BACKGROUND = 0, 1, 2  # a reader waits for it; read-ahead of a read; whole-blob fills
PRIORITIES = ("demand", "ahead", "background")


class Ticket:
    """One request's place in line, then its slot until released."""

    __slots__ = ("priority", "seq", "granted", "held", "grade")

    def __init__(self, priority: int, seq: int, granted: asyncio.Future):
        self.priority, self.seq, self.granted, self.held = priority, seq, granted, False
        self.grade = priority  # the priority it was granted its slot at


class Slots:
    """A priority semaphore with a reserve for demand."""

    def __init__(self, total: int, reserve: int, on_wait: Callable[[int, float], None] = lambda p, s: None):
        if not 0 <= reserve < total:
            raise ValueError(f"reserve {reserve} must be below total {total}")
        self.total, self.reserve = total, reserve
        self.on_wait = on_wait  # (priority, seconds waited) of every granted ticket that had to wait
        self.in_use = [0, 0, 0]  # slots held, by priority at grant time
        self._waiting: list[Ticket] = []
        self._seq = itertools.count()

    @property
    def used(self) -> int:
        return sum(self.in_use)

    @property
    def lent(self) -> int:
        """Slots of the reserve that read-ahead and background fills hold (taken while no reader's request did)."""
        return max(0, self.in_use[AHEAD] + self.in_use[BACKGROUND] - (self.total - self.reserve))

    def reading(self) -> bool:
        """A reader's request holds or waits for a slot: fills leave it the reserve."""
        return self.in_use[DEMAND] > 0 or any(w.priority == DEMAND for w in self._waiting)

    def _may_take(self, priority: int) -> bool:
        if priority == DEMAND:
            return self.used < self.total + self.lent  # a lent slot is the readers' at once
        # reading() without its scan of the waiters: a fill is asked only when no reader's request
        # waits (acquire: nobody waits; _wake: the best waiter, which a reader's would be, is a fill).
        return self.used < (self.total - self.reserve if self.in_use[DEMAND] else self.total)

    def ticket(self, priority: int) -> Ticket:
        return Ticket(priority, next(self._seq), asyncio.get_running_loop().create_future())

    async def acquire(self, t: Ticket) -> None:
        """Wait for a slot for this ticket (at once if one is free and nobody better waits)."""
        if not self._waiting and self._may_take(t.priority):
            self._grant(t)
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self._waiting.append(t)
        self._wake()
        try:
            await t.granted
        except asyncio.CancelledError:
            if t in self._waiting:
                self._waiting.remove(t)
            elif t.held:  # granted as we were cancelled: give it back
                self.release(t)
            raise
        self.on_wait(t.priority, loop.time() - t0)

    def promote(self, t: Ticket, priority: int) -> None:
        """A reader now waits for what this ticket fetches: let it ahead (no-op once it holds a slot)."""
        if priority < t.priority and not t.held:
            t.priority = priority
            self._wake()

    def release(self, t: Ticket) -> None:
        if t.held:
            t.held = False
            self.in_use[t.grade] -= 1
            self._wake()

    def _grant(self, t: Ticket) -> None:
        t.held = True
        t.grade = t.priority
        self.in_use[t.priority] += 1
        if not t.granted.done():
            t.granted.set_result(None)

    def _wake(self) -> None:
        """Hand free slots to the best waiters, in order; stop at the first that may not take one."""
        while self._waiting:
            best = min(self._waiting, key=lambda w: (w.priority, w.seq))
            if not self._may_take(best.priority):
                return
            self._waiting.remove(best)
            self._grant(best)
