"""A folder's entries as one compact block of bytes: sorted keys, each with a few bytes of payload.

A snapshot shown as a Node per file cost ~1 KiB of daemon memory per file (the
Node, its link target, its name, a dict slot) and its whole file list decoded
at the first look. As blocks, a file costs its name, its blob id and 5 bytes;
the index stores one block per folder, so a first look reads that folder only,
and a block dropped from memory is read again, not rebuilt.

Layout: entry count (u32 LE), the end offset of each entry (u32 LE each),
then the entries, each `len(key)` (one byte) + key + payload. Keys are sorted
as bytes (for UTF-8 names that is code point order, Python's `sorted`).
A block from the index is checked for its structure when read; each entry is
checked by whoever interprets it, when it is asked for.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable
from itertools import accumulate

_COUNT = struct.Struct("<I")
MAX_KEY = 255


class Block:
    """Read-only view of a packed block: entry i, and binary search by key."""

    __slots__ = ("data", "ends", "_found")

    def __init__(self, raw: bytes):
        """Raises ValueError if the offsets do not describe `raw` (a hostile or torn value)."""
        if len(raw) < _COUNT.size:
            raise ValueError("folder block: too short")
        (n,) = _COUNT.unpack_from(raw)
        head = _COUNT.size + 4 * n
        if head > len(raw):
            raise ValueError("folder block: more entries than bytes")
        ends = array("I")
        ends.frombytes(raw[_COUNT.size : head])
        if sys.byteorder == "big":
            ends.byteswap()
        data = raw[head:]
        prev = 0
        for end in ends:
            if end <= prev or end > len(data) or data[prev] >= end - prev:  # each entry holds its key
                raise ValueError("folder block: bad entry offsets")
            prev = end
        if prev != len(data):
            raise ValueError("folder block: trailing bytes")
        self.data, self.ends = data, ends
        self._found: tuple[bytes, int] = (b"", -1)  # the last key found: a lookup often asks twice

    def __len__(self) -> int:
        return len(self.ends)

    def nbytes(self) -> int:
        return len(self.data) + 4 * len(self.ends)

    def _start(self, i: int) -> int:
        return self.ends[i - 1] if i else 0

    def key(self, i: int) -> bytes:
        start = self._start(i)
        return self.data[start + 1 : start + 1 + self.data[start]]

    def entry(self, i: int) -> tuple[bytes, bytes]:
        start, end = self._start(i), self.ends[i]
        k = start + 1 + self.data[start]
        return self.data[start + 1 : k], self.data[k:end]

    def find(self, key: bytes) -> int:
        """Index of `key`, or -1. (Every lookup in a snapshot runs this: `key` is inlined.)"""
        if self._found[0] == key:
            return self._found[1]
        data, ends = self.data, self.ends
        lo, hi = 0, len(ends)
        while lo < hi:
            mid = (lo + hi) // 2
            start = ends[mid - 1] if mid else 0
            if data[start + 1 : start + 1 + data[start]] < key:
                lo = mid + 1
            else:
                hi = mid
        found = lo if lo < len(ends) and self.key(lo) == key else -1
        self._found = (key, found)
        return found

    def entries(self) -> Iterable[tuple[bytes, bytes]]:
        for i in range(len(self.ends)):
            yield self.entry(i)


def pack(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A block of (key, payload) pairs, given sorted by key, keys unique and at most 255 bytes."""
    parts = [bytes((len(key),)) + key + payload for key, payload in entries]  # ValueError: a key over 255
    if any(p[0] == 0 for p in parts):
        raise ValueError("folder block: an empty key")
    ends = array("I", accumulate(map(len, parts)))
    if sys.byteorder == "big":
        ends.byteswap()
    return _COUNT.pack(len(ends)) + ends.tobytes() + b"".join(parts)


EMPTY = Block(pack(()))


def merge(blocks: list[Block]) -> Block:
    """One block of every key of `blocks` (the first block's payload wins)."""
    if len(blocks) == 1:
        return blocks[0]
    union: dict[bytes, bytes] = {}
    for block in reversed(blocks):
        union.update(block.entries())
    return Block(pack(sorted(union.items())))
