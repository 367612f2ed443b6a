"""Compile-cache blobs in batches, the pure part: which blobs go together, and the wire format.

A compile cache is mostly thousands of small files; one HTTP request per
blob makes a warm-up cost a round trip per file. Small blobs are asked for
together instead (`POST /v1/compile-caches/peer/blobs {"ids": [...]}`), and
the answer is one frame per id asked, in the order asked: an 8-byte
big-endian length, then that many bytes; the length ABSENT means "not here".
The receiver knows each blob's size and sha256 from the manifest, so every
frame is checked before a byte of it is kept. Big blobs stay one streamed
GET each.
"""

from __future__ import annotations

import struct

from .ccmanifest import SHA256_RE

SMALL = 1 << 20  # blobs up to this size travel in batches; bigger ones are streamed one by one
BATCH_IDS = 512  # ids in one request
BATCH_BYTES = 8 << 20  # bytes of blobs in one answer
HEADER = struct.Struct(">Q")
ABSENT = 2**64 - 1


def batches(items: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    """Small (sha256, size) pairs -> groups within BATCH_IDS and BATCH_BYTES, in the order given."""
    out: list[list[tuple[str, int]]] = []
    cur: list[tuple[str, int]] = []
    size = 0
    for sha, n in items:
        if n > SMALL:
            raise ValueError(f"blob {sha} of {n} bytes is not small")
        if cur and (len(cur) == BATCH_IDS or size + n > BATCH_BYTES):
            out.append(cur)
            cur, size = [], 0
        cur.append((sha, n))
        size += n
    if cur:
        out.append(cur)
    return out


def check_ids(raw: object) -> list[str]:
    """The `ids` of a batch request, as hostile input: a non-empty list of distinct sha256 hex strings."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("field 'ids' must be a non-empty list of sha256 hex strings")
    if len(raw) > BATCH_IDS:
        raise ValueError(f"field 'ids': at most {BATCH_IDS} ids per request")
    for sha in raw:
        if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
            raise ValueError("field 'ids': every id must be 64 lowercase hex digits")
    if len(set(raw)) != len(raw):
        raise ValueError("field 'ids': an id is listed twice")
    return raw


def header(size: int | None) -> bytes:
    """The frame header of a blob of `size` bytes, or of one that is not here (None)."""
    return HEADER.pack(ABSENT if size is None else size)
