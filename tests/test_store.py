"""The LMDB index and the content-addressed blob store, on real files in tmp_path."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
import xxhash

from nodecache import directio
from nodecache.blobfile import hash_file
from nodecache.index import BlobRecord, Index
from nodecache.layout import FileEntry, InvalidName
from nodecache.quarantine import Quarantined
from nodecache.store import Store
from nodecache.tier import Tier, shortfall
from nodecache.upstream import PiecewiseSource

KiB = 1024
MiB = 1024 * KiB
CS = 64 * KiB  # the smallest chunk size the config allows: keeps the tests fast
C1, C2, C3 = "1" * 40, "2" * 40, "3" * 40
KINDS = ["sha256", "gitsha1"]


def blob_id(kind: str, data: bytes) -> str:
    if kind == "sha256":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes whose chunks all differ."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d" % (seed, block)).digest()
        block += 1
    return bytes(out[:size])


def record(kind: str, data: bytes, chunk_size: int = CS, **kw) -> BlobRecord:
    return BlobRecord(blob_id=blob_id(kind, data), size=len(data), kind=kind, chunk_size=chunk_size, **kw)


def chunks_of(data: bytes, chunk_size: int = CS) -> list[bytes]:
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def index(cache: Path):
    idx = Index(cache / "index", map_size=64 * MiB)
    yield idx
    idx.close()


@pytest.fixture
def store(cache: Path, index: Index):
    s = Store(cache, index)
    yield s
    s.close()


async def fill(store: Store, rec: BlobRecord, data: bytes, order: list[int] | None = None):
    st = store.state(rec)
    parts = chunks_of(data, rec.chunk_size)
    for i in order if order is not None else range(len(parts)):
        await store.write_chunk(st, i, parts[i])
    return st


# --- Index: refs and snapshots -------------------------------------------------


def test_ref_put_get_overwrite(index: Index):
    assert index.refs.get("model", "org/a", "main") is None
    index.refs.put("model", "org/a", "main", C1)
    index.refs.put("model", "org/a", "refs/pr/1", C2)
    assert index.refs.get("model", "org/a", "main") == C1
    assert index.refs.get("model", "org/a", "refs/pr/1") == C2
    index.refs.put("model", "org/a", "main", C3)  # the branch moved
    assert index.refs.get("model", "org/a", "main") == C3
    # Keyed by repo type and id too.
    assert index.refs.get("dataset", "org/a", "main") is None
    assert index.refs.get("model", "org/ab", "main") is None
    assert index.refs.get("model", "org", "main") is None


def test_snapshot_put_get(index: Index):
    files = [FileEntry("config.json", 12, "a" * 40), FileEntry("sub/dir/w.bin", 10**12, "b" * 64)]
    assert index.snapshots.get("model", "org/a", C1) is None
    index.snapshots.put("model", "org/a", C1, files)
    assert index.snapshots.get("model", "org/a", C1) == files
    assert index.snapshots.get("model", "org/a", C2) is None
    assert index.snapshots.get("dataset", "org/a", C1) is None
    index.snapshots.put("model", "org/a", C2, [])
    assert index.snapshots.get("model", "org/a", C2) == []


def test_views_group_refs_and_snapshots_by_repo_and_type(index: Index):
    fa = [FileEntry("a.txt", 1, "a" * 40)]
    fb = [FileEntry("b.txt", 2, "b" * 40)]
    fd = [FileEntry("d/x.parquet", 3, "d" * 64)]
    index.snapshots.put("model", "org/a", C1, fa)
    index.snapshots.put("model", "org/a", C2, fb)
    index.refs.put("model", "org/a", "main", C2)
    index.refs.put("model", "org/a", "v1", C1)
    index.snapshots.put("dataset", "org/a", C3, fd)  # same id, other type: another repo
    index.refs.put("dataset", "org/a", "refs/pr/7", C3)
    index.snapshots.put("model", "gpt2", C1, fa)
    index.refs.put("space", "org/app", "main", C1)  # a ref whose snapshot is not known yet

    views = index.views()
    assert [(v.repo_type, v.repo_id) for v in views] == [
        ("dataset", "org/a"),
        ("model", "gpt2"),
        ("model", "org/a"),
        ("space", "org/app"),
    ]
    ds, gpt2, model, space = views
    assert model.refs == {"main": C2, "v1": C1}
    assert model.snapshots == {C1: fa, C2: fb}
    assert ds.refs == {"refs/pr/7": C3}
    assert ds.snapshots == {C3: fd}
    assert gpt2.refs == {} and gpt2.snapshots == {C1: fa}
    assert space.refs == {"main": C1} and space.snapshots == {}


def test_views_of_empty_index(index: Index):
    assert index.views() == []
    assert index.snapshots.repos() == []


def test_per_repo_keys_without_reading_file_lists(index: Index):
    """What the FUSE tree reads at start and per changed repo: keys, refs, commits of one repo."""
    index.snapshots.put("model", "org/a", C1, [FileEntry("a.txt", 1, "a" * 40)])
    index.snapshots.put("model", "org/a", C2, [])
    index.refs.put("model", "org/a", "main", C2)
    index.refs.put("model", "org/a", "refs/pr/1", C1)
    index.snapshots.put("model", "org/ab", C3, [])  # a prefix of nothing: its own repo
    index.snapshots.put("dataset", "org/a", C3, [])
    index.refs.put("space", "org/app", "main", C1)  # a ref alone is no repo yet
    assert index.snapshots.repos() == [("dataset", "org/a"), ("model", "org/a"), ("model", "org/ab")]
    assert index.snapshots.commits("model", "org/a") == [C1, C2]
    assert index.refs.of("model", "org/a") == {"main": C2, "refs/pr/1": C1}
    assert index.snapshots.commits("model", "org/ab") == [C3] and index.refs.of("model", "org/ab") == {}
    assert index.snapshots.commits("model", "nobody") == [] and index.refs.of("space", "org/app") == {"main": C1}


def _names(block) -> list[bytes]:
    return [block.entry(i)[0] for i in range(len(block))] if block is not None else None


def test_snapshot_folders_are_read_one_at_a_time(index: Index):
    """Each folder of a snapshot is its own block, written with the file list: a first look reads one."""
    files = [FileEntry("config.json", 12, "a" * 40), FileEntry("sub/dir/w.bin", 10**12, "b" * 64)]
    index.snapshots.put("model", "org/a", C1, files)
    assert _names(index.snapshots.folder("model", "org/a", C1, "")) == [b"config.json", b"sub"]
    assert index.snapshots.folder("model", "org/a", C1, "sub/dir").entry(0) == (b"w.bin", bytes.fromhex("b" * 64))
    assert (
        index.snapshots.folder("model", "org/a", C1, "nope") is None
        and index.snapshots.folder("model", "org/a", C2, "") is None
    )
    blobs = index.snapshots.blobs("model", "org/a", C1)
    assert _names(blobs) == sorted([bytes.fromhex("a" * 40), bytes.fromhex("b" * 64)])
    index.snapshots.put("model", "org/a", C1, files[:1])  # written again: the old folders go
    assert index.snapshots.folder("model", "org/a", C1, "sub") is None


def test_snapshot_folders_of_an_older_index_are_derived_once_and_bad_ones_again(index: Index):
    index.snapshots.put("model", "org/a", C1, [FileEntry("d/x.bin", 3, "c" * 64)])
    key = b"model:org/a\0" + C1.encode()
    with index.env.begin(write=True) as txn:  # as an index written before the blocks existed
        index.snapshots._drop_blocks(txn, key)
    assert _names(index.snapshots.folder("model", "org/a", C1, "d")) == [b"x.bin"]
    with index.env.begin(write=True) as txn:  # tampered: the offsets say more than the bytes hold
        txn.put(key + b"/d", b"\x09\x00\x00\x00", db=index.snapshots.folders)
    assert _names(index.snapshots.folder("model", "org/a", C1, "d")) == [b"x.bin"]
    with index.env.begin(write=True) as txn:  # a file list that fails its check: no folders either
        txn.put(key, b'{"files": [["../x", 1, "zz"]]}', db=index.snapshots.table)
        index.snapshots._drop_blocks(txn, key)
    assert index.snapshots.folder("model", "org/a", C1, "") is None
    assert index.snapshots.get("model", "org/a", C1) is None and index.snapshots.commits("model", "org/a") == []


def test_repo_byte_counters_follow_blob_states(index: Index):
    """What getxattr on a repo folder reads: kept with each state change, checked against the records."""
    a, b, shared = "a" * 64, "b" * 64, "c" * 40
    index.blobs.add([BlobRecord(x, n, "sha256", CS) for x, n in ((a, 10), (b, 20), (shared, 5))])
    index.snapshots.put("model", "org/x", C1, [FileEntry("a", 10, a), FileEntry("s", 5, shared)])
    index.snapshots.put("model", "org/x", C2, [FileEntry("a", 10, a), FileEntry("b", 20, b)])  # a counted once
    index.snapshots.put("dataset", "org/y", C1, [FileEntry("s", 5, shared)])
    assert index.links.repo_bytes("model", "org/x") == (3, 35, 0, 0)
    index.blobs.put(BlobRecord(shared, 5, "sha256", CS, state="complete", verified_at=1.0))
    index.blobs.put(BlobRecord(a, 10, "sha256", CS, state="complete", verified_at=2.0))
    assert index.links.repo_bytes("model", "org/x") == (3, 35, 2, 15)
    assert index.links.repo_bytes("dataset", "org/y") == (1, 5, 1, 5)
    index.blobs.put(BlobRecord(a, 10, "sha256", CS, state="partial"))  # evicted
    assert index.links.repo_bytes("model", "org/x") == (3, 35, 1, 5)
    index.snapshots.put("model", "org/z", C3, [FileEntry("s", 5, shared)])  # a new repo of a complete blob
    assert index.links.repo_bytes("model", "org/z") == (1, 5, 1, 5)
    index.check_all()  # a start that reads every record and derives everything again
    assert index.links.repo_bytes("model", "org/x") == (3, 35, 1, 5)
    assert index.links.repo_bytes("model", "nobody") == (0, 0, 0, 0)


def _as_previous_version(index: Index) -> None:
    """Rewrite the derived tables as the previous version kept them: links without sizes,
    `blob_repos` (blob id \0 repo key -> size) beside them, and no per-repo counters (as an
    index from before those)."""
    with index.env.begin(write=True) as txn:
        links = index.links.links
        entries = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=links)]
        old = index.env.open_db(b"blob_repos", txn=txn)
        for key, size in entries:
            txn.put(key, b"", db=links)
            blob, _, snap = key.partition(b"\0")
            txn.put(blob + b"\0" + snap.partition(b"\0")[0] + b"\0", size, db=old)
        txn.drop(index.links.repo_bytes_table, delete=False)
        txn.delete(b"derived_v4", db=index.meta.table)
        txn.put(b"derived_v2", b"1", db=index.meta.table)


def test_an_index_of_the_previous_version_opens_with_the_same_counts(cache: Path, index: Index):
    """The links between blobs and snapshots used to be two tables (`blob_snapshots`, `blob_repos`):
    an index written so is derived again once on open, and reads as it did."""
    a, b, c = "a" * 64, "b" * 64, "c" * 40
    index.blobs.add([BlobRecord(x, n, "sha256", CS) for x, n in ((a, 10), (b, 20), (c, 5))])
    index.snapshots.put("model", "org/x", C1, [FileEntry("a", 10, a), FileEntry("s", 5, c)])
    index.snapshots.put("model", "org/x", C2, [FileEntry("a", 10, a), FileEntry("b", 20, b)])
    index.snapshots.put("dataset", "org/y", C1, [FileEntry("s", 5, c)])
    index.blobs.put(BlobRecord(c, 5, "sha256", CS, state="complete", verified_at=1.0))

    def read(idx: Index) -> tuple:
        repos = (("model", "org/x"), ("dataset", "org/y"))
        return (
            [idx.links.repo_bytes(*r) for r in repos],
            [idx.links.snapshots_missing(*r) for r in repos],
            [sorted(idx.links.repos_of(x)) for x in (a, b, c)],
        )

    before = read(index)
    assert before[0] == [(3, 35, 1, 5), (1, 5, 1, 5)] and before[1][0] == {C1: 1, C2: 2}
    _as_previous_version(index)
    index.close()
    again = Index(cache / "index", map_size=64 * MiB)
    try:
        assert read(again) == before
        with again.env.begin() as txn:
            assert txn.cursor(db=again.env.open_db(b"blob_repos", txn=txn)).first() is False, "emptied"
        again.blobs.put(BlobRecord(a, 10, "sha256", CS, state="complete", verified_at=2.0))  # kept from here on
        assert again.links.repo_bytes("model", "org/x") == (3, 35, 2, 15)
        assert again.links.snapshots_missing("model", "org/x") == {C1: 0, C2: 1}
        with again.env.begin(write=True) as txn:  # a link the previous version wrote meanwhile (a takeover)
            txn.put(b.encode() + b"\0" + b"model:org/x\0" + C2.encode(), b"", db=again.links.links)
        again.blobs.put(BlobRecord(b, 20, "sha256", CS, state="complete", verified_at=3.0))
        assert again.links.repo_bytes("model", "org/x") == (3, 35, 3, 15), "counted, its bytes unknown"
        assert again.links.snapshots_missing("model", "org/x") == {C1: 0, C2: 0}
    finally:
        again.close()


# --- Index: blobs and chunks ---------------------------------------------------


def test_blob_records(index: Index):
    rec = BlobRecord("a" * 64, 5 * CS + 1, "sha256", CS, repo_type="dataset", repo_id="org/d", commit=C1, path="x/y")
    assert index.blobs.get(rec.blob_id) is None
    index.blobs.put(rec)
    assert index.blobs.get(rec.blob_id) == rec
    rec.state, rec.last_access = "complete", 123.5
    index.blobs.put(rec)
    assert index.blobs.get(rec.blob_id) == rec
    other = BlobRecord("b" * 40, 0, "gitsha1", CS)
    index.blobs.put(other)
    assert sorted(index.blobs.all(), key=lambda r: r.blob_id) == [rec, other]


def test_add_blobs_records_only_new_ones_in_one_transaction(index: Index):
    done = BlobRecord("a" * 64, 10, "sha256", CS, state="complete")
    index.blobs.put(done)
    with index.env.begin(write=True) as txn:  # an entry that fails its check is replaced
        txn.put(b"c" * 40, b"{not json", db=index.blobs.table)
    new = [BlobRecord("a" * 64, 10, "sha256", CS), BlobRecord("b" * 40, 3, "gitsha1", CS)]
    new += [BlobRecord("b" * 40, 3, "gitsha1", CS), BlobRecord("c" * 40, 4, "gitsha1", CS)]
    assert index.blobs.add(new) == 2
    assert index.blobs.get("a" * 64).state == "complete", "a known blob keeps its record"
    assert index.blobs.get("b" * 40) == new[1] and index.blobs.get("c" * 40) == new[3]
    with pytest.raises(ValueError):
        index.blobs.add([BlobRecord("d" * 40, -1, "gitsha1", CS)])
    assert index.blobs.get("d" * 40) is None


@pytest.mark.parametrize(("size", "n"), [(0, 1), (1, 1), (CS, 1), (CS + 1, 2), (3 * CS, 3), (3 * CS + 7, 4)])
def test_blob_n_chunks(size, n):
    assert BlobRecord("a" * 40, size, "gitsha1", CS).n_chunks == n


def test_chunks_set_get_drop(index: Index):
    a40, a64, b64 = "a" * 40, "a" * 64, "b" * 64  # a40 is a string prefix of a64
    for blob in (a40, a64, b64):
        for i in range(4):
            index.chunks.set([(blob, i, hash((blob, i)) & (2**64 - 1))])
    index.chunks.set([(a64, 2**40, 2**64 - 1)])  # big index and digest survive the packing
    assert index.chunks.get(a40) == {i: hash((a40, i)) & (2**64 - 1) for i in range(4)}
    assert index.chunks.get(a64) == {**{i: hash((a64, i)) & (2**64 - 1) for i in range(4)}, 2**40: 2**64 - 1}
    assert index.chunks.get("c" * 64) == {}

    index.chunks.set([(a40, 1, 42)])  # re-recording replaces
    assert index.chunks.get(a40)[1] == 42

    index.chunks.drop(a40, [0, 2, 99])  # some (99 was never there)
    assert sorted(index.chunks.get(a40)) == [1, 3]
    assert len(index.chunks.get(a64)) == 5

    index.chunks.drop(a64)  # all, with records on both sides of it
    assert index.chunks.get(a64) == {}
    assert sorted(index.chunks.get(a40)) == [1, 3]
    assert sorted(index.chunks.get(b64)) == [0, 1, 2, 3]

    index.chunks.drop(b64)  # all, being the last records in the database
    assert index.chunks.get(b64) == {}
    index.chunks.drop(b64)  # nothing left: a no-op
    index.chunks.drop("f" * 64)
    assert sorted(index.chunks.get(a40)) == [1, 3]


def test_index_persists_across_close_and_reopen(cache: Path):
    path = cache / "index"
    idx = Index(path, map_size=64 * MiB)
    files = [FileEntry("w.bin", 3 * CS, "e" * 64)]
    rec = BlobRecord("e" * 64, 3 * CS, "sha256", CS, repo_id="org/a", commit=C1, path="w.bin")
    idx.refs.put("model", "org/a", "main", C1)
    idx.snapshots.put("model", "org/a", C1, files)
    idx.blobs.put(rec)
    idx.chunks.set([(rec.blob_id, 0, 7)])
    idx.chunks.set([(rec.blob_id, 2, 9)])
    idx.close()

    idx = Index(path, map_size=64 * MiB)
    try:
        assert idx.refs.get("model", "org/a", "main") == C1
        assert idx.snapshots.get("model", "org/a", C1) == files
        assert idx.blobs.get(rec.blob_id) == rec
        assert idx.chunks.get(rec.blob_id) == {0: 7, 2: 9}
        assert [(v.repo_id, v.refs) for v in idx.views()] == [("org/a", {"main": C1})]
    finally:
        idx.close()


def test_add_listed_writes_what_add_writes(tmp_path: Path):
    """A new snapshot's records made from one template, each a %-format of its own fields: the
    same bytes and the same counts as records built and added one by one (quotes, percent signs,
    non-ASCII and astral names included); a known blob keeps its record, an invalid entry is
    replaced, a hash kind we do not know is refused."""
    from dataclasses import replace

    from nodecache.index.records import encode, encoder_for

    paths = ["a.bin", 'we"ird%d%s\t.txt', "sub/é \u2028 \U0001f600", "%", "x" * 200]
    files = [(f"{i:x}" * 64)[:64] if i % 2 else f"{i:040x}" for i in range(1, 6)]
    files = [
        (b, 7 * i, "sha256" if len(b) == 64 else "gitsha1", p)
        for i, (b, p) in enumerate(zip(files, paths, strict=True))
    ]
    template = BlobRecord("0" * 40, 0, "gitsha1", CS, repo_type="dataset", repo_id="org/d", commit="c" * 40, path="-")
    records = [replace(template, blob_id=b, size=n, kind=k, path=p) for b, n, k, p in files]
    encode_one = encoder_for(template)
    assert [encode_one(b, n, k, p) for b, n, k, p in files] == [encode(r) for r in records]
    assert encode_one("a" * 40, 0, "source", "\\\x00\x7f") == encode(
        replace(template, blob_id="a" * 40, kind="source", path="\\\x00\x7f")
    )

    one, listed = Index(tmp_path / "one", map_size=64 * MiB), Index(tmp_path / "listed", map_size=64 * MiB)
    try:
        for idx in (one, listed):
            idx.blobs.put(replace(records[0], state="complete", verified_at=5.0))
            with idx.env.begin(write=True) as txn:  # an entry that fails its check is replaced
                txn.put(records[1].blob_id.encode(), b"{not json", db=idx.blobs.table)
        assert one.blobs.add(records) == 4
        assert listed.blobs.add_listed(template, files) == 4
        for idx in (one, listed):
            assert idx.blobs.get(records[0].blob_id).state == "complete", "a known blob keeps its record"
        with one.env.begin() as a, listed.env.begin() as b:
            assert list(a.cursor(db=one.blobs.table)) == list(b.cursor(db=listed.blobs.table))
        assert (
            one.counts.blob_states() == listed.counts.blob_states() == {"partial": 4, "complete": 1, "quarantined": 0}
        )
        with pytest.raises(ValueError, match="kind"):
            listed.blobs.add_listed(template, [("e" * 40, 1, "md5", "e.txt")])
        assert not listed.blobs.has("e" * 40)
    finally:
        one.close()
        listed.close()


def test_index_counts_blob_states_as_it_writes_them(cache: Path):
    """The counts /metrics and /v1/status show, and the order of proofs the scrubber follows,
    are kept by the writes (and match a scan)."""
    path = cache / "index"
    idx = Index(path, map_size=64 * MiB)

    def scanned() -> dict[str, int]:
        counts = dict.fromkeys(("partial", "complete", "quarantined"), 0)
        for r in idx.blobs.all():
            counts[r.state] += 1
        return counts

    a, b, c = (BlobRecord(ch * 64, CS, "sha256", CS) for ch in "abc")
    assert idx.blobs.add([a, b]) == 2 and idx.blobs.add([a, b, c]) == 1  # known ones are not counted twice
    assert idx.counts.blob_states() == {"partial": 3, "complete": 0, "quarantined": 0}
    assert idx.counts.proven_by(1e12) == ([], None)
    a.state, a.verified_at = "complete", 100.0
    idx.blobs.put(a)
    idx.blobs.put(a)  # no change of state
    d = BlobRecord("d" * 64, CS, "sha256", CS, state="complete", verified_at=50.0)
    idx.blobs.add([d])
    assert idx.counts.proven_by(100.0) == ([d.blob_id, a.blob_id], 50.0), "oldest proof first"
    d.verified_at = 150.0  # proven again (scrub)
    idx.blobs.put(d)
    assert idx.counts.proven_by(99.0) == ([], 100.0) and idx.counts.proven_by(150.0) == ([a.blob_id, d.blob_id], 100.0)
    d.state = "partial"  # evicted
    idx.blobs.put(d)
    b.state = "quarantined"
    idx.blobs.put(b)
    assert idx.counts.blob_states() == scanned() == {"partial": 2, "complete": 1, "quarantined": 1}
    with idx.env.begin(write=True) as txn:  # a hostile record: dropped on load, and uncounted
        txn.put(c.blob_id.encode(), b'{"state": "partial", "size": -1}', db=idx.blobs.table)
    assert idx.blobs.get(c.blob_id) is None
    assert idx.counts.blob_states() == scanned() == {"partial": 1, "complete": 1, "quarantined": 1}
    idx.meta.put("blob_states", None)  # an index from before the counters: counted once on open
    idx.meta.put("derived_v4", None)
    idx.close()
    idx = Index(path, map_size=64 * MiB)
    try:
        assert idx.counts.blob_states() == scanned() == {"partial": 1, "complete": 1, "quarantined": 1}
        assert idx.counts.proven_by(1e12) == ([a.blob_id], 100.0)
    finally:
        idx.close()


# --- Store ---------------------------------------------------------------------


def test_state_creates_sparse_file_of_full_size(cache: Path, store: Store):
    rec = BlobRecord("ab" + "c" * 62, 64 * MiB + 5, "sha256", 8 * MiB)
    st = store.state(rec)
    path = cache / "blobs" / "ab" / rec.blob_id
    assert store.path(rec.blob_id) == path
    assert path.is_file()
    stat = path.stat()
    assert stat.st_size == rec.size
    assert stat.st_blocks * 512 <= 64 * KiB  # sparse: no data blocks behind 64 MiB
    assert st.missing == rec.n_chunks == 9
    assert not any(st.has(i) for i in range(9))
    assert st.chunk_range(8) == (64 * MiB, 64 * MiB + 5)
    assert store.state(rec) is st  # one state per blob
    assert path.stat().st_ino == stat.st_ino


@pytest.mark.parametrize("kind", KINDS)
def test_write_chunks_then_read_exact_bytes(cache: Path, index: Index, store: Store, kind: str):
    data = payload(3 * CS + CS // 2, seed=1)  # partial last chunk
    rec = record(kind, data)
    index.blobs.put(rec)

    async def run():
        st = await fill(store, rec, data, order=[2, 0, 3, 1])
        assert st.missing == 0
        assert await store.read(rec.blob_id, 0, len(data)) == data
        assert await store.read(rec.blob_id, CS - 10, 20) == data[CS - 10 : CS + 10]  # across a boundary
        assert await store.read(rec.blob_id, 3 * CS, CS // 2) == data[3 * CS :]  # the short last chunk
        assert await store.read(rec.blob_id, 5, 0) == b""
        with pytest.raises(OSError):
            await store.read(rec.blob_id, len(data) - 4, 8)  # past the end: never short bytes
        return st

    st = asyncio.run(run())
    assert index.chunks.get(rec.blob_id) == {i: xxhash.xxh3_64_intdigest(c) for i, c in enumerate(chunks_of(data))}
    assert store.path(rec.blob_id).read_bytes() == data
    assert all(st.has(i) for i in range(4))


def test_write_chunk_with_wrong_length_raises_and_records_nothing(index: Index, store: Store):
    data = payload(2 * CS + 100, seed=2)
    rec = record("sha256", data)
    index.blobs.put(rec)
    st = store.state(rec)
    parts = chunks_of(data)

    async def run():
        with pytest.raises(ValueError):
            await store.write_chunk(st, 0, parts[0][:-1])
        with pytest.raises(ValueError):
            await store.write_chunk(st, 0, parts[0] + b"x")
        with pytest.raises(ValueError):
            await store.write_chunk(st, 2, parts[0])  # a full chunk where only 100 bytes belong
        await store.write_chunk(st, 2, parts[2])

    asyncio.run(run())
    assert len(parts[2]) == 100
    assert st.chunk_range(2) == (2 * CS, 2 * CS + 100)
    assert sorted(index.chunks.get(rec.blob_id)) == [2]
    assert st.missing == 2 and st.has(2) and not st.has(0)
    assert store.path(rec.blob_id).stat().st_size == rec.size  # nothing written past the end
    assert store.path(rec.blob_id).read_bytes()[: 2 * CS] == bytes(2 * CS)


@pytest.mark.parametrize("kind", KINDS)
def test_finish_with_correct_content_completes(cache: Path, index: Index, store: Store, kind: str):
    data = payload(2 * CS + 3, seed=3)
    rec = record(kind, data)
    index.blobs.put(rec)

    async def run():
        st = await fill(store, rec, data)
        assert index.chunks.get(rec.blob_id) != {}
        await store.finish(st)
        return st

    st = asyncio.run(run())
    assert st.rec.state == "complete"
    assert index.blobs.get(rec.blob_id).state == "complete"
    assert index.chunks.get(rec.blob_id) == {}  # presence of a complete blob is implied
    assert store.path(rec.blob_id).read_bytes() == data
    assert hash_file(store.path(rec.blob_id), kind, len(data)) == rec.blob_id
    assert list((cache / "quarantine").iterdir()) == []

    # After a restart the blob is still complete, with every chunk present.
    fresh = Store(cache, index)
    try:
        st2 = fresh.state(index.blobs.get(rec.blob_id))
        assert st2.missing == 0
        assert asyncio.run(fresh.read(rec.blob_id, 0, len(data))) == data
    finally:
        fresh.close()


@pytest.mark.parametrize("kind", KINDS)
def test_finish_with_wrong_content_quarantines(cache: Path, index: Index, store: Store, kind: str):
    good = payload(2 * CS + 3, seed=4)
    bad = good[:CS] + bytes([good[CS] ^ 1]) + good[CS + 1 :]  # one bit flipped in chunk 1
    rec = record(kind, good)
    index.blobs.put(rec)

    async def run():
        st = await fill(store, rec, bad)
        with pytest.raises(Quarantined):
            await store.finish(st)
        return st

    st = asyncio.run(run())
    assert st.rec.state == "quarantined"
    assert index.blobs.get(rec.blob_id).state == "quarantined"
    assert index.chunks.get(rec.blob_id) == {}
    assert not store.path(rec.blob_id).exists()
    moved = cache / "quarantine" / rec.blob_id
    assert moved.read_bytes() == bad
    assert list((cache / "quarantine").iterdir()) == [moved]


def test_empty_blob_gitsha1(index: Index, store: Store):
    rec = record("gitsha1", b"")
    assert rec.blob_id == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob
    index.blobs.put(rec)

    async def run():
        st = await fill(store, rec, b"")
        assert st.missing == 0
        await store.finish(st)

    asyncio.run(run())
    assert index.blobs.get(rec.blob_id).state == "complete"
    assert store.path(rec.blob_id).stat().st_size == 0


def test_hash_file_matches_git_and_sha256(tmp_path: Path):
    f = tmp_path / "hello"
    f.write_bytes(b"hello\n")
    assert hash_file(f, "gitsha1", 6) == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`
    assert hash_file(f, "sha256", 6) == hashlib.sha256(b"hello\n").hexdigest()


def test_evicting_a_record_copy_twice_frees_its_bytes_once(cache: Path, index: Index, store: Store):
    """evict_lru hands evict() records read from the index; a blob nobody touched since the
    start has no shared record yet. Evicting it twice must not subtract its bytes twice (the
    second eviction found the index's old "complete" record cached as the shared one)."""
    data = payload(2 * CS, seed=23)
    rec = record("sha256", data)
    index.blobs.put(rec)
    st = asyncio.run(fill(store, rec, data))
    asyncio.run(store.finish(st))
    store.close()
    fresh = Store(cache, index)  # a start: no record of it in memory
    try:
        assert fresh.tiers["disk"].used == 2 * CS
        assert fresh.evict(index.blobs.all()[0]) == 2 * CS
        assert fresh.evict(index.blobs.all()[0]) == 0
        assert fresh.tiers["disk"].used == 0 and fresh.record(rec.blob_id).state == "partial"
    finally:
        fresh.close()


def crash(store: Store) -> None:
    """What a kill -9 leaves: the blob files and the index, without the record of a clean stop."""
    store.close()
    store.index.meta.put("clean_stop", None)


def test_a_clean_stop_lets_the_next_start_skip_counting_and_recovery(cache: Path, index: Index, store: Store):
    """After a clean stop the usage comes from the index (no blob record read) and nothing is
    re-verified; after a crash, or once a tier lost its files, both are done from the disk."""
    data = payload(3 * CS + 5, seed=21)
    rec = record("sha256", data)
    index.blobs.put(rec)
    asyncio.run(fill(store, rec, data, order=[0, 2]))
    used = store.tiers["disk"].used
    assert used == 2 * CS
    store.close()
    with open(store.path(rec.blob_id), "r+b") as f:  # damage after a clean stop is the scrubber's to find
        f.seek(100)
        f.write(b"\xff" * 16)

    scans = []
    all_blobs = index.blobs.all
    index.blobs.all = lambda: scans.append(1) or all_blobs()
    again = Store(cache, index)
    assert again.clean_start and again.tiers["disk"].used == used and again.recover() == 0
    assert scans == [], "a clean start reads no blob record"
    assert index.meta.get("clean_stop") is None, "a crash from now on must not look clean"
    crash(again)

    after_crash = Store(cache, index)
    assert not after_crash.clean_start and after_crash.tiers["disk"].used == used
    assert after_crash.recover() == 1, "a crash start counts and recovers from the index"
    assert scans == [], "... without a read of every record"
    assert after_crash.tiers["disk"].used == CS, "the damaged chunk is no longer counted"
    after_crash.close()

    index.refs.put("model", "org/x", "main", C1)  # anyone else's write to the stopped index
    touched = Store(cache, index)
    assert not touched.clean_start and touched.tiers["disk"].used == CS
    assert touched.start == "written" and scans, "after anyone else's write every record is checked"
    touched.close()

    for mark in (cache / "blobs").glob(".mark-*"):  # as a tmpfs tier after a reboot
        mark.rmdir()
    wiped = Store(cache, index)
    assert wiped.start == "crash" and wiped.tiers["disk"].used == CS
    wiped.close()


def test_a_stop_whose_syncfs_hangs_leaves_no_clean_record(cache: Path, index: Index, monkeypatch):
    """Without per-chunk fsync the clean stop flushes the filesystem first; a disk busy with
    others' writes must not hold the stop past a pod's grace period: no record, and the next
    start counts and recovers as after a crash."""
    from nodecache import recovery

    gate = threading.Event()
    monkeypatch.setattr(recovery, "_syncfs", lambda tiers: gate.wait(30))
    unsynced = Store(cache, index, fsync=False)
    data = payload(2 * CS, seed=31)
    rec = record("sha256", data)
    index.blobs.put(rec)
    asyncio.run(fill(unsynced, rec, data))
    t0 = time.monotonic()
    recovery.leave_clean_stop(index, unsynced.tiers, synced=False, sync_timeout=0.2)
    assert time.monotonic() - t0 < 5 and index.meta.get("clean_stop") is None
    gate.set()
    recovery.leave_clean_stop(index, unsynced.tiers, synced=False)
    assert index.meta.get("clean_stop") is not None, "a syncfs that ends records the stop"
    unsynced.close()


@pytest.mark.parametrize("kind", KINDS)
def test_recover_drops_only_chunks_whose_bytes_changed(cache: Path, index: Index, store: Store, kind: str):
    data = payload(4 * CS - 9, seed=5)
    rec = record(kind, data)
    index.blobs.put(rec)
    asyncio.run(fill(store, rec, data, order=[0, 1, 3]))  # chunk 2 never fetched
    before = index.chunks.get(rec.blob_id)
    assert sorted(before) == [0, 1, 3]
    crash(store)

    # A crash left chunk 1 recorded but its bytes are not what was recorded.
    with open(store.path(rec.blob_id), "r+b") as f:
        f.seek(CS + 100)
        f.write(b"\xff" * 16)

    fresh = Store(cache, index)
    try:
        assert fresh.recover() == 1
        assert index.chunks.get(rec.blob_id) == {0: before[0], 3: before[3]}
        st = fresh.state(index.blobs.get(rec.blob_id))
        assert [st.has(i) for i in range(4)] == [True, False, False, True]
        assert st.missing == 2
        assert fresh.recover() == 0  # what is left is sound
    finally:
        fresh.close()


def test_recover_gives_back_blocks_of_chunks_written_but_never_recorded(cache: Path, index: Index, store: Store):
    """A kill -9 between a chunk's write and its record leaves blocks the quota cannot see."""
    data = payload(4 * CS, seed=9)
    rec = record("sha256", data)
    index.blobs.put(rec)
    asyncio.run(fill(store, rec, data, order=[1]))
    crash(store)
    with open(store.path(rec.blob_id), "r+b") as f:  # chunks 2 and 3 written, the crash before their record
        f.seek(2 * CS)
        f.write(data[2 * CS :])
        f.flush()
        os.fsync(f.fileno())
    assert os.stat(store.path(rec.blob_id)).st_blocks * 512 >= 3 * CS
    fresh = Store(cache, index)
    try:
        assert fresh.recover() == 0
        assert os.stat(store.path(rec.blob_id)).st_blocks * 512 <= CS + 4096  # chunk 1 only
        assert os.path.getsize(store.path(rec.blob_id)) == 4 * CS
        with open(store.path(rec.blob_id), "rb") as f:
            assert f.read()[CS : 2 * CS] == data[CS : 2 * CS]  # the recorded chunk is intact
    finally:
        fresh.close()


def test_recover_handles_truncated_and_missing_files_and_skips_complete(cache: Path, index: Index, store: Store):
    a = payload(3 * CS, seed=6)
    b = payload(2 * CS, seed=7)
    c = payload(CS + 1, seed=8)
    ra, rb, rc = record("sha256", a), record("gitsha1", b), record("sha256", c)
    for r in (ra, rb, rc):
        index.blobs.put(r)

    async def run():
        await fill(store, ra, a)
        await fill(store, rb, b)
        await store.finish(await fill(store, rc, c))

    asyncio.run(run())
    crash(store)
    os.truncate(store.path(ra.blob_id), CS + 5)  # chunk 0 intact, 1 cut short, 2 gone
    os.unlink(store.path(rb.blob_id))

    fresh = Store(cache, index)
    try:
        assert fresh.recover() == 2 + 2
        assert sorted(index.chunks.get(ra.blob_id)) == [0]
        assert index.chunks.get(rb.blob_id) == {}
        assert index.blobs.get(rc.blob_id).state == "complete"
        assert fresh.path(rc.blob_id).read_bytes() == c
    finally:
        fresh.close()


def stored_complete(store: Store, index: Index, seed: int) -> tuple[bytes, BlobRecord]:
    """A two-chunk blob filled and proven in `store`: its bytes and record."""
    data = payload(2 * CS, seed=seed)
    rec = record("sha256", data)
    index.blobs.put(rec)

    async def run():
        await store.finish(await fill(store, rec, data))

    asyncio.run(run())
    return data, rec


def test_state_of_complete_blob_whose_file_vanished_becomes_partial(cache: Path, index: Index, store: Store):
    data, rec = stored_complete(store, index, seed=9)
    store.close()
    os.unlink(store.path(rec.blob_id))

    fresh = Store(cache, index)
    try:
        st = fresh.state(index.blobs.get(rec.blob_id))
        assert st.missing == 2
        assert index.blobs.get(rec.blob_id).state == "partial"
        assert fresh.path(rec.blob_id).stat().st_size == len(data)
    finally:
        fresh.close()


class Killed(BaseException):
    """A kill -9 at this point: raised where the process would die, nothing after it runs."""


def _killed(*args, **kw):
    raise Killed


def served_after_restart(cache: Path, index: Index, rec: BlobRecord) -> tuple[str, bytes | None, int]:
    """After a crash: the blob's stored state, what a complete one's file holds (served as it is,
    unchecked), and the bytes its tier counts."""
    again = Store(cache, index)
    try:
        again.recover()
        stored = index.blobs.get(rec.blob_id)
        path = again.path(rec.blob_id)
        held = path.read_bytes() if stored.state == "complete" and path.exists() else None
        return stored.state, held, again.tiers["disk"].used
    finally:
        again.close()


@pytest.mark.parametrize("at", ["record", "rename"])
def test_a_crash_in_an_eviction_leaves_a_complete_blob_whole_or_partial(
    cache: Path, index: Index, store: Store, at: str, monkeypatch
):
    """An eviction writes the blob's record (partial, its chunks forgotten) before its file is
    renamed away: killed before the record, the blob is still complete with its file; killed
    after it, partial with nothing recorded. Never complete without its file: the next read
    makes a new sparse file under that record (and a crash then left zeros served as complete)."""
    data, rec = stored_complete(store, index, seed=31)
    if at == "record":
        monkeypatch.setattr(index.blobs, "put_in", _killed)
    else:
        monkeypatch.setattr(os, "rename", _killed)
    with pytest.raises(Killed):
        store.evict(index.blobs.get(rec.blob_id))
    monkeypatch.undo()
    crash(store)
    state, held, used = served_after_restart(cache, index, rec)
    if state == "complete":
        assert held == data, "a complete record without its file's bytes"
        assert used == len(data)
    else:
        assert state == "partial" and index.chunks.get(rec.blob_id) == {} and used == 0
        assert store.path(rec.blob_id).stat().st_blocks == 0, "recover gave the file's blocks back"


def test_a_crash_as_a_vanished_complete_blob_is_made_again_never_leaves_it_complete_over_zeros(
    cache: Path, index: Index, store: Store, monkeypatch
):
    """A complete blob whose file is gone (an eviction killed between its rename and its record,
    before they were ordered; a tier that lost the file) gets a new sparse file at its next read,
    and becomes partial. Killed before that record is written, the complete record must not be
    left over the new file: a complete blob is served from its file as it is, here all zeros
    where a reader wants the blob's bytes)."""
    data, rec = stored_complete(store, index, seed=32)
    crash(store)
    os.unlink(store.path(rec.blob_id))
    fresh = Store(cache, index)
    fresh.recover()
    monkeypatch.setattr(index.blobs, "put_in", _killed)
    with pytest.raises(Killed):
        fresh.state(index.blobs.get(rec.blob_id))
    monkeypatch.undo()
    crash(fresh)
    state, held, _ = served_after_restart(cache, index, rec)
    assert held is None or held == data, f"a {state} record over a file that is not its bytes"
    again = Store(cache, index)
    try:
        st = again.state(index.blobs.get(rec.blob_id))
        assert st.rec.state == "partial" and st.missing == 2, "it is fetched again"
        assert index.blobs.get(rec.blob_id).state == "partial"
    finally:
        again.close()


def test_fsync_off_still_writes_and_verifies(cache: Path, index: Index):
    store = Store(cache, index, fsync=False)
    data = payload(CS + 17, seed=10)
    rec = record("gitsha1", data)
    index.blobs.put(rec)
    try:

        async def run():
            await store.finish(await fill(store, rec, data))
            return await store.read(rec.blob_id, 0, len(data))

        assert asyncio.run(run()) == data
        assert index.blobs.get(rec.blob_id).state == "complete"
    finally:
        store.close()


@pytest.mark.parametrize(
    "bad",
    ["../x", "../" + "a" * 61, "ab", "a" * 63, "a" * 65, "A" * 64, "g" * 40, "", "ab/" + "c" * 61, "/" + "a" * 63],
)
def test_store_path_rejects_invalid_ids(cache: Path, store: Store, bad: str):
    with pytest.raises(InvalidName):
        store.path(bad)
    with pytest.raises(InvalidName):
        store.state(BlobRecord(bad, 10, "sha256", CS))
    assert list((cache / "blobs").iterdir()) == []


def test_every_file_lies_under_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative write would land here
    cache = tmp_path / "cache"
    index = Index(cache / "index", map_size=64 * MiB)
    store = Store(cache, index)
    good, other = payload(2 * CS + 1, seed=11), payload(CS, seed=12)
    r_good, r_bad = record("sha256", good), record("gitsha1", other)
    for r in (r_good, r_bad):
        index.blobs.put(r)

    async def run():
        await store.finish(await fill(store, r_good, good))
        with pytest.raises(Quarantined):
            await store.finish(await fill(store, r_bad, other[::-1]))
        for bad in ("../../../escape", "../" + "a" * 61):
            with pytest.raises(InvalidName):
                store.state(BlobRecord(bad, 1, "sha256", CS))

    try:
        asyncio.run(run())
        store.recover()
    finally:
        store.close()
        index.close()

    created = [p for p in tmp_path.rglob("*")]
    outside = [p for p in created if p != work and cache not in p.parents and p != cache]
    assert outside == []
    assert (cache / "blobs" / r_good.blob_id[:2] / r_good.blob_id).read_bytes() == good
    assert (cache / "quarantine" / r_bad.blob_id).read_bytes() == other[::-1]
    files = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    assert f"blobs/{r_good.blob_id[:2]}/{r_good.blob_id}" in files
    assert f"quarantine/{r_bad.blob_id}" in files
    assert all(f.startswith(("blobs/", "quarantine/", "index/")) for f in files), files


@pytest.mark.parametrize("kind", ["sha256", "gitsha1"])
def test_whole_blob_hash_advances_with_chunks_in_any_order(cache: Path, index: Index, kind: str):
    """Chunks land out of order; the running hash catches up and finish() needs no full re-read."""
    data = os.urandom(4 * CS + 123)
    bid = blob_id(kind, data)
    rec = BlobRecord(bid, len(data), kind, CS)
    index.blobs.put(rec)
    store = Store(cache, index)

    async def run() -> None:
        st = store.state(rec)
        for i in (3, 1, 0, 4, 2):
            await store.write_chunk(st, i, data[i * CS : (i + 1) * CS])
        await asyncio.gather(*store.hashes.tasks)
        assert store.hashes.prefixes[bid].next == 5, "the prefix hash caught up as the gaps filled"
        await store.finish(st)

    try:
        asyncio.run(run())
        assert index.blobs.get(bid).state == "complete"
        assert not store.hashes.prefixes
    finally:
        store.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("through_page_cache", [False, True])
def test_concurrent_chunk_writes_share_flushes_and_hash_from_memory(
    cache: Path, index: Index, kind: str, through_page_cache: bool
):
    """Chunks written together are synced and recorded in a few group commits, and
    the whole-blob hash takes them from memory: nothing is read back to prove the blob,
    also when they go through the page cache (a reader has the blob open): the read back
    is O_DIRECT, which writes the dirty pages out first and reads them from the disk."""
    data = payload(16 * CS + 77, seed=3)
    rec = record(kind, data)
    index.blobs.put(rec)
    store = Store(cache, index)
    flushes: list[int] = []
    flush = store._sync_and_record

    def counting(chunks):
        flushes.append(len(chunks))
        flush(chunks)

    store._commit._flush = counting
    reads: list[int] = []
    read_into = directio.read_into

    def counting_read(path, offset, length, buf):
        reads.append(offset)
        return read_into(path, offset, length, buf)

    parts = chunks_of(data)
    # Pieces as a stream delivers them: cut anywhere, some of them memoryviews.
    pieces = [[p[:1000], memoryview(p)[1000:5000], p[5000:]] for p in parts]

    async def run() -> None:
        st = store.state(rec)
        order = [*range(len(parts))][::-1]  # worst case for an in-order hash
        await asyncio.gather(*(store.write_chunk(st, i, pieces[i], cache=through_page_cache) for i in order))
        await asyncio.gather(*store.hashes.tasks)
        await store.finish(st)

    directio.read_into = counting_read
    try:
        asyncio.run(run())
    finally:
        directio.read_into = read_into
        store.close()
    assert index.blobs.get(rec.blob_id).state == "complete"
    assert sum(flushes) == len(parts) and len(flushes) < len(parts), flushes
    assert reads == [], "every chunk was hashed from memory"
    assert store.hashes.held == 0, "held chunks are let go once hashed"
    path = cache / "blobs" / rec.blob_id[:2] / rec.blob_id
    assert path.read_bytes() == data


def _run_then_proven(store: Store, run, rec: BlobRecord) -> None:
    """Run the coroutine function, close the store; the blob is proven and no chunk held."""
    try:
        asyncio.run(run())
    finally:
        store.close()
    assert store.index.blobs.get(rec.blob_id).state == "complete"
    assert store.hashes.held == 0


def test_hash_memory_bound_falls_back_to_reading_back(cache: Path, index: Index):
    data = payload(6 * CS, seed=4)
    rec = record("sha256", data)
    index.blobs.put(rec)
    store = Store(cache, index, hash_memory=2 * CS)

    async def run() -> None:
        st = store.state(rec)
        parts = chunks_of(data)
        for i in (5, 4, 3, 2):  # none is next in line: held while memory allows
            await store.write_chunk(st, i, parts[i], cache=False)
            assert store.hashes.held <= 2 * CS
        await store.write_chunk(st, 1, parts[1], cache=True)  # a reader's chunk: read back from the page cache
        assert sorted(store.hashes.prefixes[rec.blob_id].held) == [4, 5]
        await store.write_chunk(st, 0, parts[0], cache=False)
        await asyncio.gather(*store.hashes.tasks)
        await store.finish(st)

    _run_then_proven(store, run, rec)


def test_the_hash_takes_every_chunk_that_is_here_in_one_call_of_its_pool(cache: Path, index: Index):
    """Chunks that land behind a gap are hashed together once it fills: one call of the hash's
    pool and one hop through the loop for the run, not one or two per chunk. On a loop busy with
    32 streams each hop waited 10-50 ms, and the hash trailed a 256 MiB shard by half its chunks,
    all hashed after its last byte (the prefetch's end). Some of them read back from disk."""
    data = payload(12 * CS + 5, seed=6)
    rec = record("sha256", data)
    index.blobs.put(rec)
    store = Store(cache, index, hash_memory=6 * CS)  # chunks 1..6 held, 7..12 read back
    calls: list[str] = []
    pool = store.hashes.pool

    class Counting:
        def submit(self, fn, *args):
            calls.append(getattr(fn, "__name__", repr(fn)))
            return pool.submit(fn, *args)

    store.hashes.pool = Counting()  # where the hash sends its work

    async def run() -> None:
        st = store.state(rec)
        parts = chunks_of(data)
        for i in range(len(parts) - 1, 0, -1):  # all behind chunk 0
            await store.write_chunk(st, i, parts[i], cache=False)
        await asyncio.gather(*store.hashes.tasks)
        assert calls == [] and store.hashes.prefixes[rec.blob_id].next == 0
        await store.write_chunk(st, 0, parts[0], cache=False)
        await asyncio.gather(*store.hashes.tasks)
        assert store.hashes.prefixes[rec.blob_id].next == len(parts)
        await store.finish(st)

    _run_then_proven(store, run, rec)
    assert len(calls) == 1, f"13 chunks (0.8 MiB) hashed in {len(calls)} calls of the pool: {calls}"


@pytest.mark.parametrize("nice", [-3, 0])
def test_the_hash_threads_run_at_hash_nice(cache: Path, index: Index, nice: int):
    """On a busy node the proof must keep up with the fill, or a loader's next open finds its
    shard partial; hash_nice gives the hash threads their own priority (0: the daemon's)."""
    store = Store(cache, index, hash_nice=nice)
    try:
        here = os.getpriority(os.PRIO_PROCESS, 0)
        got = store._hash_pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result(10)
    finally:
        store.close()
    assert got == (nice if nice else here)
    assert os.getpriority(os.PRIO_PROCESS, 0) == here, "the rest of the process keeps its nice value"


def test_states_of_many_blobs_are_made_with_one_index_transaction(cache: Path, index: Index):
    """A prefetch makes the presence of all its blobs first (Filler._prepare): each new sparse
    file's record (its tier; a complete blob whose file is gone becomes partial, its chunks
    forgotten) is written in one transaction for all of them, each commit being an index sync
    on the loop (two per blob before: 33-40 ms for 9 blobs while the disk was busy). A proven
    blob's end is one transaction too (two before: a job's last blobs end together)."""
    datas = [payload(3 * CS + i, seed=20 + i) for i in range(9)]
    recs = [record("sha256", d) for d in datas]
    for rec in recs:
        index.blobs.put(rec)
    gone = recs[0]
    gone.state = "complete"
    index.blobs.put(gone)
    index.chunks.set([(gone.blob_id, 0, 123)])
    store = Store(cache, index)
    writes: list[int] = []
    write = index.db.write

    def counted():
        writes.append(1)
        return write()

    index.db.write = counted
    try:
        states = store.states([*recs, recs[3]])  # one listed twice
        assert len(writes) == 1, f"{len(writes)} index transactions for 9 new blob files"
        assert [st.rec.blob_id for st in states] == [r.blob_id for r in [*recs, recs[3]]]
        assert states[3] is states[-1] and store.state(recs[3]) is states[3]
        assert all(st.missing == st.rec.n_chunks for st in states), "nothing is present in a new file"
        for rec in recs:
            path = store.path(rec.blob_id)
            assert path.stat().st_size == rec.size and path.stat().st_blocks == 0, "sparse"
            assert index.blobs.get(rec.blob_id).tier == rec.tier
        assert index.blobs.get(gone.blob_id).state == "partial" and index.chunks.get(gone.blob_id) == {}
        assert store.states(recs) == states[:-1] and len(writes) == 1, "made once: nothing written again"

        async def fill(st) -> None:
            for i, part in enumerate(chunks_of(datas[1])):
                await store.write_chunk(st, i, part, cache=False)
            writes.clear()
            await store.finish(st)

        asyncio.run(fill(states[1]))
        assert len(writes) == 1, "a proven blob's record and the forgetting of its chunks: one transaction"
        assert index.blobs.get(recs[1].blob_id).state == "complete" and index.chunks.get(recs[1].blob_id) == {}
    finally:
        index.db.write = write
        store.close()


class _GatedSource(PiecewiseSource):
    """Serves blobs from memory; its `locate` (asked between a prefetch's prepare and its fills)
    waits until the test lets it go."""

    name, kind = "gated", "upstream"

    def __init__(self, datas: dict[str, bytes]):
        self.datas = datas
        self.locating, self.go = asyncio.Event(), asyncio.Event()

    async def fetch(self, rec: BlobRecord, start: int, end: int, background: bool = False) -> bytes:
        return self.datas[rec.blob_id][start:end]

    async def locate(self, rec: BlobRecord) -> None:
        self.locating.set()
        await self.go.wait()


def test_a_prefetch_keeps_the_blobs_it_prepared_until_their_fills_end(cache: Path, index: Index):
    """Filler._prepare makes every blob's presence before any fill starts (one index transaction),
    then _locate waits up to LOCATE_WAIT. A blob with chunks stored already (a prefetch resumed)
    was protected by nothing meanwhile: an eviction round then (a reader, another node's peer
    requests; min_free binds) evicted it, and its fill fetched those chunks again. Now the prefetch
    keeps each blob from its prepare until its fill ends, and no longer. (A blob with no chunk
    stored is not in eviction's order at all: nothing to lose.)"""
    from nodecache.config import Config
    from nodecache.fill import Filler
    from nodecache.metrics import Metrics

    datas = [payload(3 * CS, seed=40 + i) for i in range(2)]
    recs = [record("sha256", d) for d in datas]
    for rec in recs:
        index.blobs.put(rec)
    tier = Tier("disk", cache, quota=64 * CS)
    evicted: list[str] = []
    store = Store(cache, index, tiers=[tier])
    real_evict = store.evict
    store.evict = lambda rec: (evicted.append(rec.blob_id), real_evict(rec))[1]
    source = _GatedSource({r.blob_id: d for r, d in zip(recs, datas, strict=True)})
    ids = [r.blob_id for r in recs]

    async def main() -> None:
        await store.write_chunk(store.state(recs[0]), 0, datas[0][:CS])  # an earlier fill stored one chunk
        filler = Filler(Config(cache_dir=cache, parallel_total=4), index, store, lambda rec, k: [source], Metrics())
        job = asyncio.ensure_future(filler.fill_blobs(ids))
        await asyncio.wait_for(source.locating.wait(), 10)  # prepared, no fill started yet
        prepared = [store.state(r) for r in recs]
        assert not filler.blobs.running and not filler.chunks.inflight
        store.evict_lru(tier, 64 * CS)  # a round that evicts all it may
        assert evicted == [], "no blob a prefetch prepared is evicted before its fill starts"
        assert [store.state(r) for r in recs] == prepared and prepared[0].has(0)
        source.go.set()
        await asyncio.wait_for(job, 10)
        assert not any(filler.protected(b) for b in ids), "kept no longer than its fill"
        store.evict_lru(tier, 64 * CS)
        assert sorted(evicted) == sorted(ids), "once filled, the blobs are evictable as any other"

    try:
        asyncio.run(main())
        assert all(index.blobs.get(b).state == "partial" for b in ids)
    finally:
        store.close()


def test_a_hash_whose_wait_is_cancelled_still_hashes_what_it_took(cache: Path, index: Index):
    """The loop stops (asyncio.run ends, the daemon stops) while the hash's work waits in the
    pool: the cancelled wait must not cancel that work (its chunks are taken; the hash would
    miss them and the blob fail its proof), and the next hash waits for it."""
    import threading

    data = payload(4 * CS, seed=7)
    rec = record("sha256", data)
    index.blobs.put(rec)
    store = Store(cache, index)
    gate = threading.Event()
    busy = [store._hash_pool.submit(gate.wait, 30) for _ in range(2)]  # both hash threads

    async def land():
        st = store.state(rec)
        for i, part in enumerate(chunks_of(data)):
            await store.write_chunk(st, i, part, cache=False)
        return st

    try:
        st = asyncio.run(land())  # its end cancels the hash waiting behind `busy`
        gate.set()
        assert all(f.result(timeout=10) for f in busy)
        asyncio.run(store.finish(st))
    finally:
        gate.set()
        store.close()
    assert index.blobs.get(rec.blob_id).state == "complete"


def test_a_failed_write_of_a_hashed_chunk_spoils_the_running_hash(cache: Path, index: Index):
    """The hasher may take a chunk from memory before its write lands; if that write
    fails and the chunk is fetched again (other bytes), the proof must hash the file."""
    data = payload(3 * CS, seed=5)
    rec = record("sha256", data)
    index.blobs.put(rec)
    store = Store(cache, index)
    parts = chunks_of(data)
    failing = {"on": True}
    flush = store._sync_and_record

    def flaky(chunks):
        if failing["on"]:
            failing["on"] = False
            raise OSError(5, "injected EIO")
        flush(chunks)

    store._commit._flush = flaky

    async def run() -> None:
        st = store.state(rec)
        bad = b"\xff" * len(parts[0])  # what a broken upstream might have sent first
        with pytest.raises(OSError):
            write = asyncio.create_task(store.write_chunk(st, 0, bad, cache=False))
            await asyncio.sleep(0)  # the hasher takes chunk 0 from memory...
            await asyncio.gather(*store.hashes.tasks)
            await write  # ...and then its write fails
        assert store.hashes.prefixes[rec.blob_id].spoiled
        for i in range(3):
            await store.write_chunk(st, i, parts[i], cache=False)
        await store.finish(st)  # hashes the file: the good bytes

    try:
        asyncio.run(run())
    finally:
        store.close()
    assert index.blobs.get(rec.blob_id).state == "complete"


def test_group_commit_batches_fails_together_and_never_hangs():
    from nodecache.groupcommit import GroupCommit

    batches: list[list[int]] = []

    def flush(items: list[int]) -> None:
        batches.append(items)
        if 13 in items:
            raise OSError(5, "injected")

    async def run() -> None:
        commit = GroupCommit(flush)
        results = await asyncio.gather(*(commit(i) for i in range(10)), return_exceptions=True)
        assert results == [None] * 10
        results = await asyncio.gather(*(commit(i) for i in range(10, 20)), return_exceptions=True)
        failed = {i for i, r in zip(range(10, 20), results, strict=True) if isinstance(r, OSError)}
        assert 13 in failed and failed == set(next(b for b in batches if 13 in b)), "the whole batch failed"
        slow = GroupCommit(lambda items: __import__("time").sleep(0.2))
        waiter = asyncio.create_task(slow(1))
        await asyncio.sleep(0.01)
        later = asyncio.create_task(slow(2))  # queued behind the running flush
        await asyncio.sleep(0)
        slow._leader.cancel()  # shutdown
        done, _ = await asyncio.wait({waiter, later}, timeout=2)
        assert done == {waiter, later}, "nobody waits forever"
        flushed: list[int] = []
        settling = GroupCommit(lambda items: (__import__("time").sleep(0.1), flushed.extend(items)))
        pending = [asyncio.create_task(settling(i)) for i in range(3)]
        await asyncio.sleep(0)
        await settling.settled()
        assert flushed == [0, 1, 2], "settled() waits for every flush"
        await asyncio.gather(*pending)

    asyncio.run(run())
    assert sorted(i for b in batches for i in b) == list(range(20))
    assert len(batches) < 20, "concurrent items share flushes"


def test_eviction_reads_only_the_blobs_it_evicts(cache: Path, index: Index):
    """A round walks the index's order of last use as far as it evicts: the 2,000 records of a
    resolved dataset nobody fetched are never read. A read not yet flushed to the index puts
    a blob back in line at its real time."""
    tier = Tier("disk", cache)
    store = Store(cache, index, tiers=[tier])
    try:
        blobs = [payload(2 * CS, seed=100 + i) for i in range(6)]
        recs = [record("sha256", data, last_access=100.0 * (i + 1)) for i, data in enumerate(blobs)]
        for rec, data in zip(recs, blobs, strict=True):
            index.blobs.put(rec)
            asyncio.run(store.finish(asyncio.run(fill(store, rec, data))))
        half = record("gitsha1", payload(2 * CS, seed=99), last_access=150.0)  # one chunk held
        index.blobs.put(half)
        asyncio.run(fill(store, half, payload(2 * CS, seed=99), order=[0]))
        index.blobs.add([BlobRecord(f"{i:064x}", CS, "sha256", CS) for i in range(2000)])
        assert tier.used == 6 * 2 * CS + CS
        store.record(recs[0].blob_id).last_access = 10_000.0  # read since the last flush

        decoded = []
        decode = index.blobs.decode
        index.blobs.decode = lambda key, raw: decoded.append(key) or decode(key, raw)
        tier.quota = tier.used + 3 * CS  # low mark (0.8): 200 KiB more must fit under 80 %
        freed = store.evict_lru(tier, 200 * KiB)
        gone = [r.blob_id for r in [*recs, half] if not store.cached_bytes(store.record(r.blob_id))]
        assert gone == [recs[1].blob_id, recs[2].blob_id, half.blob_id] and freed == 5 * CS
        assert len(decoded) <= 3, f"eviction read {len(decoded)} records"
        assert [b for _, b in index.counts.least_recent("disk")] == [r.blob_id for r in (recs[0], *recs[3:])]
        assert list(index.counts.least_recent("shm")) == [], "each tier has its own order"
        store.flush_access_times()
        assert [b for _, b in index.counts.least_recent("disk")] == [r.blob_id for r in (*recs[3:], recs[0])]
    finally:
        store.close()


def test_a_crash_start_reads_only_the_records_of_blobs_holding_bytes(cache: Path, index: Index, store: Store):
    """After a kill -9 the usage is counted and partial blobs re-verified from the records of
    the blobs that hold bytes: the 2,000 records of a dataset nobody fetched are not read. The
    usage is what a count of every record gives; a complete blob whose file is gone is not
    counted, an orphan file is removed, a partial blob's bytes never recorded are released."""
    done, half, gone = (payload(3 * CS, seed=s) for s in (31, 32, 33))
    recs = [record("sha256", d) for d in (done, half, gone)]
    for rec, data, order in zip(recs, (done, half, gone), (None, [0, 2], None), strict=True):
        index.blobs.put(rec)
        st = asyncio.run(fill(store, rec, data, order))
        if order is None:
            asyncio.run(store.finish(st))
    unrecorded = record("gitsha1", payload(2 * CS, seed=34))  # its bytes were written, never recorded
    index.blobs.put(unrecorded)
    store.state(unrecorded)
    with open(store.path(unrecorded.blob_id), "r+b") as f:
        f.write(payload(CS, seed=35))
    index.blobs.add([BlobRecord(f"{i:064x}", CS, "sha256", CS) for i in range(2000)])
    crash(store)
    store.path(recs[2].blob_id).unlink()  # a complete blob's file lost
    orphan = cache / "blobs" / "ee" / ("ee" * 32)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"nobody's")

    decoded = []
    decode = index.blobs.decode
    index.blobs.decode = lambda key, raw: decoded.append(key) or decode(key, raw)
    fresh = Store(cache, index)
    try:
        assert not fresh.clean_start and fresh.recover() == 0
        assert fresh.tiers["disk"].used == 3 * CS + 2 * CS, "the complete blob and two chunks"
        assert not orphan.exists()
        assert os.stat(fresh.path(unrecorded.blob_id)).st_blocks == 0, "unrecorded bytes given back"
        assert len(decoded) <= 2 * 3, f"a crash start read {len(decoded)} records"
    finally:
        fresh.close()


