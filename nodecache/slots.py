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
import heapq
import itertools
from collections.abc import Callable

DEMAND, AHEAD, BACKGROUND = 0, 1, 2  # a reader waits for it; read-ahead of a read; whole-blob fills
PRIORITIES = ("demand", "ahead", "background")


class Ticket:
    """One request's place in line, then its slot until released."""

    __slots__ = ("priority", "seq", "granted", "held", "grade", "queued")

    def __init__(self, priority: int, seq: int, granted: asyncio.Future):
        self.priority, self.seq, self.granted, self.held = priority, seq, granted, False
        self.grade = priority  # the priority it was granted its slot at
        self.queued = False  # in line for a slot (acquire), not yet granted, cancelled or given up


class Slots:
    """A priority semaphore with a reserve for demand.

    The line is a heap of (priority, seq, ticket), so a grant costs log(waiting), not a scan of
    every waiter (a prefetch of many files queues many requests). An entry whose ticket left the
    line (granted, cancelled) or was promoted (pushed again at its new priority) is stale and
    dropped when it reaches the top; past twice the live entries the heap is rebuilt."""

    def __init__(self, total: int, reserve: int, on_wait: Callable[[int, float], None] = lambda p, s: None):
        if not 0 <= reserve < total:
            raise ValueError(f"reserve {reserve} must be below total {total}")
        self.total, self.reserve = total, reserve
        self.on_wait = on_wait  # (priority, seconds waited) of every granted ticket that had to wait
        self.in_use = [0, 0, 0]  # slots held, by priority at grant time
        self._waiting: list[tuple[int, int, Ticket]] = []  # heap; see the class docstring
        self._queued = 0  # tickets in line (the heap's live entries)
        self._seq = itertools.count()

    @property
    def used(self) -> int:
        return sum(self.in_use)

    @property
    def waiting(self) -> int:
        """Requests in line for a slot."""
        return self._queued

    @property
    def lent(self) -> int:
        """Slots of the reserve that read-ahead and background fills hold (taken while no reader's request did)."""
        return max(0, self.in_use[AHEAD] + self.in_use[BACKGROUND] - (self.total - self.reserve))

    def reading(self) -> bool:
        """A reader's request holds or waits for a slot: fills leave it the reserve."""
        best = self._best()
        return self.in_use[DEMAND] > 0 or (best is not None and best.priority == DEMAND)

    def _may_take(self, priority: int) -> bool:
        if priority == DEMAND:
            return self.used < self.total + self.lent  # a lent slot is the readers' at once
        # reading() without its look at the waiters: a fill is asked only when no reader's request
        # waits (acquire: nobody waits; _wake: the best waiter, which a reader's would be, is a fill).
        return self.used < (self.total - self.reserve if self.in_use[DEMAND] else self.total)

    def ticket(self, priority: int) -> Ticket:
        return Ticket(priority, next(self._seq), asyncio.get_running_loop().create_future())

    async def acquire(self, t: Ticket) -> None:
        """Wait for a slot for this ticket (at once if one is free and nobody better waits)."""
        if not self._queued and self._may_take(t.priority):
            self._grant(t)
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        t.queued = True
        self._queued += 1
        self._push(t)
        self._wake()
        try:
            await t.granted
        except asyncio.CancelledError:
            if t.queued:
                self._leave(t)
            elif t.held:  # granted as we were cancelled: give it back
                self.release(t)
            raise
        self.on_wait(t.priority, loop.time() - t0)

    def promote(self, t: Ticket, priority: int) -> None:
        """A reader now waits for what this ticket fetches: let it ahead (no-op once it holds a slot)."""
        if priority < t.priority and not t.held:
            t.priority = priority
            if t.queued:
                self._push(t)  # its old entry is stale now
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

    def _push(self, t: Ticket) -> None:
        heapq.heappush(self._waiting, (t.priority, t.seq, t))
        if len(self._waiting) > 2 * self._queued + 64:  # mostly stale: keep the heap's size bounded
            self._waiting = [e for e in self._waiting if _live(e)]
            heapq.heapify(self._waiting)

    def _leave(self, t: Ticket) -> None:
        """The ticket is out of line (granted or cancelled): its entries are stale from now on."""
        t.queued = False
        self._queued -= 1
        if not self._queued:
            self._waiting.clear()

    def _best(self) -> Ticket | None:
        """The waiting ticket of highest priority, then the oldest (stale entries on top dropped)."""
        heap = self._waiting
        while heap and not _live(heap[0]):
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def _wake(self) -> None:
        """Hand free slots to the best waiters, in order; stop at the first that may not take one."""
        while (best := self._best()) is not None:
            if not self._may_take(best.priority):
                return
            heapq.heappop(self._waiting)
            self._leave(best)
            self._grant(best)


def _live(entry: tuple[int, int, Ticket]) -> bool:
    """A heap entry of a ticket still in line, at the priority it has now."""
    priority, _, t = entry
    return t.queued and t.priority == priority
