"""The node's durable memory: refs, snapshots, blobs and chunk presence in LMDB.

After a restart the index is the truth. A chunk is recorded here only after
its bytes were written (and synced) to the blob file, so a crash can lose a
chunk (it is fetched again) but never claim one that is not on disk.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from .folders import Block
from .layout import (
    COMMIT_RE,
    FileEntry,
    RepoView,
    snapshot_blocks,
    validate_blob_id,
    validate_relpath,
    validate_repo_id,
    validate_repo_type,
    validate_revision,
    validate_size,
)
from .lmdbscan import under

log = logging.getLogger(__name__)

_CHUNK_KEY = struct.Struct(">Q")
_PROOF = struct.Struct(">d")  # a proof's time, ordered as bytes (times are never negative)
_SIZE = struct.Struct("<Q")
_REPO_BYTES = struct.Struct("<QQQQ")  # blobs, their bytes, complete blobs, their bytes


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
    failures: int = 0  # proofs failed in a row; reset by a proof that holds
    retry_at: float = 0.0  # quarantined: not fetched again before this (wall clock)
    demoted: list[str] = field(default_factory=list)  # sources that served the last failed attempt: asked last
    verified_at: float = 0.0  # complete: when its bytes on disk last proved its id (fill or scrub; wall clock)

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))


_KINDS = ("sha256", "gitsha1", "source")  # "source": the id names a source version (upstream.manifest)
_STATES = ("partial", "complete", "quarantined")
_TIERS = ("disk", "shm")
_BAD = (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError)  # what a hostile entry raises


def check_blob(rec: BlobRecord) -> BlobRecord:
    """Raise ValueError unless every field is sane: records outlive versions, and their
    fields once came from outside (a size of 10^18 would size our memory at start)."""
    validate_blob_id(rec.blob_id)
    validate_size(rec.size)
    cs = rec.chunk_size
    if type(cs) is not int or not 64 * 1024 <= cs <= 1 << 30 or cs & (cs - 1):
        raise ValueError(f"chunk_size {cs!r}")
    if rec.kind not in _KINDS or rec.state not in _STATES or rec.tier not in _TIERS:
        raise ValueError(f"kind/state/tier {rec.kind!r}/{rec.state!r}/{rec.tier!r}")
    for key in ("last_access", "retry_at", "verified_at"):
        if type(getattr(rec, key)) not in (int, float):
            raise ValueError(f"{key} {getattr(rec, key)!r}")
    if type(rec.failures) is not int or not 0 <= rec.failures <= 1 << 20:
        raise ValueError(f"failures {rec.failures!r}")
    if not isinstance(rec.demoted, list) or len(rec.demoted) > 64:
        raise ValueError("demoted: not a short list")
    if not all(isinstance(name, str) and len(name) <= 300 for name in rec.demoted):
        raise ValueError("demoted: not source names")
    validate_repo_type(rec.repo_type)
    if rec.repo_id or rec.commit or rec.path:  # where to fetch it: all three, or none
        validate_repo_id(rec.repo_id)
        validate_relpath(rec.path)
        if not COMMIT_RE.fullmatch(rec.commit):
            raise ValueError(f"commit {rec.commit!r}")
    return rec


# The derived records include the LRU order, the chunked set, complete bytes, and (v3) the links
# from blobs to snapshots with the blob's size, which replace v2's separate `blob_repos`.
_DERIVED = "derived_v3"


def _derived(rec: BlobRecord) -> tuple[str, float, float, int, str]:
    """What the derived records are made of: (state, verified_at, last_access, size, tier)."""
    return (rec.state, float(rec.verified_at), float(rec.last_access), rec.size, rec.tier)


def _lru_key(key: bytes, derived: tuple) -> bytes:
    """A blob's place in its tier's order of last use: tier \0 last_access id."""
    return derived[4].encode() + b"\0" + _PROOF.pack(max(0.0, derived[2])) + key


def _blob_json(rec: BlobRecord) -> bytes:
    """A record as stored: its fields, in order (`dataclasses.asdict` deep-copies each one:
    it was half the time of registering a 10^5-file snapshot)."""
    return json.dumps(vars(rec)).encode()


def _file(item) -> FileEntry:
    path, size, blob_id = item
    return FileEntry(validate_relpath(path), validate_size(size), validate_blob_id(blob_id))


def _repo_key(repo_type: str, repo_id: str) -> bytes:
    return f"{repo_type}:{repo_id}\0".encode()


def _split_key(key: bytes) -> tuple[str, str, str]:
    """`type:org/name\0tail` -> (repo_type, repo_id, tail), each part checked."""
    head, _, tail = key.decode().partition("\0")
    repo_type, _, repo_id = head.partition(":")
    return validate_repo_type(repo_type), validate_repo_id(repo_id), tail


def _commit_of(raw: bytes) -> str:
    commit = json.loads(raw)["commit"]
    if not isinstance(commit, str) or not COMMIT_RE.fullmatch(commit):
        raise ValueError(f"commit {commit!r}")
    return commit


class Index:
    """One LMDB environment with a named database per kind of record."""

    def __init__(self, path: Path, map_size: int = 1 << 36, on_invalid: Callable[[str], None] = lambda db: None):
        """`on_invalid(db)` hears of each entry that failed its check on load (and was dropped)."""
        self.on_invalid = on_invalid
        path.mkdir(parents=True, exist_ok=True)
        # metasync=False: a crash may lose the last transaction, never integrity.
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=32, metasync=False)
        self._refs = self.env.open_db(b"refs")
        self._snaps = self.env.open_db(b"snapshots")
        self._blobs = self.env.open_db(b"blobs")
        self._chunks = self.env.open_db(b"chunks")
        self._pins = self.env.open_db(b"pins")
        self._repos = self.env.open_db(b"repos")
        self._meta = self.env.open_db(b"meta")  # small records about the index itself (counters, start marks)
        self._verify = self.env.open_db(b"verify_first")  # blob ids shown under a verify_before_serve name
        self._proofs = self.env.open_db(b"proofs")  # (verified_at, blob id) of every complete blob
        # (last_access, blob id) of every blob that may hold bytes (complete, or partial with a
        # chunk recorded): eviction reads the least recently used ones only.
        self._lru = self.env.open_db(b"lru")
        self._chunked = self.env.open_db(b"chunked")  # ids of blobs with a chunk recorded
        # Readiness (node labels) per snapshot, kept as blobs complete and snapshots are recorded:
        self._complete = self.env.open_db(b"complete")  # ids of complete blobs
        # Who lists each blob: `<blob id>\0<snapshot key>` -> its size (u64 LE); from it, per repo, how
        # many of its blobs and bytes are complete, kept with each state change, read by getxattr.
        self._blob_snaps = self.env.open_db(b"blob_snapshots")
        self._missing = self.env.open_db(b"snapshot_missing")  # snapshot key -> its blobs not complete
        self._changed = self.env.open_db(b"changed_repos")  # repo keys whose readiness may have changed
        # A snapshot's folders and blobs as compact blocks (folders.py), derived from its file list
        # in the transaction that writes it: `<snapshot key>/<folder path>` and `<snapshot key>#`.
        self._folders = self.env.open_db(b"folders")
        self._repo_bytes = self.env.open_db(b"repo_bytes")
        self._derive_once()

    def close(self) -> None:
        self.env.close()

    def _drop_invalid(self, db_name: str, db, bad: list[tuple[bytes, Exception]]) -> None:
        """Entries that fail their check are logged, counted and deleted: never fatal."""
        if not bad:
            return
        with self.env.begin(write=True) as txn:
            for key, e in bad:
                log.warning("index: dropping invalid %s entry %r: %s", db_name, key[:200], e)
                if db is self._blobs:
                    self._derive_many(txn, [(key, self._stored(txn, key), None)])
                if db is self._snaps and txn.delete(key, db=self._missing):
                    txn.put(key.partition(b"\0")[0] + b"\0", b"", db=self._changed)
                if db is self._snaps:
                    self._drop_blocks(txn, key)
                txn.delete(key, db=db)
                self.on_invalid(db_name)

    # meta ----------------------------------------------------------------------

    def get_meta(self, name: str) -> object | None:
        """A small JSON record about the index itself (None: absent or unreadable)."""
        with self.env.begin() as txn:
            raw = txn.get(name.encode(), db=self._meta)
        try:
            return json.loads(raw) if raw else None
        except _BAD:
            return None

    def put_meta(self, name: str, value: object | None, sync: bool = False) -> None:
        """Set (or, with None, delete) a meta record; `sync` makes it durable before returning."""
        with self.env.begin(write=True) as txn:
            if value is None:
                txn.delete(name.encode(), db=self._meta)
            else:
                txn.put(name.encode(), json.dumps(value).encode(), db=self._meta)
        if sync:
            self.env.sync(True)

    def put_last(self, name: str, value: dict) -> None:
        """Set a meta record as the index's last write, durably, with the id of its transaction
        (`txn`): `untouched_since` then tells whether anyone wrote to the index after it."""
        with self.env.begin(write=True) as txn:
            txn.put(name.encode(), json.dumps({**value, "txn": txn.id()}).encode(), db=self._meta)
        self.env.sync(True)

    def untouched_since(self, record: dict) -> bool:
        """Is the record from `put_last` still the index's last write?"""
        return record.get("txn") == self.env.info()["last_txnid"]

    # what the blob records imply, kept in the transaction that changes a record --------
    # State counts (/metrics, /v1/status), complete blobs in order of their last proof (the
    # scrubber's next ones) and blobs holding bytes in order of their last use (eviction's
    # next ones): read without a scan of every record.

    def check_all(self) -> None:
        """Check every record (dropping the bad ones) and derive everything again: someone
        else wrote to the index, and may not have kept what the writes here keep."""
        self.all_blobs()
        self._derive_once(force=True)

    def _derive_once(self, force: bool = False) -> None:
        """Build them for an index written before they existed; later writes keep them."""
        if self.get_meta(_DERIVED) is not None and not force:
            return  # no write transaction: it would look like a write since a clean stop
        with self.env.begin(write=True) as txn:
            if force or txn.get(_DERIVED.encode(), db=self._meta) is None:
                txn.drop(self._chunked, delete=False)
                cur = txn.cursor(db=self._chunks)
                found = cur.first()
                while found:  # one jump per blob with chunks
                    blob_id = bytes(cur.key())[: -(_CHUNK_KEY.size + 1)]
                    txn.put(blob_id, b"", db=self._chunked)
                    found = cur.set_range(blob_id + b"\1")
                for db in (self._blob_snaps, self._missing, self._complete, self._repo_bytes):
                    txn.drop(db, delete=False)
                try:  # emptied, not deleted: a daemon of the previous version may still hold its handle
                    txn.drop(self.env.open_db(b"blob_repos", txn=txn, create=False), delete=False)
                except lmdb.NotFoundError:
                    pass
                stored = [(key, self._stored(txn, key)) for key, _ in txn.cursor(db=self._blobs)]
                self._rebuild(txn, [(key, s) for key, s in stored if s is not None])
                for key, raw in txn.cursor(db=self._snaps):  # after the complete set
                    try:
                        files = [_file(item) for item in json.loads(raw)["files"]]
                    except _BAD:
                        continue  # get_snapshot() and views() drop it
                    self._list_blobs(txn, bytes(key), {f.blob_id.encode(): _SIZE.pack(f.size) for f in files}.items())
                txn.put(_DERIVED.encode(), b"1", db=self._meta)

    def _rebuild(self, txn, records: list[tuple[bytes, tuple]]) -> None:
        txn.drop(self._proofs, delete=False)
        txn.drop(self._lru, delete=False)
        txn.put(b"blob_states", json.dumps(dict.fromkeys(_STATES, 0)).encode(), db=self._meta)
        txn.delete(b"complete_bytes", db=self._meta)
        self._derive_many(txn, [(key, None, s) for key, s in records])

    def _stored(self, txn, key: bytes) -> tuple[str, float, float, int, str] | None:
        """What a stored record was derived from (_derived; None: absent, or unusable)."""
        raw = txn.get(key, db=self._blobs)
        try:
            d = json.loads(raw) if raw else None
            if d is None:
                return None
            state, at, used = d["state"], d.get("verified_at", 0.0), d.get("last_access", 0.0)
            size, tier = d.get("size", 0), d.get("tier", "disk")
        except _BAD:
            return None
        if state not in _STATES or type(at) not in (int, float) or type(used) not in (int, float):
            return None
        size = size if type(size) is int and size >= 0 else 0  # never written so: a hostile entry
        return (state, float(at), float(used), size, tier if tier in _TIERS else "disk")

    def _holds(self, txn, key: bytes, derived: tuple | None) -> bool:
        """May the blob hold bytes on disk (so eviction must see it)?"""
        if derived is None or derived[0] == "quarantined":
            return False
        return derived[0] == "complete" or txn.get(key, db=self._chunked) is not None

    def _derive_many(self, txn, changes: list[tuple[bytes, tuple | None, tuple | None]]) -> None:
        """Apply records' changes (key, old (state, verified_at, last_access) or None, new or None)."""
        delta = dict.fromkeys(_STATES, 0)
        complete_bytes: dict[str, int] = {}
        for key, old, new in changes:
            if old == new:
                continue
            for d, sign in ((old, -1), (new, 1)):
                if d is not None and d[0] == "complete":
                    complete_bytes[d[4]] = complete_bytes.get(d[4], 0) + sign * d[3]
            now = new is not None and new[0] == "complete"
            if now != (txn.get(key, db=self._complete) is not None):
                self._completes(txn, key, now)
            if self._holds(txn, key, old):
                txn.delete(_lru_key(key, old), db=self._lru)
            if self._holds(txn, key, new):
                txn.put(_lru_key(key, new), b"", db=self._lru)
            if old is not None:
                delta[old[0]] -= 1
                if old[0] == "complete":
                    txn.delete(_PROOF.pack(old[1]) + key, db=self._proofs)
            if new is not None:
                delta[new[0]] += 1
                if new[0] == "complete":
                    txn.put(_PROOF.pack(new[1]) + key, b"", db=self._proofs)
        if any(delta.values()):
            raw = txn.get(b"blob_states", db=self._meta)
            counts = json.loads(raw) if raw else dict.fromkeys(_STATES, 0)
            for state, n in delta.items():
                counts[state] = max(0, counts.get(state, 0) + n)
            txn.put(b"blob_states", json.dumps(counts).encode(), db=self._meta)
        if any(complete_bytes.values()):
            raw = txn.get(b"complete_bytes", db=self._meta)
            total = json.loads(raw) if raw else {}
            for tier, n in complete_bytes.items():
                total[tier] = max(0, total.get(tier, 0) + n)
            txn.put(b"complete_bytes", json.dumps(total).encode(), db=self._meta)

    def _completes(self, txn, key: bytes, complete: bool) -> None:
        """A blob became complete (or stopped being): each snapshot listing it has one blob
        fewer (more) to wait for (its repo's readiness may have changed), and each repo listing
        it one more (fewer) complete."""
        if complete:
            txn.put(key, b"", db=self._complete)
        else:
            txn.delete(key, db=self._complete)
        repos: dict[bytes, int] = {}
        for snap, raw_size in under(txn, self._blob_snaps, key + b"\0"):
            raw = txn.get(snap, db=self._missing)
            if raw is not None:
                txn.put(snap, b"%d" % max(0, int(raw) + (-1 if complete else 1)), db=self._missing)
                txn.put(snap.partition(b"\0")[0] + b"\0", b"", db=self._changed)
            repos[snap.partition(b"\0")[0] + b"\0"] = _SIZE.unpack(raw_size)[0]
        for repo, size in repos.items():
            self._add_repo_bytes(txn, repo, 0, 0, 1 if complete else -1, size if complete else -size)

    def _list_blobs(
        self, txn, snap: bytes, blobs: Iterable[tuple[bytes, bytes]], old: set[bytes] = frozenset()
    ) -> None:
        """Link a snapshot to its blobs ((id, size u64 LE), each once), count those not complete,
        and count in its repo those no other snapshot of the repo listed; `old`: the ids it
        listed before (listed again: a commit's files do not change, but be exact)."""
        repo = snap.partition(b"\0")[0] + b"\0"
        new_repo = txn.get(repo, db=self._repo_bytes) is None  # a repo's links are never deleted
        n = size = done = done_size = missing = 0
        listed = set()
        for key, raw_size in blobs:
            listed.add(key)
            complete = txn.get(key, db=self._complete) is not None
            missing += not complete
            if new_repo or not self._linked(txn, key + b"\0" + repo):
                blob_size = _SIZE.unpack(raw_size)[0]
                n, size = n + 1, size + blob_size
                if complete:
                    done, done_size = done + 1, done_size + blob_size
            txn.put(key + b"\0" + snap, raw_size, db=self._blob_snaps)
        for key in old - listed:
            txn.delete(key + b"\0" + snap, db=self._blob_snaps)
        txn.put(snap, b"%d" % missing, db=self._missing)
        txn.put(repo, b"", db=self._changed)
        self._add_repo_bytes(txn, repo, n, size, done, done_size)

    def _linked(self, txn, prefix: bytes) -> bool:
        cur = txn.cursor(db=self._blob_snaps)
        return cur.set_range(prefix) and cur.key().startswith(prefix)

    def snapshots_missing(self, repo_type: str, repo_id: str) -> dict[str, int]:
        """commit -> how many of its snapshot's blobs are not complete (0: ready), for one repo."""
        prefix = _repo_key(repo_type, repo_id)
        with self.env.begin() as txn:
            return {commit.decode(): int(n) for commit, n in under(txn, self._missing, prefix)}

    def take_changed_repos(self) -> list[tuple[str, str]]:
        """The repos whose readiness may have changed since the last call (and forget them)."""
        with self.env.begin() as txn:
            if not txn.cursor(db=self._changed).first():
                return []  # no write transaction when nothing changed
        out = []
        with self.env.begin(write=True) as txn:
            for key in list(txn.cursor(db=self._changed).iternext(values=False)):
                try:
                    out.append(_split_key(bytes(key))[:2])
                except _BAD:
                    pass
            txn.drop(self._changed, delete=False)
        return out

    def complete_bytes(self) -> dict[str, int]:
        """tier name -> bytes of the complete blobs its records place there: one read."""
        total = self.get_meta("complete_bytes")
        return {k: v for k, v in total.items() if type(v) is int} if isinstance(total, dict) else {}

    def complete_ids(self) -> set[str]:
        """Ids of the complete blobs, from the proof order's keys (no record read)."""
        with self.env.begin() as txn:
            return {bytes(key[_PROOF.size :]).decode() for key in txn.cursor(db=self._proofs).iternext(values=False)}

    def chunked_ids(self) -> list[str]:
        """Ids of the blobs with a chunk recorded (no record read)."""
        with self.env.begin() as txn:
            return [bytes(key).decode() for key in txn.cursor(db=self._chunked).iternext(values=False)]

    def has_blob(self, blob_id: str) -> bool:
        """A record is stored under this id (not read)."""
        with self.env.begin() as txn:
            return txn.get(blob_id.encode(), db=self._blobs) is not None

    def _add_repo_bytes(self, txn, repo: bytes, blobs: int, size: int, done: int, done_size: int) -> None:
        raw = txn.get(repo, db=self._repo_bytes)
        old = _REPO_BYTES.unpack(raw) if raw and len(raw) == _REPO_BYTES.size else (0, 0, 0, 0)
        new = [max(0, a + b) for a, b in zip(old, (blobs, size, done, done_size), strict=True)]
        txn.put(repo, _REPO_BYTES.pack(*new), db=self._repo_bytes)

    def repos_of(self, blob_id: str) -> list[tuple[str, str]]:
        """(repo_type, repo_id) of each repo whose snapshots list the blob."""
        with self.env.begin() as txn:
            links = under(txn, self._blob_snaps, blob_id.encode() + b"\0")
            repos = dict.fromkeys(snap.partition(b"\0")[0] + b"\0" for snap, _ in links)
        out = []
        for repo in repos:
            try:
                out.append(_split_key(repo)[:2])
            except _BAD:
                pass
        return out

    def repo_bytes(self, repo_type: str, repo_id: str) -> tuple[int, int, int, int]:
        """(blobs, bytes, complete blobs, their bytes) of the repo's snapshots: one read."""
        with self.env.begin() as txn:
            raw = txn.get(_repo_key(repo_type, repo_id), db=self._repo_bytes)
        return _REPO_BYTES.unpack(raw) if raw and len(raw) == _REPO_BYTES.size else (0, 0, 0, 0)

    def proven_by(self, when: float) -> tuple[list[str], float | None]:
        """Complete blobs whose last proof was at or before `when`, oldest first, and the time of
        the oldest proof of all (None: no complete blob). Reads only those entries."""
        due: list[str] = []
        oldest = None
        with self.env.begin() as txn:
            for key, _ in txn.cursor(db=self._proofs):
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
            with self.env.begin() as txn:
                cur = txn.cursor(db=self._lru)
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

    def blob_states(self) -> dict[str, int]:
        """How many blob records are in each state: one read, not a scan."""
        counts = self.get_meta("blob_states")
        out = dict.fromkeys(_STATES, 0)
        if isinstance(counts, dict):
            out.update({k: v for k, v in counts.items() if k in out and type(v) is int})
        return out

    # verify-first blobs ----------------------------------------------------------

    def verify_first(self) -> set[str]:
        with self.env.begin() as txn:
            return {key.decode() for key, _ in txn.cursor(db=self._verify)}

    def set_verify_first(self, blob_ids: set[str], replace: bool = False) -> None:
        """Add blob ids (or, with `replace`, make the set exactly these)."""
        with self.env.begin(write=True) as txn:
            if replace:
                txn.drop(self._verify, delete=False)
            for blob_id in blob_ids:
                txn.put(validate_blob_id(blob_id).encode(), b"", db=self._verify)

    # refs and snapshots ------------------------------------------------------

    def put_snapshot(
        self,
        repo_type: str,
        repo_id: str,
        commit: str,
        files: list[FileEntry],
        blocks: tuple[dict[str, bytes], bytes] | None = None,
    ) -> None:
        """Record a snapshot's file list and its folders (`blocks`: `snapshot_blocks(files)`,
        given when the caller built them off the loop)."""
        value = json.dumps({"files": [[f.path, f.size, f.blob_id] for f in files], "at": time.time()})
        blocks = snapshot_blocks(files) if blocks is None else blocks
        key = _repo_key(repo_type, repo_id) + commit.encode()
        with self.env.begin(write=True) as txn:
            old = txn.get(key, db=self._snaps)
            listed: set[bytes] = set()
            if old is not None:
                try:
                    listed = {str(item[2]).encode() for item in json.loads(old)["files"]}
                except _BAD:
                    pass
            txn.put(key, value.encode(), db=self._snaps)
            blobs = ((raw_id.hex().encode(), raw_size) for raw_id, raw_size in Block(blocks[1]).entries())
            self._list_blobs(txn, key, blobs, listed)
            self._put_blocks(txn, key, blocks)

    def _put_blocks(self, txn, key: bytes, blocks: tuple[dict[str, bytes], bytes]) -> None:
        self._drop_blocks(txn, key)
        folders, blobs = blocks
        for path, raw in folders.items():
            txn.put(key + b"/" + path.encode(), raw, db=self._folders)
        txn.put(key + b"#", blobs, db=self._folders)

    def _drop_blocks(self, txn, key: bytes) -> None:
        cur = txn.cursor(db=self._folders)
        if cur.set_range(key):
            while cur.key().startswith(key):
                if not cur.delete():
                    break

    def folder(self, repo_type: str, repo_id: str, commit: str, path: str) -> Block | None:
        """One folder of a snapshot (`path` "" for its top), read alone: None if the snapshot
        or the folder is not there."""
        return self._block(_repo_key(repo_type, repo_id) + commit.encode(), b"/" + path.encode())

    def snapshot_blobs(self, repo_type: str, repo_id: str, commit: str) -> Block | None:
        """A snapshot's blobs (raw id -> size, u64 LE) as one block; None if it is not there."""
        return self._block(_repo_key(repo_type, repo_id) + commit.encode(), b"#")

    def _block(self, key: bytes, tail: bytes) -> Block | None:
        """A stored block; the snapshot's blocks derived from its file list if they are not
        stored (an index written before they were) or one fails its check."""
        for attempt in (0, 1):
            with self.env.begin() as txn:
                raw = txn.get(key + tail, db=self._folders)
                derived = raw is not None or txn.get(key + b"#", db=self._folders) is not None
            if raw is not None:
                try:
                    return Block(raw)
                except ValueError as e:
                    log.warning("index: dropping invalid folders of %r: %s", key[:200], e)
                    self.on_invalid("folders")
                    derived = False
            if derived or attempt:
                return None
            with self.env.begin() as txn:
                snap = txn.get(key, db=self._snaps)
            bad: list = []
            files = self._files(key, snap, bad) if snap else None
            self._drop_invalid("snapshots", self._snaps, bad)
            if files is None:
                return None
            blocks = snapshot_blocks(files)
            with self.env.begin(write=True) as txn:
                if txn.get(key, db=self._snaps) == snap:
                    self._put_blocks(txn, key, blocks)
        return None

    def put_ref(self, repo_type: str, repo_id: str, revision: str, commit: str) -> None:
        value = json.dumps({"commit": commit, "at": time.time()})
        key = _repo_key(repo_type, repo_id)
        with self.env.begin(write=True) as txn:
            old = txn.get(key + revision.encode(), db=self._refs)
            try:
                moved = old is None or _commit_of(old) != commit
            except _BAD:
                moved = True
            if moved:  # the repo's readiness is its refs' snapshots'
                txn.put(key, b"", db=self._changed)
            txn.put(key + revision.encode(), value.encode(), db=self._refs)

    def get_ref(self, repo_type: str, repo_id: str, revision: str) -> str | None:
        key = _repo_key(repo_type, repo_id) + revision.encode()
        with self.env.begin() as txn:
            raw = txn.get(key, db=self._refs)
        try:
            return _commit_of(raw) if raw else None
        except _BAD as e:
            self._drop_invalid("refs", self._refs, [(key, e)])
            return None

    def commit_of(self, repo_type: str, repo_id: str, revision: str) -> str | None:
        """The commit a revision names here: itself if it is one, else its recorded ref (None: unknown)."""
        return revision if COMMIT_RE.fullmatch(revision) else self.get_ref(repo_type, repo_id, revision)

    def all_refs(self) -> list[tuple[str, str, str, str, float]]:
        """(repo_type, repo_id, revision, commit, resolved_at) of every ref."""
        out, bad = [], []
        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self._refs):
                try:
                    repo_type, repo_id, revision = _split_key(key)
                    at = json.loads(raw)["at"]
                    if type(at) not in (int, float):
                        raise ValueError(f"at {at!r}")
                    out.append((repo_type, repo_id, validate_revision(revision), _commit_of(raw), at))
                except _BAD as e:
                    bad.append((key, e))
        self._drop_invalid("refs", self._refs, bad)
        return out

    def _files(self, key: bytes, raw: bytes, bad: list) -> list[FileEntry] | None:
        """A snapshot's file list, or None (and the snapshot marked bad) if any entry fails
        its check: a listing with holes would claim a commit it does not show. It is
        resolved again from upstream when asked for."""
        try:
            items = json.loads(raw)["files"]
            if not isinstance(items, list):
                raise ValueError("files is not a list")
            return [_file(item) for item in items]
        except _BAD as e:
            bad.append((key, e))
            return None

    def get_snapshot(self, repo_type: str, repo_id: str, commit: str) -> list[FileEntry] | None:
        key = _repo_key(repo_type, repo_id) + commit.encode()
        with self.env.begin() as txn:
            raw = txn.get(key, db=self._snaps)
        bad: list = []
        files = self._files(key, raw, bad) if raw else None
        self._drop_invalid("snapshots", self._snaps, bad)
        return files

    def views(self) -> list[RepoView]:
        """Every repo with its refs and snapshots, for building the FUSE tree."""
        found: dict[tuple[str, str], RepoView] = {}

        def view(key: bytes) -> tuple[RepoView, str]:
            repo_type, repo_id, tail = _split_key(key)
            v = found.setdefault((repo_type, repo_id), RepoView(repo_type, repo_id, {}, {}))
            return v, tail

        bad_snaps: list = []
        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self._snaps):
                try:
                    if not COMMIT_RE.fullmatch(_split_key(key)[2]):
                        raise ValueError("not a commit")
                except _BAD as e:
                    bad_snaps.append((key, e))
                    continue
                files = self._files(key, raw, bad_snaps)
                if files is not None:
                    v, commit = view(key)
                    v.snapshots[commit] = files
        self._drop_invalid("snapshots", self._snaps, bad_snaps)
        for repo_type, repo_id, revision, commit, _ in self.all_refs():
            v, _ = view(_repo_key(repo_type, repo_id))
            v.refs[revision] = commit
        return [found[k] for k in sorted(found)]

    def repos(self) -> list[tuple[str, str]]:
        """(repo_type, repo_id) of every repo with a snapshot, from the keys alone:
        one cursor jump per repo, no file list read."""
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._snaps)
            found = cur.first()
            while found:
                key = cur.key()
                head = key.partition(b"\0")[0]
                try:
                    out.append(_split_key(key)[:2])
                except _BAD:
                    pass  # views() and get_snapshot() drop it
                found = cur.set_range(head + b"\1")
        return out

    def _keys(self, db, repo_type: str, repo_id: str) -> list[tuple[bytes, bytes]]:
        prefix = _repo_key(repo_type, repo_id)
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=db)
            found = cur.set_range(prefix)
            while found and cur.key().startswith(prefix):
                out.append((bytes(cur.key()), bytes(cur.value()) if db is self._refs else b""))
                found = cur.next()
        return out

    def commits(self, repo_type: str, repo_id: str) -> list[str]:
        """The commits of one repo's snapshots (keys only)."""
        n = len(_repo_key(repo_type, repo_id))
        return [
            k[n:].decode()
            for k, _ in self._keys(self._snaps, repo_type, repo_id)
            if COMMIT_RE.fullmatch(k[n:].decode())
        ]

    def refs(self, repo_type: str, repo_id: str) -> dict[str, str]:
        """revision -> commit for one repo."""
        out, bad = {}, []
        for key, raw in self._keys(self._refs, repo_type, repo_id):
            try:
                out[validate_revision(_split_key(key)[2])] = _commit_of(raw)
            except _BAD as e:
                bad.append((key, e))
        self._drop_invalid("refs", self._refs, bad)
        return out

    def view(self, repo_type: str, repo_id: str) -> RepoView | None:
        """One repo's refs and snapshots (its keys and file lists only; None: not in the index)."""
        refs = self.refs(repo_type, repo_id)
        snapshots = {}
        for commit in self.commits(repo_type, repo_id):
            files = self.get_snapshot(repo_type, repo_id, commit)
            if files is not None:
                snapshots[commit] = files
        return RepoView(repo_type, repo_id, refs, snapshots) if refs or snapshots else None

    def has_repo(self, repo_type: str, repo_id: str) -> bool:
        """Any snapshot of the repo recorded (without reading them all)."""
        prefix = _repo_key(repo_type, repo_id)
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._snaps)
            return cur.set_range(prefix) and cur.key().startswith(prefix)

    def put_repo_meta(self, repo_type: str, repo_id: str, visibility: str) -> None:
        """What the repo's source said of it last time (survives a restart with the source down)."""
        value = json.dumps({"visibility": visibility, "at": time.time()})
        with self.env.begin(write=True) as txn:
            txn.put(_repo_key(repo_type, repo_id), value.encode(), db=self._repos)

    def get_repo_meta(self, repo_type: str, repo_id: str) -> dict | None:
        key = _repo_key(repo_type, repo_id)
        with self.env.begin() as txn:
            raw = txn.get(key, db=self._repos)
        if not raw:
            return None
        try:
            meta = json.loads(raw)
            if meta["visibility"] not in ("public", "gated", "private", "unknown"):
                raise ValueError(f"visibility {meta['visibility']!r}")
            return meta
        except _BAD as e:
            self._drop_invalid("repos", self._repos, [(key, e)])
            return None

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
        out, bad = [], []
        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self._pins):
                try:
                    repo_type, repo_id, revision = _split_key(key)
                    mode = json.loads(raw)["mode"]
                    if mode not in ("pin", "hot"):
                        raise ValueError(f"mode {mode!r}")
                    out.append((repo_type, repo_id, validate_revision(revision), mode))
                except _BAD as e:
                    bad.append((key, e))
        self._drop_invalid("pins", self._pins, bad)
        return out

    # blobs and chunks --------------------------------------------------------

    @staticmethod
    def _blob(key: bytes, raw: bytes) -> BlobRecord:
        rec = check_blob(BlobRecord(**json.loads(raw)))
        if rec.blob_id.encode() != key:
            raise ValueError(f"record of {rec.blob_id} stored under another id")
        return rec

    def get_blob(self, blob_id: str) -> BlobRecord | None:
        key = blob_id.encode()
        with self.env.begin() as txn:
            raw = txn.get(key, db=self._blobs)
        try:
            return self._blob(key, raw) if raw else None
        except _BAD as e:
            self._drop_invalid("blobs", self._blobs, [(key, e)])
            return None

    def put_blob(self, rec: BlobRecord) -> None:
        check_blob(rec)  # what cannot be loaded back must not be stored
        key = rec.blob_id.encode()
        with self.env.begin(write=True) as txn:
            self._derive_many(txn, [(key, self._stored(txn, key), _derived(rec))])
            txn.put(key, _blob_json(rec), db=self._blobs)

    def add_blobs(self, recs: list[BlobRecord]) -> int:
        """Record the blobs not known yet (or known only by an entry that fails its
        check), in one transaction: a snapshot of 10^5 files is one commit, not 10^5.
        Returns how many were recorded."""
        for rec in recs:
            check_blob(rec)
        added = 0
        changes = []
        with self.env.begin(write=True) as txn:
            for rec in recs:
                key = rec.blob_id.encode()
                raw = txn.get(key, db=self._blobs)
                if raw is not None:
                    try:
                        self._blob(key, raw)
                        continue
                    except _BAD as e:
                        log.warning("index: replacing invalid blobs entry %r: %s", key[:200], e)
                        self.on_invalid("blobs")
                        self._derive_many(txn, [(key, self._stored(txn, key), None)])
                txn.put(key, _blob_json(rec), db=self._blobs)
                changes.append((key, None, _derived(rec)))
                added += 1
            self._derive_many(txn, changes)
        return added

    def all_blobs(self) -> list[BlobRecord]:
        out, bad = [], []
        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self._blobs):
                try:
                    out.append(self._blob(key, raw))
                except _BAD as e:
                    bad.append((key, e))
        self._drop_invalid("blobs", self._blobs, bad)
        return out

    def set_chunk(self, blob_id: str, index: int, digest: int) -> None:
        self.set_chunks([(blob_id, index, digest)])

    def set_chunks(self, chunks: list[tuple[str, int, int]]) -> None:
        """Record (blob id, chunk index, xxh3-64) of chunks already synced, in one transaction."""
        with self.env.begin(write=True) as txn:
            for blob_id, index, digest in chunks:
                txn.put(blob_id.encode() + b"\0" + _CHUNK_KEY.pack(index), _CHUNK_KEY.pack(digest), db=self._chunks)
            for key in {blob_id.encode() for blob_id, _, _ in chunks}:
                if txn.get(key, db=self._chunked) is None:  # its first chunk: a partial blob now holds bytes
                    stored = self._stored(txn, key)
                    was = self._holds(txn, key, stored)
                    txn.put(key, b"", db=self._chunked)
                    if not was and self._holds(txn, key, stored):
                        txn.put(_lru_key(key, stored), b"", db=self._lru)

    def chunks(self, blob_id: str) -> dict[int, int]:
        """chunk index -> xxh3-64 of the chunk, for every chunk on disk."""
        with self.env.begin() as txn:
            return {
                _CHUNK_KEY.unpack(k)[0]: _CHUNK_KEY.unpack(v)[0]
                for k, v in under(txn, self._chunks, blob_id.encode() + b"\0")
            }

    def has_chunks(self, blob_id: str) -> bool:
        """Any chunk recorded (one cursor step, not a read of them all)."""
        prefix = blob_id.encode() + b"\0"
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._chunks)
            return cur.set_range(prefix) and cur.key().startswith(prefix)

    def drop_chunks(self, blob_id: str, indexes: list[int] | None = None) -> None:
        """Forget some (or all) chunks of a blob, e.g. after failed verification."""
        key = blob_id.encode()
        prefix = key + b"\0"
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=self._chunks)
            if indexes is not None:
                for i in indexes:
                    txn.delete(prefix + _CHUNK_KEY.pack(i), db=self._chunks)
                if cur.set_range(prefix) and cur.key().startswith(prefix):
                    return  # some are left
            elif cur.set_range(prefix):
                while cur.key().startswith(prefix):
                    if not cur.delete():
                        break
            if txn.get(key, db=self._chunked) is not None:  # its last chunk: a partial blob holds no bytes now
                stored = self._stored(txn, key)
                was = self._holds(txn, key, stored)
                txn.delete(key, db=self._chunked)
                if was and not self._holds(txn, key, stored):
                    txn.delete(_lru_key(key, stored), db=self._lru)