def test_a_written_chunks_buffer_is_free_before_its_sync_and_record(cache, index):
    """A part from the receiver is handed over: once its bytes are written, its buffer can take
    the next part while the group commit (the sync and the LMDB record) is still running."""
    from nodecache.groupcommit import GroupCommit
    from nodecache.upstream.receive import Buffers

    store = Store(cache, index, hash_memory=0)
    data = payload(2 * CS)
    rec = record("sha256", data)
    pool = Buffers(keep=1)
    first = id(pool.take(CS))  # ids: a reference of the test's own would keep it busy
    gate = threading.Event()
    flush = store._sync_and_record
    store._commit = GroupCommit(lambda chunks: (gate.wait(10), flush(chunks)))

    async def main() -> None:
        st = store.state(rec)
        buf = pool.take(CS)
        buf[:CS] = data[:CS]
        part = [memoryview(buf)[:CS]]
        del buf
        write = asyncio.create_task(store.write_chunk(st, 0, part, cache=False))
        deadline = time.monotonic() + 10
        while part:
            assert time.monotonic() < deadline, "the part was never handed back"
            await asyncio.sleep(0.01)
        assert not write.done() and not st.has(0), "the commit still waits"
        assert id(pool.take(CS)) == first, "the buffer is free for the next part"
        gate.set()
        await write
        assert st.has(0)

    try:
        asyncio.run(main())
    finally:
        gate.set()
        store.close()


