"""Demand first: the node's fetch slots go to readers before read-ahead and background fills.

The slots are pure asyncio and tested directly; the rest with the Hub
emulator and a real FUSE mount, waiting on events (emulator faults reached,
status fields), never on sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import threading
import urllib.parse
import urllib.request

from conftest import BIG, SMALL, MiB, counter, snapshot_dir, verified, wait_until

from nodecache.config import Config
from nodecache.fill import Filler
from nodecache.index import BlobRecord, Index
from nodecache.metrics import Metrics
from nodecache.scrub import Scrubber
from nodecache.slots import AHEAD, BACKGROUND, DEMAND, Slots
from nodecache.store import Store
from nodecache.testing.hub import Fault

# ---- the slots (pure asyncio) ----------------------------------------------------------------


async def _held(slots: Slots, n: int) -> list:
    """n background tickets, each granted a slot (within a second)."""
    held = [slots.ticket(BACKGROUND) for _ in range(n)]
    for t in held:
        await asyncio.wait_for(slots.acquire(t), 1)
    return held


def _release(slots: Slots, *tickets) -> None:
    for t in tickets:
        slots.release(t)


def test_readers_go_first_and_background_never_takes_the_reserve_while_a_reader_s_request_is_in():
    async def main() -> None:
        slots = Slots(4, 1)
        held = await _held(slots, 3)
        reader = slots.ticket(DEMAND)
        await asyncio.wait_for(slots.acquire(reader), 1)
        late_bg = slots.ticket(BACKGROUND)
        bg = asyncio.ensure_future(slots.acquire(late_bg))
        slots.release(held[0])  # 3 of 4 in use, but one is a reader's: the reserve is its
        await asyncio.sleep(0)
        assert not bg.done(), "background took the reserve beside a reader's request"
        ahead, reader2 = slots.ticket(AHEAD), slots.ticket(DEMAND)
        waits = [asyncio.ensure_future(slots.acquire(t)) for t in (ahead, reader2)]
        await asyncio.sleep(0)
        assert waits[1].done() and not waits[0].done(), "the reader's second request went first"
        slots.promote(late_bg, DEMAND)  # a reader now waits for what it fetches
        slots.release(held[1])
        await asyncio.sleep(0)
        assert bg.done() and not waits[0].done(), "the promoted ticket went before read-ahead"
        waits[0].cancel()
        await asyncio.gather(waits[0], return_exceptions=True)
        _release(slots, held[2], late_bg, reader, reader2)
        assert slots.used == 0 and slots._waiting == []

    asyncio.run(main())


def test_a_cancelled_waiter_gives_its_slot_back():
    async def main() -> None:
        slots = Slots(2, 1)
        a = slots.ticket(DEMAND)
        await slots.acquire(a)
        b = slots.ticket(DEMAND)
        await slots.acquire(b)
        c = slots.ticket(DEMAND)
        w = asyncio.ensure_future(slots.acquire(c))
        await asyncio.sleep(0)
        slots.release(a)  # granted to c ...
        w.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(w, return_exceptions=True)
        slots.release(b)
        assert slots.used == 0

    asyncio.run(main())


def test_the_reserve_is_lent_while_no_reader_s_request_needs_it_and_taken_back_at_once():
    async def main() -> None:
        slots = Slots(4, 1)
        held = await _held(slots, 4)  # all four: no reader's request is in
        assert slots.lent == 1 and not slots.reading()
        reader, reader2, bg = slots.ticket(DEMAND), slots.ticket(DEMAND), slots.ticket(BACKGROUND)
        await asyncio.wait_for(slots.acquire(reader), 1)
        assert slots.used == 5 and slots.reading(), "beside the borrower, which runs on"
        waits = [asyncio.ensure_future(slots.acquire(t)) for t in (bg, reader2)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waits), "no more than the reserve: the reader's second request waits"
        slots.release(held[0])  # the borrower ends: the slot it had was the reader's already
        await asyncio.sleep(0)
        assert slots.lent == 0 and not any(w.done() for w in waits)
        slots.release(held[1])
        await asyncio.sleep(0)
        assert waits[1].done() and not waits[0].done(), "the next slot went to the reader"
        slots.release(held[2])
        await asyncio.sleep(0)
        assert not waits[0].done(), "background gets 3 of 4 again (one held, two readers)"
        slots.release(reader)
        await asyncio.sleep(0)
        assert waits[0].done()
        _release(slots, held[3], reader2, bg)
        assert slots.used == 0

    asyncio.run(main())


def test_waiting_fills_take_the_reserve_as_soon_as_the_readers_requests_are_out():
    async def main() -> None:
        slots = Slots(4, 1)
        held = await _held(slots, 2)
        reader = slots.ticket(DEMAND)
        await slots.acquire(reader)
        late = [slots.ticket(BACKGROUND) for _ in range(2)]
        waiting = [asyncio.ensure_future(slots.acquire(t)) for t in late]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiting), "the reserve is kept while a reader's request is in"
        slots.release(reader)  # both take a slot, the second the reserve
        await asyncio.wait_for(asyncio.gather(*waiting), 1)
        assert slots.used == 4 and slots.lent == 1
        _release(slots, *held, *late)
        assert slots.used == 0

    asyncio.run(main())


class _ScanSlots:
    """The reference: the line as it was before the heap (a list, the best waiter found by a scan
    of all of them per grant), with the same rules of who may take a slot."""

    def __init__(self, total: int, reserve: int):
        self.total, self.reserve, self.in_use, self.waiting_list = total, reserve, [0, 0, 0], []
        self._seq = itertools.count()

    used = Slots.used
    lent = Slots.lent
    _may_take = Slots._may_take
    _grant = Slots._grant
    release = Slots.release
    ticket = Slots.ticket

    def reading(self) -> bool:
        return self.in_use[DEMAND] > 0 or any(w.priority == DEMAND for w in self.waiting_list)

    async def acquire(self, t) -> None:
        if not self.waiting_list and self._may_take(t.priority):
            self._grant(t)
            return
        self.waiting_list.append(t)
        self._wake()
        try:
            await t.granted
        except asyncio.CancelledError:
            if t in self.waiting_list:
                self.waiting_list.remove(t)
            elif t.held:
                self.release(t)
            raise

    def promote(self, t, priority: int) -> None:
        if priority < t.priority and not t.held:
            t.priority = priority
            self._wake()

    def _wake(self) -> None:
        while self.waiting_list:
            best = min(self.waiting_list, key=lambda w: (w.priority, w.seq))
            if not self._may_take(best.priority):
                return
            self.waiting_list.remove(best)
            self._grant(best)


def test_the_line_grants_as_the_scan_of_every_waiter_did_under_random_cancels_and_promotions():
    """The heap with lazily dropped entries grants the same tickets, in the same order, as the
    min() scan it replaces, through random requests, releases, cancellations and promotions."""

    async def run(seed: int) -> None:
        rng = random.Random(seed)
        total = rng.randint(1, 9)
        reserve = rng.randint(0, total - 1)
        both = (Slots(total, reserve), _ScanSlots(total, reserve))
        tickets: list[list] = [[], []]  # per implementation, the i-th request's ticket
        waits: list[list] = [[], []]
        grants: list[list[int]] = [[], []]  # request numbers in the order their slots were granted
        for _ in range(rng.randint(20, 300)):
            op, pick, priority = rng.random(), rng.random(), rng.choice((DEMAND, AHEAD, BACKGROUND))
            for side, slots in enumerate(both):  # the same step on each
                mine = tickets[side]
                if op < 0.45 or not mine:
                    t = slots.ticket(priority)
                    n = len(mine)
                    t.granted.add_done_callback(lambda f, n=n, side=side: f.cancelled() or grants[side].append(n))
                    mine.append(t)
                    waits[side].append(asyncio.ensure_future(slots.acquire(t)))
                    continue
                i = int(pick * len(mine))
                if op < 0.7:
                    slots.release(mine[i])
                elif op < 0.85:
                    waits[side][i].cancel()
                else:
                    slots.promote(mine[i], priority)
            for _ in range(3):
                await asyncio.sleep(0)
            heap, scan = both
            assert grants[0] == grants[1], f"seed {seed}: granted in another order"
            assert heap.in_use == scan.in_use and heap.reading() == scan.reading(), f"seed {seed}"
            assert [t.held for t in tickets[0]] == [t.held for t in tickets[1]], f"seed {seed}"
            assert heap.waiting == len(scan.waiting_list), f"seed {seed}"
            assert len(heap._waiting) <= 2 * heap.waiting + 64, f"seed {seed}: stale entries pile up"
        for side, slots in enumerate(both):
            for w in waits[side]:
                w.cancel()
            await asyncio.gather(*waits[side], return_exceptions=True)
            for t in tickets[side]:
                slots.release(t)
            assert slots.used == 0
        assert both[0]._waiting == [] and both[0].waiting == 0

    async def main() -> None:
        for seed in range(300):
            await run(seed)

    asyncio.run(main())


def test_a_scrub_keeps_its_blob_but_does_not_count_as_a_reader(tmp_path):
    """A scrub pass over a large cache takes hours at scrub_bps: it is no reader (a fill of the
    blob meanwhile would not go ahead as read-ahead), and the blob is not evicted."""
    data = os.urandom(3 * 64 * 1024)
    blob_id = hashlib.sha256(data).hexdigest()
    rec = BlobRecord(blob_id=blob_id, kind="sha256", size=len(data), chunk_size=64 * 1024)

    async def main(store: Store, filler: Filler) -> None:
        st = store.state(rec)
        for k in range(rec.n_chunks):
            await store.write_chunk(st, k, data[k * rec.chunk_size : (k + 1) * rec.chunk_size])
        await store.finish(st)
        assert store.record(blob_id).state == "complete"
        inside, go = asyncio.Event(), asyncio.Event()

        async def pace(n: int) -> None:
            inside.set()
            await go.wait()

        check = asyncio.ensure_future(Scrubber(store, filler, Metrics(), 0).check(blob_id, pace))
        await asyncio.wait_for(inside.wait(), 10)
        assert not filler.chunks.is_open(blob_id), "a scrub is not a reader: its fill would be a background one"
        assert store.in_use.protected(blob_id), "...but its blob is not evicted under the hash"
        go.set()
        assert await asyncio.wait_for(check, 10) is True
        assert not store.in_use.protected(blob_id)

    index = Index(tmp_path / "index", map_size=64 * MiB)
    store = Store(tmp_path / "cache", index)
    try:
        cfg = Config(cache_dir=tmp_path / "cache", parallel_total=4)
        asyncio.run(main(store, Filler(cfg, index, store, lambda rec, k: [], Metrics())))
    finally:
        store.close()
        index.close()


def test_a_prefetch_nobody_reads_uses_every_connection(hub, daemons, big_repo):
    """No blob is open: the slots kept for readers are lent to the whole-blob fills."""
    held = [Fault("hold") for _ in range(4)]
    env = {"NODECACHE_PARALLEL_TOTAL": "4", "NODECACHE_PARALLEL_PER_BLOB": "4", "NODECACHE_FILL_RUN_CHUNKS": "1"}
    daemon = daemons([BIG], env=env)
    hub.faults.extend(held)
    try:
        _post_prefetch(daemon, BIG)
        for f in held:
            assert f.reached.wait(30), "the prefetch held fewer than all 4 connections at once"
    finally:
        for f in held:
            f.release.set()
    weights = snapshot_dir(daemon, BIG, hub.commits[BIG]) / "weights.bin"
    wait_until(lambda: verified(weights), "the prefetch finished once released")
    assert (weights).read_bytes() == (big_repo / "weights.bin").read_bytes()


def test_a_reader_is_served_while_a_prefetch_holds_every_connection(hub, daemons, big_repo):
    """The reserve is lent to a prefetch nobody reads: a reader that then opens a blob is
    served beside the lent requests, not after the first of them ends (here: never, until released)."""
    held = [Fault("hold") for _ in range(4)]
    env = {
        "NODECACHE_PARALLEL_TOTAL": "4",
        "NODECACHE_PARALLEL_PER_BLOB": "4",
        "NODECACHE_FILL_RUN_CHUNKS": "1",
        "NODECACHE_READ_AHEAD_CHUNKS": "0",
        "NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false",
    }
    daemon = daemons([BIG], env=env)
    weights = snapshot_dir(daemon, BIG, hub.commits[BIG]) / "weights.bin"
    want = (big_repo / "weights.bin").read_bytes()
    hub.faults.extend(held)
    fd = None
    try:
        _post_prefetch(daemon, BIG)
        for f in held:
            assert f.reached.wait(30), "the prefetch did not hold all 4 connections"
        fd = os.open(weights, os.O_RDONLY)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(os.pread(fd, 4096, 60 * MiB + 5)))
        reader.start()
        reader.join(15)  # bounds a failure only: on the old code it waits for a held request to end
        assert got == [want[60 * MiB + 5 : 60 * MiB + 5 + 4096]], "the reader was served"
        assert not any(f.release.is_set() for f in held), "...while the prefetch's requests still hung"
    finally:
        for f in held:
            f.release.set()
        if fd is not None:
            reader.join(30)
            os.close(fd)
    wait_until(lambda: verified(weights), "the prefetch finished once released")
    assert weights.read_bytes() == want


def _peer_chunk(daemon, blob: str, commit: str, k: int, **extra: str) -> bytes:
    """Chunk k of a blob of BIG asked through the peer API, as a peer would (1 MiB chunks)."""
    q = {"repo_type": "model", "repo": BIG, "commit": commit, "chunk_size": str(MiB), "chunk": str(k), **extra}
    url = f"{daemon.url}/v1/blobs/{blob}?{urllib.parse.urlencode(q)}"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Bearer tok"}), timeout=60) as r:
        return r.read()


def _post_prefetch(daemon, repo: str) -> None:
    req = urllib.request.Request(f"{daemon.url}/v1/prefetch", data=json.dumps({"repo": repo}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")  # fmt: skip
    urllib.request.urlopen(req, timeout=30).close()


def _owner(hub, daemons, big_repo, **env: str):
    """A node with 4 slots that peers may ask (token `tok`), serving BIG: (daemon, commit, the
    weights' path, their bytes, their blob id)."""
    base = {"NODECACHE_PARALLEL_TOTAL": "4", "NODECACHE_PARALLEL_PER_BLOB": "4"}
    base.update(NODECACHE_CLUSTER_TOKEN="tok", NODECACHE_PEERS="127.0.0.1:9")
    daemon = daemons([BIG], env={**base, **env})
    commit = hub.commits[BIG]
    weights = snapshot_dir(daemon, BIG, commit) / "weights.bin"
    return daemon, commit, weights, (big_repo / "weights.bin").read_bytes(), os.readlink(weights).rsplit("/", 1)[1]


# ---- through the mount -------------------------------------------------------------------------


def test_a_reader_is_served_while_the_fill_of_its_blob_holds_every_connection(hub, daemons, big_repo):
    # 4 slots: the whole-blob fill started by the open takes all 4 (no reader's request needs the
    # readers' reserve yet); those requests hang in the emulator until the test lets them go.
    held = [Fault("hold") for _ in range(4)]
    env = {
        "NODECACHE_PARALLEL_TOTAL": "4",
        "NODECACHE_PARALLEL_PER_BLOB": "4",
        "NODECACHE_READ_AHEAD_CHUNKS": "0",
        "NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false",  # config.json must not take one of the held requests
    }
    daemon = daemons([BIG], env=env)
    weights = snapshot_dir(daemon, BIG, hub.commits[BIG]) / "weights.bin"
    want = (big_repo / "weights.bin").read_bytes()
    hub.faults.extend(held)
    fd = os.open(weights, os.O_RDONLY)
    try:
        for f in held:
            assert f.reached.wait(30), "the fill of an open blob did not take every connection"
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(os.pread(fd, 4096, 60 * MiB + 5)))
        reader.start()
        reader.join(30)  # bounds a failure only: waiting for a slot it would hang
        assert got == [want[60 * MiB + 5 : 60 * MiB + 5 + 4096]], "the reader was served"
        assert not any(f.release.is_set() for f in held), "...while the fill's requests still hung"
        assert counter(daemon, "nodecache_read_wait_seconds_count") >= 1
    finally:
        for f in held:
            f.release.set()
        os.close(fd)
    wait_until(lambda: verified(weights), "the fill finished once released")
    assert weights.read_bytes() == want


