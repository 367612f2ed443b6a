"""Content-addressed blob files on local disk, with per-chunk presence.

A blob lives at `<root>/blobs/<id[:2]>/<id>`, created sparse at its full size.
A chunk is written, synced, then recorded in the index with its xxh3-64; only
recorded chunks are ever served. When every chunk is present the whole file is
hashed and must equal its id (sha256 or git blob sha1), or it is quarantined:
moved to its tier's `quarantine/` (a rename on the same filesystem), kept there
for inspection within bounds (files, bytes, age), and fetched again after a
backoff that grows with each failure.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import xxhash

from . import directio
from .backoff import proof_backoff
from .groupcommit import GroupCommit
from .index import BlobRecord, Index
from .layout import validate_blob_id

log = logging.getLogger(__name__)

_HASH_BUF = 8 * 1024 * 1024
_MAX_FDS = 256


class NoSpace(Exception):
    """A tier cannot take more bytes, even after evicting everything evictable."""


@dataclass
class Tier:
    """One place blob files live (shm or disk), with a byte quota and watermarks.

    `used` counts bytes of chunks written (reserved before the write), so the
    quota is exceeded by at most the chunks in flight.
    """

    name: str
    root: Path
    quota: int = 0  # 0: the filesystem's size
    high: float = 0.9
    low: float = 0.8
    min_free: int = 0
    used: int = 0  # includes `quarantined`

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    def capacity(self) -> int:
        st = os.statvfs(self.root)
        size = st.f_blocks * st.f_frsize
        return min(self.quota, size) if self.quota else size

    def fs_free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fits(self, n: int, fraction: float) -> bool:
        return self.used + n <= self.capacity() * fraction and self.fs_free() - n >= self.min_free


class BlobState:
    """In-memory presence of a blob's chunks; mirrors the index."""

    def __init__(self, rec: BlobRecord, present: dict[int, int]):
        self.rec = rec
        self.present = bytearray(rec.n_chunks)
        for i in present:
            if i < rec.n_chunks:
                self.present[i] = 1
        self.missing = rec.n_chunks - sum(self.present)
        self.cached = sum(self.chunk_len(i) for i in range(rec.n_chunks) if self.present[i])

    def chunk_len(self, index: int) -> int:
        start, end = self.chunk_range(index)
        return end - start

    def has(self, index: int) -> bool:
        return bool(self.present[index])

    def mark(self, index: int) -> None:
        if not self.present[index]:
            self.present[index] = 1
            self.missing -= 1
            self.cached += self.chunk_len(index)

    def unmark(self, index: int) -> None:
        if self.present[index]:
            self.present[index] = 0
            self.missing += 1
            self.cached -= self.chunk_len(index)

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.rec.chunk_size
        return start, min(start + self.rec.chunk_size, self.rec.size)


class Quarantined(Exception):
    """The blob's bytes did not hash to its id: moved aside, never served, fetched again later."""

    def __init__(self, blob_id: str, message: str):
        super().__init__(message)
        self.blob_id = blob_id


def quarantine_excess(
    entries: list[tuple[str, int, float]], now: float, max_files: int, max_bytes: int, ttl: float
) -> list[str]:
    """Names of quarantined files (name, bytes, mtime) to delete: all but the newest that
    fit in max_files and max_bytes and are younger than ttl."""
    keep_files = keep_bytes = 0
    drop = []
    for name, size, mtime in sorted(entries, key=lambda e: e[2], reverse=True):
        if keep_files < max_files and keep_bytes + size <= max_bytes and now - mtime <= ttl:
            keep_files += 1
            keep_bytes += size
        else:
            drop.append(name)
    return drop


def bad_chunks(path: Path, chunk_size: int, size: int, chunks: dict[int, int]) -> list[int]:
    """Recorded chunks whose bytes on disk no longer match their xxh3 at write time."""
    bad = []
    with open(path, "rb", buffering=0) as f:
        for i, digest in chunks.items():
            data = os.pread(f.fileno(), min(chunk_size, size - i * chunk_size), i * chunk_size)
            if xxhash.xxh3_64_intdigest(data) != digest:
                bad.append(i)
    return bad


