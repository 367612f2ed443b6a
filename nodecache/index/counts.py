"""What the blob records imply, kept in the transaction that changes a record.

State counts (/metrics, /v1/status), complete blobs in the order of their last proof (the
scrubber's next ones), blobs that may hold bytes in their tier's order of last use (eviction's
next ones) and the complete set (readiness, per-repo bytes): read without a scan of every record.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from .db import Db
from .links import Links
from .meta import Meta
from .records import STATES, Derived, derived_of

_PROOF = struct.Struct(">d")  # a time, ordered as bytes (times are never negative)


def _lru_key(key: bytes, d: Derived) -> bytes:
    """A blob's place in its tier's order of last use: tier \\0 last_access id."""
    return d[4].encode() + b"\0" + _PROOF.pack(max(0.0, d[2])) + key


class Counts:
    def __init__(self, db: Db, meta: Meta, links: Links):
        self.db, self.meta, self.links = db, meta, links
        self.blobs = db.table("blobs")
        self.proofs = db.table("proofs")  # (verified_at, blob id) of every complete blob
        # (last_access, blob id) of every blob that may hold bytes (complete, or partial with a
        # chunk recorded): eviction reads the least recently used ones only.
        self.lru = db.table("lru")
        self.complete = db.table("complete")  # ids of complete blobs
        self.chunked = db.table("chunked")  # ids of blobs with a chunk recorded (kept by chunks.Chunks)

    def stored(self, txn, key: bytes) -> Derived | None:
        """What the stored record of `key` was derived from."""
        return derived_of(txn.get(key, db=self.blobs))

    def _holds(self, d: Derived | None, chunked: bool) -> bool:
        """May the blob hold bytes on disk (so eviction must see it)?"""
        return d is not None and d[0] != "quarantined" and (d[0] == "complete" or chunked)

    def chunked_changed(self, txn, key: bytes, chunked: bool) -> None:
        """A blob's first chunk was recorded (or its last one dropped): a partial blob holds
        bytes now (or no longer)."""
        d = self.stored(txn, key)
        was, now = self._holds(d, not chunked), self._holds(d, chunked)
        if now and not was:
            txn.put(_lru_key(key, d), b"", db=self.lru)
        elif was and not now:
            txn.delete(_lru_key(key, d), db=self.lru)

    def change(self, txn, changes: list[tuple[bytes, Derived | None, Derived | None]]) -> None:
        """Apply records' changes (key, old or None, new or None)."""
        delta = dict.fromkeys(STATES, 0)
        complete_bytes: dict[str, int] = {}
        for key, old, new in changes:
            if old == new:
                continue
            if new is not None and new[2] > (old[2] if old is not None else 0.0):
                self.links.accessed(txn, key, new[2])
            for d, sign in ((old, -1), (new, 1)):
                if d is not None and d[0] == "complete":
                    complete_bytes[d[4]] = complete_bytes.get(d[4], 0) + sign * d[3]
            now = new is not None and new[0] == "complete"
            if now != (txn.get(key, db=self.complete) is not None):
                if now:
                    txn.put(key, b"", db=self.complete)
                else:
                    txn.delete(key, db=self.complete)
                self.links.completed(txn, key, now)
            chunked = txn.get(key, db=self.chunked) is not None
            if self._holds(old, chunked):
                txn.delete(_lru_key(key, old), db=self.lru)
            if self._holds(new, chunked):
                txn.put(_lru_key(key, new), b"", db=self.lru)
            if old is not None:
                delta[old[0]] -= 1
                if old[0] == "complete":
                    txn.delete(_PROOF.pack(old[1]) + key, db=self.proofs)
            if new is not None:
                delta[new[0]] += 1
                if new[0] == "complete":
                    txn.put(_PROOF.pack(new[1]) + key, b"", db=self.proofs)
        if any(delta.values()):
            counts = self.meta.get_in(txn, "blob_states") or dict.fromkeys(STATES, 0)
            for state, n in delta.items():
                counts[state] = max(0, counts.get(state, 0) + n)
            self.meta.put_in(txn, "blob_states", counts)
        if any(complete_bytes.values()):
            total = self.meta.get_in(txn, "complete_bytes") or {}
            for tier, n in complete_bytes.items():
                total[tier] = max(0, total.get(tier, 0) + n)
            self.meta.put_in(txn, "complete_bytes", total)

    def rebuild(self, txn) -> None:
        """Derive everything again from every record (the links were cleared: listed after)."""
        for table in (self.complete, self.proofs, self.lru):
            txn.drop(table, delete=False)
        self.meta.put_in(txn, "blob_states", dict.fromkeys(STATES, 0))
        self.meta.put_in(txn, "complete_bytes", None)
        stored = [(key, self.stored(txn, key)) for key, _ in txn.cursor(db=self.blobs)]
        self.change(txn, [(key, None, d) for key, d in stored if d is not None])

    # read ----------------------------------------------------------------------

    def blob_states(self) -> dict[str, int]:
        """How many blob records are in each state: one read, not a scan."""
        counts = self.meta.get("blob_states")
        out = dict.fromkeys(STATES, 0)
        if isinstance(counts, dict):
            out.update({k: v for k, v in counts.items() if k in out and type(v) is int})
        return out

    def complete_bytes(self) -> dict[str, int]:
        """tier name -> bytes of the complete blobs its records place there: one read."""
        total = self.meta.get("complete_bytes")
        return {k: v for k, v in total.items() if type(v) is int} if isinstance(total, dict) else {}

    def complete_ids(self) -> set[str]:
        """Ids of the complete blobs, from the proof order's keys (no record read)."""
        with self.db.read() as txn:
            return {bytes(key[_PROOF.size :]).decode() for key in txn.cursor(db=self.proofs).iternext(values=False)}

    def chunked_ids(self) -> list[str]:
        """Ids of the blobs with a chunk recorded (no record read)."""
        with self.db.read() as txn:
            return [bytes(key).decode() for key in txn.cursor(db=self.chunked).iternext(values=False)]

    def proven_by(self, when: float) -> tuple[list[str], float | None]:
        """Complete blobs whose last proof was at or before `when`, oldest first, and the time of
        the oldest proof of all (None: no complete blob). Reads only those entries."""
        due: list[str] = []
        oldest = None
        with self.db.read() as txn:
            for key, _ in txn.cursor(db=self.proofs):
                at = _PROOF.unpack(key[: _PROOF.size])[0]
                oldest = at if oldest is None else oldest
                if at > when:
                    break
                due.append(key[_PROOF.size :].decode())
        return due, oldest

    def least_recent(self, tier: str, page: int = 256) -> Iterator[tuple[float, str]]:
        """(last_access as stored, blob id) of the tier's blobs that may hold bytes, least
        recently used first, read a page at a time (each page its own transaction: the caller
        may write between them). Reads only as far as the caller goes."""
        prefix = tier.encode() + b"\0"
        after = prefix
        while True:
            with self.db.read() as txn:
                cur = txn.cursor(db=self.lru)
                found = cur.set_range(after)
                if found and after != prefix and cur.key() == after:
                    found = cur.next()
                keys = []
                while found and len(keys) < page and cur.key().startswith(prefix):
                    keys.append(bytes(cur.key()))
                    found = cur.next()
            if not keys:
                return
            for key in keys:
                at = key[len(prefix) : len(prefix) + _PROOF.size]
                yield _PROOF.unpack(at)[0], key[len(prefix) + _PROOF.size :].decode()
            after = keys[-1]
