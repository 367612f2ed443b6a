"""The one prefix scan over an LMDB table: keys are built as `<prefix><rest>` everywhere in the index."""

from __future__ import annotations

from collections.abc import Iterator


def under(txn, db, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key without `prefix`, value) of every key that starts with `prefix`, in key order. Values are
    copied: for tables of small values (file lists are read by key, not scanned)."""
    cur = txn.cursor(db=db)
    found = cur.set_range(prefix)
    while found and cur.key().startswith(prefix):
        yield bytes(cur.key())[len(prefix) :], bytes(cur.value())
        found = cur.next()
