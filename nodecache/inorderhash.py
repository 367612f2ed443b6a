"""The whole-blob hash of a fresh fill, advanced over chunks as they land in order,
so proving a blob at the end costs one chunk, not a re-read of the whole file.

Chunks written around the page cache that arrive ahead of the hash wait in
`held` (bounded by hash_memory over all blobs), so the hash reads them from
memory, not back from disk, and does not wait for their writes. A held chunk
whose write then fails spoils the running hash: the proof falls back to
hashing the file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path

from . import directio
from .blobfile import hash_range, new_hasher
from .index import BlobRecord
from .presence import BlobState

log = logging.getLogger(__name__)
BATCH = 64 << 20  # bytes hashed per call of the pool: the loop sees progress (and a drop) between calls


class Prefix:
    """One blob's running hash: chunks [0, next) are taken."""

    def __init__(self, rec: BlobRecord):
        self.hasher = new_hasher(rec.kind, rec.size)
        self.next = 0  # chunks [0, next) are taken by the hasher
        self.held: dict[int, tuple[list, int]] = {}  # chunk -> (its buffers, bytes)
        self.spoiled = False
        self.lock = asyncio.Lock()
        # The pool's work on the hasher: it runs on even if the advance awaiting it was cancelled
        # (its loop stopped), and the next advance waits for it before taking more.
        self.digesting: Future | None = None


class InOrderHashes:
    """Every running hash of the store; hashing runs in `pool` (not behind chunk writes)."""

    def __init__(self, buffers: directio.BufferPool, pool: Executor, hash_memory: int, path_of: Callable[[str], Path]):
        self.buffers, self.pool, self.hash_memory, self.path_of = buffers, pool, hash_memory, path_of
        self.held = 0  # bytes of chunks held (all blobs)
        self.prefixes: dict[str, Prefix] = {}
        self.tasks: set[asyncio.Task] = set()

    def start(self, rec: BlobRecord) -> None:
        """A blob filled from nothing gets a running hash (a "source" id has no hash to run)."""
        if rec.kind in ("sha256", "gitsha1"):
            self.prefixes[rec.blob_id] = Prefix(rec)

    def get(self, blob_id: str) -> Prefix | None:
        return self.prefixes.get(blob_id)

    def hold(self, st: BlobState, prefix: Prefix, index: int, pieces: list, size: int) -> None:
        """Keep a chunk for the in-order hash if it is ahead of it and memory allows."""
        if index < prefix.next or index in prefix.held or self.held + size > self.hash_memory:
            return
        prefix.held[index] = (pieces, size)
        self.held += size
        self.kick(st)

    def unhold(self, prefix: Prefix, index: int, spoil: bool = False) -> list | None:
        """Stop holding a chunk; returns its pieces if it was held."""
        held = prefix.held.pop(index, None)
        if held is not None:
            self.held -= held[1]
            return held[0]
        if spoil and index < prefix.next:
            prefix.spoiled = True  # the hasher took bytes that never made it to disk
        return None

    def drop(self, blob_id: str) -> None:
        prefix = self.prefixes.pop(blob_id, None)
        if prefix is not None:
            for index in list(prefix.held):
                self.unhold(prefix, index)

    def kick(self, st: BlobState) -> None:
        """Advance the blob's hash if its next chunk is here (the lock serializes; a late task finds nothing)."""
        prefix = self.prefixes.get(st.rec.blob_id)
        if prefix is None or prefix.spoiled or prefix.next >= st.rec.n_chunks:
            return
        if not (prefix.next in prefix.held or st.has(prefix.next)):
            return
        task = asyncio.get_running_loop().create_task(self.advance(st, prefix))
        self.tasks.add(task)
        task.add_done_callback(lambda t: (self.tasks.discard(t), t.cancelled() or t.exception()))

    async def result(self, st: BlobState) -> str | None:
        """The finished hash of a blob whose chunks are all present, or None if it has none
        (not filled from nothing, or spoiled): then the file must be hashed. Ends its run."""
        prefix = self.prefixes.get(st.rec.blob_id)
        if prefix is None:
            return None
        await self.advance(st, prefix)
        self.drop(st.rec.blob_id)
        if prefix.next == st.rec.n_chunks and not prefix.spoiled:
            return prefix.hasher.hexdigest()
        return None

    async def advance(self, st: BlobState, prefix: Prefix) -> None:
        """Feed the in-order run of available chunks to the blob's running hash.

        Each turn takes every consecutive chunk that is here (up to BATCH bytes) and hashes
        them in one call of the pool: held chunks from memory, the others read back there
        (around the page cache). One hop through the loop per turn, not two per chunk: with
        32 streams filling, each hop waited 10-50 ms for the loop and a pool thread, the hash
        fell up to half a blob behind its chunks and caught up only after the blob's last byte.
        """
        rec = st.rec
        path = self.path_of(rec.blob_id)
        async with prefix.lock:
            while True:
                if prefix.digesting is not None:
                    # Shielded: a cancelled wait must not cancel a batch queued in the pool (its
                    # chunks are taken: the hash would miss them).
                    await asyncio.shield(asyncio.wrap_future(prefix.digesting))
                    prefix.digesting = None
                if prefix.spoiled or self.prefixes.get(rec.blob_id) is not prefix:
                    break
                batch = self._take(st, prefix)
                if not batch:
                    break
                prefix.digesting = self.pool.submit(self._digest, prefix, path, batch)

    def _take(self, st: BlobState, prefix: Prefix) -> list[tuple[int, int, list | None]]:
        """The chunks from the hash's next on that are here, as (start, length, held pieces or
        None: on disk), up to BATCH bytes; taken: a failed write of one from now on spoils the hash."""
        batch: list[tuple[int, int, list | None]] = []
        taken = 0
        k = prefix.next
        while k < st.rec.n_chunks and taken < BATCH:
            pieces = self.unhold(prefix, k)
            if pieces is None and not st.has(k):
                break
            start, end = st.chunk_range(k)
            batch.append((start, end - start, pieces))
            taken += end - start
            k += 1
        prefix.next = k
        return batch

    def _digest(self, prefix: Prefix, path: Path, batch: list[tuple[int, int, list | None]]) -> None:
        """In a pool thread: hash the batch in order; a chunk's buffers go as soon as it is hashed.
        A chunk that cannot be read back spoils the hash (the proof then hashes the file)."""
        try:
            for i, (start, length, pieces) in enumerate(batch):
                if pieces is None:
                    hash_range(prefix.hasher, path, start, length, self.buffers)
                else:
                    for p in pieces:
                        prefix.hasher.update(p)
                batch[i] = (start, length, None)
        except Exception as e:  # the hash missed bytes it took: never a wrong proof, never a stuck one
            log.warning("running hash of %s spoiled at its chunk at %d: %s", path.name, start, e)
            prefix.spoiled = True
