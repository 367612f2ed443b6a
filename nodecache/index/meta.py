"""Small JSON records about the index itself: counters, start marks, derivation marks."""

from __future__ import annotations

import json

from .db import Db
from .records import BAD


class Meta:
    def __init__(self, db: Db):
        self.db = db
        self.table = db.table("meta")

    def get(self, name: str) -> object | None:
        """A record (None: absent or unreadable)."""
        with self.db.read() as txn:
            return self.get_in(txn, name)

    def get_in(self, txn, name: str) -> object | None:
        raw = txn.get(name.encode(), db=self.table)
        try:
            return json.loads(raw) if raw else None
        except BAD:
            return None

    def put(self, name: str, value: object | None, sync: bool = False) -> None:
        """Set (or, with None, delete) a record; `sync` makes it durable before returning."""
        with self.db.write() as txn:
            self.put_in(txn, name, value)
        if sync:
            self.db.env.sync(True)

    def put_in(self, txn, name: str, value: object | None) -> None:
        if value is None:
            txn.delete(name.encode(), db=self.table)
        else:
            txn.put(name.encode(), json.dumps(value).encode(), db=self.table)

    def put_last(self, name: str, value: dict) -> None:
        """Set a record as the index's last write, durably, with the id of its transaction
        (`txn`): `untouched_since` then tells whether anyone wrote to the index after it."""
        with self.db.write() as txn:
            self.put_in(txn, name, {**value, "txn": txn.id()})
        self.db.env.sync(True)

    def untouched_since(self, record: dict) -> bool:
        """Is the record from `put_last` still the index's last write?"""
        return record.get("txn") == self.db.env.info()["last_txnid"]
