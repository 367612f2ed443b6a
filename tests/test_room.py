"""Demand first for space: fills nobody reads give their room to a reader (Filler._make_room).

Each test builds a Filler in-process over a 16 MiB tier with a source whose answers it delays,
so which fill holds which chunk when a reader comes is decided by the test, not by timing."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time

import pytest

from nodecache.config import Config
from nodecache.fill import Filler, FillError
from nodecache.index import BlobRecord, Index
from nodecache.metrics import Metrics
from nodecache.store import Store
from nodecache.tier import Tier
from nodecache.upstream import PiecewiseSource

MiB = 1 << 20


class Rig:
    """Blobs of `sizes` MiB; `slow(blob index, offset)` is awaited before each chunk is served."""

    def __init__(self, tmp_path, sizes, slow):
        self.contents = [os.urandom(n * MiB) for n in sizes]
        self.ids = [hashlib.sha256(d).hexdigest() for d in self.contents]
        self.fetched: list[tuple[int, int]] = []
        rig = self

        class Source(PiecewiseSource):
            name, kind = "memory", "upstream"

            async def fetch(self, rec, start: int, end: int, background: bool = False) -> bytes:
                i = rig.ids.index(rec.blob_id)
                rig.fetched.append((i, start))
                await slow(i, start)
                return rig.contents[i][start:end]

        cfg = Config(cache_dir=tmp_path / "cache", chunk_size=MiB, parallel_total=8, fsync=False, read_timeout=30)
        self.index = Index(tmp_path / "index", map_size=64 * MiB)
        for b, data in zip(self.ids, self.contents, strict=True):
            self.index.blobs.put(BlobRecord(blob_id=b, kind="sha256", size=len(data), chunk_size=MiB))
        self.tier = Tier("disk", tmp_path / "cache", quota=16 * MiB)
        self.store = Store(tmp_path / "cache", self.index, fsync=False, tiers=[self.tier])
        self.metrics = Metrics()
        self.filler = Filler(cfg, self.index, self.store, lambda rec, k: [Source()], self.metrics)

    def slow_commits(self, seconds: float) -> list:
        """The group commits of the first two blobs' chunks take `seconds` (an fsync on a busy
        disk); returns the list of the chunks handed to a commit, as they are."""
        commit, submitted = self.store._commit, []
        flush, submit = commit._flush, commit.submit

        def slow_flush(batch) -> None:
            if any(b in self.ids[:2] for _, b, _, _ in batch):
                time.sleep(seconds)
            flush(batch)

        def counted(item):
            submitted.append(item)
            return submit(item)

        commit._flush, commit.submit = slow_flush, counted
        return submitted

    def close(self) -> None:
        self.store.close()
        self.index.close()


@pytest.fixture
def rigs(tmp_path):
    made: list[Rig] = []

    def make(sizes, slow) -> Rig:
        made.append(Rig(tmp_path / str(len(made)), sizes, slow))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


async def hang_from_chunk_5(i: int, start: int) -> None:
    if i < 2 and start >= 5 * MiB:  # the two fills ahead: their last chunk does not come
        await asyncio.sleep(3600)


def test_a_reader_gets_the_room_that_fills_nobody_reads_hold(rigs):
    """Two whole-blob fills nobody reads (a snapshot fill's shards ahead of a loader) hold 10 of
    16 MiB, their last chunks slow to come; a reader of an 8 MiB file then finds the tier full.
    Those fills stop and their chunks are evicted for the reader's (before, the read failed
    ENOSPC while they held the room)."""
    rig = rigs((6, 6, 8), hang_from_chunk_5)

    async def main() -> bytes:
        fills = [rig.filler.fill_in_background(b) for b in rig.ids[:2]]
        while rig.tier.used < 10 * MiB:  # five chunks of each stored, the sixth on its way
            await asyncio.sleep(0.01)
        data = await asyncio.wait_for(rig.filler.read(rig.ids[2], 0, 8 * MiB), 30)
        assert all(f.done() for f in fills), "the fills ahead were stopped"
        return data

    assert asyncio.run(main()) == rig.contents[2]
    assert any(rig.store.cached_bytes(rig.store.record(b)) == 0 for b in rig.ids[:2]), "chunks of theirs evicted"
    assert rig.tier.used <= 16 * MiB
    assert rig.metrics.fills_yielded._value.get() == 2


def test_the_stopped_fills_chunks_being_committed_are_evicted_after_their_commit(rigs):
    """A stopped fill's chunk whose group commit is still running (a slow fsync) keeps its blob in
    use until the commit ends: evicted before, its bytes could not be given back (the reader got
    ENOSPC anyway) and the commit then recorded a chunk of a deleted file, counted twice at the
    next eviction (the tier's usage went below 0)."""
    rig = rigs((6, 6, 8), hang_from_chunk_5)
    store, tier = rig.store, rig.tier
    submitted = rig.slow_commits(0.05)
    tier.low = 0.3  # an eviction round takes both stopped fills, not only what the reader needs

    async def main() -> bytes:
        fills = [rig.filler.fill_in_background(b) for b in rig.ids[:2]]
        while len(submitted) < 10:  # five chunks of each written and in their commit
            await asyncio.sleep(0.01)
        data = await asyncio.wait_for(rig.filler.read(rig.ids[2], 0, 8 * MiB), 30)
        await asyncio.wait(fills)
        await store.settle()
        return data

    assert asyncio.run(main()) == rig.contents[2]
    for b in rig.ids[:2]:
        if not store.path(b).exists():
            assert rig.index.chunks.get(b) == {}, "no chunk recorded of a deleted file"
    store.evict_lru(tier, 16 * MiB)  # nothing is in use: the round takes every blob
    assert all(store.cached_bytes(store.record(b)) == 0 for b in rig.ids)
    assert tier.used == 0, f"{tier.used:+,} bytes counted with nothing stored"


def test_a_fill_stopped_before_its_first_step_fetches_nothing(rigs):
    """A fill started in the loop turn its stop comes in (the snapshot fill starting the next
    shard as a reader's chunk finds the tier full) never ran the code that stops its workers:
    they are stopped too (before, they fetched the whole blob, unprotected)."""

    async def slow(i: int, start: int) -> None:
        await asyncio.sleep(0.05)

    rig = rigs((6, 2), slow)

    async def main() -> None:
        fill = rig.filler.fill_in_background(rig.ids[0])
        waits = rig.filler._make_room(rig.store.record(rig.ids[1]))
        assert fill in waits
        await asyncio.wait(waits, timeout=5)
        assert fill.cancelled()
        await asyncio.sleep(0.5)

    asyncio.run(main())
    assert rig.fetched == [], "nothing fetched for the stopped fill"


def test_a_reader_that_comes_as_its_blobs_fill_is_stopped_gets_its_bytes(rigs):
    """A reader of a blob whose fill is being stopped joins its cancelled fetch (still in the
    in-flight table for a loop turn or two): it asks again, and gets its bytes (before: EIO,
    "daemon is shutting down")."""
    first: set[int] = set()

    async def slow(i: int, start: int) -> None:
        if i == 0 and start not in first:
            first.add(start)
            await asyncio.sleep(3600)  # the fill's first try hangs; a new fetch is served

    rig = rigs((4, 2), slow)

    async def main() -> bytes:
        rig.filler.fill_in_background(rig.ids[0])
        while (0, 0) not in rig.fetched:  # its chunks in flight, nobody has it open
            await asyncio.sleep(0.01)
        waits = rig.filler._make_room(rig.store.record(rig.ids[1]))  # a reader of another blob found the tier full
        late = asyncio.create_task(rig.filler.read(rig.ids[0], 0, MiB))  # one of this blob comes meanwhile
        await asyncio.wait(waits, timeout=5)
        return await asyncio.wait_for(late, 10)

    try:
        data = asyncio.run(main())
    except FillError as e:
        pytest.fail(f"{errno.errorcode[e.errno]}: {e}")
    assert data == rig.contents[0][:MiB]


def test_a_reader_waits_for_fills_stopped_before_whose_chunks_are_still_being_committed(rigs):
    """Fills stopped for a first reader chunk leave the running table at once, but their chunk
    writes wait for their commits (a slow fsync): a second reader chunk that finds the tier full
    then waits for those too (before, it found nothing to stop or evict: ENOSPC)."""
    rig = rigs((6, 6, 8), hang_from_chunk_5)
    store = rig.store
    submitted = rig.slow_commits(0.5)

    async def main() -> bytes:
        for b in rig.ids[:2]:
            rig.filler.fill_in_background(b)
        while len(submitted) < 10:  # five chunks of each written and in their commit
            await asyncio.sleep(0.01)
        first = rig.filler._make_room(store.record(rig.ids[2]))  # a first reader chunk stopped them
        while rig.filler.blobs.running:
            await asyncio.sleep(0.01)
        assert store.in_use.fetching, "their chunks' commits still run"
        try:
            return await asyncio.wait_for(rig.filler.read(rig.ids[2], 0, 8 * MiB), 30)
        finally:
            await asyncio.wait(first)

    assert asyncio.run(main()) == rig.contents[2]
