"""Work on one blob file: its own fds for threads, a bounded fd cache for the loop,
chunk checks against their xxh3, whole-file hashes, and giving back unrecorded blocks."""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import xxhash

from . import directio

HASH_BUF = 8 * 1024 * 1024

_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (linux/falloc.h)
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@contextmanager
def own_fd(path: Path, flags: int) -> Iterator[int]:
    """An fd for work in a thread. The store's fd cache lives on the loop and may close
    an fd (whose number is then reused for another blob) while a thread still uses it."""
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


class FileSlice:
    """Bytes of a blob file to be sent later, by another thread: file descriptors of its own
    (the fd cache may close its fd, and the number be reused for another blob, meanwhile),
    which whoever sends it closes. `direct_fd` (O_DIRECT, or -1) reads them without
    bringing them into the page cache."""

    __slots__ = ("fd", "direct_fd", "offset", "size")

    def __init__(self, fd: int, offset: int, size: int, direct_fd: int = -1):
        self.fd, self.offset, self.size, self.direct_fd = fd, offset, size, direct_fd

    def __len__(self) -> int:
        return self.size

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1


def pread(path: Path, size: int, offset: int) -> bytes:
    with own_fd(path, os.O_RDONLY) as fd:
        return os.pread(fd, size, offset)


class FdCache:
    """Open read-write fds of recently read blobs, for reads on the loop (at most `limit`)."""

    def __init__(self, path_of: Callable[[str], Path], limit: int = 256):
        self._path_of = path_of
        self._limit = limit
        self._fds: OrderedDict[str, int] = OrderedDict()

    def get(self, blob_id: str) -> int:
        fd = self._fds.get(blob_id)
        if fd is None:
            fd = os.open(self._path_of(blob_id), os.O_RDWR | os.O_CLOEXEC)
            self._fds[blob_id] = fd
            if len(self._fds) > self._limit:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(blob_id)
        return fd

    def forget(self, blob_id: str) -> None:
        """Close the blob's fd, if open (its file is moved or deleted)."""
        fd = self._fds.pop(blob_id, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


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
    with own_fd(path, os.O_RDWR) as fd:
        for offset, length in runs:
            if length > 0 and _LIBC.fallocate(fd, _PUNCH_HOLE, offset, length) != 0:
                if not recorded:
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, size)
                return


def new_hasher(kind: str, size: int):
    return hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % size)


def hash_range(hasher, path: Path, start: int, length: int, pool: directio.BufferPool) -> None:
    """Feed file bytes to a hash without leaving them in the page cache (its own fd:
    the store's fd cache may close one)."""
    with pool.buffer(length) as buf, directio.read_into(path, start, length, buf) as view:
        hasher.update(view)


def hash_file(path: Path, kind: str, size: int, pool: directio.BufferPool | None = None) -> str:
    """The id a blob file's content proves: sha256, or git's `blob <n>\\0` sha1."""
    h = new_hasher(kind, size)
    pool = pool or directio.BufferPool(keep=0)
    for start in range(0, size, HASH_BUF):
        hash_range(h, path, start, min(HASH_BUF, size - start), pool)
    return h.hexdigest()