def test_a_writer_cancelled_during_its_commit_counts_what_the_index_records(cache, index):
    """A stop cancels the fills' writers. One whose chunk the group commit has taken is recorded
    all the same, and must stay counted: a clean stop keeps the count, and one short of the
    recorded chunks let the next start overrun its quota (a full store answered 200, not 507).
    One whose commit then fails gives its bytes back."""
    from nodecache.groupcommit import GroupCommit

    store = Store(cache, index)
    data = payload(3 * CS, seed=31)
    rec = record("sha256", data)
    index.blobs.put(rec)
    parts = chunks_of(data)
    taken, gate = threading.Event(), threading.Event()
    fail = {"on": False}
    flush = store._sync_and_record

    def gated(chunks) -> None:
        taken.set()
        gate.wait(10)
        if fail["on"]:
            raise OSError(5, "injected EIO")
        flush(chunks)

    store._commit = GroupCommit(gated)
    disk = store.tiers["disk"]

    async def cancelled_in_commit(st, chunks: list[int]) -> None:
        taken.clear()
        gate.clear()
        writes = [asyncio.create_task(store.write_chunk(st, i, parts[i], cache=False)) for i in chunks]
        deadline = time.monotonic() + 10
        while not taken.is_set():
            assert time.monotonic() < deadline, "the commit never started"
            await asyncio.sleep(0.01)
        for w in writes:
            w.cancel()
        await asyncio.gather(*writes, return_exceptions=True)
        assert all(w.cancelled() for w in writes)
        gate.set()
        await store.settle()

    async def main() -> None:
        st = store.state(rec)
        await cancelled_in_commit(st, [0, 1])
        assert sorted(index.chunks.get(rec.blob_id)) == [0, 1], "recorded though their writers were cancelled"
        assert st.has(0) and st.has(1) and disk.used == 2 * CS, "counted and present as recorded"
        fail["on"] = True
        await cancelled_in_commit(st, [2])
        assert sorted(index.chunks.get(rec.blob_id)) == [0, 1] and not st.has(2)
        assert disk.used == 2 * CS, "a chunk never recorded gives its bytes back"

    try:
        asyncio.run(main())
    finally:
        gate.set()
        store.close()
    again = Store(cache, index)
    try:
        assert again.clean_start and again.tiers["disk"].used == 2 * CS, "the clean stop kept the true count"
        assert again.evict(index.blobs.get(rec.blob_id)) == 2 * CS and again.tiers["disk"].used == 0
    finally:
        again.close()