def release_unrecorded(path: Path, chunk_size: int, size: int, recorded: set[int]) -> None:
    """Give back the disk blocks of chunks a crash left written but unrecorded.

    The tier counts recorded chunks only, so such blocks would hold space the
    quota cannot see (every chunk in flight at a kill -9). Holes are punched
    over each run of unrecorded chunks; without hole punching (EOPNOTSUPP) a
    blob with nothing recorded is emptied by truncation.
    """
    n = max(1, -(-size // chunk_size))
    runs, start = [], None
    for i in range(n + 1):
        if i < n and i not in recorded:
            start = i if start is None else start
        elif start is not None:
            runs.append((start * chunk_size, min(i * chunk_size, size) - start * chunk_size))
            start = None
    if not runs:
        return
    with _own_fd(path, os.O_RDWR) as fd:
        for offset, length in runs:
            if length > 0 and _LIBC.fallocate(fd, _PUNCH_HOLE, offset, length) != 0:
                if not recorded:
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, size)
                return


_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (linux/falloc.h)
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@contextmanager
def _own_fd(path: Path, flags: int) -> Iterator[int]:
    """An fd for work in a thread. The store's fd cache lives on the loop and may close
    an fd (whose number is then reused for another blob) while a thread still uses it."""
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _pread(path: Path, size: int, offset: int) -> bytes:
    with _own_fd(path, os.O_RDONLY) as fd:
        return os.pread(fd, size, offset)


def _new_hasher(kind: str, size: int):
    return hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % size)


class _Prefix:
    """The whole-blob hash of a fresh fill, advanced over chunks as they land in order,
    so proving a blob at the end costs one chunk, not a re-read of the whole file.

    Chunks written around the page cache that arrive ahead of the hash wait in
    `held` (bounded by the store's hash_memory), so the hash reads them from
    memory, not back from disk, and does not wait for their writes. A held
    chunk whose write then fails spoils the running hash: the proof falls back
    to hashing the file.
    """

    def __init__(self, rec: BlobRecord):
        self.hasher = _new_hasher(rec.kind, rec.size)
        self.next = 0  # chunks [0, next) are taken by the hasher
        self.held: dict[int, tuple[list, int]] = {}  # chunk -> (its buffers, bytes)
        self.spoiled = False
        self.lock = asyncio.Lock()


def _hash_range(hasher, path: Path, start: int, length: int, pool: directio.BufferPool) -> None:
    """Feed file bytes to a hash without leaving them in the page cache (its own fd:
    the store's fd cache may close one)."""
    with pool.buffer(length) as buf, directio.read_into(path, start, length, buf) as view:
        hasher.update(view)


