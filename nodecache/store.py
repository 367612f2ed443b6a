"""Content-addressed blob files on local disk, with per-chunk presence.

A blob lives at `<root>/blobs/<id[:2]>/<id>`, created sparse at its full size.
A chunk is written, synced, then recorded in the index with its xxh3-64; only
recorded chunks are ever served. When every chunk is present the whole file is
hashed and must equal its id (sha256 or git blob sha1), or it is quarantined.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import xxhash

from .index import BlobRecord, Index
from .layout import validate_blob_id

_HASH_BUF = 8 * 1024 * 1024
_MAX_FDS = 256


class BlobState:
    """In-memory presence of a blob's chunks; mirrors the index."""

    def __init__(self, rec: BlobRecord, present: dict[int, int]):
        self.rec = rec
        self.present = bytearray(rec.n_chunks)
        for i in present:
            if i < rec.n_chunks:
                self.present[i] = 1
        self.missing = rec.n_chunks - sum(self.present)

    def has(self, index: int) -> bool:
        return bool(self.present[index])

    def mark(self, index: int) -> None:
        if not self.present[index]:
            self.present[index] = 1
            self.missing -= 1

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.rec.chunk_size
        return start, min(start + self.rec.chunk_size, self.rec.size)


class Quarantined(Exception):
    """The blob's bytes did not hash to its id; it is never served again."""


def hash_file(path: Path, kind: str, size: int) -> str:
    """The id a blob file's content proves: sha256, or git's `blob <n>\\0` sha1."""
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb", buffering=0) as f:
        while buf := f.read(_HASH_BUF):
            h.update(buf)
    return h.hexdigest()


class Store:
    """One disk tier. All blocking file work runs in the default thread pool."""

    def __init__(self, root: Path, index: Index, fsync: bool = True):
        self.root = root
        self.index = index
        self.fsync = fsync
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "quarantine").mkdir(parents=True, exist_ok=True)
        self._states: dict[str, BlobState] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()

    def path(self, blob_id: str) -> Path:
        validate_blob_id(blob_id)  # never join an unchecked name to a path
        return self.root / "blobs" / blob_id[:2] / blob_id

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # presence ---------------------------------------------------------------

    def state(self, rec: BlobRecord) -> BlobState:
        """The blob's presence, creating its sparse file on first use."""
        st = self._states.get(rec.blob_id)
        if st is None:
            path = self.path(rec.blob_id)
            if not path.exists():
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
        return st

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

    async def read(self, blob_id: str, offset: int, size: int) -> bytes:
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
            return bytes(buf)
        rest = await asyncio.get_running_loop().run_in_executor(None, os.pread, fd, size - got, offset + got)
        data = bytes(buf[:got]) + rest
        if len(data) != size:
            raise OSError(errno.EIO, f"short read of blob {blob_id}")
        return data

    async def write_chunk(self, st: BlobState, index: int, data: bytes) -> None:
        """Write, sync, then record: the order that makes a crash safe."""
        start, end = st.chunk_range(index)
        if len(data) != end - start:
            raise ValueError(f"chunk {index} of {st.rec.blob_id}: {len(data)} bytes, want {end - start}")
        fd = self._fd(st.rec.blob_id)

        def work() -> int:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], start + done)
            if self.fsync:
                os.fdatasync(fd)
            return xxhash.xxh3_64_intdigest(data)

        digest = await asyncio.get_running_loop().run_in_executor(None, work)
        self.index.set_chunk(st.rec.blob_id, index, digest)
        st.mark(index)

    async def finish(self, st: BlobState) -> None:
        """All chunks are present: prove the id, then mark complete or quarantine."""
        rec = st.rec
        got = await asyncio.get_running_loop().run_in_executor(
            None, hash_file, self.path(rec.blob_id), rec.kind, rec.size
        )
        if got == rec.blob_id:
            rec.state = "complete"
            self.index.put_blob(rec)
            self.index.drop_chunks(rec.blob_id)  # presence of a complete blob is implied
            return
        self.quarantine(st)
        raise Quarantined(f"blob {rec.blob_id} hashed to {got}")

    def quarantine(self, st: BlobState) -> None:
        rec = st.rec
        rec.state = "quarantined"
        self.index.put_blob(rec)
        self.index.drop_chunks(rec.blob_id)
        fd = self._fds.pop(rec.blob_id, None)
        if fd is not None:
            os.close(fd)
        os.replace(self.path(rec.blob_id), self.root / "quarantine" / rec.blob_id)
        self._states.pop(rec.blob_id, None)

    def recover(self) -> int:
        """Re-verify every recorded chunk of partial blobs against its xxh3.

        Run once at start: a chunk recorded but not durably on disk (power loss
        without fsync, a truncated file) is forgotten and fetched again.
        Returns how many chunks were dropped.
        """
        dropped = 0
        for rec in self.index.all_blobs():
            if rec.state != "partial":
                continue
            chunks = self.index.chunks(rec.blob_id)
            path = self.path(rec.blob_id)
            if not path.exists():
                self.index.drop_chunks(rec.blob_id)
                dropped += len(chunks)
                continue
            bad = []
            with open(path, "rb", buffering=0) as f:
                for i, digest in chunks.items():
                    f.seek(i * rec.chunk_size)
                    data = f.read(min(rec.chunk_size, rec.size - i * rec.chunk_size))
                    if xxhash.xxh3_64_intdigest(data) != digest:
                        bad.append(i)
            if bad:
                self.index.drop_chunks(rec.blob_id, bad)
                dropped += len(bad)
        return dropped