def test_a_part_refused_for_space_is_left_whole_for_the_retry(cache, index):
    """chunks._fetch writes the same part again once a proof lets space go (NoSpace comes before
    any byte is written): the list must still hold it; once written, it is emptied."""
    from nodecache.tier import NoSpace

    tier = Tier("disk", cache, quota=CS // 2)
    store = Store(cache, index, tiers=[tier])
    data = payload(2 * CS)
    rec = record("sha256", data)

    async def main() -> None:
        st = store.state(rec)
        part = [memoryview(bytearray(data[:CS]))]
        with pytest.raises(NoSpace):
            await store.write_chunk(st, 0, part, cache=False)
        assert len(part) == 1 and bytes(part[0]) == data[:CS]
        tier.quota = 16 * CS
        await store.write_chunk(st, 0, part, cache=False)
        assert part == [] and st.has(0)

    try:
        asyncio.run(main())
        assert store.path(rec.blob_id).read_bytes()[:CS] == data[:CS]
    finally:
        store.close()


def test_warming_many_blobs_holds_one_blob_file_open_and_leaves_the_default_executor_free(store, monkeypatch):
    """A snapshot's read-ahead warms every complete shard in shard_read_ahead at once (4 GiB:
    4096 shards of 1 MiB). Each warm must not hold an fd while it waits for its turn, nor
    take the default executor's threads, which write the fills' chunks, while the disk reads."""
    data = [payload(CS, seed=i) for i in range(40)]
    recs = [record("sha256", d) for d in data]
    gate, advised = threading.Event(), threading.Event()
    real = os.posix_fadvise

    def busy_disk(fd: int, offset: int, size: int, advice: int) -> None:
        advised.set()
        gate.wait(10)
        real(fd, offset, size, advice)

    async def main() -> None:
        for r, d in zip(recs, data, strict=True):
            await store.finish(await fill(store, r, d))
        loop = asyncio.get_running_loop()
        before = len(os.listdir("/proc/self/fd"))
        monkeypatch.setattr(os, "posix_fadvise", busy_disk)
        warms = [loop.create_task(store.warm(r.blob_id)) for r in recs]
        try:
            while not advised.is_set():
                await asyncio.sleep(0.01)
            assert len(os.listdir("/proc/self/fd")) - before <= 1, "one blob file open for warming at a time"
            assert await asyncio.wait_for(loop.run_in_executor(None, int), 5) == 0, "the default executor is free"
        finally:
            gate.set()
            await asyncio.gather(*warms)

    asyncio.run(main())


def test_a_blob_evicted_and_filling_again_while_its_warm_waits_is_not_warmed(store, monkeypatch):
    """Warms wait for their turn: one whose blob was evicted and is being fetched again meanwhile
    would read a partial file into the page cache, where its O_DIRECT chunk writes invalidate it."""
    data = [payload(2 * CS, seed=i) for i in range(2)]
    recs = [record("sha256", d) for d in data]
    gate, advised = threading.Event(), []  # (the blob file advised, the second blob's state then)
    real = os.posix_fadvise

    def busy_disk(fd: int, offset: int, size: int, advice: int) -> None:
        second = recs[1].blob_id
        try:
            its = os.path.samestat(os.fstat(fd), os.stat(store.path(second)))
        except FileNotFoundError:
            its = False
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), store.record(second).state if its else None))
        gate.wait(10)
        real(fd, offset, size, advice)

    async def main() -> None:
        for r, d in zip(recs, data, strict=True):
            await store.finish(await fill(store, r, d))
        monkeypatch.setattr(os, "posix_fadvise", busy_disk)
        warms = [asyncio.get_running_loop().create_task(store.warm(r.blob_id)) for r in recs]
        try:
            while not advised:
                await asyncio.sleep(0.01)
            store.evict(store.record(recs[1].blob_id))
            await store.write_chunk(store.state(recs[1]), 0, data[1][:CS])
            assert store.record(recs[1].blob_id).state == "partial"
        finally:
            gate.set()
            await asyncio.gather(*warms)
        assert (str(store.path(recs[0].blob_id)), None) in advised, "the first one was warmed"
        assert all(state != "partial" for _, state in advised), "the partial file was not"

    asyncio.run(main())


