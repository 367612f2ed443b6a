"""Which chunks of each blob are on disk, with their xxh3-64.

A chunk is recorded only after its bytes were written (and synced) to the blob file, so a crash
can lose a chunk (it is fetched again) but never claim one that is not on disk.
"""

from __future__ import annotations

import struct

from ..lmdbscan import under
from .counts import Counts
from .db import Db

_U64 = struct.Struct(">Q")  # chunk index (ordered as bytes), and digest


class Chunks:
    def __init__(self, db: Db, counts: Counts):
        self.db, self.counts = db, counts
        self.chunks = db.table("chunks")  # <blob id>\0<index> -> digest
        self.chunked = db.table("chunked")  # ids of blobs with a chunk recorded

    def rebuild(self, txn) -> None:
        """The chunked set again from the chunks' keys: one cursor jump per blob."""
        txn.drop(self.chunked, delete=False)
        cur = txn.cursor(db=self.chunks)
        found = cur.first()
        while found:
            blob_id = bytes(cur.key())[: -(_U64.size + 1)]
            txn.put(blob_id, b"", db=self.chunked)
            found = cur.set_range(blob_id + b"\1")

    def set(self, chunks: list[tuple[str, int, int]]) -> None:
        """Record (blob id, chunk index, xxh3-64) of chunks already synced, in one transaction."""
        with self.db.write() as txn:
            for blob_id, index, digest in chunks:
                txn.put(blob_id.encode() + b"\0" + _U64.pack(index), _U64.pack(digest), db=self.chunks)
            for key in {blob_id.encode() for blob_id, _, _ in chunks}:
                if txn.put(key, b"", db=self.chunked, overwrite=False):  # its first chunk
                    self.counts.chunked_changed(txn, key, True)

    def get(self, blob_id: str) -> dict[int, int]:
        """chunk index -> xxh3-64 of the chunk, for every chunk on disk."""
        with self.db.read() as txn:
            return {_U64.unpack(k)[0]: _U64.unpack(v)[0] for k, v in under(txn, self.chunks, blob_id.encode() + b"\0")}

    def has(self, blob_id: str) -> bool:
        """Any chunk recorded (one cursor step, not a read of them all)."""
        prefix = blob_id.encode() + b"\0"
        with self.db.read() as txn:
            cur = txn.cursor(db=self.chunks)
            return cur.set_range(prefix) and cur.key().startswith(prefix)

    def drop(self, blob_id: str, indexes: list[int] | None = None) -> None:
        """Forget some (or all) chunks of a blob, e.g. after failed verification."""
        with self.db.write() as txn:
            self.drop_in(txn, blob_id, indexes)

    def drop_in(self, txn, blob_id: str, indexes: list[int] | None = None) -> None:
        """`drop` in the caller's transaction."""
        key = blob_id.encode()
        prefix = key + b"\0"
        cur = txn.cursor(db=self.chunks)
        if indexes is not None:
            for i in indexes:
                txn.delete(prefix + _U64.pack(i), db=self.chunks)
            if cur.set_range(prefix) and cur.key().startswith(prefix):
                return  # some are left
        elif cur.set_range(prefix):
            while cur.key().startswith(prefix):
                if not cur.delete():
                    break
        if txn.delete(key, db=self.chunked):  # its last chunk
            self.counts.chunked_changed(txn, key, False)