def hash_file(path: Path, kind: str, size: int, pool: directio.BufferPool | None = None) -> str:
    """The id a blob file's content proves: sha256, or git's `blob <n>\\0` sha1."""
    h = _new_hasher(kind, size)
    pool = pool or directio.BufferPool(keep=0)
    for start in range(0, size, _HASH_BUF):
        _hash_range(h, path, start, min(_HASH_BUF, size - start), pool)
    return h.hexdigest()


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
        retry_base: float = 0.2,
        quarantine_limits: tuple[int, int, float] = (16, 4 << 30, 7 * 86400.0),
        placement: Callable[[BlobRecord], str] = lambda rec: "disk",
    ):
        self.index = index
        self.fsync = fsync
        self.direct_io = direct_io
        self.buffers = directio.BufferPool()
        self.hash_memory = hash_memory
        self._held = 0  # bytes of chunks held for the in-order hashes (all blobs)
        self._commit = GroupCommit(self._sync_and_record)
        # Hashing gets threads of its own: it must not queue behind chunk writes
        # waiting on the disk, or the proof of a blob lags its last byte.
        self._hash_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nodecache-hash")
        self.tiers = {t.name: t for t in (tiers or [Tier("disk", root)])}
        self.retry_base = retry_base
        self.quarantine_limits = quarantine_limits  # per tier: files, bytes, seconds
        for t in self.tiers.values():
            (t.root / "blobs").mkdir(parents=True, exist_ok=True)
            t.quarantine.mkdir(exist_ok=True)
        # Set by the filler: blobs that must not be evicted (open, in flight, pinned).
        self.protected: Callable[[str], bool] = lambda blob_id: False
        self.placement = placement  # the tier a new blob goes to
        self.on_evict = on_evict or (lambda tier, nbytes: None)
        self._recs: dict[str, BlobRecord] = {}
        self._states: dict[str, BlobState] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._prefix: dict[str, _Prefix] = {}
        self._hashing: set[asyncio.Task] = set()
        self._load_usage()

    def path(self, blob_id: str) -> Path:
        validate_blob_id(blob_id)  # never join an unchecked name to a path
        rec = self.record(blob_id)
        tier = self.tiers.get(rec.tier if rec else "disk") or self.tiers["disk"]
        return tier.root / "blobs" / blob_id[:2] / blob_id

    def record(self, blob_id: str) -> BlobRecord | None:
        """The blob's record, one shared object per blob (it carries last_access)."""
        rec = self._recs.get(blob_id)
        if rec is None:
            rec = self.index.get_blob(blob_id)
            if rec is not None:
                self._recs[blob_id] = rec
        return rec

    async def settle(self) -> None:
        """Wait for chunk records still being committed: the index must not close under them."""
        await self._commit.settled()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._hash_pool.shutdown(wait=False, cancel_futures=True)
        self.buffers.close()
        self.flush_access_times()

    def flush_access_times(self) -> None:
        """last_access lives in memory while serving; persist it now and then."""
        for rec in self._recs.values():
            stored = self.index.get_blob(rec.blob_id)
            if stored is not None and stored.last_access != rec.last_access:
                stored.last_access = rec.last_access
                self.index.put_blob(stored)

    def _load_usage(self) -> None:
        """Count each tier's bytes from the index; drop what disagrees with the disk."""
        known: set[str] = set()
        for rec in self.index.all_blobs():
            known.add(rec.blob_id)
            tier = self.tiers.get(rec.tier)
            if tier is None or rec.state == "quarantined":
                continue
            path = tier.root / "blobs" / rec.blob_id[:2] / rec.blob_id
            if not path.exists():
                continue  # recover() and state() forget its chunks
            if rec.state == "complete":
                tier.used += rec.size
            else:
                st = BlobState(rec, self.index.chunks(rec.blob_id))
                tier.used += st.cached
        for tier in self.tiers.values():
            for path in (tier.root / "blobs").glob("*/*"):
                if path.name not in known:  # a file no index entry claims
                    log.warning("removing orphan blob file %s", path)
                    path.unlink(missing_ok=True)
            tier.used += sum(size for _, size, _ in self._quarantined(tier))

    # presence ---------------------------------------------------------------

    def cached_bytes(self, rec: BlobRecord) -> int:
        if rec.state == "complete":
            return rec.size
        if rec.state == "quarantined":
            return 0
        st = self._states.get(rec.blob_id)
        return st.cached if st else BlobState(rec, self.index.chunks(rec.blob_id)).cached

    def state(self, rec: BlobRecord) -> BlobState:
        """The blob's presence, creating its sparse file on first use."""
        st = self._states.get(rec.blob_id)
        if st is None:
            validate_blob_id(rec.blob_id)
            self._recs.setdefault(rec.blob_id, rec)
            rec = self._recs[rec.blob_id]
            path = self.path(rec.blob_id)
            if not path.exists():
                rec.tier = self.placement(rec)
                path = self.path(rec.blob_id)
                path.parent.mkdir(exist_ok=True)
                with open(path, "wb") as f:
                    f.truncate(rec.size)
                self.index.drop_chunks(rec.blob_id)  # a lost file has no chunks
                if rec.state == "complete":
                    rec.state = "partial"
                self.index.put_blob(rec)
            present = (
                self.index.chunks(rec.blob_id) if rec.state != "complete" else dict.fromkeys(range(rec.n_chunks), 0)
            )
            st = self._states[rec.blob_id] = BlobState(rec, present)
            if st.missing == rec.n_chunks and rec.kind in ("sha256", "gitsha1"):
                self._prefix[rec.blob_id] = _Prefix(rec)
        return st

    # space ------------------------------------------------------------------

    def reserve(self, st: BlobState, n: int) -> Tier:
        """Account n bytes to the blob's tier, evicting LRU blobs past the high watermark."""
        tier = self.tiers[st.rec.tier]
        if not tier.fits(n, tier.high):
            self.evict_lru(tier, n)
        if not tier.fits(n, 1.0):
            raise NoSpace(
                f"tier {tier.name} is full ({tier.used:,} of {tier.capacity():,} bytes used, "
                f"{tier.fs_free():,} free on disk) and nothing more can be evicted"
            )
        tier.used += n
        return tier

    def evict_lru(self, tier: Tier, incoming: int = 0) -> int:
        """Evict least-recently-read unprotected blobs until under the low watermark."""
        freed = 0
        for path, size, _ in sorted(self._quarantined(tier), key=lambda e: e[2]):  # evidence before cache
            if tier.fits(incoming, tier.low):
                return freed
            freed += self._unlink_quarantined(tier, path, size)
        recs = {r.blob_id: r for r in self.index.all_blobs()}
        recs.update(self._recs)  # in-memory records have the fresh access times
        for rec in sorted(recs.values(), key=lambda r: r.last_access):
            if tier.fits(incoming, tier.low):
                break
            if rec.tier != tier.name or rec.state == "quarantined" or self.protected(rec.blob_id):
                continue
            freed += self.evict(rec)
        return freed

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
        rec = self._recs.get(rec.blob_id, rec)
        cached = self.cached_bytes(rec)
        if cached == 0 and not self.path(rec.blob_id).exists():
            return 0
        fd = self._fds.pop(rec.blob_id, None)
        if fd is not None:
            os.close(fd)
        self._delete(self.path(rec.blob_id))
        self.index.drop_chunks(rec.blob_id)
        rec.state = "partial"
        self.index.put_blob(rec)
        self._states.pop(rec.blob_id, None)
        self._drop_prefix(rec.blob_id)
        self.tiers[rec.tier].used -= cached
        self.on_evict(rec.tier, cached)
        log.info("evicted %s (%d bytes) from %s", rec.blob_id, cached, rec.tier)
        return cached

    def _fd(self, blob_id: str) -> int:
        fd = self._fds.get(blob_id)
        if fd is None:
            fd = os.open(self.path(blob_id), os.O_RDWR | os.O_CLOEXEC)
            self._fds[blob_id] = fd
            if len(self._fds) > _MAX_FDS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(blob_id)
        return fd

    # data -------------------------------------------------------------------

    async def read(self, blob_id: str, offset: int, size: int) -> bytes | bytearray:
        """Bytes already present. Page-cache hits are served on the loop.

        A thread hop costs ~3x the CPU of the read itself, so first try a
        non-blocking read (RWF_NOWAIT); only a cold or partial one goes to a thread.
        """
        fd = self._fd(blob_id)
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
        rest = await asyncio.get_running_loop().run_in_executor(None, _pread, path, size - got, offset + got)
        data = bytes(buf[:got]) + rest
        if len(data) != size:
            raise OSError(errno.EIO, f"short read of blob {blob_id}")
        return data

    async def write_chunk(self, st: BlobState, index: int, data: bytes | list, cache: bool = True) -> None:
        """Write, sync, then record: the order that makes a crash safe.

        `data` is the chunk's bytes, or a list of buffers that make them up in
        order (as a stream delivered them; see upstream.ranges.range_parts).
        cache=False: nobody is reading this chunk now, so it goes around the
        page cache (see directio) where the store allows. Syncs and records
        are shared with the chunks written at the same time (groupcommit).
        """
        pieces = data if isinstance(data, list) else [data]
        size = sum(map(len, pieces))
        start, end = st.chunk_range(index)
        if size != end - start:
            raise ValueError(f"chunk {index} of {st.rec.blob_id}: {size} bytes, want {end - start}")
        if st.has(index):
            return  # a twin write: the chunk is on disk and recorded already
        tier = self.reserve(st, size)
        direct = self.direct_io and not cache
        path = self.path(st.rec.blob_id)
        prefix = self._prefix.get(st.rec.blob_id)
        if prefix is not None and direct:  # a chunk going to the page cache is cheap to read back
            self._hold(st, prefix, index, pieces, size)

        def work() -> int:
            with _own_fd(path, os.O_WRONLY) as fd, self.buffers.buffer(size) if direct else nullcontext() as buf:
                directio.write(fd, path, pieces, start, buf)
            h = xxhash.xxh3_64()
            for p in pieces:
                h.update(p)
            return h.intdigest()

        try:
            digest = await asyncio.get_running_loop().run_in_executor(None, work)
            await self._commit((path, st.rec.blob_id, index, digest))
        except BaseException:
            tier.used -= size
            if prefix is not None:
                self._unhold(prefix, index, spoil=True)
            raise
        if st.has(index) or self._states.get(st.rec.blob_id) is not st:  # raced with a twin write or an eviction
            tier.used -= size
            return
        st.mark(index)
        self._kick(st)

    def _sync_and_record(self, chunks: list[tuple[Path, str, int, int]]) -> None:
        """One flush per blob file, then one index transaction, for every chunk written meanwhile."""
        if self.fsync:
            for path in dict.fromkeys(path for path, *_ in chunks):
                with _own_fd(path, os.O_RDONLY) as fd:
                    os.fdatasync(fd)
        self.index.set_chunks([(blob_id, index, digest) for _, blob_id, index, digest in chunks])

    def _hold(self, st: BlobState, prefix: _Prefix, index: int, pieces: list, size: int) -> None:
        """Keep a chunk for the in-order hash if it is ahead of it and memory allows."""
        if index < prefix.next or index in prefix.held or self._held + size > self.hash_memory:
            return
        prefix.held[index] = (pieces, size)
        self._held += size
        self._kick(st)

    def _unhold(self, prefix: _Prefix, index: int, spoil: bool = False) -> list | None:
        """Stop holding a chunk; returns its pieces if it was held."""
        held = prefix.held.pop(index, None)
        if held is not None:
            self._held -= held[1]
            return held[0]
        if spoil and index < prefix.next:
            prefix.spoiled = True  # the hasher took bytes that never made it to disk
        return None

    def _drop_prefix(self, blob_id: str) -> None:
        prefix = self._prefix.pop(blob_id, None)
        if prefix is not None:
            for index in list(prefix.held):
                self._unhold(prefix, index)

    def _kick(self, st: BlobState) -> None:
        """Advance the blob's hash if its next chunk is here (the lock serializes; a late task finds nothing)."""
        prefix = self._prefix.get(st.rec.blob_id)
        if prefix is None or prefix.spoiled or prefix.next >= st.rec.n_chunks:
            return
        if not (prefix.next in prefix.held or st.has(prefix.next)):
            return
        task = asyncio.get_running_loop().create_task(self._advance(st, prefix))
        self._hashing.add(task)
        task.add_done_callback(lambda t: (self._hashing.discard(t), t.cancelled() or t.exception()))

    async def finish(self, st: BlobState) -> None:
        """All chunks are present: prove the id, then mark complete or quarantine.

        A "source"-kind id names a source version (S3 ETag, file mtime), not the
        content, so no hash can prove it: each chunk was fetched pinned to that
        version, and every chunk on disk must still match its recorded xxh3.
        """
        rec = st.rec
        loop = asyncio.get_running_loop()
        prefix = self._prefix.get(rec.blob_id)
        if prefix is not None:
            await self._advance(st, prefix)
            self._drop_prefix(rec.blob_id)
        if prefix is not None and prefix.next == rec.n_chunks and not prefix.spoiled:
            got = prefix.hasher.hexdigest()
        elif rec.kind == "source":
            chunks = self.index.chunks(rec.blob_id)
            bad = await loop.run_in_executor(None, bad_chunks, self.path(rec.blob_id), rec.chunk_size, rec.size, chunks)
            bad += [i for i in range(rec.n_chunks) if i not in chunks]
            got = rec.blob_id if not bad else f"bad chunks {bad[:5]}"
        else:
            got = await loop.run_in_executor(
                self._hash_pool, hash_file, self.path(rec.blob_id), rec.kind, rec.size, self.buffers
            )
        if got == rec.blob_id:
            rec.state = "complete"
            rec.failures, rec.retry_at, rec.demoted, rec.verified_at = 0, 0.0, [], time.time()
            self.index.put_blob(rec)
            if rec.kind != "source":  # presence of a complete blob is implied; a source blob's xxh3s are its proof
                self.index.drop_chunks(rec.blob_id)
            return
        self.quarantine(st)
        raise Quarantined(rec.blob_id, f"blob {rec.blob_id} hashed to {got}")

    async def _advance(self, st: BlobState, prefix: _Prefix) -> None:
        """Feed the in-order run of available chunks to the blob's running hash.

        A held chunk is hashed from memory; a chunk only on disk is read back
        (around the page cache) one chunk ahead of the hash, so the disk and
        the hash work at the same time.
        """
        rec = st.rec
        path = self.path(rec.blob_id)
        loop = asyncio.get_running_loop()

        def load(k: int):
            start, end = st.chunk_range(k)
            buf = self.buffers.take(end - start)  # given back by digest(); if we are cancelled, garbage
            return buf, [directio.read_into(path, start, end - start, buf)]

        def digest(item) -> None:
            buf, pieces = item
            for p in pieces:
                prefix.hasher.update(p)
            if buf is not None:
                pieces[0].release()
                self.buffers.give(buf)

        def on_disk(k: int) -> bool:
            return k < rec.n_chunks and k not in prefix.held and st.has(k)

        async with prefix.lock:
            ahead: asyncio.Future | None = None
            while not prefix.spoiled and self._prefix.get(rec.blob_id) is prefix:
                k = prefix.next
                if k in prefix.held:
                    item = (None, self._unhold(prefix, k))
                elif on_disk(k):
                    item = await (ahead if ahead is not None else loop.run_in_executor(self._hash_pool, load, k))
                else:
                    break
                prefix.next = k + 1  # taken: a failed write of chunk k from now on spoils the hash
                ahead = loop.run_in_executor(self._hash_pool, load, k + 1) if on_disk(k + 1) else None
                await loop.run_in_executor(self._hash_pool, digest, item)

    async def rehash(self, rec: BlobRecord, pace=None, hashed=None) -> str | None:
        """What a complete blob's file proves now (scrub): the id it hashes to, `rec.blob_id` for a
        source-identified blob whose chunks still match their xxh3s, else a description of the damage;
        None if it cannot be checked (a source blob completed before its xxh3s were kept).
        `pace(n)` is awaited before each piece of n bytes is read, `hashed(n)` called after it."""
        path = self.path(rec.blob_id)
        loop = asyncio.get_running_loop()
        if rec.kind == "source":
            chunks = self.index.chunks(rec.blob_id)
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
        hasher = _new_hasher(rec.kind, rec.size)
        for start in range(0, rec.size, _HASH_BUF):
            n = min(_HASH_BUF, rec.size - start)
            if pace is not None:
                await pace(n)
            await loop.run_in_executor(self._hash_pool, _hash_range, hasher, path, start, n, self.buffers)
            if hashed is not None:
                hashed(n)
        return hasher.hexdigest()

    async def check_chunks(self, rec: BlobRecord) -> int:
        """Re-check a partial blob's recorded chunks against their xxh3; forget the bad ones
        (they are fetched again). Returns how many were bad."""
        chunks = self.index.chunks(rec.blob_id)
        if rec.state != "partial" or not chunks:
            return 0
        args = (self.path(rec.blob_id), rec.chunk_size, rec.size, chunks)
        try:
            bad = await asyncio.get_running_loop().run_in_executor(None, bad_chunks, *args)
        except FileNotFoundError:
            return 0
        if bad:
            self.index.drop_chunks(rec.blob_id, bad)
            st = self._states.get(rec.blob_id)
            for i in bad if st is not None else ():
                if st.has(i):
                    self.tiers[rec.tier].used -= st.chunk_len(i)
                    st.unmark(i)
        return len(bad)

    def quarantine(self, st: BlobState) -> None:
        """Move the blob's bytes aside and schedule its refetch (after proof_backoff).

        Its file goes to its own tier's quarantine dir (same filesystem: a
        rename, also for shm) and stays counted in that tier's usage until
        cleaned; a second failure of the same blob replaces the first file.
        """
        rec = st.rec
        tier = self.tiers[rec.tier]
        fd = self._fds.pop(rec.blob_id, None)
        if fd is not None:
            os.close(fd)
        dest = tier.quarantine / rec.blob_id
        replaced = dest.stat().st_size if dest.exists() else 0
        tier.used -= st.cached + replaced
        try:
            os.replace(self.path(rec.blob_id), dest)
            os.utime(dest)  # its age in quarantine starts now
            tier.used += dest.stat().st_size
        except FileNotFoundError:
            pass
        rec.state = "quarantined"
        rec.failures += 1
        rec.retry_at = time.time() + proof_backoff(rec.failures, self.retry_base)
        self.index.put_blob(rec)
        self.index.drop_chunks(rec.blob_id)
        self._states.pop(rec.blob_id, None)
        self._drop_prefix(rec.blob_id)
        self.clean_quarantine()

    def retry(self, rec: BlobRecord) -> bool:
        """A quarantined blob whose backoff is over becomes fetchable again (from nothing)."""
        if rec.state != "quarantined" or time.time() < rec.retry_at:
            return False
        rec.state = "partial"
        self.index.put_blob(rec)
        return True

    def _quarantined(self, tier: Tier) -> list[tuple[Path, int, float]]:
        """(path, bytes, mtime) of every file in a tier's quarantine dir."""
        out = []
        for path in tier.quarantine.iterdir():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((path, st.st_size, st.st_mtime))
        return out

    def _unlink_quarantined(self, tier: Tier, path: Path, size: int) -> int:
        path.unlink(missing_ok=True)
        tier.used -= size
        log.info("removed quarantined %s (%d bytes) from %s", path.name, size, tier.name)
        return size

    def clean_quarantine(self, now: float | None = None) -> int:
        """Enforce the quarantine bounds on every tier; returns bytes freed."""
        now = time.time() if now is None else now
        freed = 0
        for tier in self.tiers.values():
            found = self._quarantined(tier)
            by_name = {path.name: (path, size) for path, size, _ in found}
            listed = [(path.name, size, mtime) for path, size, mtime in found]
            for name in quarantine_excess(listed, now, *self.quarantine_limits):
                freed += self._unlink_quarantined(tier, *by_name[name])
        return freed

    def quarantine_usage(self) -> dict[str, tuple[int, int]]:
        """tier name -> (files, bytes) in quarantine."""
        out = {}
        for name, tier in self.tiers.items():
            found = self._quarantined(tier)
            out[name] = (len(found), sum(size for _, size, _ in found))
        return out

    def discard_quarantined(self, blob_id: str) -> None:
        """Empty a quarantined file that readers still have open in passthrough mode: the
        kernel reads it directly, so truncating it is the only way to stop them (they see
        end of file, never the wrong bytes). Its evidence is lost."""
        for tier in self.tiers.values():
            path = tier.quarantine / validate_blob_id(blob_id)
            try:
                size = path.stat().st_size
                os.truncate(path, 0)
            except FileNotFoundError:
                continue
            self._unlink_quarantined(tier, path, size)

    def recover(self) -> int:
        """Re-verify every recorded chunk of partial blobs against its xxh3.

        Run once at start: a chunk recorded but not durably on disk (power loss
        without fsync, a truncated file) is forgotten and fetched again.
        Returns how many chunks were dropped.
        """
        dropped = 0
        on_disk = {p.name for t in self.tiers.values() for p in (t.root / "blobs").glob("*/*")}  # no stat per blob
        for rec in self.index.all_blobs():
            if rec.state != "partial":
                continue
            if rec.blob_id not in on_disk and not self.index.has_chunks(rec.blob_id):
                continue  # nothing fetched yet (most blobs of a big dataset): nothing to check or give back
            chunks = self.index.chunks(rec.blob_id)
            path = self.path(rec.blob_id)
            if rec.blob_id not in on_disk:
                if chunks:
                    self.index.drop_chunks(rec.blob_id)
                    dropped += len(chunks)
                continue
            bad = bad_chunks(path, rec.chunk_size, rec.size, chunks) if chunks else []
            if bad:
                self.index.drop_chunks(rec.blob_id, bad)
                dropped += len(bad)
            release_unrecorded(path, rec.chunk_size, rec.size, set(chunks) - set(bad))
        return dropped