def test_records_and_presence_in_memory_are_bounded(cache: Path, index: Index):
    """A dataset of many small files read once (a mount, a peer, the mirror) must not grow the
    daemon's memory with every blob: only blobs in use, partly stored ones (filling()) and a
    bounded number of recently used ones keep their record and presence. An access time of a
    record dropped from memory is persisted first, and a blob in use keeps its one shared record."""
    from nodecache.store import RECENT_BLOBS

    n = RECENT_BLOBS + 1000
    tier = Tier("disk", cache)
    store = Store(cache, index, fsync=False, tiers=[tier])
    try:
        datas = [b"%d" % i for i in range(n)]
        recs = [record("sha256", d, state="complete", last_access=1.0) for d in datas]
        for rec, data in zip(recs, datas, strict=True):
            path = tier.blob_path(rec.blob_id)
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
        index.blobs.add(recs)
        half = record("sha256", payload(2 * CS, seed=7), last_access=1.0)  # one chunk stored
        index.blobs.put(half)
        asyncio.run(fill(store, half, payload(2 * CS, seed=7), order=[0]))
        opened = recs[1].blob_id
        store.in_use.open[opened] = 1  # an open handle: its record must stay the shared one
        shared = store.record(opened)
        untouched = payload(2 * CS, seed=8)  # a fill started, nothing stored: its running hash goes too
        empty = record("sha256", untouched)
        index.blobs.put(empty)
        assert store.state(store.record(empty.blob_id)).missing == 2 and store.hashes.get(empty.blob_id)

        async def read_all() -> None:
            for i, rec in enumerate(recs):
                got = store.record(rec.blob_id)
                st = store.state(got)
                assert st.rec is got and await store.read(rec.blob_id, 0, rec.size) == datas[i]
                got.last_access = 1000.0 + i  # as a read through the fill path sets it

        asyncio.run(read_all())
        assert len(store._recs) <= RECENT_BLOBS + 3 and len(store._states) <= RECENT_BLOBS + 3
        assert store.record(opened) is shared, "a blob in use keeps its one shared record"
        assert store.filling() == [(half.blob_id, CS)], "a partly stored blob stays reported"
        first = recs[0].blob_id
        assert first not in store._recs, "the least recently used record was dropped"
        assert index.blobs.get(first).last_access == 1000.0, "its access time was persisted when dropped"
        assert store.record(first).last_access == 1000.0
        assert store.cached_bytes(store.record(first)) == 1 and store.state(store.record(first)).missing == 0
        store.flush_access_times()
        order = [b for _, b in index.counts.least_recent("disk")]
        assert order[:2] == [half.blob_id, recs[0].blob_id] and order[-1] == recs[-1].blob_id
        assert empty.blob_id not in store._states and store.hashes.get(empty.blob_id) is None
        assert store.state(store.record(empty.blob_id)).missing == 2 and store.hashes.get(empty.blob_id)
        st = asyncio.run(fill(store, store.record(empty.blob_id), untouched))
        asyncio.run(store.finish(st))
        assert store.record(empty.blob_id).state == "complete" and store.cached_bytes(st.rec) == 2 * CS
    finally:
        store.close()


