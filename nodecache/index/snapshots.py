"""Snapshots: each commit's file list, and its folders and blobs as compact blocks.

The blocks (folders.py) are derived from the file list in the transaction that writes it:
`<snapshot key>/<folder path>` per folder and `<snapshot key>#` for its blobs. A file list
that fails its check is dropped whole: a listing with holes would claim a commit it does not
show (it is resolved again from upstream when asked for).
"""

from __future__ import annotations

import json
import logging
import time

from ..folders import Block
from ..layout import COMMIT_RE, FileEntry, snapshot_blocks
from .db import Db
from .keys import decode_files, encode_files, repo_key, split_key
from .links import SIZE, Links
from .records import BAD

log = logging.getLogger("nodecache.index")

Blocks = tuple[dict[str, bytes], bytes]  # snapshot_blocks(files): folder path -> block, and the blobs' block


class Snapshots:
    def __init__(self, db: Db, links: Links):
        self.db, self.links = db, links
        self.table = db.table("snapshots")
        self.folders = db.table("folders")
        self.decode = decode_files  # an attribute, so that a test can count the lists decoded

    def files(self, key: bytes, raw: bytes, bad: list) -> list[FileEntry] | None:
        """A stored file list, or None (and the snapshot added to `bad`) if it fails its check."""
        try:
            return self.decode(raw)
        except BAD as e:
            bad.append((key, e))
            return None

    def _drop(self, bad: list[tuple[bytes, Exception]]) -> None:
        if not bad:
            return
        with self.db.write() as txn:
            for key, e in bad:
                self.links.forget(txn, key)
                self._drop_blocks(txn, key)
                self.db.invalid(txn, "snapshots", self.table, key, e)

    # write ---------------------------------------------------------------------

    def put(
        self, repo_type: str, repo_id: str, commit: str, files: list[FileEntry], blocks: Blocks | None = None
    ) -> None:
        """Record a snapshot's file list and its folders (`blocks`: `snapshot_blocks(files)`,
        given when the caller built them off the loop)."""
        with self.db.write() as txn:
            self.put_in(txn, repo_type, repo_id, commit, files, blocks)

    def put_in(
        self, txn, repo_type: str, repo_id: str, commit: str, files: list[FileEntry], blocks: Blocks | None = None
    ) -> None:
        """`put` in the caller's transaction (a small snapshot's registration is one)."""
        value = encode_files(files, time.time())
        blocks = snapshot_blocks(files) if blocks is None else blocks
        key = repo_key(repo_type, repo_id) + commit.encode()
        old = txn.get(key, db=self.table)
        listed: set[bytes] = set()
        if old is not None:  # listed again (a commit's files do not change, but be exact)
            try:
                listed = {str(item[2]).encode() for item in json.loads(old)["files"]}
            except BAD:
                pass
        txn.put(key, value, db=self.table)
        blobs = ((raw_id.hex().encode(), raw_size) for raw_id, raw_size in Block(blocks[1]).entries())
        self.links.list(txn, key, blobs, len(files), listed)
        self._put_blocks(txn, key, blocks)

    def relist(self, txn) -> None:
        """Link every snapshot to its blobs again (a file list that fails its check is left to
        `get` and `views`, which drop it)."""
        for key, raw in txn.cursor(db=self.table):
            try:
                files = self.decode(raw)
            except BAD:
                continue
            blobs = {f.blob_id.encode(): SIZE.pack(f.size) for f in files}
            self.links.list(txn, bytes(key), blobs.items(), len(files))

    def _put_blocks(self, txn, key: bytes, blocks: Blocks) -> None:
        self._drop_blocks(txn, key)
        folders, blobs = blocks
        for path, raw in folders.items():
            txn.put(key + b"/" + path.encode(), raw, db=self.folders)
        txn.put(key + b"#", blobs, db=self.folders)

    def _drop_blocks(self, txn, key: bytes) -> None:
        cur = txn.cursor(db=self.folders)
        if cur.set_range(key):
            while cur.key().startswith(key):
                if not cur.delete():
                    break

    # read ----------------------------------------------------------------------

    def get(self, repo_type: str, repo_id: str, commit: str) -> list[FileEntry] | None:
        key = repo_key(repo_type, repo_id) + commit.encode()
        with self.db.read() as txn:
            raw = txn.get(key, db=self.table)
        bad: list = []
        files = self.files(key, raw, bad) if raw else None
        self._drop(bad)
        return files

    def all(self) -> dict[tuple[str, str], dict[str, list[FileEntry]]]:
        """(repo_type, repo_id) -> commit -> file list, of every snapshot."""
        out: dict[tuple[str, str], dict[str, list[FileEntry]]] = {}
        bad: list = []
        with self.db.read() as txn:
            for key, raw in txn.cursor(db=self.table):
                try:
                    repo_type, repo_id, commit = split_key(key)
                    if not COMMIT_RE.fullmatch(commit):
                        raise ValueError("not a commit")
                except BAD as e:
                    bad.append((key, e))
                    continue
                files = self.files(key, raw, bad)
                if files is not None:
                    out.setdefault((repo_type, repo_id), {})[commit] = files
        self._drop(bad)
        return out

    def repos(self) -> list[tuple[str, str]]:
        """(repo_type, repo_id) of every repo with a snapshot, from the keys alone:
        one cursor jump per repo, no file list read."""
        out = []
        with self.db.read() as txn:
            cur = txn.cursor(db=self.table)
            found = cur.first()
            while found:
                key = cur.key()
                head = key.partition(b"\0")[0]
                try:
                    out.append(split_key(key)[:2])
                except BAD:
                    pass  # views() and get() drop it
                found = cur.set_range(head + b"\1")
        return out

    def commits(self, repo_type: str, repo_id: str) -> list[str]:
        """The commits of one repo's snapshots (keys only)."""
        prefix = repo_key(repo_type, repo_id)
        out = []
        with self.db.read() as txn:
            cur = txn.cursor(db=self.table)
            found = cur.set_range(prefix)
            while found and cur.key().startswith(prefix):
                commit = bytes(cur.key())[len(prefix) :].decode()
                if COMMIT_RE.fullmatch(commit):
                    out.append(commit)
                found = cur.next()
        return out

    def has_repo(self, repo_type: str, repo_id: str) -> bool:
        """Any snapshot of the repo recorded (without reading them all)."""
        prefix = repo_key(repo_type, repo_id)
        with self.db.read() as txn:
            cur = txn.cursor(db=self.table)
            return cur.set_range(prefix) and cur.key().startswith(prefix)

    def folder(self, repo_type: str, repo_id: str, commit: str, path: str) -> Block | None:
        """One folder of a snapshot (`path` "" for its top), read alone: None if the snapshot
        or the folder is not there."""
        return self._block(repo_key(repo_type, repo_id) + commit.encode(), b"/" + path.encode())

    def blobs(self, repo_type: str, repo_id: str, commit: str) -> Block | None:
        """A snapshot's blobs (raw id -> size, u64 LE) as one block; None if it is not there."""
        return self._block(repo_key(repo_type, repo_id) + commit.encode(), b"#")

    def _block(self, key: bytes, tail: bytes) -> Block | None:
        """A stored block; the snapshot's blocks derived from its file list if they are not
        stored (an index written before they were) or one fails its check."""
        for attempt in (0, 1):
            with self.db.read() as txn:
                raw = txn.get(key + tail, db=self.folders)
                derived = raw is not None or txn.get(key + b"#", db=self.folders) is not None
            if raw is not None:
                try:
                    return Block(raw)
                except ValueError as e:
                    log.warning("index: dropping invalid folders of %r: %s", key[:200], e)
                    self.db.on_invalid("folders")
                    derived = False
            if derived or attempt:
                return None
            with self.db.read() as txn:
                snap = txn.get(key, db=self.table)
            bad: list = []
            files = self.files(key, snap, bad) if snap else None
            self._drop(bad)
            if files is None:
                return None
            blocks = snapshot_blocks(files)
            with self.db.write() as txn:
                if txn.get(key, db=self.table) == snap:
                    self._put_blocks(txn, key, blocks)
        return None
