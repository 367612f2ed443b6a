"""Which snapshots list each blob, and what that makes of readiness and per-repo bytes.

One table links them: `<blob id>\\0<snapshot key>` -> the blob's size (u64 LE). From it, kept in
the transaction that lists a snapshot or changes a blob's completeness:
- per snapshot, how many of its blobs are not complete (0: ready; node labels);
- the repos whose readiness may have changed since the labels were last computed;
- per repo, its blobs and bytes and how many of them are complete (getxattr on a repo folder);
- per snapshot, its files, blobs and bytes, the bytes of its complete blobs and the latest
  last_access its blobs' records hold (/v1/repos: one read per snapshot, not its file list).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import lmdb

from ..lmdbscan import under
from .db import Db
from .keys import repo_key, repo_of, split_key
from .records import BAD, last_access_of

SIZE = struct.Struct("<Q")
_REPO_BYTES = struct.Struct("<QQQQ")  # blobs, their bytes, complete blobs, their bytes
_SNAP = struct.Struct("<QQQQd")  # files, blobs, their bytes, bytes of the complete ones, latest last_access


class Links:
    def __init__(self, db: Db):
        self.db = db
        self.links = db.table("blob_snapshots")
        self.missing = db.table("snapshot_missing")  # snapshot key -> its blobs not complete
        self.changed = db.table("changed_repos")  # repo keys whose readiness may have changed
        self.repo_bytes_table = db.table("repo_bytes")
        self.snap_counts = db.table("snapshot_counts")
        self.records = db.table("blobs")  # blob records (kept by blobs.Blobs): their last_access
        self.complete = db.table("complete")  # ids of complete blobs (kept by counts.Counts)

    def clear(self, txn) -> None:
        """Before listing every snapshot again (and of an index from before the links had
        sizes: its `blob_repos`, now in the links)."""
        for table in (self.links, self.missing, self.repo_bytes_table, self.snap_counts):
            txn.drop(table, delete=False)
        try:  # emptied, not deleted: a daemon of the previous version may still hold its handle
            txn.drop(self.db.env.open_db(b"blob_repos", txn=txn, create=False), delete=False)
        except lmdb.NotFoundError:
            pass

    def list(
        self, txn, snap: bytes, blobs: Iterable[tuple[bytes, bytes]], files: int, old: set[bytes] = frozenset()
    ) -> None:
        """Link a snapshot of `files` files to its blobs ((id, size u64 LE), each once), count
        those not complete and the snapshot's figures, and count in its repo those no other
        snapshot of the repo listed; `old`: the ids it listed before (listed again: a commit's
        files do not change, but be exact)."""
        repo = repo_of(snap)
        new_repo = txn.get(repo, db=self.repo_bytes_table) is None  # a repo's links are never deleted
        n = size = done = done_size = missing = 0
        snap_blobs = snap_bytes = snap_done = 0
        last_access = 0.0
        listed = set()
        for key, raw_size in blobs:
            listed.add(key)
            complete = txn.get(key, db=self.complete) is not None
            missing += not complete
            blob_size = SIZE.unpack(raw_size)[0]
            snap_blobs, snap_bytes = snap_blobs + 1, snap_bytes + blob_size
            snap_done += blob_size if complete else 0
            last_access = max(last_access, last_access_of(txn.get(key, db=self.records)))
            if new_repo or not self._linked(txn, key + b"\0" + repo):
                n, size = n + 1, size + blob_size
                if complete:
                    done, done_size = done + 1, done_size + blob_size
            txn.put(key + b"\0" + snap, raw_size, db=self.links)
        for key in old - listed:
            txn.delete(key + b"\0" + snap, db=self.links)
        txn.put(snap, b"%d" % missing, db=self.missing)
        txn.put(snap, _SNAP.pack(files, snap_blobs, snap_bytes, snap_done, last_access), db=self.snap_counts)
        txn.put(repo, b"", db=self.changed)
        self._add_repo_bytes(txn, repo, n, size, done, done_size)

    def _linked(self, txn, prefix: bytes) -> bool:
        cur = txn.cursor(db=self.links)
        return cur.set_range(prefix) and cur.key().startswith(prefix)

    def completed(self, txn, key: bytes, complete: bool) -> None:
        """A blob became complete (or stopped being): each snapshot listing it has one blob
        fewer (more) to wait for, and each repo listing it one more (fewer) complete."""
        repos: dict[bytes, int] = {}
        for snap, raw_size in under(txn, self.links, key + b"\0"):
            raw = txn.get(snap, db=self.missing)
            if raw is not None:
                txn.put(snap, b"%d" % max(0, int(raw) + (-1 if complete else 1)), db=self.missing)
                txn.put(repo_of(snap), b"", db=self.changed)
            # a link without a size (the previous version's, written during a takeover) counts 0 bytes
            repos[repo_of(snap)] = size = SIZE.unpack(raw_size)[0] if len(raw_size) == SIZE.size else 0
            counts = self._snap(txn, snap)
            if counts is not None:
                files, n, total, done, at = counts
                done = max(0, done + (size if complete else -size))
                txn.put(snap, _SNAP.pack(files, n, total, done, at), db=self.snap_counts)
        for repo, size in repos.items():
            self._add_repo_bytes(txn, repo, 0, 0, 1 if complete else -1, size if complete else -size)

    def accessed(self, txn, key: bytes, at: float) -> None:
        """A blob's stored last_access became `at`: the snapshots listing it were used then."""
        for snap, _ in under(txn, self.links, key + b"\0"):
            counts = self._snap(txn, snap)
            if counts is not None and at > counts[4]:
                txn.put(snap, _SNAP.pack(*counts[:4], at), db=self.snap_counts)

    def _snap(self, txn, snap: bytes) -> tuple[int, int, int, int, float] | None:
        raw = txn.get(snap, db=self.snap_counts)
        return _SNAP.unpack(raw) if raw is not None and len(raw) == _SNAP.size else None

    def forget(self, txn, snap: bytes) -> None:
        """A snapshot's file list was dropped: nobody waits for its readiness."""
        txn.delete(snap, db=self.snap_counts)
        if txn.delete(snap, db=self.missing):
            txn.put(repo_of(snap), b"", db=self.changed)

    def changed_repo(self, txn, repo: bytes) -> None:
        """A ref of the repo moved: its readiness is its refs' snapshots'."""
        txn.put(repo, b"", db=self.changed)

    def _add_repo_bytes(self, txn, repo: bytes, blobs: int, size: int, done: int, done_size: int) -> None:
        raw = txn.get(repo, db=self.repo_bytes_table)
        old = _REPO_BYTES.unpack(raw) if raw and len(raw) == _REPO_BYTES.size else (0, 0, 0, 0)
        new = [max(0, a + b) for a, b in zip(old, (blobs, size, done, done_size), strict=True)]
        txn.put(repo, _REPO_BYTES.pack(*new), db=self.repo_bytes_table)

    # read ----------------------------------------------------------------------

    def snapshots_missing(self, repo_type: str, repo_id: str) -> dict[str, int]:
        """commit -> how many of its snapshot's blobs are not complete (0: ready), for one repo."""
        with self.db.read() as txn:
            return {commit.decode(): int(n) for commit, n in under(txn, self.missing, repo_key(repo_type, repo_id))}

    def snapshot_counts(self, repo_type: str, repo_id: str) -> dict[str, tuple[int, int, int, int, float]]:
        """commit -> (files, blobs, their bytes, bytes of the complete ones, latest stored
        last_access of its blobs) for one repo: one read per snapshot, no file list."""
        with self.db.read() as txn:
            found = under(txn, self.snap_counts, repo_key(repo_type, repo_id))
            return {commit.decode(): _SNAP.unpack(raw) for commit, raw in found if len(raw) == _SNAP.size}

    def take_changed_repos(self) -> list[tuple[str, str]]:
        """The repos whose readiness may have changed since the last call (and forget them)."""
        with self.db.read() as txn:
            if not txn.cursor(db=self.changed).first():
                return []  # no write transaction when nothing changed
        out = []
        with self.db.write() as txn:
            for key in list(txn.cursor(db=self.changed).iternext(values=False)):
                try:
                    out.append(split_key(bytes(key))[:2])
                except BAD:
                    pass
            txn.drop(self.changed, delete=False)
        return out

    def repos_of(self, blob_id: str) -> list[tuple[str, str]]:
        """(repo_type, repo_id) of each repo whose snapshots list the blob."""
        with self.db.read() as txn:
            repos = dict.fromkeys(repo_of(snap) for snap, _ in under(txn, self.links, blob_id.encode() + b"\0"))
        out = []
        for repo in repos:
            try:
                out.append(split_key(repo)[:2])
            except BAD:
                pass
        return out

    def snapshots_of(self, blob_id: str) -> list[tuple[str, str, str]]:
        """(repo_type, repo_id, commit) of each snapshot that lists the blob."""
        with self.db.read() as txn:
            snaps = [snap for snap, _ in under(txn, self.links, blob_id.encode() + b"\0")]
        out = []
        for snap in snaps:
            try:
                out.append(split_key(snap))
            except BAD:
                pass
        return out

    def repo_bytes(self, repo_type: str, repo_id: str) -> tuple[int, int, int, int]:
        """(blobs, bytes, complete blobs, their bytes) of the repo's snapshots: one read."""
        with self.db.read() as txn:
            raw = txn.get(repo_key(repo_type, repo_id), db=self.repo_bytes_table)
        return _REPO_BYTES.unpack(raw) if raw and len(raw) == _REPO_BYTES.size else (0, 0, 0, 0)
