"""Whole-blob fills: multi-chunk requests (runs), their failures, and writes around the page cache."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    BIG,
    MiB,
    cached_share,
    counter,
    in_page_cache,
    need_direct_io,
    sha256_file,
    snapshot_dir,
    verified,
    wait_until,
)

from nodecache import directio
from nodecache.blobfill import run_length
from nodecache.testing.hub import Fault


def test_run_lengths_shrink_and_cover_the_blob():
    left, lengths = 64, []
    while left:
        n = run_length(left, workers=8, most=8)
        lengths.append(n)
        left -= n
    assert sum(lengths) == 64
    assert lengths == sorted(lengths, reverse=True), "runs only shrink"
    assert lengths[0] == 4 and lengths[-16:] == [1] * 16, "half a fair share; single chunks at the end"
    assert run_length(1000, workers=8, most=2) == 2 and run_length(3, workers=8, most=8) == 1


def test_a_fill_ends_with_its_workers_error_never_proving_a_blob_with_chunks_missing(tmp_path):
    """A running fill gains workers (start() again: a prefetch, a snapshot fill, an open). One
    that failed (NoSpace, an upstream's error) while the fill waited for the others was never
    looked at: the fill then proved a file with that worker's chunks missing, and quarantined
    the blob as if its sources had served wrong bytes (seen with a prefetch and readers on a
    full disk: readers got EIO, "failed verification", instead of ENOSPC)."""
    import asyncio
    import hashlib

    from nodecache.config import Config
    from nodecache.fill import Filler, FillError
    from nodecache.index import BlobRecord, Index
    from nodecache.metrics import Metrics
    from nodecache.store import Store
    from nodecache.upstream import NotFound, PiecewiseSource

    cs = 64 * 1024
    data = os.urandom(4 * cs)
    rec = BlobRecord(blob_id=hashlib.sha256(data).hexdigest(), kind="sha256", size=len(data), chunk_size=cs)

    class Source(PiecewiseSource):
        """Chunk 1 is refused the first time (NotFound: never retried); the chunk at `gated`
        waits for `go`."""

        name, kind = "gated", "upstream"

        def __init__(self) -> None:
            self.go, self.refused, self.gated = asyncio.Event(), False, 0

        async def fetch(self, rec, start: int, end: int, background: bool = False) -> bytes:
            if start == cs and not self.refused:
                self.refused = True
                raise NotFound("chunk 1 is gone")
            if start == self.gated:
                await self.go.wait()
            return data[start:end]

    async def main(store: Store) -> None:
        source = Source()
        cfg = Config(cache_dir=tmp_path / "cache", parallel_per_blob=1, parallel_total=4)
        filler = Filler(cfg, store.index, store, lambda rec, k: [source], Metrics())
        fill = filler.fill_in_background(rec.blob_id)  # one worker: it waits for chunk 0
        await asyncio.sleep(0)
        first = set(filler.blobs._fills[rec.blob_id].workers)
        assert filler.fill_in_background(rec.blob_id, workers=2) is fill  # a second worker: chunk 1
        (late,) = filler.blobs._fills[rec.blob_id].workers - first
        await asyncio.wait_for(asyncio.wait({late}), 10)
        assert isinstance(late.exception(), NotFound) and not fill.done()
        source.go.set()  # the first worker fills chunks 0, 2 and 3, and ends
        with pytest.raises(NotFound):
            await asyncio.wait_for(fill, 10)
        assert store.record(rec.blob_id).state == "partial", "not quarantined: nothing was proven"
        assert filler.blobs.running == {} and filler.chunks.finishing == {}

        # A fill whose presence goes under it (here evicted by hand, past what protects it, and
        # made again by a reader) ends with an error too, never a proof of a file it did not fill.
        source.go.clear()
        source.gated = cs
        old = store.state(store.record(rec.blob_id))
        fill = filler.fill_in_background(rec.blob_id)
        await asyncio.sleep(0)
        store.evict(store.record(rec.blob_id))
        assert store.state(store.record(rec.blob_id)) is not old  # a new, empty file
        source.go.set()
        with pytest.raises(FillError, match="not stored"):
            await asyncio.wait_for(fill, 10)
        assert store.record(rec.blob_id).state == "partial" and filler.chunks.finishing == {}

    index = Index(tmp_path / "index", map_size=64 * MiB)
    index.blobs.put(rec)
    store = Store(tmp_path / "cache", index)
    try:
        asyncio.run(main(store))
    finally:
        store.close()
        index.close()


def test_a_prefetch_of_thousands_of_small_files_fills_a_window_of_them_at_once(tmp_path):
    """A prefetch takes its blobs in order, at most PREFETCH_WINDOW x parallel_total filling
    (and a prepared batch more held) at once: started all at once, every fill, its requests and
    its presence were held for the whole job, and each grant and progress report looked at all
    of them. Its progress rises as blobs end, to the repo's bytes; the bound is reached, so the
    window is what limits it, not the source."""
    import asyncio
    import hashlib

    from nodecache.config import Config
    from nodecache.fill import _PREPARED, PREFETCH_WINDOW, Filler
    from nodecache.index import BlobRecord, Index
    from nodecache.metrics import Metrics
    from nodecache.store import Store
    from nodecache.upstream import PiecewiseSource

    contents = {}
    for i in range(3000):
        data = b"file %d\n" % i
        contents[hashlib.sha256(data).hexdigest()] = data
    recs = [BlobRecord(blob_id=b, kind="sha256", size=len(d), chunk_size=MiB) for b, d in contents.items()]
    most = {"running": 0, "held": 0}

    class Source(PiecewiseSource):
        """Serves the files, a loop turn later (many requests are out at once), and notes how many
        blobs fill and are held at each request."""

        name, kind = "memory", "upstream"

        async def fetch(self, rec, start: int, end: int, background: bool = False) -> bytes:
            most["running"] = max(most["running"], len(filler.blobs.running))
            most["held"] = max(most["held"], len(store.in_use.kept))
            await asyncio.sleep(0)
            return contents[rec.blob_id][start:end]

    cfg = Config(cache_dir=tmp_path / "cache", parallel_total=4, parallel_per_blob=1, fsync=False)
    index = Index(tmp_path / "index", map_size=256 * MiB)
    for rec in recs:
        index.blobs.put(rec)
    store = Store(tmp_path / "cache", index, fsync=False)
    filler = Filler(cfg, index, store, lambda rec, k: [Source()], Metrics())
    reports: list[int] = []
    try:
        asyncio.run(asyncio.wait_for(filler.fill_blobs([r.blob_id for r in recs], reports.append), 120))
        assert all(store.record(r.blob_id).state == "complete" for r in recs)
    finally:
        store.close()
        index.close()
    window = PREFETCH_WINDOW * cfg.parallel_total
    assert most["running"] == window, f"at most (and up to) {window} blobs fill at once, not {most['running']}"
    assert most["held"] <= _PREPARED + window, f"{most['held']} blobs held at once"
    assert reports == sorted(reports) and reports[-1] == sum(r.size for r in recs) and len(reports) > 1
    assert store.in_use.kept == {} and filler.blobs.running == {}


def test_a_blob_waiting_out_a_failed_proofs_backoff_takes_no_place_in_the_prefetch_window(tmp_path):
    """A prefetch tries a blob whose proof failed again after its backoff (up to 300 s): while it
    waits it is no fill, and the blobs after it start. Before, a window full of such blobs held
    every healthy one behind it for a whole backoff."""
    import asyncio
    import hashlib
    import time

    from nodecache.config import Config
    from nodecache.fill import PREFETCH_WINDOW, Filler, FillError
    from nodecache.index import BlobRecord, Index
    from nodecache.metrics import Metrics
    from nodecache.store import Store
    from nodecache.upstream import PiecewiseSource

    cfg = Config(cache_dir=tmp_path / "cache", parallel_total=1, parallel_per_blob=1, fsync=False)
    window = PREFETCH_WINDOW * cfg.parallel_total
    contents = {}
    for i in range(2 * window):
        data = b"file %d\n" % i
        contents[hashlib.sha256(data).hexdigest()] = data
    ids = list(contents)
    bad = set(ids[:window])  # served wrong bytes: each proof fails, the blob waits out its backoff
    done_at: dict[str, float] = {}

    class Source(PiecewiseSource):
        name, kind = "memory", "upstream"

        async def fetch(self, rec, start: int, end: int, background: bool = False) -> bytes:
            data = contents[rec.blob_id][start:end]
            return data.upper() if rec.blob_id in bad else data

    index = Index(tmp_path / "index", map_size=64 * MiB)
    for b, data in contents.items():
        index.blobs.put(BlobRecord(blob_id=b, kind="sha256", size=len(data), chunk_size=MiB))
    store = Store(tmp_path / "cache", index, fsync=False, retry_base=2.0)
    filler = Filler(cfg, index, store, lambda rec, k: [Source()], Metrics())

    async def main() -> float:
        t0 = time.monotonic()

        def progress(_: int) -> None:
            for b in ids[window:]:
                if b not in done_at and store.record(b).state == "complete":
                    done_at[b] = time.monotonic() - t0

        with pytest.raises(FillError, match=f"{window} blob"):
            await asyncio.wait_for(filler.fill_blobs(ids, progress, attempts=2), 60)
        return time.monotonic() - t0

    try:
        took = asyncio.run(main())
    finally:
        store.close()
        index.close()
    assert all(store.record(b).state == "quarantined" for b in bad)
    assert len(done_at) == window, "every healthy blob filled"
    assert max(done_at.values()) < 1.5, f"healthy blobs done at {sorted(done_at.values())}: behind the 2 s backoffs"
    assert took >= 2.0, "the bad blobs were tried again after their backoff"


def test_direct_write_and_read_go_around_the_page_cache(tmp_path):
    need_direct_io(tmp_path)
    path = tmp_path / "blob"
    data = os.urandom(3 * directio.ALIGN + 100)
    pieces = [data[:5000], memoryview(data)[5000:9000], data[9000:]]  # as a stream delivers them
    with open(path, "wb") as f:
        f.truncate(len(data))
    pool = directio.BufferPool()
    fd = os.open(path, os.O_RDWR)
    try:
        with pool.buffer(len(data)) as buf:
            done = directio.write(fd, path, pieces, 0, buf)
        assert done == 3 * directio.ALIGN, "the aligned head goes direct, the tail through the page cache"
        assert not in_page_cache(path, 0, done), "a direct write leaves nothing in the page cache"
        with pool.buffer(len(data)) as buf, directio.read_into(path, 0, len(data), buf) as view:
            assert bytes(view) == data
        assert not in_page_cache(path, 0, done), "nor does a direct read"
        assert path.read_bytes() == data
        assert directio.write(fd, path, pieces, 100, bytearray(8192)) == 0, "an unaligned offset is not for O_DIRECT"
        with open(path, "rb") as f:
            f.seek(100)
            assert f.read() == data, "...so all of it went through the page cache"
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e, pool.buffer(16384) as buf:
        directio.read_into(path, 0, path.stat().st_size + 1, buf)
    assert e.value.errno == errno.EIO


def _prefetch(hub, cache: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nodecache", "prefetch", BIG, "--cache-dir", str(cache), "--hub-url", hub.url]
    env = {**os.environ, "NODECACHE_CHUNK_SIZE": str(MiB), "NODECACHE_RETRY_BASE": "0.05", **env}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_prefetch_streams_runs_survives_broken_ones_and_leaves_no_page_cache(hub, tmp_path, big_repo):
    need_direct_io(tmp_path)
    hub.stats.reset()
    hub.faults.extend([Fault("truncate"), Fault("reset"), Fault("500")])
    out = _prefetch(hub, tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    assert hub.faults == [], "every injected fault was hit"
    want = sha256_file(big_repo / "weights.bin")
    blob = tmp_path / "cache" / "blobs" / want[:2] / want
    assert sha256_file(blob) == want
    ranges = [(s, e) for b, s, e in hub.stats.ranges if b == want]
    assert any(e - s > MiB for s, e in ranges), "some requests carried a run of chunks"
    assert sum(e - s for s, e in ranges) < 72 * MiB + 4 * MiB, "a broken run refetches only what it lost"
    # The fill wrote around the page cache: the checks above read the file, so look
    # at a fresh fill of another cache instead.
    out = _prefetch(hub, tmp_path / "direct")
    assert out.returncode == 0, out.stderr
    cached = [in_page_cache(tmp_path / "direct" / "blobs" / want[:2] / want, k * MiB, MiB) for k in range(72)]
    assert sum(cached) <= 2, "only chunks a reader waited for may stay in the page cache"
    out = _prefetch(hub, tmp_path / "buffered", NODECACHE_DIRECT_IO="false")
    assert out.returncode == 0, out.stderr
    blob = tmp_path / "buffered" / "blobs" / want[:2] / want
    share = cached_share(blob, 0, 72 * MiB)
    assert share >= 0.5, f"direct_io=false writes through the page cache; only {share:.0%} of it cached"


def test_prefetch_asks_the_cdn_location_once_per_blob_before_its_workers_start(hub, tmp_path, big_repo):
    """One HEAD per blob of several chunks learns the Hub's redirect before the fill's workers
    start; their range requests then go straight to the CDN. Before, each of the blob's
    parallel_per_blob workers took the hop itself as 32 requests left at once (the CDN's first
    byte ~20 ms later in the bench)."""
    hub.stats.reset()
    out = _prefetch(hub, tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    want = sha256_file(big_repo / "weights.bin")
    assert sha256_file(tmp_path / "cache" / "blobs" / want[:2] / want) == want
    got = hub.stats.requests
    assert got["resolve_head"] == 1, "one HEAD: weights.bin (config.json is one chunk, served by the Hub itself)"
    assert got["resolve_get"] == 1, f"only config.json's GET went to the Hub, not the workers' first runs: {got}"
    assert got["cdn_get"] >= 2 and hub.stats.auth_on_cdn == 0


def test_a_location_that_cannot_be_learned_leaves_the_hop_to_the_fill(hub, tmp_path, big_repo):
    """A HEAD that fails (the Hub down, or no redirect: a file the Hub serves itself) records
    nothing and raises nothing: the fill's requests take the hop as before."""
    import asyncio

    import aiohttp

    from nodecache.index import BlobRecord
    from nodecache.metrics import Metrics
    from nodecache.upstream.hf import HfUpstream

    commit = hub.commits[BIG]
    want = sha256_file(big_repo / "weights.bin")
    lfs = BlobRecord(want, 72 * MiB, "sha256", MiB, repo_id=BIG, commit=commit, path="weights.bin")
    small = BlobRecord("0" * 40, 2, "gitsha1", MiB, repo_id=BIG, commit=commit, path="config.json")

    async def run() -> dict:
        hub.stats.reset()
        async with aiohttp.ClientSession() as session:
            hf = HfUpstream(hub.url, session, Metrics())
            try:
                await hf.locate(small)  # 200: the Hub serves it, no redirect to remember
                hub.down = True
                await hf.locate(lfs)  # 503
                unlearned = dict(hf._locations)
                hub.down = False
                assert hub.stats.requests["down"] == 1, "the HEAD was asked and refused"
                await hf.locate(lfs)
                return {"unlearned": unlearned, "learned": dict(hf._locations)}
            finally:
                await hf.close()

    got = asyncio.run(run())
    assert got["unlearned"] == {}
    assert list(got["learned"]) == [want] and got["learned"][want][0].startswith(hub.cdn_url + "/blobs/" + want)


def test_a_hub_that_does_not_answer_the_head_holds_the_prefetch_up_no_longer_than_locate_wait(
    tmp_path, big_repo, monkeypatch
):
    """The HEADs are a shortcut: when they hang, the prefetch goes on after LOCATE_WAIT and its
    workers take the hop themselves."""
    import asyncio
    import time

    from nodecache import cli, fill
    from nodecache import config as config_mod
    from nodecache.testing.hub import HubEmulator

    class SlowHeads(HubEmulator):
        async def _resolve(self, request, *args):
            if request.method == "HEAD":
                self.stats.requests["resolve_head"] += 1
                await asyncio.sleep(5)
            return await super()._resolve(request, *args)

    monkeypatch.setattr(fill, "LOCATE_WAIT", 0.3)
    with SlowHeads() as hub:
        hub.add_repo(BIG, big_repo)
        cfg = config_mod.load({"cache_dir": tmp_path / "cache", "hub_url": hub.url, "chunk_size": MiB}, environ={})
        t0 = time.monotonic()
        asyncio.run(cli._prefetch_standalone(cfg, BIG))
        took = time.monotonic() - t0
        assert hub.stats.requests["resolve_head"] == 1 and hub.stats.requests["resolve_get"] >= 2
    want = sha256_file(big_repo / "weights.bin")
    assert sha256_file(tmp_path / "cache" / "blobs" / want[:2] / want) == want
    assert 0.3 <= took < 4, f"the prefetch took {took:.1f}s"


def test_a_reader_through_the_mount_leaves_the_blob_file_out_of_the_page_cache(hub, daemons, big_repo):
    """A FUSE reader's chunks are written with O_DIRECT and its large reads answered with O_DIRECT:
    the kernel keeps the bytes in the mount's page cache; a second copy in the blob file's would
    cost fresh pages (more CPU on this VM than the rest of the fill) and memory."""
    d = daemons(repos=(BIG,))
    need_direct_io(d.cache_dir)
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    want = sha256_file(big_repo / "weights.bin")
    assert sha256_file(path) == want  # read front to back while the open's whole-blob fill runs
    blob = d.cache_dir / "blobs" / want[:2] / want
    wait_until(lambda: verified(path), "the blob filled and proven")
    n = -(-blob.stat().st_size // MiB)
    cached = [k for k in range(n) if in_page_cache(blob, k * MiB, min(MiB, blob.stat().st_size - k * MiB))]
    assert len(cached) <= 2, f"chunks left in the blob file's page cache: {cached}"
    assert sha256_file(blob) == want


def test_a_complete_blob_served_by_the_daemon_is_read_through_the_page_cache(hub, daemons, big_repo):
    """Without passthrough (kernels before 6.9), the daemon serves every read of a complete blob:
    those reads go through the blob file's page cache, so the next reader finds it warm; O_DIRECT
    there read every byte from the disk again (3x slower served from a warm store)."""
    d = daemons(repos=(BIG,), env={"NODECACHE_PASSTHROUGH": "false"})
    need_direct_io(d.cache_dir)
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    want = sha256_file(big_repo / "weights.bin")
    assert sha256_file(path) == want  # fills it (this handle, opened before, reads around the cache)
    wait_until(lambda: verified(path), "the blob filled and proven")
    blob = d.cache_dir / "blobs" / want[:2] / want
    for cached_copy in (blob, path):  # whatever the fill left, and the mount's own copy, go
        fd = os.open(cached_copy, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    assert sha256_file(path) == want  # a new handle on the complete blob: served by the daemon
    share = cached_share(blob, 0, blob.stat().st_size)  # read around it, at most 2 of 72 chunks stay
    assert share >= 0.5, f"only {share:.0%} of the blob read through the page cache"


def test_buffers_are_private_anonymous_memory():
    """A shared anonymous mapping (mmap's default) is shmem: its first touch of a page costs
    this VM twice what a private page does. Every reused buffer of the fill is private."""
    from nodecache.upstream.receive import Buffers

    def perms(buf: mmap.mmap) -> str:
        at = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        for line in Path("/proc/self/maps").read_text().splitlines():
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= at < hi:
                return line.split()[1]
        raise AssertionError("buffer not mapped")

    pool = directio.BufferPool(keep=1)
    rx = Buffers(keep=1)
    for buf in (directio.anonymous(5000), pool.take(MiB), rx.take(MiB)):
        assert perms(buf) == "rw-p" and len(buf) % 4096 == 0


def test_a_fill_asks_each_next_run_on_the_connection_its_last_run_ends_on(hub, daemons, big_repo):
    """At a per-connection cap every moment between one run's last byte and the next run's request
    is that connection's bandwidth lost: once a run's last bytes are on their way its worker asks for
    its next run, which goes out on the same connection as soon as they are in (receive.py)."""
    d = daemons([BIG], env={"NODECACHE_PARALLEL_TOTAL": "5", "NODECACHE_READ_AHEAD_CHUNKS": "1"})  # 4 workers
    weights = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    want = sha256_file(big_repo / "weights.bin")
    hub.stats.reset()
    hub.rate_limit_bps = 16 * MiB  # per response: a 1 MiB chunk takes ~60 ms
    try:
        with open(weights, "rb") as f:
            assert f.read(8) == (big_repo / "weights.bin").read_bytes()[:8]
        wait_until(lambda: verified(weights), "the whole blob filled and proven")
    finally:
        hub.rate_limit_bps = None
    assert sha256_file(weights) == want
    requests = len([r for r in hub.stats.ranges if r[0] == want])
    chained = counter(d, "nodecache_upstream_requests_chained_total")
    assert requests > 36, "the fill asked for its chunks in many requests"
    # All but each worker's first request, the reader's chunk and its read-ahead (measured: 54 of 59).
    assert chained >= 0.75 * requests, f"only {chained:.0f} of {requests} requests followed the run before"
