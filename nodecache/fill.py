"""The one fill path: every face (FUSE, HTTP, CLI prefetch) reads through here.

A read maps to chunks. Present chunks are served from the store at once; a
missing chunk is fetched once per node however many readers want it
(coalescing), with read-ahead behind it and, after a blob's first open, the
rest of the blob in the background. Failures are retried with jittered
backoff until the read's deadline; only then does the reader get an error,
and the next read tries again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from collections.abc import Callable

from .config import Config
from .index import BlobRecord, Index
from .metrics import Metrics
from .store import BlobState, NoSpace, Quarantined, Store
from .upstream import NotFound, Upstream, UpstreamError

log = logging.getLogger(__name__)


class FillError(Exception):
    """A read that could not be satisfied; `errno` is what the FUSE face answers."""

    def __init__(self, message: str, code: int = errno.EIO):
        super().__init__(message)
        self.errno = code


class Filler:
    """Chunk scheduler of one node: coalescing, read-ahead, background fills."""

    def __init__(self, cfg: Config, index: Index, store: Store, upstream: Upstream, metrics: Metrics):
        self.cfg = cfg
        self.index = index
        self.store = store
        self.upstream = upstream
        # Where chunk k of a blob may come from, in order (peers, then upstreams);
        # each failure falls through to the next source before any backoff.
        self.sources: Callable[[BlobRecord, int], list[Upstream]] = lambda rec, k: [upstream]
        self.metrics = metrics
        self.closing = False
        self.pinned: set[str] = set()  # blob ids the owner wants kept (pins); never evicted
        self._open: dict[str, int] = {}  # blob id -> open handles / reads in progress
        self._inflight: dict[tuple[str, int], asyncio.Task] = {}
        self._fetched: dict[tuple[str, int], asyncio.Future] = {}  # set once a chunk's bytes are off the wire
        self._finishing: dict[str, asyncio.Task] = {}
        self._background: dict[str, asyncio.Task] = {}
        self._slots = asyncio.Semaphore(cfg.parallel_total)
        store.protected = self.protected

    def protected(self, blob_id: str) -> bool:
        """Eviction must spare pinned blobs, open ones and ones being filled."""
        return (
            blob_id in self.pinned
            or self._open.get(blob_id, 0) > 0
            or blob_id in self._background
            or blob_id in self._finishing
            or any(b == blob_id for b, _ in self._inflight)
        )

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def hold(self, blob_id: str) -> None:
        """An open handle (FUSE open, an HTTP download): keep the blob until release()."""
        self._open[blob_id] = self._open.get(blob_id, 0) + 1

    def release(self, blob_id: str) -> None:
        n = self._open.get(blob_id, 0) - 1
        if n > 0:
            self._open[blob_id] = n
        else:
            self._open.pop(blob_id, None)

    # lookups ------------------------------------------------------------------

    def record(self, blob_id: str) -> BlobRecord:
        rec = self.store.record(blob_id)
        if rec is None:
            raise FillError(f"unknown blob {blob_id}")
        return rec

    def state(self, blob_id: str) -> BlobState:
        rec = self.record(blob_id)
        if rec.state == "quarantined":
            raise FillError(f"blob {blob_id} failed verification and is quarantined")
        return self.store.state(rec)

    def cached_bytes(self, blob_id: str) -> int:
        """Verified bytes on disk; a quarantined blob counts as none."""
        return self.store.cached_bytes(self.record(blob_id))

    # reads ---------------------------------------------------------------------

    async def read(self, blob_id: str, offset: int, size: int) -> bytes:
        """Exactly the bytes [offset, offset+size) clipped to the blob, or FillError."""
        self.hold(blob_id)
        try:
            return await self._read(blob_id, offset, size)
        finally:
            self.release(blob_id)

    async def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        st = self.state(blob_id)
        rec = st.rec
        size = max(0, min(size, rec.size - offset))
        if size == 0:
            return b""
        first, last = offset // rec.chunk_size, (offset + size - 1) // rec.chunk_size
        missing = [k for k in range(first, last + 1) if not st.has(k)]
        source = "local"
        if missing:
            waits = asyncio.gather(*(self._chunk(st, k, demand=True) for k in missing))
            for k in range(last + 1, min(last + 1 + self.cfg.read_ahead_chunks, rec.n_chunks)):
                if not st.has(k):
                    self._chunk(st, k, demand=False)
            await self._await(waits, f"read of {blob_id} [{offset}+{size}]")
            kinds = set(waits.result())
            source = "upstream" if "upstream" in kinds else "peer" if "peer" in kinds else "local"
            st = self.state(blob_id)  # verification may have quarantined it
        data = await self.store.read(blob_id, offset, size)
        self.metrics.read_bytes.labels(source).inc(len(data))
        rec.last_access = time.time()
        return data

    async def _await(self, fut: asyncio.Future, what: str) -> None:
        """Wait for fills, bounded by read_timeout; map every failure to FillError."""
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.cfg.read_timeout)
        except TimeoutError:
            raise FillError(f"{what}: timed out after {self.cfg.read_timeout:.0f}s") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our own reader was cancelled, not the fetch
            raise FillError(f"{what}: daemon is shutting down") from None
        except NoSpace as e:
            raise FillError(f"{what}: {e}", errno.ENOSPC) from None
        except (UpstreamError, Quarantined, OSError) as e:
            raise FillError(f"{what}: {e}") from None
        finally:
            if not fut.done():
                fut.add_done_callback(_consume)

    async def read_chunk(self, blob_id: str, k: int, sources: list | None = None, local_only: bool = False) -> bytes | None:
        """Chunk k of a blob, filled through if needed (the peer API); None if local_only and absent."""
        self.hold(blob_id)
        try:
            st = self.state(blob_id)
            if not 0 <= k < st.rec.n_chunks:
                raise FillError(f"chunk {k} out of range for {blob_id}", errno.EINVAL)
            if not st.has(k):
                if local_only:
                    return None
                await self._await(self._chunk(st, k, demand=True, sources=sources), f"chunk {k} of {blob_id}")
                st = self.state(blob_id)
            start, end = st.chunk_range(k)
            return await self.store.read(blob_id, start, end - start)
        finally:
            self.release(blob_id)

    def _chunk(self, st: BlobState, k: int, demand: bool, sources: list | None = None) -> asyncio.Task:
        """The one in-flight fetch of chunk k, created if needed (coalescing)."""
        key = (st.rec.blob_id, k)
        task = self._inflight.get(key)
        if task is not None:
            if demand:
                self.metrics.coalesced_waits.inc()
            return task
        fetched = self._fetched[key] = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(self._fetch(st, k, demand, fetched, sources))
        self._inflight[key] = task
        task.add_done_callback(lambda t: (self._inflight.pop(key, None), self._fetched.pop(key, None), _consume(t)))
        return task

    async def _off_the_wire(self, key: tuple[str, int], task: asyncio.Task) -> None:
        """Wait until the chunk's bytes are received (or the task ended), not until they are on disk."""
        fetched = self._fetched.get(key)
        if fetched is None or task.done():
            return
        await asyncio.wait({fetched, task}, return_when=asyncio.FIRST_COMPLETED)

    async def _fetch(
        self, st: BlobState, k: int, demand: bool, fetched: asyncio.Future, sources: list | None = None
    ) -> str:
        """Fetch and store chunk k; returns the kind of source it came from.

        The fetch slot is given back as soon as the bytes are in memory: the
        write and its fsync must not keep a connection idle.
        """
        if self.closing:
            raise FillError("daemon is shutting down")
        data, kind = None, "local"
        if not demand:  # demand reads never queue behind read-ahead
            await self._slots.acquire()
        self.metrics.fill_inflight.inc()
        try:
            if not st.has(k):
                data, kind = await self._fetch_with_retries(st.rec, k, *st.chunk_range(k), sources=sources)
        finally:
            self.metrics.fill_inflight.dec()
            if not demand:
                self._slots.release()
            if not fetched.done():
                fetched.set_result(None)
        if data is not None:
            await self.store.write_chunk(st, k, data)
        if st.missing == 0:
            self._finish(st)  # readers of the last chunk do not wait for the hash
        return kind

    async def _fetch_with_retries(
        self, rec: BlobRecord, k: int, start: int, end: int, sources: list | None = None
    ) -> tuple[bytes, str]:
        """Try every source in order; back off and go round again until the deadline."""
        deadline = time.monotonic() + self.cfg.read_timeout
        delay = self.cfg.retry_base
        while True:
            errors: list[UpstreamError] = []
            for src in sources if sources is not None else self.sources(rec, k):
                try:
                    return await src.fetch(rec, start, end), getattr(src, "kind", "upstream")
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
            await asyncio.sleep(min(left, delay * random.uniform(0.5, 1.5)))
            delay = min(delay * 2, 5.0)

    def _finish(self, st: BlobState) -> asyncio.Future:
        """Prove the whole blob once every chunk is in; all callers share one check."""
        blob_id = st.rec.blob_id
        task = self._finishing.get(blob_id)
        if task is None:
            if st.rec.state != "partial":
                done = asyncio.get_running_loop().create_future()
                done.set_result(None)
                return done
            task = self._finishing[blob_id] = asyncio.get_running_loop().create_task(self.store.finish(st))
            task.add_done_callback(lambda t: (self._finishing.pop(blob_id, None), _consume(t)))
            task.add_done_callback(self._count_verify)
        return task

    def _count_verify(self, task: asyncio.Task) -> None:
        if not task.cancelled() and isinstance(task.exception(), Quarantined):
            self.metrics.verify_failures.labels("upstream").inc()
            log.error("%s", task.exception())

    # whole blobs ---------------------------------------------------------------

    def fill_in_background(self, blob_id: str) -> asyncio.Task | None:
        """Start (or join) filling the whole blob; called on first open."""
        try:
            st = self.state(blob_id)
        except FillError:
            return None
        if st.rec.state == "complete":
            return None
        task = self._background.get(blob_id)
        if task is None:
            task = self._background[blob_id] = asyncio.get_running_loop().create_task(self._fill_blob(st))
            task.add_done_callback(lambda t: (self._background.pop(blob_id, None), _consume(t)))
        return task

    async def _fill_blob(self, st: BlobState) -> None:
        todo = iter([k for k in range(st.rec.n_chunks) if not st.has(k)])

        async def worker() -> None:
            # Pipelined: fetch chunk k+1 while chunk k is written and synced,
            # with at most one write outstanding per worker (bounded memory).
            writing: asyncio.Task | None = None
            for k in todo:
                task = self._chunk(st, k, demand=False)
                await self._off_the_wire((st.rec.blob_id, k), task)
                if writing is not None:
                    await writing
                writing = task
            if writing is not None:
                await writing

        await asyncio.gather(*(worker() for _ in range(self.cfg.parallel_per_blob)))
        await asyncio.shield(self._finish(st))

    async def fill_blobs(self, blob_ids: list[str], progress: Callable[[int], None] | None = None) -> None:
        """Fill and verify blobs completely (prefetch); progress(bytes_done) as it goes."""
        ids = list(dict.fromkeys(blob_ids))
        tasks = [t for b in ids if (t := self.fill_in_background(b)) is not None]

        def report() -> None:
            if progress:
                progress(sum(self.cached_bytes(b) for b in ids))

        report()
        while tasks and not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=0.25)
            report()
        for t in tasks:
            await self._await(t, "prefetch")
        bad = [b for b in ids if self.record(b).state != "complete"]
        if bad:
            raise FillError(f"{len(bad)} blob(s) not complete, e.g. {bad[0]} is {self.record(bad[0]).state}")
        report()

    async def close(self) -> None:
        """Stop fetching: every waiting reader is woken with an error."""
        self.closing = True
        tasks = [*self._inflight.values(), *self._background.values(), *self._finishing.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _consume(task: asyncio.Future) -> None:
    """Mark a task's exception as seen: its waiters got it already, or nobody waits."""
    if not task.cancelled():
        task.exception()
