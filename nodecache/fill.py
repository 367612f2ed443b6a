"""The one fill path: every face (FUSE, HTTP, CLI prefetch) reads through here.

A read maps to chunks. Present chunks are served from the store at once; a
missing chunk is fetched once per node however many readers want it
(coalescing, chunks.py), with read-ahead behind it and, after a blob's first
open, the rest of the blob in the background (blobfill.py). Failures are
retried with jittered backoff until the read's deadline; only then does the
reader get an error, and the next read tries again.

A blob whose whole-blob proof fails is quarantined by the store; here it gets
a new generation (handles opened before get EIO from then on), its next fetch
waits out a backoff and asks the sources that served the failed attempt last.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .blobfile import FileSlice
from .blobfill import BlobFills
from .chunks import Chunks, FillError, consume
from .config import Config
from .index import BlobRecord, Index
from .metrics import Metrics
from .presence import BlobState
from .quarantine import Quarantined
from .repos import RepoRef
from .snapfill import SnapshotFills
from .store import Store
from .tier import NoSpace, shortfall
from .upstream import Source, UpstreamError

log = logging.getLogger(__name__)
T = TypeVar("T")

PROOF_ATTEMPTS = 3  # a prefetch tries a blob whose proof keeps failing this many times
_PREPARED = 256  # blobs whose presence a prefetch makes in one index transaction
LOCATE_WAIT = 2.0  # seconds a prefetch waits to learn where its blobs are served from (Filler._locate)
PREFETCH_WINDOW = 4  # a prefetch fills at most this many times parallel_total blobs at once
REPORT_EVERY = 0.25  # seconds between a prefetch's progress reports

__all__ = ["FillError", "Filler", "PROOF_ATTEMPTS"]


class _Stopped(FillError):
    """The fetch a reader waited for was stopped for another reader's room (Filler._make_room):
    the reader asks again, and a fetch of its own starts."""


class Filler:
    """The fill path's face: demand reads, open handles, prefetches, failed proofs."""

    def __init__(
        self,
        cfg: Config,
        index: Index,
        store: Store,
        sources: Callable[[BlobRecord, int], list[Source]],
        metrics: Metrics,
        on_quarantine: Callable[[str], None] = lambda blob_id: None,
    ):
        self.cfg, self.index, self.store, self.metrics = cfg, index, store, metrics
        # Told of every blob whose proof failed, after its bytes were moved aside:
        # the owner drops copies the store does not own (the kernel's page cache).
        self.on_quarantine = on_quarantine
        self.chunks = Chunks(cfg, store, sources, metrics, self._failed_proof, self._make_room)
        self.blobs = BlobFills(cfg, self.chunks, metrics)
        self.snapshots = SnapshotFills(
            cfg,
            index,
            self.fill_in_background,
            self.blobs.claimed,
            store.record,
            store.read,
            store.warm,
            fits=lambda sizes: self._shortfall(sizes)[0] == 0,
        )
        self.verify_first: set[str] = set()  # blob ids whose reads wait for the whole-blob proof (verify_before_serve)
        self._generation: dict[str, int] = {}  # blob id -> failed proofs seen while running

    def _make_room(self, rec: BlobRecord) -> list[asyncio.Task]:
        """A reader's chunk of `rec` found its tier full: the whole-blob fills there that nobody
        reads, keeps or pins (the shards a snapshot fill started ahead of a loader, a fill whose
        reader left) stop, and so do the snapshot fills that would start more; their chunks are
        then evicted for the reader's. Without, a loader on a tight cache got ENOSPC while fills
        nobody was reading yet held the room. Returns the tasks to wait for."""
        in_use = self.store.in_use
        idle = {
            b
            for b in self.blobs.running
            if b != rec.blob_id
            and not in_use.open.get(b)
            and not in_use.kept.get(b)
            and b not in in_use.pinned
            and (r := self.store.record(b)) is not None
            and r.tier == rec.tier
        }
        # Fetches stopped before (for another reader) whose writes still wait for their commits:
        # their blobs leave `running` at once but stay in use until then.
        ending = [t for (b, _), t in self.chunks.inflight.items() if b != rec.blob_id and t.cancelling()]
        if not idle:
            return ending
        stopping = sum(1 for b in idle if not self.blobs.running[b].cancelling())  # not stopped for another
        if stopping:
            log.warning("tier %s is full: %d fill(s) nobody reads stopped for a reader of %s", rec.tier, stopping,
                        rec.blob_id)  # fmt: skip
            self.metrics.fills_yielded.inc(stopping)
        return self.snapshots.stop() + self.blobs.stop(idle) + ending

    @property
    def closing(self) -> bool:
        return self.chunks.closing

    def protected(self, blob_id: str) -> bool:
        """Eviction must spare pinned blobs, open ones and ones being filled (the store's InUse)."""
        return self.store.in_use.protected(blob_id)

    @property
    def inflight(self) -> int:
        return len(self.chunks.inflight)

    @property
    def filling(self) -> int:
        """Blobs with a whole-blob fill or its proof still running (0: the node is quiet)."""
        return len(self.blobs.running.keys() | self.chunks.finishing.keys())

    def hold(self, blob_id: str, paged: bool = True, reader: bool = True) -> None:
        """An open handle (FUSE open, an HTTP download): keep the blob until release().
        `paged`: it reads through the page cache, so the chunks it will read are written there.
        `reader=False`: nobody reads it (a scrub, a peer's background fill): the blob is only kept,
        and its fill stays a background one (runs of chunks, queued after read-ahead)."""
        _count(self.chunks.open if reader else self.store.in_use.kept, blob_id, 1)
        if paged:
            _count(self.chunks.paged, blob_id, 1)

    def release(self, blob_id: str, paged: bool = True, reader: bool = True) -> None:
        _count(self.chunks.open if reader else self.store.in_use.kept, blob_id, -1)
        if paged:
            _count(self.chunks.paged, blob_id, -1)

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

    def cached_bytes(self, blob_id: str) -> int:
        """Verified bytes on disk; a quarantined blob counts as none."""
        return self.store.cached_bytes(self.record(blob_id))

    # reads ---------------------------------------------------------------------

    async def read(
        self,
        blob_id: str,
        offset: int,
        size: int,
        since: int | None = None,
        ahead: bool = True,
        as_slice: bool = False,
        paged: bool = True,
    ) -> bytes | FileSlice:
        """Exactly the bytes [offset, offset+size) clipped to the blob, or FillError.

        `since`: the blob's generation when the reader opened it; if a proof
        failed since, the reader may hold wrong bytes already and gets EIO.
        `ahead`: a miss also fetches the next `read_ahead_chunks` (off for a
        reader whose whole-blob fill runs: its workers fetch those, in order).
        `as_slice`: once present, the bytes as a FileSlice of the blob file (the
        FUSE session sends them from a thread), not read into memory here.
        `paged`: the reader reads on through the page cache: its chunks are written there,
        and its slices are read through it (else with O_DIRECT where the store allows).
        """
        self.hold(blob_id, paged)
        try:
            self._same_generation(blob_id, since)
            data = await self._unstopped(lambda: self._read(blob_id, offset, size, ahead, as_slice, paged))
            try:
                self._same_generation(blob_id, since)  # a proof may have failed while we waited
            except FillError:
                if isinstance(data, FileSlice):
                    data.close()
                raise
            return data
        finally:
            self.release(blob_id, paged)

    async def _unstopped(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, made again if a fetch it waited for was stopped (_Stopped): a reader that
        came as the fills of a blob nobody read were stopped for another reader's room joined them."""
        for _ in range(2):
            try:
                return await attempt()
            except _Stopped:
                await asyncio.sleep(0)  # the stopped fetches leave the in-flight table
        return await attempt()

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
            except _Stopped:
                await asyncio.sleep(0)  # its fill was stopped as this reader came: start another
            except FillError:
                if self.record(blob_id).state != "quarantined":
                    raise

    async def _read(
        self, blob_id: str, offset: int, size: int, ahead: bool, as_slice: bool, paged: bool
    ) -> bytes | FileSlice:
        deadline = time.monotonic() + self.cfg.read_timeout
        await self._backoff(blob_id, deadline)
        if blob_id in self.verify_first:
            with self.chunks.awaited(blob_id):
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
            waits = asyncio.gather(*(self.chunks.get(st, k, demand=True, paged=paged) for k in missing))
            reach = self.cfg.read_ahead_chunks if ahead else 0
            for k in range(last + 1, min(last + 1 + reach, rec.n_chunks)):
                if not st.has(k):
                    self.chunks.get(st, k, demand=False, paged=paged)
            t0 = time.monotonic()
            try:
                await self._await(waits, f"read of {blob_id} [{offset}+{size}]")
            finally:
                self.metrics.read_wait_seconds.observe(time.monotonic() - t0)
            kinds = set(waits.result())
            source = "upstream" if "upstream" in kinds else "peer" if "peer" in kinds else "local"
            st = self.state(blob_id)  # verification may have quarantined it
        if as_slice:
            data = self.store.slice(blob_id, offset, size, direct=not paged)
        else:
            data = await self.store.read(blob_id, offset, size)
        self.metrics.read_bytes.labels(source).inc(len(data))
        rec.last_access = time.time()
        return data

    async def _await(self, fut: asyncio.Future, what: str, timeout: float | None = None, bounded: bool = True) -> None:
        """Wait for fills, bounded by read_timeout (or `timeout`) unless not `bounded`; map every failure to FillError."""
        timeout = None if not bounded else self.cfg.read_timeout if timeout is None else max(0.0, timeout)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise FillError(f"{what}: timed out after {self.cfg.read_timeout:.0f}s") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our own reader was cancelled, not the fetch
            if not self.closing:
                raise _Stopped(f"{what}: the fetch was stopped") from None
            raise FillError(f"{what}: daemon is shutting down") from None
        except NoSpace as e:
            raise FillError(f"{what}: {e}", errno.ENOSPC) from None
        except (UpstreamError, Quarantined, OSError) as e:
            raise FillError(f"{what}: {e}") from None
        finally:
            if not fut.done():
                fut.add_done_callback(consume)

    async def read_chunk(
        self,
        blob_id: str,
        k: int,
        sources: list | None = None,
        local_only: bool = False,
        background: bool = False,
        paged: bool = True,
    ) -> bytes | FileSlice | None:
        """Chunk k of a blob, filled through if needed (the peer API); None if local_only and absent.

        `background`: the peer asking fills in the background; its fetch here waits behind readers.
        `paged=False`: the chunk is written around the page cache and returned as a FileSlice
        (the peer keeps its own copy; this node's would be fresh pages)."""
        self.hold(blob_id, paged, reader=not background)
        try:
            return await self._unstopped(lambda: self._read_chunk(blob_id, k, sources, local_only, background, paged))
        finally:
            self.release(blob_id, paged, reader=not background)

    async def _read_chunk(
        self, blob_id: str, k: int, sources: list | None, local_only: bool, background: bool, paged: bool
    ) -> bytes | FileSlice | None:
        st = self.state(blob_id)
        if not 0 <= k < st.rec.n_chunks:
            raise FillError(f"chunk {k} out of range for {blob_id}", errno.EINVAL)
        if not st.has(k):
            if local_only:
                return None
            task = self.chunks.get(st, k, demand=not background, sources=sources, background=background, paged=paged)
            t0 = time.monotonic()
            try:
                await self._await(task, f"chunk {k} of {blob_id}")
            finally:
                if not background:
                    self.metrics.read_wait_seconds.observe(time.monotonic() - t0)
            st = self.state(blob_id)
        start, end = st.chunk_range(k)
        if not paged:
            return self.store.slice(blob_id, start, end - start, direct=True)
        return await self.store.read(blob_id, start, end - start)

    def _failed_proof(self, blob_id: str, used: dict[str, str]) -> None:
        """After a failed proof: new generation, sources of the attempt asked last, owner told."""
        # Readers of a verify_before_serve blob never got a byte of it before its proof.
        seen = blob_id not in self.verify_first
        self.quarantined(blob_id, "peer" if "peer" in used.values() else "upstream", sorted(used), seen)

    def quarantined(self, blob_id: str, source: str, served_by: list[str], seen: bool = True) -> None:
        """The store moved a blob aside (failed proof or scrub): everyone holding its bytes must let go.

        `seen`: readers may have been served its bytes (handles opened before get EIO from now on).
        """
        rec = self.record(blob_id)
        rec.demoted = served_by
        self.index.blobs.put(rec)
        if seen:
            self._generation[blob_id] = self.generation(blob_id) + 1
        self.metrics.verify_failures.labels(source).inc()
        log.warning("blob %s quarantined (%d failure(s)), fetched again in %.1fs", blob_id, rec.failures,
                    max(0.0, rec.retry_at - time.time()))  # fmt: skip
        self.on_quarantine(blob_id)

    # whole blobs ---------------------------------------------------------------

    def fill_in_background(self, blob_id: str, workers: int | None = None) -> asyncio.Task | None:
        """Start (or join) filling the whole blob; called on first open. `workers`: see BlobFills.start.
        Not a blob larger than its tier can ever hold (Tier.most): it is read lazily, as far as its
        readers go. Filled whole, its chunks ran ahead of the reader until the tier was full of
        them (its own, not evictable), and the reader's next chunk got ENOSPC."""
        try:
            st = self.state(blob_id)
        except FillError:
            return None
        if st.rec.state == "complete" or st.rec.size > self.store.tiers[st.rec.tier].most():
            return None
        return self.blobs.start(st, workers)

    def opened_in_repo(
        self, repo_type: str, repo_id: str, blob_id: str, commit: str | None, reads_here: bool = True
    ) -> asyncio.Task | None:
        """A reader opened a blob of a repo: if it is a weight file, fill what the loader reads next
        (and, if it reads through the mount, read the next shards into the page cache)."""
        return self.snapshots.opened(repo_type, repo_id, blob_id, commit, reads_here)

    def must_fit(
        self,
        ref: RepoRef,
        sizes: dict[str, int],
        pinned: bool = False,
        hot: bool = False,
        kept: dict[str, int] | None = None,
    ) -> None:
        """Refuse a revision that can never be whole here before a byte of it is fetched: filling
        it would evict every other model on the node, then its own first files for its last
        ones, and end with files missing (a 700 GB model on a 500 GB cache). `sizes`: blob id ->
        bytes. A pin's blobs are never evicted, so they may fill the disk tier's whole capacity;
        a prefetch's finished files are evicted past its high watermark. Either way the bytes
        pins keep are not room: `kept` ({blob id: size}, Pins.besides) for a pin about to move
        (what it lets go is), else every pin's. `hot`: shm takes a "hot" pin's blobs of any size."""
        if self.index.links.snapshots_missing(ref.repo_type, ref.repo_id).get(ref.commit) == 0:
            return  # every byte is here already (in a cache made smaller since, too)
        short, where = self._shortfall(sizes, pinned, hot, kept)
        if short:
            raise FillError(
                f"{ref}: {sum(sizes.values()):,} bytes do not fit this node's cache ({where}): nothing fetched",
                errno.ENOSPC,
            )

    def _shortfall(
        self, sizes: dict[str, int], pinned: bool = False, hot: bool = False, kept: dict[str, int] | None = None
    ) -> tuple[int, str]:
        """(bytes of these blobs no placement can hold at once, the bound said in words): tier.shortfall."""
        disk, shm = self.store.tiers["disk"], self.store.tiers.get("shm")
        most = disk.most(1.0 if pinned else disk.high), 0 if shm is None else shm.most(shm.high)
        held = self._held(sizes, kept)
        where = f"disk {most[0]:,}" + ("" if shm is None else f", shm {most[1]:,}") + " bytes at most"
        if held:
            where += f", {held:,} of them kept by other pins"
        return shortfall(list(sizes.values()), *most, self.cfg.shm_file_max, hot, held), where

    def _held(self, sizes: dict[str, int], kept: dict[str, int] | None) -> int:
        """Bytes pins keep besides these blobs: O(this revision) from the pins' total kept up to
        date (InUse.pin), or O(kept) when given."""
        if kept is not None:
            return sum(n for b, n in kept.items() if b not in sizes)
        pinned = self.store.in_use.pinned
        return self.store.in_use.pinned_bytes - sum(pinned[b] for b in sizes if b in pinned)

    async def fill_blobs(
        self, blob_ids: list[str], progress: Callable[[int], None] | None = None, attempts: int = PROOF_ATTEMPTS
    ) -> None:
        """Fill and verify blobs completely (prefetch); progress(bytes_done) as it goes.

        The blobs are taken in order, at most PREFETCH_WINDOW x parallel_total filling at once,
        the next starting as one ends: started all at once, a prefetch of N small files held N
        fills, their requests and presences for the whole job, and each grant and progress
        report looked at all N (O(N^2) per job). `bytes_done` counts the blobs reached: what
        those passed hold (a complete one is passed at once) and what the running ones have
        stored, counted as they go, not by a look at every blob.

        A blob that fails does not stop the others; once all have ended, the error of the
        first (in the order given) that raised is raised, else a FillError naming the blobs not
        complete (a blob still quarantined after its attempts raises nothing). A blob whose proof
        fails is tried again after its backoff, up to `attempts` times in all; while it waits it
        takes no place in the window.
        """
        ids = list(dict.fromkeys(blob_ids))
        window = PREFETCH_WINDOW * self.cfg.parallel_total
        loop = asyncio.get_running_loop()
        # Each blob is kept (held as no reader, as a scrub holds its blob) from its prepare until
        # its fill ends: in between (the sources located, LOCATE_WAIT at most) it is not yet
        # `running`, and an eviction round would take the chunks a resumed prefetch has stored already.
        held: set[str] = set()
        running: dict[str, tuple[int, asyncio.Task]] = {}  # blob id -> (its place in ids, its fill)
        ended: deque[str] = deque()  # blobs whose fills ended, not yet counted
        wake = asyncio.Event()
        passed = 0  # bytes of the blobs passed
        failed: tuple[int, BaseException] | None = None  # the first blob (in ids) that raised
        next_report = loop.time()
        rest = 0  # running blobs that wait out a failed proof's backoff: they take no place in the window

        def resting(n: int) -> None:
            nonlocal rest
            rest += n
            wake.set()

        def let_go(blob_id: str) -> None:
            if blob_id in held:
                held.discard(blob_id)
                self.release(blob_id, paged=False, reader=False)

        def on_end(blob_id: str) -> None:
            ended.append(blob_id)
            wake.set()
            let_go(blob_id)

        def stored(blob_id: str) -> int:
            rec = self.store.record(blob_id)
            return 0 if rec is None else self.store.cached_bytes(rec)

        async def one_ends() -> None:
            """Until a fill ends (counted) or a report is due (made)."""
            nonlocal passed, failed, next_report
            if not ended:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_report - loop.time())):
                        await wake.wait()
            while ended:
                i, task = running.pop(ended.popleft())
                passed += stored(ids[i])
                if not task.cancelled() and task.exception() is not None and (failed is None or i < failed[0]):
                    failed = (i, task.exception())
            if loop.time() >= next_report:
                if progress:
                    progress(passed + sum(stored(b) for b in running))
                next_report = loop.time() + REPORT_EVERY

        try:
            for start in range(0, len(ids), _PREPARED):
                batch = ids[start : start + _PREPARED]
                for b in batch:
                    held.add(b)
                    self.hold(b, paged=False, reader=False)
                await self._prepare(batch)
                await self._locate(batch)
                for i, b in enumerate(batch, start):
                    rec = self.store.record(b)
                    if rec is not None and rec.state == "complete":
                        passed += rec.size
                        let_go(b)
                        continue
                    while len(running) - rest >= window:
                        await one_ends()
                    task = loop.create_task(self._fill_proven(b, attempts, resting))
                    running[b] = (i, task)
                    task.add_done_callback(lambda _, b=b: on_end(b))
            while running:
                await one_ends()
        finally:
            for _, task in running.values():
                task.cancel()
            for b in list(held):
                let_go(b)
        if failed is not None:
            raise failed[1]
        done, bad = 0, []
        for b in ids:  # once, at the end
            rec = self.record(b)
            done += self.store.cached_bytes(rec)
            if rec.state != "complete":
                bad.append(rec)
        if bad:
            raise FillError(f"{len(bad)} blob(s) not complete, e.g. {bad[0].blob_id} is {bad[0].state}")
        if progress:
            progress(done)

    async def _prepare(self, blob_ids: list[str]) -> None:
        """The presence of these blobs (a prefetch's next _PREPARED), made (sparse file, record)
        _PREPARED at a time in one index transaction, before their fills start (Store.states):
        else each fill's first step made its own, with two index syncs, one after another on the loop."""
        recs = [rec for b in blob_ids if (rec := self.store.record(b)) is not None and rec.state == "partial"]
        for start in range(0, len(recs), _PREPARED):
            self.store.states(recs[start : start + _PREPARED])
            await asyncio.sleep(0)  # the loop serves readers between batches

    async def _locate(self, blob_ids: list[str]) -> None:
        """Before the fills of a prefetch's next blobs start: where each blob of several chunks
        is served from, asked of its first source (Source.locate; the Hub tells its CDN redirect,
        most sources have nothing to tell), for all of them at once (at most parallel_total at a time),
        waiting at most LOCATE_WAIT: a Hub slow to answer must not hold the fill up (its requests
        have their own timeouts and retries)."""
        room = asyncio.Semaphore(self.cfg.parallel_total)

        async def locate(rec: BlobRecord) -> None:
            chain = self.chunks.chain(rec, 0)
            if chain:
                async with room:
                    await chain[0].locate(rec)

        recs = [rec for b in blob_ids if (rec := self.store.record(b)) is not None]
        asked = [locate(rec) for rec in recs if rec.n_chunks > 1 and rec.state != "complete"]
        try:
            await asyncio.wait_for(asyncio.gather(*asked), LOCATE_WAIT)
        except TimeoutError:
            log.info("prefetch: the sources' locations not learned within %.0fs; the fill goes on", LOCATE_WAIT)

    async def _fill_proven(self, blob_id: str, attempts: int, resting: Callable[[int], None] = lambda n: None) -> None:
        """Fill a blob and prove it, again after each failed proof's backoff. The wait for a fill is
        not read_timeout's: a shard of a big model shares the link with the others for longer than a
        reader waits, and its requests have their own timeouts. resting(+1/-1) around a backoff: the
        prefetch's window counts no blob that only waits."""
        tried = 0
        for _ in range(2 * attempts):  # each turn fills, or waits out a failed proof's backoff
            task = self.fill_in_background(blob_id)  # None: complete, or waiting out a failed proof
            if task is not None:
                tried += 1
                try:
                    await self._await(task, "prefetch", bounded=False)
                except FillError:
                    if self.record(blob_id).state != "quarantined":
                        raise
            rec = self.record(blob_id)
            if rec.state != "quarantined" or tried == attempts or self.closing:
                return
            resting(1)
            try:
                await asyncio.sleep(max(0.0, rec.retry_at - time.time()))
            finally:
                resting(-1)

    async def close(self) -> None:
        """Stop fetching: every waiting reader is woken with an error."""
        self.chunks.closing = True
        tasks = [*self.snapshots.tasks(), *self.chunks.tasks(), *self.blobs.tasks()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _count(counts: dict[str, int], key: str, n: int) -> None:
    left = counts.get(key, 0) + n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
