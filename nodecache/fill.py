"""The one fill path: every face (FUSE, HTTP, CLI prefetch) reads through here.

A read maps to chunks. Present chunks are served from the store at once; a
missing chunk is fetched once per node however many readers want it
(coalescing), with read-ahead behind it and, after a blob's first open, the
rest of the blob in the background. Failures are retried with jittered
backoff until the read's deadline; only then does the reader get an error,
and the next read tries again.

A blob whose whole-blob proof fails is quarantined by the store; here it gets
a new generation (handles opened before get EIO from then on), its next fetch
waits out a backoff and asks the sources that served the failed attempt last.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import aclosing

from .backoff import delays
from .config import Config
from .index import BlobRecord, Index
from .metrics import Metrics
from .presence import BlobState
from .quarantine import Quarantined
from .store import Store
from .tier import NoSpace
from .upstream import NotFound, PiecewiseSource, Source, UpstreamError

log = logging.getLogger(__name__)

PROOF_ATTEMPTS = 3  # a prefetch tries a blob whose proof keeps failing this many times


class FillError(Exception):
    """A read that could not be satisfied; `errno` is what the FUSE face answers."""

    def __init__(self, message: str, code: int = errno.EIO):
        super().__init__(message)
        self.errno = code


class Filler:
    """Chunk scheduler of one node: coalescing, read-ahead, background fills."""

    def __init__(
        self,
        cfg: Config,
        index: Index,
        store: Store,
        sources: Callable[[BlobRecord, int], list[Source]],
        metrics: Metrics,
        on_quarantine: Callable[[str], None] = lambda blob_id: None,
        pinned: set[str] | None = None,
    ):
        self.cfg, self.index, self.store, self.metrics = cfg, index, store, metrics
        # Told of every blob whose proof failed, after its bytes were moved aside:
        # the owner drops copies the store does not own (the kernel's page cache).
        self.on_quarantine = on_quarantine
        # Where chunk k of a blob may come from, in order (peers, then upstreams);
        # each failure falls through to the next source before any backoff.
        self.sources = sources
        self.closing = False
        self.pinned: set[str] = set() if pinned is None else pinned  # blob ids kept (pins): never evicted
        self.verify_first: set[str] = set()  # blob ids whose reads wait for the whole-blob proof (verify_before_serve)
        self._open: dict[str, int] = {}  # blob id -> open handles / reads in progress
        self._inflight: dict[tuple[str, int], asyncio.Task] = {}
        self._fetched: dict[tuple[str, int], asyncio.Future] = {}  # set once a chunk's bytes are off the wire
        self._wanted: set[tuple[str, int]] = set()  # in-flight chunks a reader waits for: keep them in the page cache
        self._finishing: dict[str, asyncio.Task] = {}
        self._background: dict[str, asyncio.Task] = {}
        self._pumps: set[asyncio.Task] = set()  # streamed multi-chunk requests (runs)
        self._slots = asyncio.Semaphore(cfg.parallel_total)
        self._generation: dict[str, int] = {}  # blob id -> failed proofs seen while running
        self._used: dict[str, dict[str, str]] = {}  # blob id -> {source name: kind} of its current attempt
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

    @property
    def filling(self) -> int:
        """Blobs with a whole-blob fill or its proof still running (0: the node is quiet)."""
        return len(self._background.keys() | self._finishing.keys())

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
        if rec.state == "quarantined" and not self.store.retry(rec):
            wait = rec.retry_at - time.time()
            raise FillError(f"blob {blob_id} failed verification; it is fetched again in {wait:.0f}s")
        return self.store.state(rec)

    def generation(self, blob_id: str) -> int:
        """Changes when the blob fails a proof: a handle opened before must not read on."""
        return self._generation.get(blob_id, 0)

    def chain(self, rec: BlobRecord, k: int) -> list[Source]:
        """Where chunk k may come from, in order; the sources that served a failed attempt of this blob go last."""
        chain = self.sources(rec, k)
        if rec.demoted:
            chain = sorted(chain, key=lambda src: src.name in rec.demoted)  # stable: the rest keep their order
        return chain

    def cached_bytes(self, blob_id: str) -> int:
        """Verified bytes on disk; a quarantined blob counts as none."""
        return self.store.cached_bytes(self.record(blob_id))

    # reads ---------------------------------------------------------------------

    async def read(self, blob_id: str, offset: int, size: int, since: int | None = None) -> bytes:
        """Exactly the bytes [offset, offset+size) clipped to the blob, or FillError.

        `since`: the blob's generation when the reader opened it; if a proof
        failed since, the reader may hold wrong bytes already and gets EIO.
        """
        self.hold(blob_id)
        try:
            self._same_generation(blob_id, since)
            data = await self._read(blob_id, offset, size)
            self._same_generation(blob_id, since)  # a proof may have failed while we waited
            return data
        finally:
            self.release(blob_id)

    def _same_generation(self, blob_id: str, since: int | None) -> None:
        if since is not None and self.generation(blob_id) != since:
            raise FillError(f"blob {blob_id} failed verification after it was opened; open it again")

    async def _backoff(self, blob_id: str, deadline: float) -> None:
        """A quarantined blob is fetched again once its backoff ends: wait for that if it ends before the deadline."""
        rec = self.record(blob_id)
        wait = rec.retry_at - time.time()
        if rec.state == "quarantined" and 0 < wait <= deadline - time.monotonic():
            await asyncio.sleep(wait)

    async def _proven(self, blob_id: str, deadline: float) -> None:
        """verify_before_serve: fill the whole blob and wait until its proof holds, trying
        again after failed proofs, until the deadline."""
        while self.record(blob_id).state != "complete":
            await self._backoff(blob_id, deadline)
            task = self.fill_in_background(blob_id)
            if task is None:
                self.state(blob_id)  # raises why (waiting out a failed proof past the deadline)
                if self.record(blob_id).state != "complete":
                    raise FillError(f"blob {blob_id} could not be filled")
                return
            try:
                await self._await(task, f"proof of {blob_id}", deadline - time.monotonic())
            except FillError:
                if self.record(blob_id).state != "quarantined":
                    raise

    async def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        deadline = time.monotonic() + self.cfg.read_timeout
        await self._backoff(blob_id, deadline)
        if blob_id in self.verify_first:
            await self._proven(blob_id, deadline)
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

    async def _await(self, fut: asyncio.Future, what: str, timeout: float | None = None) -> None:
        """Wait for fills, bounded by read_timeout; map every failure to FillError."""
        timeout = self.cfg.read_timeout if timeout is None else max(0.0, timeout)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
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

    async def read_chunk(
        self, blob_id: str, k: int, sources: list | None = None, local_only: bool = False
    ) -> bytes | None:
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

    def _chunk(
        self,
        st: BlobState,
        k: int,
        demand: bool,
        sources: list | None = None,
        handed: asyncio.Future | None = None,
        background: bool = False,
    ) -> asyncio.Task:
        """The one in-flight fetch of chunk k, created if needed (coalescing).

        `handed`: the chunk is part of a run; its bytes arrive there (None: fetch it alone).
        `background`: part of a whole-blob fill; unless a reader joins, it is
        written around the page cache.
        """
        key = (st.rec.blob_id, k)
        if not background:
            self._wanted.add(key)
        task = self._inflight.get(key)
        if task is not None:
            if demand:
                self.metrics.coalesced_waits.inc()
            return task
        fetched = self._fetched[key] = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(self._fetch(st, k, demand, fetched, sources, handed))
        self._inflight[key] = task
        task.add_done_callback(
            lambda t: (
                self._inflight.pop(key, None),
                self._fetched.pop(key, None),
                self._wanted.discard(key),
                _consume(t),
            )
        )
        return task

    async def _off_the_wire(self, key: tuple[str, int], task: asyncio.Task) -> None:
        """Wait until the chunk's bytes are received (or the task ended), not until they are on disk."""
        fetched = self._fetched.get(key)
        if fetched is None or task.done():
            return
        await asyncio.wait({fetched, task}, return_when=asyncio.FIRST_COMPLETED)

    async def _fetch(
        self,
        st: BlobState,
        k: int,
        demand: bool,
        fetched: asyncio.Future,
        sources: list | None = None,
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
            if data is None:
                kind = "local"
                if not st.has(k):
                    data, kind = await self._fetch_alone(st, k, demand, sources)
        finally:
            if not fetched.done():
                fetched.set_result(None)
        if data is not None:
            # Into the page cache if a reader waits for it or has the blob open (it will
            # read on); a prefetch nobody reads yet goes around it.
            cache = (st.rec.blob_id, k) in self._wanted or self._open.get(st.rec.blob_id, 0) > 0
            try:
                await self.store.write_chunk(st, k, data, cache=cache)
            except NoSpace:
                # Blobs whose hash is being proven cannot be evicted yet; they can be soon.
                proving = [t for b, t in self._finishing.items() if b != st.rec.blob_id]
                if not proving:
                    raise
                await asyncio.wait(proving, timeout=self.cfg.read_timeout)
                await self.store.write_chunk(st, k, data, cache=cache)
        if st.missing == 0:
            self._finish(st)  # readers of the last chunk do not wait for the hash
        return kind

    async def _fetch_alone(self, st: BlobState, k: int, demand: bool, sources: list | None) -> tuple[bytes, str]:
        """One ranged GET for one chunk, under a fetch slot unless a reader waits for it."""
        if not demand:  # demand reads never queue behind read-ahead
            await self._slots.acquire()
        self.metrics.fill_inflight.inc()
        try:
            return await self._fetch_with_retries(st.rec, k, *st.chunk_range(k), sources=sources)
        finally:
            self.metrics.fill_inflight.dec()
            if not demand:
                self._slots.release()

    def _start_run(self, st: BlobState, run: list[int], source) -> list[asyncio.Task]:
        """Chunks run[0..] as one ranged GET from `source`; each chunk is its own coalesced task."""
        loop = asyncio.get_running_loop()
        handed = {k: loop.create_future() for k in run}
        tasks = [self._chunk(st, k, demand=False, handed=handed[k], background=True) for k in run]
        pump = loop.create_task(self._pump(st, run, source, handed, tasks))
        self._pumps.add(pump)
        pump.add_done_callback(lambda t: (self._pumps.discard(t), _consume(t)))
        return tasks

    async def _pump(self, st: BlobState, run: list[int], source, handed: dict, tasks: list[asyncio.Task]) -> None:
        """Hand each chunk of the stream to its task as it arrives.

        At most two chunks of a run wait for their writes (bounded memory).
        If the stream breaks, the chunks not yet handed are fetched one by
        one, with the usual retries and every source in order.
        """
        start, end = st.chunk_range(run[0])[0], st.chunk_range(run[-1])[1]
        kind = source.kind
        i = 0
        await self._slots.acquire()
        self.metrics.fill_inflight.inc()
        try:
            async with aclosing(source.stream(st.rec, start, end, st.rec.chunk_size)) as parts:
                async for data in parts:
                    self._used.setdefault(st.rec.blob_id, {})[source.name] = kind
                    if not handed[run[i]].done():  # its task may have been cancelled
                        handed[run[i]].set_result((data, kind))
                    i += 1
                    if 2 <= i < len(run):  # not after the last part: the connection goes back to the pool now
                        await asyncio.wait({tasks[i - 2]})
        except UpstreamError as e:
            log.info("%s/%s [%d-%d) from %s broke at chunk %d: %s", st.rec.repo_id, st.rec.path, start, end,
                     source.name, run[i] if i < len(run) else run[-1], e)  # fmt: skip
        finally:
            self.metrics.fill_inflight.dec()
            self._slots.release()
            for fut in handed.values():
                if not fut.done():
                    fut.set_result((None, kind))

    async def _fetch_with_retries(
        self, rec: BlobRecord, k: int, start: int, end: int, sources: list | None = None
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
                    data = await src.fetch(rec, start, end)
                    kind = src.kind
                    self._used.setdefault(rec.blob_id, {})[src.name] = kind
                    return data, kind
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
            task.add_done_callback(lambda t: self._proved(blob_id, t))
        return task

    def _proved(self, blob_id: str, task: asyncio.Task) -> None:
        """After a proof: on failure, new generation, sources of the attempt asked last, owner told."""
        used = self._used.pop(blob_id, {})
        if task.cancelled() or not isinstance(task.exception(), Quarantined):
            return
        log.error("%s (chunks from %s)", task.exception(), ", ".join(sorted(used)) or "nowhere")
        # Readers of a verify_before_serve blob never got a byte of it before its proof.
        seen = blob_id not in self.verify_first
        self.quarantined(blob_id, "peer" if "peer" in used.values() else "upstream", sorted(used), seen)

    def quarantined(self, blob_id: str, source: str, served_by: list[str], seen: bool = True) -> None:
        """The store moved a blob aside (failed proof or scrub): everyone holding its bytes must let go.

        `seen`: readers may have been served its bytes (handles opened before get EIO from now on).
        """
        rec = self.record(blob_id)
        rec.demoted = served_by
        self.index.put_blob(rec)
        if seen:
            self._generation[blob_id] = self.generation(blob_id) + 1
        self.metrics.verify_failures.labels(source).inc()
        log.warning("blob %s quarantined (%d failure(s)), fetched again in %.1fs", blob_id, rec.failures,
                    max(0.0, rec.retry_at - time.time()))  # fmt: skip
        self.on_quarantine(blob_id)

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
        todo = deque(k for k in range(st.rec.n_chunks) if not st.has(k))
        workers = self.cfg.parallel_per_blob

        async def worker() -> None:
            # Pipelined: the next run is asked for once this one's bytes are off
            # the wire, while its chunks are still being written and synced.
            writing: list[asyncio.Task] = []
            while claim := self._claim(st, todo, workers):
                run, source = claim
                if source is not None:
                    tasks = self._start_run(st, run, source)
                else:
                    tasks = [self._chunk(st, run[0], demand=False, background=True)]
                await self._off_the_wire((st.rec.blob_id, run[-1]), tasks[-1])
                for t in writing:
                    await t
                writing = tasks
            for t in writing:
                await t

        await asyncio.gather(*(worker() for _ in range(workers)))
        await asyncio.shield(self._finish(st))

    def _claim(self, st: BlobState, todo: deque[int], workers: int) -> tuple[list[int], object | None] | None:
        """The next chunks one worker should fetch with one request: consecutive,
        nobody fetching them yet, all from one source that serves a range in one request; a
        single chunk while the blob is open.

        Returns (chunks, that source), or ([chunk], None) for a fetch through
        the usual chain (a source that serves chunk by chunk, or a chunk a reader
        already fetches); None when nothing is left.
        """
        while todo and st.has(todo[0]):
            todo.popleft()
        if not todo:
            return None
        run = [todo.popleft()]
        size = run_length(len(todo) + 1, workers, self.cfg.fill_run_chunks)
        if self._open.get(st.rec.blob_id, 0) > 0:
            size = 1  # someone reads it front to back: one chunk per request lands chunks in that order
        chain = self.chain(st.rec, run[0])
        if not chain or isinstance(chain[0], PiecewiseSource) or self._busy(st, run[0]) or st.rec.size == 0:
            return run, None
        first = chain[0]
        while (
            len(run) < size
            and todo
            and todo[0] == run[-1] + 1
            and not self._busy(st, todo[0])
            and self.chain(st.rec, todo[0])[0] is first
        ):
            run.append(todo.popleft())
        return run, first

    def _busy(self, st: BlobState, k: int) -> bool:
        return st.has(k) or (st.rec.blob_id, k) in self._inflight

    async def fill_blobs(
        self, blob_ids: list[str], progress: Callable[[int], None] | None = None, attempts: int = PROOF_ATTEMPTS
    ) -> None:
        """Fill and verify blobs completely (prefetch); progress(bytes_done) as it goes.

        A blob whose proof fails is tried again after its backoff, up to `attempts` times in all.
        """
        ids = list(dict.fromkeys(blob_ids))
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._fill_proven(b, attempts)) for b in ids]

        def report() -> None:
            if progress:
                progress(sum(self.cached_bytes(b) for b in ids))

        report()
        try:
            while tasks and not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.25)
                report()
            for t in tasks:
                await t
        finally:
            for t in tasks:
                t.cancel()
        bad = [b for b in ids if self.record(b).state != "complete"]
        if bad:
            raise FillError(f"{len(bad)} blob(s) not complete, e.g. {bad[0]} is {self.record(bad[0]).state}")
        report()

    async def _fill_proven(self, blob_id: str, attempts: int) -> None:
        tried = 0
        for _ in range(2 * attempts):  # each turn fills, or waits out a failed proof's backoff
            task = self.fill_in_background(blob_id)  # None: complete, or waiting out a failed proof
            if task is not None:
                tried += 1
                try:
                    await self._await(task, "prefetch")
                except FillError:
                    if self.record(blob_id).state != "quarantined":
                        raise
            rec = self.record(blob_id)
            if rec.state != "quarantined" or tried == attempts or self.closing:
                return
            await asyncio.sleep(max(0.0, rec.retry_at - time.time()))

    async def close(self) -> None:
        """Stop fetching: every waiting reader is woken with an error."""
        self.closing = True
        tasks = [*self._inflight.values(), *self._pumps, *self._background.values(), *self._finishing.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_length(left: int, workers: int, most: int) -> int:
    """Chunks in the next request of a whole-blob fill with `left` chunks to go.

    Guided self-scheduling: half a fair share, at most `most`. Long runs save
    the idle gap between requests on a connection; shrinking them towards the
    end lets the workers finish together and keeps the in-order hash of the
    blob close behind its last byte.
    """
    return max(1, min(most, left // (2 * workers)))


def _consume(task: asyncio.Future) -> None:
    """Mark a task's exception as seen: its waiters got it already, or nobody waits."""
    if not task.cancelled():
        task.exception()