def test_a_blob_is_kept_while_any_of_its_chunk_fetches_runs_counted_by_blob():
    """Eviction asks of every blob it looks at: the fetches in flight are counted per blob, not
    scanned per question, and a blob is spared until its last fetch ends (ending twice is harmless)."""
    from nodecache.inuse import InUse

    in_use = InUse()
    a, b = "a" * 64, "b" * 64
    for key in ((a, 0), (a, 1), (b, 0), (a, 1)):
        in_use.fetch_started(key, object())
    in_use.fetch_ended((a, 0))
    in_use.fetch_ended((a, 0))
    assert in_use.protected(a) and in_use.protected(b), "a's chunk 1 is still being fetched"
    in_use.fetch_ended((a, 1))
    assert not in_use.protected(a) and in_use.protected(b)
    in_use.fetch_ended((b, 0))
    assert not in_use.protected(b) and in_use.inflight == {} and in_use.fetching == {}


@pytest.mark.parametrize(
    "sizes, disk, shm, hot, short, held",
    [
        ([10], 20, 0, False, 0, 10),  # exactly full beside a pin's 10
        ([10], 20, 0, False, 1, 11),
        ([10], 20, 5, False, 0, 5),  # the pin's bytes may lie in shm (too small for this blob)
        ([2, 2], 0, 4, False, 2, 2),  # ... and then leave shm only 2
        ([10], 20, 5, False, 5, 20),  # 15 of them on the disk at least
    ]
    + [
        (*case, 0)
        for case in [
            ([10, 10], 20, 0, False, 0),  # exactly full
            ([10, 11], 20, 0, False, 1),
            ([10, 10, 2], 20, 5, False, 0),  # the small one goes to shm
            ([30], 20, 50, False, 10),  # too big for shm, more than the disk
            ([30], 20, 50, True, 0),  # a hot pin's blobs may go to shm
            ([2, 2, 2, 30], 25, 4, False, 7),  # shm holds 4 of the 6 small bytes
            ([30], 10, 28, True, 20),  # a blob goes whole to one tier: shm has no room for it
            ([6, 6], 5, 5, False, 7),  # small, but each larger than shm
            ([], 0, 0, False, 0),
        ]
    ],
)
def test_shortfall_counts_shm_only_for_what_may_go_there(sizes, disk, shm, hot, short, held):
    assert shortfall(sizes, disk, shm, shm_file_max=8, hot=hot, held=held) == short


