"""/v1/repos and /v1/status figures come from counters the index keeps per snapshot: the status
of a repo costs the same whatever its number of files, and reads no file list and no record."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from nodecache.config import Config
from nodecache.index import BlobRecord, Index
from nodecache.layout import FileEntry
from nodecache.pins import Pins
from nodecache.status import Serving, Status
from nodecache.store import Store

CS = 64 * 1024
C1, C2 = "1" * 40, "2" * 40


def bid(n: int) -> str:
    return hashlib.sha256(b"%d" % n).hexdigest()


def status_of(cfg_root: Path, index: Index, store: Store) -> Status:
    """The report over a real index, store and pins; what repos()/repo() never touch (fills,
    jobs, peers, compile caches, metrics) is left out."""
    return Status(
        cfg=Config(cache_dir=cfg_root),
        serving=Serving(),
        index=index,
        store=store,
        filler=None,
        jobs=None,
        pins=Pins(index, None, 0),
        membership=None,
        has_peers=False,
        compile_caches=None,
        metrics=None,
    )


def walked(index: Index, store: Store, repo_type: str, repo_id: str) -> list[dict]:
    """The figures as the previous version computed them: every file list and every record."""
    view = index.view(repo_type, repo_id)
    out = []
    for commit, files in view.snapshots.items():
        blobs = {f.blob_id: f.size for f in files}
        recs = [index.blobs.get(b) for b in blobs]
        out.append(
            {
                "commit": commit,
                "revisions": sorted(r for r, c in view.refs.items() if c == commit),
                "files": len(files),
                "bytes_total": sum(blobs.values()),
                "bytes_cached": sum(store.cached_bytes(r) for r in recs if r),
                "complete": all(r is not None and r.state == "complete" for r in recs),
                "last_access": max((r.last_access for r in recs if r), default=0.0),
            }
        )
    return out


def test_repo_figures_match_the_walk_and_survive_an_old_index(tmp_path: Path):
    """A small repo: complete, partly stored (with a chunk on disk), quarantined and unknown
    blobs, a file listed twice, two snapshots sharing a blob, an access time flushed."""
    cache = tmp_path / "cache"
    index = Index(cache / "index", map_size=1 << 26)
    store = Store(cache, index)
    try:
        done = BlobRecord(bid(1), 10, "sha256", CS, state="complete", last_access=5.0)
        part = BlobRecord(bid(2), 3 * CS, "sha256", CS)
        bad = BlobRecord(bid(3), 7, "sha256", CS, state="quarantined")
        index.blobs.add([done, part, bad])
        files1 = [
            FileEntry("a.bin", 10, done.blob_id),
            FileEntry("sub/a-again.bin", 10, done.blob_id),
            FileEntry("b.bin", 3 * CS, part.blob_id),
            FileEntry("c.bin", 7, bad.blob_id),
            FileEntry("d.bin", 99, bid(4)),  # no record yet
        ]
        index.snapshots.put("model", "org/small", C1, files1)
        index.snapshots.put("model", "org/small", C2, [FileEntry("a.bin", 10, done.blob_id)])
        index.refs.put("model", "org/small", "main", C1)
        index.refs.put("model", "org/small", "v1", C1)
        index.refs.put("model", "org/small", "old", C2)
        index.refs.put("model", "org/refonly", "main", C1)  # a ref whose snapshot is not recorded yet
        index.pins.put("model", "org/small", "old", "pin", C2)

        async def one_chunk():
            st = store.state(store.record(part.blob_id))
            await store.write_chunk(st, 1, b"x" * CS)
            await store.settle()

        asyncio.run(one_chunk())
        store.record(done.blob_id).last_access = 42.0  # read while serving, then flushed
        store.flush_access_times()

        status = status_of(cache, index, store)
        report = status.repo("model", "org/small")
        assert report["snapshots"] == walked(index, store, "model", "org/small")
        by_commit = {s["commit"]: s for s in report["snapshots"]}
        assert by_commit[C1]["bytes_cached"] == 10 + CS and by_commit[C1]["files"] == 5
        assert by_commit[C1]["last_access"] == 42.0 and not by_commit[C1]["complete"]
        assert by_commit[C2]["complete"] and by_commit[C2]["revisions"] == ["old"]
        assert report["refs"] == {"main": C1, "v1": C1, "old": C2} and report["pinned"] == {"old": "pin"}
        assert [r["repo"] for r in status.repos()] == ["org/refonly", "org/small"]
        assert status.repos()[0]["snapshots"] == [] and status.repo("model", "org/none") is None
        assert status._complete(status.pins.refs()[0][0])

        done2 = BlobRecord(bid(4), 99, "sha256", CS, state="complete")
        index.blobs.add([done2])  # the unknown blob arrives complete
        part.state = "complete"
        index.blobs.put(part)
        bad.state = "complete"
        index.blobs.put(bad)
        store.close()
        store = Store(cache, index)  # nothing touched in this process: chunks come from the index
        status = status_of(cache, index, store)
        assert status.repo("model", "org/small")["snapshots"] == walked(index, store, "model", "org/small")
        assert all(s["complete"] for s in status.repo("model", "org/small")["snapshots"])

        expected = status.repos()
        store.close()
        index.meta.put("derived_v4", None)  # an index from before the snapshot counts
        with index.env.begin(write=True) as txn:
            txn.drop(index.links.snap_counts, delete=False)
        index.close()
        index = Index(cache / "index", map_size=1 << 26)
        store = Store(cache, index)
        assert status_of(cache, index, store).repos() == expected
    finally:
        store.close()
        index.close()


def test_status_of_a_big_repo_reads_no_file_list_and_caches_no_record(tmp_path: Path):
    """20,000 files: /v1/repos and one repo's entry read the counters (no file list decoded, no
    blob record read or kept), and report what the walk over every file would."""
    cache = tmp_path / "cache"
    index = Index(cache / "index", map_size=1 << 28)
    store = Store(cache, index)
    try:
        n = 20_000
        recs = [
            BlobRecord(bid(i), 100 + i, "sha256", CS, state="complete" if i % 3 == 0 else "partial") for i in range(n)
        ]
        index.blobs.add(recs)
        index.snapshots.put(
            "dataset",
            "org/big",
            C1,
            [FileEntry(f"d{i // 100}/f{i}.parquet", r.size, r.blob_id) for i, r in enumerate(recs)],
        )
        index.refs.put("dataset", "org/big", "main", C1)
        expected = walked(index, store, "dataset", "org/big")
        store.close()
        store = Store(cache, index)

        lists, records = [], []
        decode_files, decode_record = index.snapshots.decode, index.blobs.decode
        index.snapshots.decode = lambda raw: lists.append(raw) or decode_files(raw)
        index.blobs.decode = lambda key, raw: records.append(key) or decode_record(key, raw)
        status = status_of(cache, index, store)
        report = status.repos()
        one = status.repo("dataset", "org/big")
        assert report == [one] and one["snapshots"] == expected
        assert expected[0]["files"] == n and expected[0]["bytes_total"] == sum(r.size for r in recs)
        assert lists == [] and records == [], "no file list and no blob record read"
        assert store._recs == {}, "no record kept in the store's shared records"
    finally:
        store.close()
        index.close()
