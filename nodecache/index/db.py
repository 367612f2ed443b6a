"""The index's one LMDB environment, its named tables, and how an entry that fails its check goes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lmdb

log = logging.getLogger("nodecache.index")


class Db:
    """One environment for every table, so that a change spanning families is one transaction."""

    def __init__(self, path: Path, map_size: int, on_invalid: Callable[[str], None]):
        """`on_invalid(table)` hears of each entry that failed its check on load (and was dropped)."""
        path.mkdir(parents=True, exist_ok=True)
        # metasync=False: a crash may lose the last transaction, never integrity.
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=32, metasync=False)
        self.on_invalid = on_invalid

    def table(self, name: str):
        return self.env.open_db(name.encode())

    def read(self):
        return self.env.begin()

    def write(self):
        return self.env.begin(write=True)

    def invalid(self, txn, name: str, table, key: bytes, e: Exception) -> None:
        """Log, count and delete an entry that failed its check: never fatal."""
        log.warning("index: dropping invalid %s entry %r: %s", name, key[:200], e)
        txn.delete(key, db=table)
        self.on_invalid(name)

    def drop_invalid(self, name: str, table, bad: list[tuple[bytes, Exception]]) -> None:
        """`invalid` for each (key, why) a read found, in one write (none if nothing was bad)."""
        if bad:
            with self.write() as txn:
                for key, e in bad:
                    self.invalid(txn, name, table, key, e)

    def close(self) -> None:
        self.env.close()
