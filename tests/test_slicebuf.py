"""slicebuf: a blob's bytes read around the page cache into a pooled buffer (mirror, peer API)."""

from __future__ import annotations

import os

import pytest

from nodecache import directio
from nodecache.blobfile import FileSlice
from nodecache.slicebuf import read_slice, written_out


class _Transport:
    def __init__(self, pending: int):
        self.pending = pending

    def get_write_buffer_size(self) -> int:
        return self.pending


def _slice(path, offset: int, size: int) -> FileSlice:
    return FileSlice(os.open(path, os.O_RDONLY), offset, size, directio.open_direct(path, os.O_RDONLY) or -1)


@pytest.mark.parametrize("offset", [0, 4096, 1000])  # aligned (O_DIRECT), aligned, unaligned (buffered)
def test_read_slice_gives_exactly_the_bytes_and_closes_the_slice(tmp_path, offset):
    data = os.urandom(3 * 1024 * 1024 + 5)  # the file's end is not block-aligned
    p = tmp_path / "blob"
    p.write_bytes(data)
    pool = directio.BufferPool(keep=2)
    sl = _slice(p, offset, len(data) - offset)
    held = read_slice(sl, pool)
    assert bytes(held.view) == data[offset:] and len(held) == len(data) - offset
    assert sl.fd == sl.direct_fd == -1  # closed
    held.sent(pool, _Transport(0))
    again = read_slice(_slice(p, 0, 10), pool)
    assert again.buf is held.buf, "the buffer went back to the pool and is used again"
    assert bytes(again.view) == data[:10]


def test_a_short_file_is_an_error_never_fewer_bytes(tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(os.urandom(8192))
    with pytest.raises(OSError, match="short read"):
        read_slice(_slice(p, 4096, 8192), directio.BufferPool())


def test_a_buffer_a_transport_may_still_read_is_not_reused(tmp_path, monkeypatch):
    import sys

    assert written_out(_Transport(0))
    monkeypatch.setattr(sys, "version_info", (3, 12, 0))
    assert written_out(_Transport(0)) and not written_out(_Transport(5))
    p = tmp_path / "blob"
    p.write_bytes(os.urandom(8192))
    pool = directio.BufferPool(keep=2)
    held = read_slice(_slice(p, 0, 8192), pool)
    held.sent(pool, _Transport(5))
    assert read_slice(_slice(p, 0, 8192), pool).buf is not held.buf
