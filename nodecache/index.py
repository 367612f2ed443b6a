"""The node's durable memory: refs, snapshots, blobs and chunk presence in LMDB.

After a restart the index is the truth. A chunk is recorded here only after
its bytes were written (and synced) to the blob file, so a crash can lose a
chunk (it is fetched again) but never claim one that is not on disk.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb

from .layout import FileEntry, RepoView

_CHUNK_KEY = struct.Struct(">Q")


@dataclass
class BlobRecord:
    """What we know of one content-addressed blob, and how to fill it."""

    blob_id: str
    size: int
    kind: str  # "sha256" | "gitsha1": which whole-blob hash proves the id
    chunk_size: int
    state: str = "partial"  # "partial" | "complete" | "quarantined"
    repo_type: str = "model"  # where to fetch it: any snapshot that lists it
    repo_id: str = ""
    commit: str = ""
    path: str = ""
    last_access: float = 0.0
    tier: str = "disk"  # which store tier holds its file

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))


def _repo_key(repo_type: str, repo_id: str) -> bytes:
    return f"{repo_type}:{repo_id}\0".encode()


class Index:
    """One LMDB environment with a named database per kind of record."""

    def __init__(self, path: Path, map_size: int = 1 << 36):
        path.mkdir(parents=True, exist_ok=True)
        # metasync=False: a crash may lose the last transaction, never integrity.
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=8, metasync=False)
        self._refs = self.env.open_db(b"refs")
        self._snaps = self.env.open_db(b"snapshots")
        self._blobs = self.env.open_db(b"blobs")
        self._chunks = self.env.open_db(b"chunks")
        self._pins = self.env.open_db(b"pins")
        self._repos = self.env.open_db(b"repos")

    def close(self) -> None:
        self.env.close()

    # refs and snapshots ------------------------------------------------------

    def put_snapshot(self, repo_type: str, repo_id: str, commit: str, files: list[FileEntry]) -> None:
        value = json.dumps({"files": [[f.path, f.size, f.blob_id] for f in files], "at": time.time()})
        with self.env.begin(write=True) as txn:
            txn.put(_repo_key(repo_type, repo_id) + commit.encode(), value.encode(), db=self._snaps)

    def put_ref(self, repo_type: str, repo_id: str, revision: str, commit: str) -> None:
        value = json.dumps({"commit": commit, "at": time.time()})
        with self.env.begin(write=True) as txn:
            txn.put(_repo_key(repo_type, repo_id) + revision.encode(), value.encode(), db=self._refs)

    def get_ref(self, repo_type: str, repo_id: str, revision: str) -> str | None:
        with self.env.begin() as txn:
            raw = txn.get(_repo_key(repo_type, repo_id) + revision.encode(), db=self._refs)
        return json.loads(raw)["commit"] if raw else None

    def all_refs(self) -> list[tuple[str, str, str, str, float]]:
        """(repo_type, repo_id, revision, commit, resolved_at) of every ref."""
        out = []
        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self._refs):
                head, _, revision = key.decode().partition("\0")
                repo_type, _, repo_id = head.partition(":")
                value = json.loads(raw)
                out.append((repo_type, repo_id, revision, value["commit"], value["at"]))
        return out

    def get_snapshot(self, repo_type: str, repo_id: str, commit: str) -> list[FileEntry] | None:
        with self.env.begin() as txn:
            raw = txn.get(_repo_key(repo_type, repo_id) + commit.encode(), db=self._snaps)
        return [FileEntry(*f) for f in json.loads(raw)["files"]] if raw else None

    def views(self) -> list[RepoView]:
        """Every repo with its refs and snapshots, for building the FUSE tree."""
        found: dict[tuple[str, str], RepoView] = {}

        def view(key: bytes) -> tuple[RepoView, str]:
            head, _, tail = key.decode().partition("\0")
            repo_type, _, repo_id = head.partition(":")
            v = found.setdefault((repo_type, repo_id), RepoView(repo_type, repo_id, {}, {}))
            return v, tail

        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self._snaps):
                v, commit = view(key)
                v.snapshots[commit] = [FileEntry(*f) for f in json.loads(raw)["files"]]
            for key, raw in txn.cursor(db=self._refs):
                v, revision = view(key)
                v.refs[revision] = json.loads(raw)["commit"]
        return [found[k] for k in sorted(found)]

    def put_repo_meta(self, repo_type: str, repo_id: str, visibility: str) -> None:
        """What the repo's source said of it last time (survives a restart with the source down)."""
        value = json.dumps({"visibility": visibility, "at": time.time()})
        with self.env.begin(write=True) as txn:
            txn.put(_repo_key(repo_type, repo_id), value.encode(), db=self._repos)

    def get_repo_meta(self, repo_type: str, repo_id: str) -> dict | None:
        with self.env.begin() as txn:
            raw = txn.get(_repo_key(repo_type, repo_id), db=self._repos)
        return json.loads(raw) if raw else None

    # pins -------------------------------------------------------------------

    def put_pin(self, repo_type: str, repo_id: str, revision: str, mode: str) -> None:
        value = json.dumps({"mode": mode, "at": time.time()})
        with self.env.begin(write=True) as txn:
            txn.put(_repo_key(repo_type, repo_id) + revision.encode(), value.encode(), db=self._pins)

    def delete_pin(self, repo_type: str, repo_id: str, revision: str) -> bool:
        with self.env.begin(write=True) as txn:
            return txn.delete(_repo_key(repo_type, repo_id) + revision.encode(), db=self._pins)

    def pins(self) -> list[tuple[str, str, str, str]]:
        """(repo_type, repo_id, revision, mode) of every pin."""
        out = []
        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self._pins):
                head, _, revision = key.decode().partition("\0")
                repo_type, _, repo_id = head.partition(":")
                out.append((repo_type, repo_id, revision, json.loads(raw)["mode"]))
        return out

    # blobs and chunks --------------------------------------------------------

    def get_blob(self, blob_id: str) -> BlobRecord | None:
        with self.env.begin() as txn:
            raw = txn.get(blob_id.encode(), db=self._blobs)
        return BlobRecord(**json.loads(raw)) if raw else None

    def put_blob(self, rec: BlobRecord) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(rec.blob_id.encode(), json.dumps(asdict(rec)).encode(), db=self._blobs)

    def all_blobs(self) -> list[BlobRecord]:
        with self.env.begin() as txn:
            return [BlobRecord(**json.loads(raw)) for _, raw in txn.cursor(db=self._blobs)]

    def set_chunk(self, blob_id: str, index: int, digest: int) -> None:
        self.set_chunks([(blob_id, index, digest)])

    def set_chunks(self, chunks: list[tuple[str, int, int]]) -> None:
        """Record (blob id, chunk index, xxh3-64) of chunks already synced, in one transaction."""
        with self.env.begin(write=True) as txn:
            for blob_id, index, digest in chunks:
                txn.put(blob_id.encode() + b"\0" + _CHUNK_KEY.pack(index), _CHUNK_KEY.pack(digest), db=self._chunks)

    def chunks(self, blob_id: str) -> dict[int, int]:
        """chunk index -> xxh3-64 of the chunk, for every chunk on disk."""
        prefix = blob_id.encode() + b"\0"
        out: dict[int, int] = {}
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._chunks)
            if cur.set_range(prefix):
                for key, value in cur:
                    if not key.startswith(prefix):
                        break
                    out[_CHUNK_KEY.unpack(key[len(prefix) :])[0]] = _CHUNK_KEY.unpack(value)[0]
        return out

    def drop_chunks(self, blob_id: str, indexes: list[int] | None = None) -> None:
        """Forget some (or all) chunks of a blob, e.g. after failed verification."""
        prefix = blob_id.encode() + b"\0"
        with self.env.begin(write=True) as txn:
            if indexes is not None:
                for i in indexes:
                    txn.delete(prefix + _CHUNK_KEY.pack(i), db=self._chunks)
                return
            cur = txn.cursor(db=self._chunks)
            if cur.set_range(prefix):
                while cur.key().startswith(prefix):
                    if not cur.delete():
                        break
