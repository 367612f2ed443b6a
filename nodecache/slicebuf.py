"""A blob's bytes read around the page cache into a reused aligned buffer, to be sent on.

The mirror and the peer API send bytes that another kernel keeps (the client's
page cache, the peer's store): a copy in this node's page cache too would cost
fresh pages, dearer on VMs than the rest of the transfer (see directio).
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys

from . import directio
from .blobfile import FileSlice


class Held:
    """Bytes in a buffer of a pool: `view` until given back with `release`."""

    __slots__ = ("buf", "view")

    def __init__(self, buf, size: int):
        self.buf, self.view = buf, memoryview(buf)[:size]

    def __len__(self) -> int:
        return len(self.view)

    def sent(self, pool: directio.BufferPool, transport: asyncio.BaseTransport | None) -> None:
        """The bytes were written to `transport`: the buffer goes back to the pool once nothing
        can still read it, else it is left to the garbage collector."""
        if transport is not None and written_out(transport):
            self.view.release()
            pool.give(self.buf)


def written_out(transport: asyncio.BaseTransport) -> bool:
    """Whether the transport holds no view of what it was given: before Python 3.12 asyncio
    copied the bytes a socket did not take at once; later versions keep views until sent."""
    return sys.version_info < (3, 12) or getattr(transport, "get_write_buffer_size", lambda: 1)() == 0


def read_slice(sl: FileSlice, pool: directio.BufferPool) -> Held:
    """In a thread: the slice's bytes with O_DIRECT where the store and the offset allow (else
    through the page cache); a short read is an error, never fewer bytes. Closes the slice."""
    try:
        want = -(-sl.size // directio.ALIGN) * directio.ALIGN
        buf = pool.take(want)
        got = -1
        if sl.direct_fd >= 0 and sl.offset % directio.ALIGN == 0:
            with memoryview(buf) as whole, whole[:want] as view:
                try:
                    got = os.preadv(sl.direct_fd, [view], sl.offset)
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: refused after all, read it buffered
                        raise
        if got < sl.size:
            with memoryview(buf) as whole, whole[: sl.size] as view:
                got = os.preadv(sl.fd, [view], sl.offset)
        if got < sl.size:
            raise OSError(errno.EIO, f"short read: {got} of {sl.size} bytes")
        return Held(buf, sl.size)
    finally:
        sl.close()