def test_a_reader_waiting_for_a_verify_before_serve_proof_goes_before_background_fills(hub, daemons, small_repo):
    """A read of a verify_before_serve file waits for its whole-blob fill: every chunk of it is
    one a reader waits for, so its requests go first, as a lazy read's do, not behind (here:
    forever) background fills that hold every other connection."""
    held = [Fault("hold") for _ in range(3)]
    env = {
        "NODECACHE_PARALLEL_TOTAL": "4",
        "NODECACHE_PARALLEL_PER_BLOB": "4",
        "NODECACHE_READ_AHEAD_CHUNKS": "0",
        "NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false",
        "NODECACHE_VERIFY_BEFORE_SERVE": "org/small=model.safetensors",
    }
    daemon = daemons([BIG, SMALL], env=env)
    weights = snapshot_dir(daemon, BIG, hub.commits[BIG]) / "weights.bin"
    model = snapshot_dir(daemon, SMALL, hub.commits[SMALL]) / "model.safetensors"
    hub.faults.extend(held)
    fd = os.open(
        weights, os.O_RDONLY
    )  # the fill of weights.bin, open: 3 of its requests hang, the 4th slot runs on (the proof's requests take it back)
    got: list[bytes] = []
    try:
        for f in held:
            assert f.reached.wait(30), "the background fill did not start its requests"
        reader = threading.Thread(target=lambda: got.append(model.read_bytes()))
        reader.start()
        reader.join(15)  # bounds a failure only: behind the held requests it would wait for them
        assert got and not any(f.release.is_set() for f in held), "the proven file was served while they hung"
    finally:
        for f in held:
            f.release.set()
        os.close(fd)
    wait_until(lambda: verified(weights), "the background fill finished once released")
    assert got[0] == (small_repo / "model.safetensors").read_bytes()


