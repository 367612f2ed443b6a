"""Content-addressed blob files on local disk, with per-chunk presence.

A blob lives at `<tier>/blobs/<id[:2]>/<id>`, created sparse at its full size.
A chunk is written, synced, then recorded in the index with its xxh3-64; only
recorded chunks are ever served. When every chunk is present the whole file is
hashed and must equal its id (sha256 or git blob sha1), or it is quarantined
and fetched again after a backoff that grows with each failure.

The store ties its parts together: tiers (tier.py), presence (presence.py),
file work and the fd cache (blobfile.py), the in-order hash (inorderhash.py),
group commit (groupcommit.py), eviction (eviction.py), quarantine
(quarantine.py) and what a start recovers (recovery.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import xxhash

from . import directio, eviction, recovery
from .backoff import proof_backoff
from .blobfile import HASH_BUF, FdCache, FileSlice, bad_chunks, hash_file, hash_range, new_hasher, own_fd, pread
from .groupcommit import GroupCommit
from .index import BlobRecord, Index
from .inorderhash import InOrderHashes, Prefix
from .inuse import InUse
from .layout import validate_blob_id
from .presence import BlobState
from .quarantine import Quarantined, QuarantineDirs
from .tier import NoSpace, Tier

log = logging.getLogger(__name__)
WARM_STEP = 8 << 20  # bytes of read-ahead asked for per call (warm)
# Blobs whose record and presence stay in memory though nothing uses them, the most recently
# used ones (~1 KiB each): a dataset of 10^6 files read once must not keep 10^6 of them.
RECENT_BLOBS = 4096


class Store:
    """Blob files in tiers. Blocking file work runs in the default thread pool, hashing in its own."""

    def __init__(
        self,
        root: Path,
        index: Index,
        fsync: bool = True,
        tiers: list[Tier] | None = None,
        on_evict=None,
        direct_io: bool = True,
        hash_memory: int = 256 * 1024 * 1024,
        hash_nice: int = 0,
        retry_base: float = 0.2,
        quarantine_limits: tuple[int, int, float] = (16, 4 << 30, 7 * 86400.0),
        placement: Callable[[BlobRecord], str] = lambda rec: "disk",
        in_use: InUse | None = None,
        recent: int = RECENT_BLOBS,
    ):
        self.index = index
        self.fsync = fsync
        self.direct_io = direct_io
        self.buffers = directio.BufferPool()
        self._commit = GroupCommit(self._sync_and_record)
        # Hashing gets threads of its own: it must not queue behind chunk writes
        # waiting on the disk, or the proof of a blob lags its last byte. At `hash_nice`: on a
        # busy node their fair share of the CPU was less than the hash needs to keep up with
        # a fill (0.5 CPU-s per GiB), the proof of a shard trailed its last chunk by 0.5-1 s,
        # and a loader's open of it found it partial (served by READs, not passthrough).
        self._hash_pool = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="nodecache-hash", initializer=_set_nice, initargs=(hash_nice,)
        )
        self.hashes = InOrderHashes(self.buffers, self._hash_pool, hash_memory, self.path)
        # Warming too (warm): a read-ahead window asks for every shard in it at once, and the
        # default executor writes the fills' chunks. One at a time, in the order asked for.
        self._warm_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nodecache-warm")
        self._warm_turn = asyncio.Lock()
        self.tiers = {t.name: t for t in (tiers or [Tier("disk", root)])}
        self.retry_base = retry_base
        for t in self.tiers.values():
            t.blobs.mkdir(parents=True, exist_ok=True)
        self.quarantined = QuarantineDirs(self.tiers, quarantine_limits)
        self.in_use = InUse() if in_use is None else in_use  # what eviction must spare (inuse.py)
        self.placement = placement  # the tier a new blob goes to
        self.on_evict = on_evict or (lambda tier, nbytes: None)
        # The shared record (and presence, if read or filled) of each blob in use, partly stored
        # or among the `recent` most recently used, least recently used first (_remember).
        self._recs: OrderedDict[str, BlobRecord] = OrderedDict()
        self._states: dict[str, BlobState] = {}
        self._promised: dict[str, tuple[Tier, int]] = {}  # blob id -> (shm, bytes placed there not yet reserved)
        self.recent = recent
        self._trim_at = recent
        self._fds = FdCache(self.path)
        # After a clean stop the index holds each tier's usage and nothing needs recovering.
        # After someone else wrote to the stopped index every record is checked first.
        self.start = recovery.take_clean_stop(index, self.tiers)
        self.clean_start = self.start == "clean"
        if self.start == "written":
            index.check_all()
        if not self.clean_start:
            recovery.load_usage(index, self.tiers, self.quarantined)
        used = ", ".join(f"{t.name} {t.used:,}" for t in self.tiers.values())
        log.debug("bytes used (%s): %s", "as left at a clean stop" if self.clean_start else "counted", used)

    def path(self, blob_id: str) -> Path:
        validate_blob_id(blob_id)  # never join an unchecked name to a path
        rec = self.record(blob_id)
        tier = self.tiers.get(rec.tier if rec else "disk") or self.tiers["disk"]
        return tier.blob_path(blob_id)

    def record(self, blob_id: str) -> BlobRecord | None:
        """The blob's record, one shared object per blob (it carries last_access)."""
        rec = self._recs.get(blob_id)
        if rec is None:
            rec = self.index.blobs.get(blob_id)
        if rec is not None:
            self._remember(rec)
        return rec

    def _remember(self, rec: BlobRecord) -> None:
        """Keep the record as the most recently used one, dropping the least recently used
        ones past the bound (_trim)."""
        self._recs[rec.blob_id] = rec
        self._recs.move_to_end(rec.blob_id)
        if len(self._recs) > self._trim_at:
            self._trim()

    def _kept(self, blob_id: str) -> bool:
        """Must stay in memory whatever its age: in use (its record and presence are held across
        awaits, and identity checks guard races with them), or partly stored (filling())."""
        st = self._states.get(blob_id)
        return self.in_use.protected(blob_id) or (st is not None and st.rec.state == "partial" and st.cached > 0)

    def _trim(self) -> None:
        """Drop the least recently used records and presences nothing keeps, an eighth of the
        bound at a time, their access times persisted first in one transaction (a record read
        back from the index must carry it: eviction goes by it). A kept one goes to the back
        of the line: a round looks at each entry at most once, and the next comes only after
        as many new entries as it left behind, so each lookup costs a constant on average."""
        target = self.recent - self.recent // 8
        dropped: list[BlobRecord] = []
        for _ in range(len(self._recs)):
            if len(self._recs) <= target:
                break
            blob_id = next(iter(self._recs))
            if self._kept(blob_id):
                self._recs.move_to_end(blob_id)
                continue
            dropped.append(self._recs.pop(blob_id))
            if self._states.get(blob_id) is not None:
                self._drop_state(blob_id)  # a partial blob with nothing stored: its hash starts again
        self.index.blobs.accessed([(rec.blob_id, rec.last_access) for rec in dropped])
        self._trim_at = max(self.recent, len(self._recs) + self.recent // 8)

    async def settle(self) -> None:
        """Wait for chunk records still being committed: the index must not close under them."""
        await self._commit.settled()

    def close(self) -> None:
        self._fds.close()
        self._hash_pool.shutdown(wait=False, cancel_futures=True)
        self._warm_pool.shutdown(wait=False, cancel_futures=True)
        self.buffers.close()
        self.flush_access_times()
        recovery.leave_clean_stop(self.index, self.tiers, synced=self.fsync)

    def flush_access_times(self) -> None:
        """last_access lives in memory while serving; persist it now and then."""
        self.index.blobs.accessed([(rec.blob_id, rec.last_access) for rec in self._recs.values()])

    def recover(self) -> int:
        """Re-verify recorded chunks of partial blobs after a crash (recovery.recover); nothing after a clean stop."""
        return 0 if self.clean_start else recovery.recover(self.index, self.tiers, self.path)

    # presence ---------------------------------------------------------------

    def cached_bytes(self, rec: BlobRecord) -> int:
        if rec.state == "complete":
            return rec.size
        if rec.state == "quarantined":
            return 0
        st = self._states.get(rec.blob_id)
        return st.cached if st else BlobState(rec, self.index.chunks.get(rec.blob_id)).cached

    def partial_bytes(self, blob_ids: list[str]) -> dict[str, int]:
        """Bytes on disk of each of these blobs that is partly stored, read without keeping its
        record (a report must not grow the shared records with every blob it counts)."""
        out = {}
        for blob_id in blob_ids:
            st = self._states.get(blob_id)
            rec = st.rec if st else self._recs.get(blob_id) or self.index.blobs.get(blob_id)
            if rec is not None and rec.state == "partial":
                out[blob_id] = st.cached if st else BlobState(rec, self.index.chunks.get(blob_id)).cached
        return out

    def filling(self) -> list[tuple[str, int]]:
        """(blob id, bytes on disk) of each blob partly stored that this process has touched."""
        return [(b, st.cached) for b, st in self._states.items() if st.rec.state == "partial" and st.cached]

    def state(self, rec: BlobRecord) -> BlobState:
        """The blob's presence, creating its sparse file on first use."""
        return self.states([rec])[0]

    def states(self, recs: list[BlobRecord]) -> list[BlobState]:
        """`state` of each, the records of the files created written in one transaction: each
        commit syncs the index (0.3 ms on a quiet disk, ~4 ms while fills write), and a
        prefetch's first steps are the states of all its blobs, on the loop, before any
        request leaves (9 blobs: 33-40 ms while the disk was busy).

        The records go first, the files after them: a crash between leaves a partial blob
        without its file (nothing to serve), never a complete record over a new file of zeros
        (a complete blob's file is served as it is, unchecked after a restart)."""
        found: list[BlobRecord] = []
        created: dict[str, BlobRecord] = {}
        pruned = False
        for rec in recs:
            st = self._states.get(rec.blob_id)
            if st is not None:
                self._remember(st.rec)
                found.append(st.rec)
                continue
            validate_blob_id(rec.blob_id)
            self._remember(self._recs.get(rec.blob_id, rec))
            rec = self._recs[rec.blob_id]
            if rec.blob_id not in created and not self.path(rec.blob_id).exists():
                if not pruned:
                    self._prune_promises()
                    pruned = True
                rec.tier = self.placement(rec)  # counting the blobs placed before it (promise)
                self._promise(rec)
                if rec.state == "complete":
                    rec.state = "partial"
                created[rec.blob_id] = rec
            found.append(rec)
        if created:
            with self.index.db.write() as txn:
                for rec in created.values():
                    self.index.chunks.drop_in(txn, rec.blob_id)  # a lost file has no chunks
                    self.index.blobs.put_in(txn, rec)
            for rec in created.values():
                path = self.path(rec.blob_id)
                path.parent.mkdir(exist_ok=True)
                with open(path, "wb") as f:
                    f.truncate(rec.size)
        out = []
        for rec in found:
            st = self._states.get(rec.blob_id)
            out.append(self._new_state(rec) if st is None else st)
        return out

    def _new_state(self, rec: BlobRecord) -> BlobState:
        """The presence of a blob whose file exists (its recorded chunks; all of a complete one)."""
        present = (
            self.index.chunks.get(rec.blob_id) if rec.state != "complete" else dict.fromkeys(range(rec.n_chunks), 0)
        )
        st = self._states[rec.blob_id] = BlobState(rec, present)
        if st.missing == rec.n_chunks:
            self.hashes.start(rec)
        return st

    def _drop_state(self, blob_id: str) -> None:
        """Forget a blob's presence (evicted, quarantined, or nothing of it stored)."""
        self._states.pop(blob_id, None)
        self.hashes.drop(blob_id)
        self._drop_promise(blob_id)

    # space ------------------------------------------------------------------

    def _promise(self, rec: BlobRecord) -> None:
        """A new blob placed off the disk tier (shm: its room is decided per blob) is counted
        there until its bytes are reserved (Tier.promised)."""
        self._drop_promise(rec.blob_id)
        if rec.tier != "disk" and rec.size:
            tier = self.tiers[rec.tier]
            tier.promised += rec.size
            self._promised[rec.blob_id] = (tier, rec.size)

    def _prune_promises(self) -> None:
        """Promises hold while their blobs are filled or read: one whose fill failed, was cancelled,
        or whose readers read part of it and left would keep shm closed to new blobs while it
        stays nearly empty. A blob nobody uses goes back to the one count of its bytes, `used`.
        O(blobs promised): those in use, and those let go since the last placement."""
        for blob_id in [b for b in self._promised if not self.in_use.protected(b)]:
            self._drop_promise(blob_id)

    def _drop_promise(self, blob_id: str) -> None:
        tier, left = self._promised.pop(blob_id, (None, 0))
        if tier is not None:
            tier.promised -= left

    def reserve(self, st: BlobState, n: int) -> Tier:
        """Account n bytes to the blob's tier, evicting LRU blobs past the high watermark."""
        tier = self.tiers[st.rec.tier]
        if not tier.fits(n, tier.high):  # high <= 1: what fits under it fits at all (one statvfs a chunk)
            self.evict_lru(tier, n)
            if not tier.fits(n, 1.0):
                raise NoSpace(
                    f"tier {tier.name} is full ({tier.used:,} of {tier.capacity():,} bytes used, "
                    f"{tier.fs_free():,} free on disk) and nothing more can be evicted"
                )
        tier.used += n
        promised, left = self._promised.get(st.rec.blob_id, (None, 0))
        if promised is tier:  # its own bytes are counted once: as used from now on
            took = min(n, left)
            tier.promised -= took
            if left > took:
                self._promised[st.rec.blob_id] = (tier, left - took)
            else:
                del self._promised[st.rec.blob_id]
        return tier

    def evict_lru(self, tier: Tier, incoming: int = 0) -> int:
        """Evict least-recently-read unprotected blobs until under the low watermark (reading the
        index's LRU order only as far as it goes)."""
        ordered = eviction.by_last_use(self.index.counts.least_recent(tier.name), self.record)
        return eviction.evict_lru(tier, incoming, self.quarantined, ordered, self.in_use.protected, self.evict)

    @staticmethod
    def _delete(path: Path) -> None:
        """Unlinking a GiB-sized file takes a while: rename it away now, unlink it in a thread."""
        trash = path.with_name(path.name + f".evicted-{os.getpid()}-{id(path)}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        try:
            asyncio.get_running_loop().run_in_executor(None, trash.unlink, True)
        except RuntimeError:  # no loop (tests, tools): just do it
            trash.unlink(missing_ok=True)

    def evict(self, rec: BlobRecord) -> int:
        """Drop a blob's bytes (its record stays: it can be fetched again). Returns bytes freed."""
        # The shared record, never the caller's copy (evict_lru's come from the index): path()
        # below would otherwise cache the index's record, still "complete", as the shared one,
        # and a second eviction would subtract the bytes of a deleted file again.
        rec = self.record(rec.blob_id) or rec
        cached = self.cached_bytes(rec)
        if cached == 0 and not self.path(rec.blob_id).exists():
            return 0
        # The record first, in one transaction, the file after it: a crash between leaves a
        # partial blob with nothing recorded (recover() gives its blocks back), never a complete
        # record without its file, which a later start would make again, sparse, under it.
        with self.index.db.write() as txn:
            self.index.chunks.drop_in(txn, rec.blob_id)
            self.index.blobs.put_in(txn, dataclasses.replace(rec, state="partial"))
        rec.state = "partial"
        self._fds.forget(rec.blob_id)
        self._delete(self.path(rec.blob_id))
        self._drop_state(rec.blob_id)
        self.tiers[rec.tier].used -= cached
        self.on_evict(rec.tier, cached)
        log.info("evicted %s (%d bytes) from %s", rec.blob_id, cached, rec.tier)
        return cached

    # data -------------------------------------------------------------------

    async def read(self, blob_id: str, offset: int, size: int) -> bytes | bytearray:
        """Bytes already present. Page-cache hits are served on the loop.

        A thread hop costs ~3x the CPU of the read itself, so first try a
        non-blocking read (RWF_NOWAIT); only a cold or partial one goes to a thread.
        """
        fd = self._fds.get(blob_id)
        buf = bytearray(size)
        got = 0
        try:
            got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EWOULDBLOCK):
                raise
        if got == size:
            return buf  # the FUSE session and aiohttp take any buffer: no extra 1 MiB copy
        path = self.path(blob_id)
        rest = await asyncio.get_running_loop().run_in_executor(None, pread, path, size - got, offset + got)
        data = bytes(buf[:got]) + rest
        if len(data) != size:
            raise OSError(errno.EIO, f"short read of blob {blob_id}")
        return data

    async def warm(self, blob_id: str) -> None:
        """Have the kernel read a complete blob into the page cache, for a reader about to open it.

        Its chunks were written around the page cache (O_DIRECT); a passthrough read of a cold
        blob file reads the disk at the reader's pace (~640 MB/s here, against ~2 GB/s warm).
        The reads are asynchronous readahead: one WILLNEED per WARM_STEP, since the kernel
        reads at most the device's read-ahead window per call (one call for a whole
        256 MiB file read 8 MiB here). Blobs are warmed one at a time in a thread of their
        own, which opens the file: one waiting for its turn holds no fd, and is looked at
        when its turn comes (evicted meanwhile, it may be a partial file of a new fill)."""
        async with self._warm_turn:
            rec = self.record(blob_id)
            if rec is not None and rec.state == "complete":
                await asyncio.get_running_loop().run_in_executor(self._warm_pool, _advise, self.path(blob_id))

    def slice(self, blob_id: str, offset: int, size: int, direct: bool = True) -> FileSlice:
        """Bytes already present, to be read by the FUSE session's reply threads: the loop
        neither copies them nor waits for the disk. With `direct` (and direct I/O) they are
        read around the page cache (the reader's kernel keeps its own copy): fresh page-cache
        pages cost more here than the rest of the fill (the storage notes of the README).
        Without, through it: a complete blob's pages stay warm for the next reader."""
        fd = os.dup(self._fds.get(blob_id))
        direct_fd = -1
        if self.direct_io and direct:
            try:
                opened = directio.open_direct(f"/proc/self/fd/{fd}", os.O_RDONLY)  # the same file, even if renamed
            except OSError:
                opened = None
            direct_fd = -1 if opened is None else opened
        return FileSlice(fd, offset, size, direct_fd)

    async def write_chunk(self, st: BlobState, index: int, data: bytes | list, cache: bool = True) -> None:
        """Write, sync, then record: the order that makes a crash safe.

        `data` is the chunk's bytes, or a list of buffers that make them up in
        order (as a stream delivered them). A list is handed over: it is
        emptied once its bytes are written, before the sync and the record, so
        a buffer the receiver lent (upstream/receive.py) goes back to it
        without waiting for the group commit (~35 ms here, which kept twice
        the buffers of a fill alive). It is left whole if nothing was written.
        cache=False: nobody is reading this chunk now, so it goes around the
        page cache (see directio) where the store allows. Syncs and records
        are shared with the chunks written at the same time (groupcommit).
        """
        pieces = list(data) if isinstance(data, list) else [data]
        size = sum(map(len, pieces))
        start, end = st.chunk_range(index)
        if size != end - start:
            raise ValueError(f"chunk {index} of {st.rec.blob_id}: {size} bytes, want {end - start}")
        if st.has(index):
            return  # a twin write: the chunk is on disk and recorded already
        tier = self.reserve(st, size)
        direct = self.direct_io and not cache
        path = self.path(st.rec.blob_id)
        prefix = self.hashes.get(st.rec.blob_id)
        if prefix is not None:
            # Also a chunk going to the page cache: the hash reads back with O_DIRECT, which
            # would write its dirty pages out first and then read them from the disk.
            self.hashes.hold(st, prefix, index, pieces, size)

        def work(parts: list) -> int:
            with own_fd(path, os.O_WRONLY) as fd, self.buffers.buffer(size) if direct else nullcontext() as buf:
                directio.write(fd, path, parts, start, buf)
            h = xxhash.xxh3_64()
            for p in parts:
                h.update(p)
            return h.intdigest()

        try:
            digest = await asyncio.get_running_loop().run_in_executor(None, work, pieces)
        except BaseException:
            self._unreserve(tier, size, prefix, index)
            raise
        if isinstance(data, list):
            data.clear()
        pieces = None  # the hash holds its own list of the buffers, if it holds them
        # Handed to the group commit, the chunk is recorded whatever becomes of this writer: its
        # bytes stay counted until the commit ends, and go back only if no record was made. A
        # writer cancelled by a stop gave them back at once, the record landed anyway, and the
        # clean stop kept a count short of the chunks recorded (a later start then let the
        # quota be overrun by as much).
        # A writer cancelled meanwhile (a stop, a fill stopped for a reader's room) still waits for
        # the commit: until it ends the chunk is neither recorded nor given back, and the writer's
        # fetch keeps the blob protected. Ending at once, it let eviction take the blob first (its
        # recorded chunks only: a reader still found the tier full) and the commit then recorded a
        # chunk of a deleted file, counted twice when evicted again (the tier's usage went below 0).
        commit = self._commit.submit((path, st.rec.blob_id, index, digest))
        cancelled = False
        while not commit.done():
            try:
                await asyncio.wait({commit})
            except asyncio.CancelledError:
                cancelled = True
        self._committed(st, index, size, tier, prefix, commit)
        if cancelled:
            raise asyncio.CancelledError
        commit.result()  # the commit's error, if it failed
        self.hashes.kick(st)

    def _committed(
        self, st: BlobState, index: int, size: int, tier: Tier, prefix: Prefix | None, commit: asyncio.Future
    ) -> None:
        """A chunk's group commit ended: present if its record was made, else its bytes go back."""
        if commit.cancelled() or commit.exception() is not None:
            self._unreserve(tier, size, prefix, index)
        elif st.has(index) or self._states.get(st.rec.blob_id) is not st:  # raced with a twin write or an eviction
            tier.used -= size
        else:
            st.mark(index)

    def _unreserve(self, tier: Tier, size: int, prefix: Prefix | None, index: int) -> None:
        """A chunk that was not recorded: its bytes go back, and a hash that took it is spoiled."""
        tier.used -= size
        if prefix is not None:
            self.hashes.unhold(prefix, index, spoil=True)

    def _sync_and_record(self, chunks: list[tuple[Path, str, int, int]]) -> None:
        """One flush per blob file, then one index transaction, for every chunk written meanwhile."""
        if self.fsync:
            for path in dict.fromkeys(path for path, *_ in chunks):
                with own_fd(path, os.O_RDONLY) as fd:
                    os.fdatasync(fd)
        self.index.chunks.set([(blob_id, index, digest) for _, blob_id, index, digest in chunks])

    async def finish(self, st: BlobState) -> None:
        """All chunks are present: prove the id, then mark complete or quarantine.

        A "source"-kind id names a source version (S3 ETag, file mtime), not the
        content, so no hash can prove it: each chunk was fetched pinned to that
        version, and every chunk on disk must still match its recorded xxh3.
        """
        rec = st.rec
        loop = asyncio.get_running_loop()
        got = await self.hashes.result(st)
        if got is None and rec.kind == "source":
            chunks = self.index.chunks.get(rec.blob_id)
            bad = await loop.run_in_executor(None, bad_chunks, self.path(rec.blob_id), rec.chunk_size, rec.size, chunks)
            bad += [i for i in range(rec.n_chunks) if i not in chunks]
            got = rec.blob_id if not bad else f"bad chunks {bad[:5]}"
        elif got is None:
            got = await loop.run_in_executor(
                self._hash_pool, hash_file, self.path(rec.blob_id), rec.kind, rec.size, self.buffers
            )
        if got == rec.blob_id:
            rec.state = "complete"
            rec.failures, rec.retry_at, rec.demoted, rec.verified_at = 0, 0.0, [], time.time()
            with self.index.db.write() as txn:  # one index sync (on the loop), and both or neither
                self.index.blobs.put_in(txn, rec)
                if rec.kind != "source":  # presence of a complete blob is implied; a source blob's xxh3s are its proof
                    self.index.chunks.drop_in(txn, rec.blob_id)
            return
        self.quarantine(st)
        raise Quarantined(rec.blob_id, f"blob {rec.blob_id} hashed to {got}")

    async def rehash(self, rec: BlobRecord, pace=None, hashed=None) -> str | None:
        """What a complete blob's file proves now (scrub): the id it hashes to, `rec.blob_id` for a
        source-identified blob whose chunks still match their xxh3s, else a description of the damage;
        None if it cannot be checked (a source blob completed before its xxh3s were kept).
        `pace(n)` is awaited before each piece of n bytes is read, `hashed(n)` called after it."""
        path = self.path(rec.blob_id)
        loop = asyncio.get_running_loop()
        if rec.kind == "source":
            chunks = self.index.chunks.get(rec.blob_id)
            if len(chunks) < rec.n_chunks:
                return None
            for i in range(rec.n_chunks):
                if pace is not None:
                    await pace(min(rec.chunk_size, rec.size - i * rec.chunk_size))
                args = (path, rec.chunk_size, rec.size, {i: chunks[i]})
                if await loop.run_in_executor(self._hash_pool, bad_chunks, *args):
                    return f"chunk {i} no longer matches its xxh3"
                if hashed is not None:
                    hashed(min(rec.chunk_size, rec.size - i * rec.chunk_size))
            return rec.blob_id
        hasher = new_hasher(rec.kind, rec.size)
        for start in range(0, rec.size, HASH_BUF):
            n = min(HASH_BUF, rec.size - start)
            if pace is not None:
                await pace(n)
            await loop.run_in_executor(self._hash_pool, hash_range, hasher, path, start, n, self.buffers)
            if hashed is not None:
                hashed(n)
        return hasher.hexdigest()

    async def check_chunks(self, rec: BlobRecord) -> int:
        """Re-check a partial blob's recorded chunks against their xxh3; forget the bad ones
        (they are fetched again). Returns how many were bad."""
        chunks = self.index.chunks.get(rec.blob_id)
        if rec.state != "partial" or not chunks:
            return 0
        args = (self.path(rec.blob_id), rec.chunk_size, rec.size, chunks)
        try:
            bad = await asyncio.get_running_loop().run_in_executor(None, bad_chunks, *args)
        except FileNotFoundError:
            return 0
        if bad:
            self.index.chunks.drop(rec.blob_id, bad)
            st = self._states.get(rec.blob_id)
            for i in bad if st is not None else ():
                if st.has(i):
                    self.tiers[rec.tier].used -= st.chunk_len(i)
                    st.unmark(i)
        return len(bad)

    def quarantine(self, st: BlobState) -> None:
        """Move the blob's bytes aside and schedule its refetch (after proof_backoff).

        Its file goes to its own tier's quarantine dir (QuarantineDirs.move_in).
        """
        rec = st.rec
        self._fds.forget(rec.blob_id)
        self.quarantined.move_in(self.tiers[rec.tier], self.path(rec.blob_id), rec.blob_id, st.cached)
        rec.state = "quarantined"
        rec.failures += 1
        rec.retry_at = time.time() + proof_backoff(rec.failures, self.retry_base)
        self.index.blobs.put(rec)
        self.index.chunks.drop(rec.blob_id)
        self._drop_state(rec.blob_id)
        self.clean_quarantine()

    def retry(self, rec: BlobRecord) -> bool:
        """A quarantined blob whose backoff is over becomes fetchable again (from nothing)."""
        if rec.state != "quarantined" or time.time() < rec.retry_at:
            return False
        rec.state = "partial"
        self.index.blobs.put(rec)
        return True

    def clean_quarantine(self, now: float | None = None) -> int:
        """Enforce the quarantine bounds on every tier; returns bytes freed."""
        return self.quarantined.clean(now)

    def quarantine_usage(self) -> dict[str, tuple[int, int]]:
        """tier name -> (files, bytes) in quarantine."""
        return self.quarantined.usage()

    def discard_quarantined(self, blob_id: str) -> None:
        """Empty a quarantined file passthrough readers still have open (QuarantineDirs.discard)."""
        self.quarantined.discard(blob_id)


def _advise(path: Path) -> None:
    """Ask the kernel to read the whole file into the page cache (Store.warm)."""
    try:
        with own_fd(path, os.O_RDONLY) as fd:
            size = os.fstat(fd).st_size
            for off in range(0, size, WARM_STEP):
                os.posix_fadvise(fd, off, min(WARM_STEP, size - off), os.POSIX_FADV_WILLNEED)
    except FileNotFoundError:
        pass  # evicted or quarantined since its turn came: nothing to warm


def _set_nice(nice: int) -> None:
    """In a new pool thread: its own nice value (Linux schedules threads one by one). Lower than 0
    needs CAP_SYS_NICE; without it the thread keeps the daemon's, and says so once per thread."""
    if nice == 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as e:
        log.warning("hash thread: cannot set nice %d (%s); it runs at the daemon's", nice, e)
