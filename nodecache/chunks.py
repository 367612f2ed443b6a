"""Chunk fetches of one node: each missing chunk is fetched once however many want it.

Both kinds of fill go through here: demand reads (fill.py) and whole-blob
runs (blobfill.py). A fetch asks the chunk's sources in order, retries with
jittered backoff until the read deadline, writes the bytes and, once a blob's
last chunk is in, proves the whole blob (all callers share one proof).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .backoff import delays
from .config import Config
from .index import BlobRecord
from .metrics import Metrics
from .presence import BlobState
from .quarantine import Quarantined
from .slots import AHEAD, BACKGROUND, DEMAND, PRIORITIES, Slots, Ticket
from .store import Store
from .tier import NoSpace
from .upstream import NotFound, Source, UpstreamError

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (blob id, chunk index)


class FillError(Exception):
    """A read that could not be satisfied; `errno` is what the FUSE face answers."""

    def __init__(self, message: str, code: int = errno.EIO):
        super().__init__(message)
        self.errno = code


class Chunks:
    """The in-flight chunk fetches of a node (coalescing), the fetch slots, and whole-blob proofs."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        sources: Callable[[BlobRecord, int], list[Source]],
        metrics: Metrics,
        on_failed_proof: Callable[[str, dict[str, str]], None],
        make_room: Callable[[BlobRecord], list[asyncio.Task]] = lambda rec: [],
    ):
        self.cfg, self.store, self.metrics = cfg, store, metrics
        # A reader's chunk found the blob's tier full: stop the fills nobody reads and return what
        # to wait for (their chunks then become evictable). Demand first, for space too.
        self.make_room = make_room
        # Where chunk k of a blob may come from, in order (peers, then upstreams);
        # each failure falls through to the next source before any backoff.
        self.sources = sources
        # Told of a blob whose proof failed, with {source name: kind} of the attempt.
        self.on_failed_proof = on_failed_proof
        self.closing = False
        # Kept in the store's InUse, which eviction asks: open handles / reads in progress,
        # in-flight fetches and whole-blob proofs.
        self.in_use = store.in_use
        self.open, self.inflight, self.finishing = store.in_use.open, store.in_use.inflight, store.in_use.finishing
        self._fetched: dict[Key, asyncio.Future] = {}  # set once a chunk's bytes are off the wire
        self._wanted: set[Key] = set()  # in-flight chunks a reader waits for: keep them in the page cache
        # Blob id -> holds of readers that read it through the page cache (the mirror, peers, small
        # FUSE reads). A FUSE handle reads large ranges with O_DIRECT (fusesession): its chunks go
        # around the page cache, whose fresh pages cost more than the rest of the fill (storage notes).
        self.paged: dict[str, int] = {}
        reserve = reserve_for_demand(cfg.parallel_total)
        self.slots = Slots(cfg.parallel_total, reserve, self._waited)
        self._tickets: dict[Key, Ticket] = {}  # chunks whose request waits for (or holds) a slot
        self._used: dict[str, dict[str, str]] = {}  # blob id -> {source name: kind} of its current attempt
        self._awaited: dict[str, int] = {}  # blob id -> readers waiting for all of it (its proof)

    def _waited(self, priority: int, seconds: float) -> None:
        self.metrics.fill_slot_wait_seconds.labels(PRIORITIES[priority]).observe(seconds)

    async def take_slot(self, keys: list[Key], priority: int) -> Ticket:
        """A fetch slot for the request of these chunks; a reader joining one of them later lets it ahead."""
        if keys and keys[0][0] in self._awaited:
            priority = DEMAND  # a reader waits for every chunk of the blob
        t = self.slots.ticket(priority)
        for key in keys:
            self._tickets[key] = t
        try:
            await self.slots.acquire(t)
        except BaseException:
            self.give_slot(keys, t)
            raise
        return t

    def give_slot(self, keys: list[Key], t: Ticket) -> None:
        self.slots.release(t)
        for key in keys:
            if self._tickets.get(key) is t:
                del self._tickets[key]

    @contextmanager
    def awaited(self, blob_id: str) -> Iterator[None]:
        """A reader waits for the whole blob (its proof: verify_before_serve): every request of
        its fill is one a reader waits for, and goes first as a lazy read's would."""
        self._awaited[blob_id] = self._awaited.get(blob_id, 0) + 1
        for (b, _), t in list(self._tickets.items()):
            if b == blob_id:
                self.slots.promote(t, DEMAND)
        try:
            yield
        finally:
            if self._awaited[blob_id] > 1:
                self._awaited[blob_id] -= 1
            else:
                del self._awaited[blob_id]

    def is_open(self, blob_id: str) -> bool:
        return self.open.get(blob_id, 0) > 0

    def chain(self, rec: BlobRecord, k: int) -> list[Source]:
        """Where chunk k may come from, in order; the sources that served a failed attempt of this blob go last."""
        chain = self.sources(rec, k)
        if rec.demoted:
            chain = sorted(chain, key=lambda src: src.name in rec.demoted)  # stable: the rest keep their order
        return chain

    def busy(self, st: BlobState, k: int) -> bool:
        return st.has(k) or (st.rec.blob_id, k) in self.inflight

    def served(self, blob_id: str, src: Source) -> None:
        """Remember who served bytes of this attempt: a failed proof demotes them."""
        self._used.setdefault(blob_id, {})[src.name] = src.kind

    def get(
        self,
        st: BlobState,
        k: int,
        demand: bool,
        sources: list[Source] | None = None,
        handed: asyncio.Future | None = None,
        background: bool = False,
        paged: bool = True,
    ) -> asyncio.Task:
        """The one in-flight fetch of chunk k, created if needed (coalescing).

        `handed`: the chunk is part of a run; its bytes arrive there (None: fetch it alone).
        `background`: part of a whole-blob fill; unless a reader joins, it is
        written around the page cache. `paged`: the reader reads through the page cache.
        """
        key = (st.rec.blob_id, k)
        if not background and paged:
            self._wanted.add(key)
        task = self.inflight.get(key)
        if task is not None:
            if demand:
                self.metrics.coalesced_waits.inc()
            ticket = self._tickets.get(key)
            if ticket is not None and not background:
                self.slots.promote(ticket, DEMAND if demand else AHEAD)
            return task
        loop = asyncio.get_running_loop()
        fetched = self._fetched[key] = loop.create_future()
        priority = DEMAND if demand else BACKGROUND if background else AHEAD
        task = loop.create_task(self._fetch(st, k, priority, fetched, sources, handed))
        self.in_use.fetch_started(key, task)
        task.add_done_callback(
            lambda t: (
                self.in_use.fetch_ended(key),
                self._fetched.pop(key, None),
                self._wanted.discard(key),
                consume(t),
            )
        )
        return task

    async def off_the_wire(self, key: Key, task: asyncio.Task) -> None:
        """Wait until the chunk's bytes are received (or the task ended), not until they are on disk."""
        fetched = self._fetched.get(key)
        if fetched is None or task.done():
            return
        await asyncio.wait({fetched, task}, return_when=asyncio.FIRST_COMPLETED)

    async def _fetch(
        self,
        st: BlobState,
        k: int,
        priority: int,
        fetched: asyncio.Future,
        sources: list[Source] | None = None,
        handed: asyncio.Future | None = None,
    ) -> str:
        """Fetch and store chunk k; returns the kind of source it came from.

        The fetch slot is given back as soon as the bytes are in memory: the
        write and its fsync must not keep a connection idle.
        """
        if self.closing:
            raise FillError("daemon is shutting down")
        data = None
        try:
            if handed is not None:
                data, kind = await handed  # (None, _) if the run broke before this chunk
                handed = None  # nor does its result keep the bytes once they are written
            if data is None:
                kind = "local"
                if not st.has(k):
                    data, kind = await self._fetch_alone(st, k, priority, sources)
        finally:
            if not fetched.done():
                fetched.set_result(None)
        if data is not None:
            # Into the page cache if a reader that reads through it waits for it or has the
            # blob open (it will read on); a prefetch nobody reads yet goes around it.
            cache = (st.rec.blob_id, k) in self._wanted or self.paged.get(st.rec.blob_id, 0) > 0
            try:
                await self.store.write_chunk(st, k, data, cache=cache)
            except NoSpace:
                # Blobs whose hash is being proven cannot be evicted yet; they can be soon. A
                # reader's chunk goes before fills nobody reads: those stop and can be evicted.
                waits = [t for b, t in self.finishing.items() if b != st.rec.blob_id]
                if priority == DEMAND or self.is_open(st.rec.blob_id):
                    waits += self.make_room(st.rec)
                if not waits:
                    raise
                await asyncio.wait(waits, timeout=self.cfg.read_timeout)
                await self.store.write_chunk(st, k, data, cache=cache)
        if st.missing == 0:
            self.finish(st)  # readers of the last chunk do not wait for the hash
        return kind

    async def _fetch_alone(
        self, st: BlobState, k: int, priority: int, sources: list[Source] | None
    ) -> tuple[bytes, str]:
        """One ranged GET for one chunk, under a fetch slot (readers' requests go first)."""
        keys = [(st.rec.blob_id, k)]
        ticket = await self.take_slot(keys, priority)
        self.metrics.fill_inflight.inc()
        try:
            return await self._fetch_with_retries(
                st.rec, k, *st.chunk_range(k), sources=sources, background=priority != DEMAND
            )
        finally:
            self.metrics.fill_inflight.dec()
            self.give_slot(keys, ticket)

    async def _fetch_with_retries(
        self,
        rec: BlobRecord,
        k: int,
        start: int,
        end: int,
        sources: list[Source] | None = None,
        background: bool = False,
    ) -> tuple[bytes, str]:
        """Try every source in order; back off and go round again until the deadline."""
        if start == end:
            return b"", "local"  # the one chunk of an empty file: nothing to ask anyone for
        deadline = time.monotonic() + self.cfg.read_timeout
        backoff = delays(self.cfg.retry_base, 5.0)
        while True:
            errors: list[UpstreamError] = []
            for src in sources if sources is not None else self.chain(rec, k):
                try:
                    data = await src.fetch(rec, start, end, background=background)
                    self.served(rec.blob_id, src)
                    return data, src.kind
                except UpstreamError as e:
                    errors.append(e)
                    log.info("%s/%s [%d-%d) from %s failed: %s", rec.repo_id, rec.path, start, end, src.name, e)
            if not errors:
                raise UpstreamError(f"no source for {rec.repo_id}/{rec.path}")
            if all(isinstance(e, NotFound) for e in errors):
                raise errors[-1]
            left = deadline - time.monotonic()
            if self.closing or left <= 0:
                raise errors[-1]
            log.warning("retrying %s/%s [%d-%d): %s", rec.repo_id, rec.path, start, end, errors[-1])
            await asyncio.sleep(min(left, next(backoff)))

    def finish(self, st: BlobState) -> asyncio.Future:
        """Prove the whole blob once every chunk is in; all callers share one check."""
        blob_id = st.rec.blob_id
        task = self.finishing.get(blob_id)
        if task is None:
            if st.rec.state != "partial":
                done = asyncio.get_running_loop().create_future()
                done.set_result(None)
                return done
            task = self.finishing[blob_id] = asyncio.get_running_loop().create_task(self.store.finish(st))
            task.add_done_callback(lambda t: (self.finishing.pop(blob_id, None), consume(t)))
            task.add_done_callback(lambda t: self._proved(blob_id, t))
        return task

    def _proved(self, blob_id: str, task: asyncio.Task) -> None:
        used = self._used.pop(blob_id, {})
        if task.cancelled() or not isinstance(task.exception(), Quarantined):
            return
        log.error("%s (chunks from %s)", task.exception(), ", ".join(sorted(used)) or "nowhere")
        self.on_failed_proof(blob_id, used)

    def tasks(self) -> list[asyncio.Task]:
        """Every fetch and proof running (for shutdown)."""
        return [*self.inflight.values(), *self.finishing.values()]


def reserve_for_demand(total: int) -> int:
    """Slots read-ahead and background fills leave to readers while a reader's request holds or
    waits for one (slots.py): an eighth, at least one (none of a single slot)."""
    return max(1, total // 8) if total > 1 else 0


def consume(task: asyncio.Future) -> None:
    """Mark a task's exception as seen: its waiters got it already, or nobody waits."""
    if not task.cancelled():
        task.exception()
