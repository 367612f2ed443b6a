"""Blob records: what we know of each content-addressed blob and how to fill it."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ..layout import validate_blob_id
from .counts import Counts
from .db import Db
from .records import BAD, KINDS, BlobRecord, check_blob, decode, derived, encode, encoder_for

log = logging.getLogger("nodecache.index")


class Blobs:
    def __init__(self, db: Db, counts: Counts):
        self.db, self.counts = db, counts
        self.table = db.table("blobs")
        self.decode = decode  # an attribute, so that a test can count the records read

    def _drop(self, bad: list[tuple[bytes, Exception]]) -> None:
        if not bad:
            return
        with self.db.write() as txn:
            for key, e in bad:
                self.counts.change(txn, [(key, self.counts.stored(txn, key), None)])
                self.db.invalid(txn, "blobs", self.table, key, e)

    def get(self, blob_id: str) -> BlobRecord | None:
        key = blob_id.encode()
        with self.db.read() as txn:
            raw = txn.get(key, db=self.table)
        try:
            return self.decode(key, raw) if raw else None
        except BAD as e:
            self._drop([(key, e)])
            return None

    def put(self, rec: BlobRecord) -> None:
        with self.db.write() as txn:
            self.put_in(txn, rec)

    def put_in(self, txn, rec: BlobRecord) -> None:
        """`put` in the caller's transaction."""
        check_blob(rec)  # what cannot be loaded back must not be stored
        key = rec.blob_id.encode()
        self.counts.change(txn, [(key, self.counts.stored(txn, key), derived(rec))])
        txn.put(key, encode(rec), db=self.table)

    def accessed(self, times: list[tuple[str, float]]) -> int:
        """Persist blobs' last_access times (kept in memory while serving), in one transaction;
        records absent or unusable are left alone. Returns how many changed."""
        changes = []
        if not times:
            return 0
        with self.db.write() as txn:
            for blob_id, at in times:
                key = blob_id.encode()
                raw = txn.get(key, db=self.table)
                try:
                    stored = self.decode(key, raw) if raw else None
                except BAD:
                    continue  # get() drops it
                if stored is None or stored.last_access == at:
                    continue
                stored.last_access = at
                changes.append((key, self.counts.stored(txn, key), derived(stored)))
                txn.put(key, encode(stored), db=self.table)
            self.counts.change(txn, changes)
        return len(changes)

    def add(self, recs: list[BlobRecord]) -> int:
        """Record the blobs not known yet (or known only by an entry that fails its
        check), in one transaction: a snapshot of 10^5 files is one commit, not 10^5.
        Returns how many were recorded."""
        for rec in recs:
            check_blob(rec)
        added = 0
        changes = []
        with self.db.write() as txn:
            for rec in recs:
                key = rec.blob_id.encode()
                if self._known(txn, key):
                    continue
                txn.put(key, encode(rec), db=self.table)
                changes.append((key, None, derived(rec)))
                added += 1
            self.counts.change(txn, changes)
        return added

    def _known(self, txn, key: bytes) -> bool:
        """Whether the blob has a valid record already (kept: an add never overwrites one). An
        invalid one is dropped from the counters here, for the caller to replace."""
        raw = txn.get(key, db=self.table)
        if raw is None:
            return False
        try:
            self.decode(key, raw)
            return True
        except BAD as e:
            log.warning("index: replacing invalid blobs entry %r: %s", key[:200], e)
            self.db.on_invalid("blobs")
            self.counts.change(txn, [(key, self.counts.stored(txn, key), None)])
            return False

    def add_listed(self, template: BlobRecord, files: Iterable[tuple[str, int, str, str]]) -> int:
        """`add` of a new snapshot's records: `template` with each file's (blob_id, size, kind,
        path), in one transaction. The template is checked whole, each file's kind here; its id,
        size and path the caller checked (repos.check_snapshot, the door every listing passes).
        No record object per file: building, checking and encoding 10^5 of them was half the
        time of registering a snapshot. Writes what `add` writes. Returns how many were new."""
        with self.db.write() as txn:
            return self.add_listed_in(txn, template, files)

    def add_listed_in(self, txn, template: BlobRecord, files: Iterable[tuple[str, int, str, str]]) -> int:
        """`add_listed` in the caller's transaction (a small snapshot's registration is one)."""
        check_blob(template)
        encode_one = encoder_for(template)
        state, verified_at, last_access, _, tier = derived(template)
        added = 0
        changes = []
        for blob_id, size, kind, path in files:
            if kind not in KINDS:
                raise ValueError(f"kind {kind!r} of {blob_id}")
            key = blob_id.encode()
            if self._known(txn, key):
                continue
            txn.put(key, encode_one(blob_id, size, kind, path), db=self.table)
            changes.append((key, None, (state, verified_at, last_access, size, tier)))
            added += 1
        self.counts.change(txn, changes)
        return added

    def all(self) -> list[BlobRecord]:
        """Every record, each checked (the bad ones dropped)."""
        out, bad = [], []
        with self.db.read() as txn:
            for key, raw in txn.cursor(db=self.table):
                try:
                    out.append(self.decode(key, raw))
                except BAD as e:
                    bad.append((key, e))
        self._drop(bad)
        return out

    def has(self, blob_id: str) -> bool:
        """A record is stored under this id (not read)."""
        with self.db.read() as txn:
            return txn.get(blob_id.encode(), db=self.table) is not None


class VerifyFirst:
    """Blob ids shown under a `verify_before_serve` name: proven whole before their first byte is served."""

    def __init__(self, db: Db):
        self.db = db
        self.table = db.table("verify_first")

    def get(self) -> set[str]:
        with self.db.read() as txn:
            return {key.decode() for key, _ in txn.cursor(db=self.table)}

    def set(self, blob_ids: set[str], replace: bool = False) -> None:
        """Add blob ids (or, with `replace`, make the set exactly these)."""
        with self.db.write() as txn:
            if replace:
                txn.drop(self.table, delete=False)
            for blob_id in blob_ids:
                txn.put(validate_blob_id(blob_id).encode(), b"", db=self.table)