def test_a_peer_filling_in_the_background_waits_behind_the_owner_s_readers(hub, daemons, big_repo):
    """The peer API: a chunk a peer's reader waits for is demand on the owner; a peer's
    background fill says so (background=1) and queues behind the owner's own fills."""
    held = [Fault("hold") for _ in range(4)]
    env = {"NODECACHE_READ_AHEAD_CHUNKS": "0", "NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false"}
    daemon, commit, weights, want, blob = _owner(hub, daemons, big_repo, **env)

    def peer_get(k: int, **extra: str) -> bytes:
        return _peer_chunk(daemon, blob, commit, k, **extra)

    hub.faults.extend(held)
    fd = os.open(weights, os.O_RDONLY)  # the owner's own whole-blob fill: its 4 requests hang
    try:
        for f in held:
            assert f.reached.wait(30), "the fill of an open blob did not take every slot"
        wait_until(lambda: daemon.status()["fills_inflight"] >= 4, "the fill's four requests in")
        got: list[bytes] = []
        behind = threading.Thread(target=lambda: got.append(peer_get(50, background="1")))
        behind.start()
        wait_until(lambda: daemon.status()["fills_inflight"] >= 5, "the peer's background chunk queued")
        assert peer_get(60) == want[60 * MiB : 61 * MiB], "a peer's reader is served at once"
        assert behind.is_alive() and not got, "the background request still waits for a slot"
    finally:
        for f in held:
            f.release.set()
        os.close(fd)
    behind.join(60)
    assert got == [want[50 * MiB : 51 * MiB]], "...and is served once the owner's fills move on"


def test_a_peer_s_background_fill_is_no_reader_of_the_owner(hub, daemons, big_repo):
    """A peer filling in the background (a cluster preload) is not a reader of the owner: its
    requests are no readers' requests, so the owner's own prefetch keeps the readers' reserve lent."""
    held = [Fault("hold") for _ in range(4)]
    daemon, commit, weights, want, blob = _owner(hub, daemons, big_repo, NODECACHE_FILL_RUN_CHUNKS="1")
    got: list[bytes] = []

    def peer_get() -> None:
        got.append(_peer_chunk(daemon, blob, commit, 70, background="1"))

    hub.faults.extend(held)
    peer = threading.Thread(target=peer_get)
    try:
        peer.start()
        assert held[0].reached.wait(30), "the peer's chunk is asked for (and hangs: the peer holds the blob)"
        _post_prefetch(daemon, BIG)
        for f in held[1:]:
            assert f.reached.wait(15), "the prefetch got fewer than the 3 connections the peer left it"
    finally:
        for f in held:
            f.release.set()
        peer.join(60)
    assert got == [want[70 * MiB : 71 * MiB]]
    wait_until(lambda: verified(weights), "the prefetch finished once released")
    assert weights.read_bytes() == want