def test_blobs_placed_on_shm_count_there_until_their_bytes_are_stored(cache, index):
    """The shm placement counts the blobs placed there and not yet stored (Tier.promised): six
    4-chunk blobs prepared at once fill shm to its high watermark and the rest go to disk; a
    blob's own bytes count once (as used from their reserve on); eviction and a presence dropped
    with nothing stored give the rest of the promise back."""
    from nodecache.pins import Pins

    shm = Tier("shm", cache / "shm", quota=16 * CS)  # high watermark 0.9: 14.4 chunks
    disk = Tier("disk", cache)
    pins = Pins(index, shm, shm_file_max=4 * CS)
    store = Store(cache, index, tiers=[shm, disk], placement=pins.place)
    try:
        blobs = [(rec := record("sha256", data), data) for data in (payload(4 * CS, seed=40 + i) for i in range(6))]
        states = store.states([rec for rec, _ in blobs])
        assert [st.rec.tier for st in states] == ["shm"] * 3 + ["disk"] * 3
        assert shm.promised == 12 * CS and disk.promised == 0
        asyncio.run(fill(store, *blobs[0]))
        assert (shm.used, shm.promised) == (4 * CS, 8 * CS)
        st = states[1]
        asyncio.run(store.write_chunk(st, 0, chunks_of(blobs[1][1])[0]))
        assert (shm.used, shm.promised) == (5 * CS, 7 * CS)
        store.evict(st.rec)
        assert (shm.used, shm.promised) == (4 * CS, 4 * CS)
        store._drop_state(states[2].rec.blob_id)  # as a trim drops a presence with nothing stored
        assert shm.promised == 0
        rec = record("sha256", payload(4 * CS, seed=50))
        assert store.state(rec).rec.tier == "shm", "shm has room again"
        # A blob placed there whose fill stopped (failed, cancelled, read in part and closed) and
        # that nobody uses: the next placement gives its promise back (shm stayed closed before).
        assert shm.promised == 4 * CS
        later = [record("sha256", payload(CS, seed=60 + i)) for i in range(6)]
        assert [st.rec.tier for st in store.states(later)] == ["shm"] * 6 and shm.promised == 6 * CS
        store.in_use.open[later[0].blob_id] = 1  # one is read: its promise holds
        store.state(record("sha256", payload(CS, seed=70)))
        assert shm.promised == 2 * CS
    finally:
        store.close()


def test_a_chunk_refused_for_room_keeps_its_blobs_shm_promise(cache, index):
    """A blob's promise on shm turns into used bytes only once a chunk is let in: a write refused
    (the tier full of blobs in use) leaves it promised, so placement still counts it."""
    from nodecache.pins import Pins
    from nodecache.tier import NoSpace

    shm = Tier("shm", cache / "shm", quota=8 * CS)
    pins = Pins(index, shm, shm_file_max=4 * CS)
    store = Store(cache, index, tiers=[shm, Tier("disk", cache)], placement=pins.place)
    try:
        data = payload(4 * CS, seed=80)
        [st] = store.states([record("sha256", data)])
        store.in_use.open[st.rec.blob_id] = 1  # being read
        assert (st.rec.tier, shm.promised) == ("shm", 4 * CS)
        shm.used = 8 * CS  # filled meanwhile by blobs in use
        with pytest.raises(NoSpace):
            asyncio.run(store.write_chunk(st, 0, chunks_of(data)[0]))
        assert (shm.used, shm.promised) == (8 * CS, 4 * CS)
    finally:
        store.close()
