"""What the kernel side of a FUSE connection knows, kept where a daemon restart cannot lose it.

The kernel names files by the node ids we gave it and keeps them as long as
the connection lives, which is longer than a daemon when the connection is
handed over (see `keeper`). So node ids are not a counter in memory: this
table is their one source, in an LMDB env of its own, written before the reply
that tells the kernel a new number. It opens with sync off: a killed process
loses nothing (the pages are the kernel's), and a reboot ends the connection
anyway, so the table starts over with every fresh mount (`reset`).

An immutable folder (a snapshot's, a commit's blobs) is numbered as one range:
its entry i is `base + i`, and only (folder, base, count) is written, once. A
walk of 10^6 files then writes ~10^4 rows, not 2 x 10^6 (~350 bytes each), and
a lookup in a folder already numbered writes nothing before its reply.

Beside the numbers: how each inode is open (passthrough or served, and its
backing id), because the kernel refuses to mix the two modes on one inode and
a second backing file for it, and the daemon that answers the RELEASE may not
be the one that answered the OPEN.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import lmdb

from .lmdbscan import under

log = logging.getLogger(__name__)

ROOT = 1
_Q = struct.Struct(">Q")
_OPEN_KEY = struct.Struct(">QQ")  # inode, kernel file handle
_BACKING = struct.Struct("<iB")
_RANGE = struct.Struct(">QQ")  # base, count  # backing id, retired
MAP_SIZE = 1 << 30  # sparse; ~2.5 million paths to start with, doubled when full; starts over with each mount
PASSTHROUGH, SERVED = b"p", b"s"


class InodeTable:
    """Path <-> inode number. Memory holds a bounded cache; LMDB holds the truth."""

    def __init__(self, path: Path, cache_max: int = 100_000, map_size: int = MAP_SIZE):
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(path), max_dbs=6, map_size=map_size, sync=False, metasync=False)
        self._by_path = self.env.open_db(b"by_path")
        self._by_ino = self.env.open_db(b"by_ino")
        self._opens = self.env.open_db(b"opens")
        self._backing = self.env.open_db(b"backing")
        self._bases = self.env.open_db(b"bases")  # range key -> base, count
        self._ranges = self.env.open_db(b"ranges")  # last number of a range -> range key
        self.cache_max = cache_max
        self._ino_of: dict[str, int] = {}
        self._path_of: dict[int, str] = {}
        self._pending: dict[str, int] = {}  # numbers handed out, not yet written
        self._base_of: dict[str, tuple[int, int]] = {}  # range key -> (base, count), bounded like _ino_of
        self._pending_ranges: dict[str, tuple[int, int]] = {}
        self._last_range: tuple[int, int, str] = (0, 0, "")  # (base, count, key) of the last range found by number
        self._whole = False  # memory holds every number (a fresh table, nothing evicted): a miss is new
        with self.env.begin() as txn:
            raw = txn.get(b"next")
            self._next = _Q.unpack(raw)[0] if raw else ROOT + 1
            self._count = txn.stat(self._by_path)["entries"]
            self._ranged = txn.stat(self._bases)["entries"] > 0
            raw = txn.get(b"conn_id")
        self.conn_id = raw.decode() if raw else ""
        self._remember("", ROOT)

    def reset(self) -> None:
        """A fresh connection: the kernel knows no number, every old one may go."""
        with self.env.begin(write=True) as txn:
            for db in (self._by_path, self._by_ino, self._opens, self._backing, self._bases, self._ranges):
                txn.drop(db, delete=False)
            txn.delete(b"next")
            self.conn_id = os.urandom(8).hex()
            txn.put(b"conn_id", self.conn_id.encode())
        self._ino_of.clear()
        self._path_of.clear()
        self._pending.clear()
        self._base_of.clear()
        self._pending_ranges.clear()
        self._last_range = (0, 0, "")
        self._next, self._count = ROOT + 1, 0
        self._ranged = False
        self._remember("", ROOT)
        self._whole = True

    def close(self) -> None:
        self.commit()
        self.env.close()

    def __len__(self) -> int:
        """Numbers handed out (paths and ranges)."""
        return self._next - 1

    # numbers ---------------------------------------------------------------------

    def ino(self, path: str) -> int:
        """The number of `path`, a new one if it never had one (written by the next `commit`)."""
        ino = self._ino_of.get(path)
        if ino is not None:
            return ino
        ino = self._pending.get(path)
        if ino is not None:
            return ino
        raw = None
        if not self._whole:
            with self.env.begin() as txn:
                raw = txn.get(path.encode(), db=self._by_path)
        if raw is not None:
            ino = _Q.unpack(raw)[0]
        else:
            ino = self._pending[path] = self._next
            self._next += 1
            return ino
        self._remember(path, ino)
        return ino

    def find(self, path: str) -> int | None:
        """The number of `path` if it was given one; none is given here."""
        ino = self._ino_of.get(path) or self._pending.get(path)
        if ino is not None or self._whole:
            return ino
        with self.env.begin() as txn:
            raw = txn.get(path.encode(), db=self._by_path)
        return None if raw is None else _Q.unpack(raw)[0]

    def path(self, ino: int) -> str | None:
        """The path numbered `ino` by `ino`; None for a number of a range (see `in_range`) or none given."""
        path = self._path_of.get(ino)
        if path is not None:
            return path
        base, count, _ = self._last_range
        if base <= ino < base + count:
            return None
        for p, i in self._pending.items():
            if i == ino:
                return p
        if self._whole:
            return None
        with self.env.begin() as txn:
            raw = txn.get(_Q.pack(ino), db=self._by_ino)
        if raw is None:
            return None
        path = raw.decode()
        self._remember(path, ino)
        return path

    def commit(self) -> None:
        """Write the numbers handed out since the last commit: before the kernel hears of them."""
        if not self._pending and not self._pending_ranges:
            return
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for path, ino in self._pending.items():
                        txn.put(path.encode(), _Q.pack(ino), db=self._by_path)
                        txn.put(_Q.pack(ino), path.encode(), db=self._by_ino)
                    for key, (base, count) in self._pending_ranges.items():
                        txn.put(key.encode(), _RANGE.pack(base, count), db=self._bases)
                        txn.put(_Q.pack(base + count - 1), key.encode(), db=self._ranges)
                    txn.put(b"next", _Q.pack(self._next))
                break
            except lmdb.MapFullError:
                # A connection handed from daemon to daemon is never mounted afresh, so its table
                # only grows (~350 bytes a path): grow the map rather than fail every new lookup.
                size = self.env.info()["map_size"] * 2
                log.warning("inode table full: growing its map to %d MiB", size >> 20)
                self.env.set_mapsize(size)
        self._count += len(self._pending)
        for path, ino in self._pending.items():
            self._remember(path, ino)
        self._pending.clear()
        for key, found in self._pending_ranges.items():
            self._remember_range(key, found)
        self._pending_ranges.clear()

    # ranges ------------------------------------------------------------------------

    def base(self, key: str) -> int | None:
        """The first number of the range `key` names, if it was given one (none is given here)."""
        found = self._base_of.get(key) or self._pending_ranges.get(key)
        if found is None and not self._whole:
            with self.env.begin() as txn:
                raw = txn.get(key.encode(), db=self._bases)
            if raw is not None:
                found = _RANGE.unpack(raw)
                self._remember_range(key, found)
        return None if found is None else found[0]

    def range(self, key: str, count: int) -> int:
        """The first of `count` numbers for an immutable folder's entries, in its order (entry i is
        `base + i`); new ones if the folder never had them (written by the next `commit`).
        `key` must name the folder and its content: a folder that may change needs another key."""
        base = self.base(key)
        if base is None:
            base, self._next = self._next, self._next + max(count, 1)
            self._pending_ranges[key] = (base, max(count, 1))
            self._ranged = True
        return base

    @property
    def ranged(self) -> bool:
        """Whether any range was given on this connection (a daemon before them cannot serve it)."""
        return self._ranged

    def in_range(self, ino: int) -> tuple[str, int] | None:
        """(range key, entry index) of a number given by `range`; None for any other number."""
        base, count, key = self._last_range
        if not base <= ino < base + count:
            found = next(((k, b, c) for k, (b, c) in self._pending_ranges.items() if b <= ino < b + c), None)
            if found is None:
                with self.env.begin() as txn:
                    cursor = txn.cursor(db=self._ranges)
                    if not cursor.set_range(_Q.pack(ino)):
                        return None
                    key = cursor.value().decode()
                    raw = txn.get(cursor.value(), db=self._bases)
                if raw is None:
                    return None
                base, count = _RANGE.unpack(raw)
            else:
                key, base, count = found
            if not base <= ino < base + count:
                return None
            self._last_range = (base, count, key)
        return key, ino - base

    def _remember_range(self, key: str, found: tuple[int, int]) -> None:
        if len(self._base_of) >= self.cache_max:
            self._whole = False
            for old in list(self._base_of)[: self.cache_max // 10]:
                del self._base_of[old]
        self._base_of[key] = found

    def _remember(self, path: str, ino: int) -> None:
        if len(self._ino_of) >= self.cache_max:  # drop the oldest tenth; LMDB still has them
            self._whole = False
            for old in list(self._ino_of)[1 : self.cache_max // 10 + 1]:  # [0] is the root
                self._path_of.pop(self._ino_of.pop(old), None)
        self._ino_of[path] = ino
        self._path_of[ino] = path

    # opens -------------------------------------------------------------------------

    def opened(self, ino: int, fh: int, mode: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(_OPEN_KEY.pack(ino, fh), mode, db=self._opens)

    def released(self, ino: int, fh: int) -> bytes | None:
        """The mode the handle was opened in; None if it was never recorded (or released already)."""
        with self.env.begin(write=True) as txn:
            return txn.pop(_OPEN_KEY.pack(ino, fh), db=self._opens)

    def open_modes(self, ino: int) -> tuple[int, int]:
        """(passthrough opens, served opens) of an inode."""
        counts = {PASSTHROUGH: 0, SERVED: 0}
        with self.env.begin() as txn:
            for _, mode in under(txn, self._opens, _Q.pack(ino)):
                counts[mode] = counts.get(mode, 0) + 1
        return counts[PASSTHROUGH], counts[SERVED]

    def backing(self, ino: int) -> tuple[int, bool] | None:
        """(backing id, retired) of an inode the kernel reads in passthrough."""
        with self.env.begin() as txn:
            raw = txn.get(_Q.pack(ino), db=self._backing)
        if raw is None:
            return None
        backing_id, retired = _BACKING.unpack(raw)
        return backing_id, bool(retired)

    def set_backing(self, ino: int, backing_id: int, retired: bool = False) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(_Q.pack(ino), _BACKING.pack(backing_id, retired), db=self._backing)

    def drop_backing(self, ino: int) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(_Q.pack(ino), db=self._backing)

    def backed(self) -> list[tuple[int, int]]:
        """Every (inode, backing id) held."""
        with self.env.begin() as txn:
            return [(_Q.unpack(k)[0], _BACKING.unpack(v)[0]) for k, v in txn.cursor(db=self._backing)]
