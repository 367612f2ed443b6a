"""Snapshot-aware fill: opening one shard fills the snapshot's small files, then the other shards.

The plan (snapplan) is pure and tested directly; the rest with the Hub
emulator and a real FUSE mount, waiting on events (status fields, xattrs),
never on sleeps.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import MiB, cached_share, in_page_cache, need_direct_io, snapshot_dir, verified, wait_until
from safetensors.numpy import save_file

from nodecache.layout import FileEntry
from nodecache.snapplan import first_weight, index_files, opened_in, read_ahead, shard_order, siblings, small_files

SHARDED = "org/sharded"
C = "a" * 40


def _entry(path: str, size: int = 1000) -> FileEntry:
    return FileEntry(path, size, format(abs(hash(path)), "x").rjust(40, "0")[:40])


# ---- the plan (pure) -----------------------------------------------------------------------


def test_opened_in_names_the_repo_and_the_snapshot_if_it_was_opened_by_its_path():
    assert opened_in(f"hub/models--org--m/blobs/{'b' * 64}") == ("model", "org/m", None)
    assert opened_in(f"hub/datasets--org--d/snapshots/{C}/sub/x.bin") == ("dataset", "org/d", C)
    for bad in ("hub/models--org--m/refs/main", "hub/models--org--m/snapshots/main/x.bin", "hub/nope/blobs/x", "x"):
        assert opened_in(bad) is None, bad


def _fill_order(files: list[FileEntry], opened: str, indexes: dict[str, bytes]) -> list[FileEntry]:
    """The siblings in the order the snapshot fill takes them: after the opened one, then before it."""
    after, before = siblings(files, opened, indexes)
    return after + before


def test_siblings_follow_the_index_order_starting_after_the_opened_shard():
    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    files = [_entry(s, 100 * MiB) for s in shards]
    files += [_entry("config.json", 500), _entry("model.safetensors.index.json", 3000), _entry("tokenizer.json", 9e6)]
    files += [_entry("model.fp16-00001-of-00002.safetensors"), _entry("pytorch_model.bin", 400 * MiB)]
    files += [_entry("images/sample.png", 2 * MiB), _entry("big.parquet", 500 * MiB)]
    index = {"weight_map": {"a": shards[2], "b": shards[0], "c": shards[2], "d": shards[3], "e": shards[1]}}
    raw = json.dumps(index).encode()
    assert shard_order(raw) == [shards[2], shards[0], shards[3], shards[1]]
    got = _fill_order(files, shards[2], {"model.safetensors.index.json": raw})
    assert [f.path for f in got] == [shards[0], shards[3], shards[1]], "after the opened one, index order"
    got = _fill_order(files, shards[0], {"model.safetensors.index.json": raw})
    assert [f.path for f in got] == [shards[3], shards[1], shards[2]], "wraps around to those before it"
    # Without an index: the same series in name order; other formats and precisions never.
    assert [f.path for f in _fill_order(files, shards[1], {})] == [shards[2], shards[3], shards[0]]
    assert _fill_order(files, "pytorch_model.bin", {"model.safetensors.index.json": raw}) == []
    # Small files: root and the opened file's folder, no weights, smallest first; indexes among them.
    assert [f.path for f in small_files(files, shards[0])] == [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    assert [f.path for f in index_files(files, shards[0])] == ["model.safetensors.index.json"]


@pytest.mark.parametrize(
    "raw", [b"", b"[]", b'{"weight_map": []}', b'{"weight_map": {"a": 1}}', b"\xff\xfe", b'{"x": {}}']
)
def test_a_malformed_index_means_name_order(raw):
    assert shard_order(raw) == []
    files = [_entry(f"m-0000{i}-of-00003.safetensors") for i in (1, 2, 3)]
    got = _fill_order(files, "m-00001-of-00003.safetensors", {"m.safetensors.index.json": raw})
    assert [f.path for f in got] == ["m-00002-of-00003.safetensors", "m-00003-of-00003.safetensors"]


def test_the_weight_file_a_loader_opens_first_after_config_json():
    shards = [_entry(f"model-0000{i}-of-00003.safetensors") for i in (3, 1, 2)]
    others = [_entry("config.json"), _entry("model.fp16-00001-of-00002.safetensors"), _entry("pytorch_model.bin")]
    others += [_entry("sub/model.safetensors"), _entry("model-00001-of-00003.bin")]
    assert first_weight(shards + others).path == "model-00001-of-00003.safetensors", "the series' first, by name"
    assert first_weight([*shards, *others, _entry("model.safetensors")]).path == "model.safetensors"
    # Another format, precision or folder: which one a loader picks is not known from its config.
    assert first_weight(others) is None and first_weight([]) is None
    assert first_weight([_entry("model-0001-of-0002.gguf"), _entry("consolidated.safetensors")]) is None


# ---- a sharded model through the mount ----------------------------------------------------


def test_read_ahead_takes_the_next_shards_that_fit_in_the_budget_together():
    from itertools import accumulate

    files = [_entry("a", 300), _entry("b", 300), _entry("c", 300), _entry("d", 100), _entry("e", 10)]
    ends = list(accumulate((f.size for f in files), initial=0))

    def ahead(at: int, budget: int) -> list[str]:
        return [f.path for f in files[at + 1 : read_ahead(ends, at, budget)]]

    assert ahead(0, 600) == ["b", "c"]
    assert ahead(0, 700) == ["b", "c", "d"], "in order: nothing skipped to fit"
    assert ahead(1, 400) == ["c", "d"] and ahead(3, 10**9) == ["e"] and ahead(4, 10**9) == []
    assert ahead(0, 299) == [] and ahead(0, 0) == []
    assert read_ahead([0, 300, 300], 0, 0) == 1, "0 turns it off, even for an empty shard next"
    assert read_ahead([0, 300, 300], 0, 1) == 2, "an empty shard fits in any other budget"


@pytest.fixture(scope="module")
def sharded_repo(tmp_path_factory):
    """Four real safetensors shards of ~3 MiB whose index lists them out of name order."""
    d = tmp_path_factory.mktemp("sharded")
    rng = np.random.default_rng(3)
    names = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    order = [names[2], names[0], names[3], names[1]]
    weight_map = {}
    for i, name in enumerate(names):
        save_file({f"t{i}": rng.standard_normal(786_000, dtype=np.float32)}, str(d / name))
    for j, name in enumerate(order):
        weight_map[f"layer.{j}.weight"] = name
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text('{"model_type": "sharded"}')
    (d / "tokenizer.json").write_text(json.dumps({"vocab": list(range(20_000))}))
    return d, names, order


def _first_requests(hub, blob_ids: dict[str, str]) -> list[str]:
    """File names in the order the emulator first saw a data request for each."""
    names = {b: n for n, b in blob_ids.items()}
    return list(dict.fromkeys(names[b] for b, _, _ in list(hub.stats.ranges) if b in names))


def _blob_ids(snap) -> dict[str, str]:
    return {p.name: os.readlink(p).rsplit("/", 1)[1] for p in snap.iterdir()}


def test_opening_one_shard_fills_small_files_then_the_others_in_index_order(hub, daemons, sharded_repo):
    d, names, order = sharded_repo
    commit = hub.add_repo(SHARDED, d)
    # One whole-blob fill at a time (2 slots / 2 per blob): the order the emulator sees is the plan's.
    env = {"NODECACHE_PARALLEL_TOTAL": "2", "NODECACHE_PARALLEL_PER_BLOB": "2"}
    daemon = daemons([SHARDED], env=env)
    snap = snapshot_dir(daemon, SHARDED, commit)
    ids = _blob_ids(snap)
    hub.stats.reset()
    with open(snap / order[0], "rb") as f:  # the loader opens the index's first shard, reads its header
        assert len(f.read(8)) == 8
    wait_until(lambda: verified(snap), "the whole snapshot filled and proven")
    seen = _first_requests(hub, ids)
    small = ["config.json", "model.safetensors.index.json", "tokenizer.json"]
    others = [n for n in seen if n != order[0]]
    assert sorted(others[:3]) == small, f"small files before any other shard: {seen}"
    assert others[3:] == order[1:], f"the other shards in index order: {seen}"
    for n in names:
        assert (snap / n).read_bytes() == (d / n).read_bytes()


def test_the_shard_read_now_and_the_one_read_next_fill_alone_with_the_background_connections(
    hub, daemons, sharded_repo
):
    """Shards filling side by side (parallel_per_blob each) would finish together, after the loader
    opened them: the opened one, then the next, gets every background connection, so it is complete
    first."""
    d, names, order = sharded_repo
    commit = hub.add_repo(SHARDED, d)
    env = {"NODECACHE_CHUNK_SIZE": str(256 * 1024), "NODECACHE_PARALLEL_TOTAL": "8", "NODECACHE_PARALLEL_PER_BLOB": "2"}
    daemon = daemons([SHARDED], env={**env, "NODECACHE_READ_AHEAD_CHUNKS": "1"})  # the opened shard's: its workers
    snap = snapshot_dir(daemon, SHARDED, commit)
    ids = _blob_ids(snap)
    hub.stats.reset()
    hub.rate_limit_bps = 4_000_000  # ~65 ms per chunk: the requests of one shard overlap
    try:
        with open(snap / order[0], "rb") as f:
            assert len(f.read(8)) == 8
        wait_until(lambda: verified(snap), "the whole snapshot filled and proven")
    finally:
        hub.rate_limit_bps = None
    peaks = {n: hub.stats.peak.get(ids[n], 0) for n in order}
    asked = [b for b, _, _ in list(hub.stats.ranges)]
    last_opened = len(asked) - 1 - asked[::-1].index(ids[order[0]])
    # The opened shard, which is being read, is asked for before the next one; only its last round
    # overlaps: each worker asks for its next run as its last one's end is on its way (a follow-up,
    # sent as that connection frees), and the next shard's first runs follow connections freed first.
    overlap = asked[:last_opened].count(ids[order[1]])
    assert overlap < 7, f"{overlap} requests of the next shard went before the opened one's last"
    # 8 slots = 8 workers for each shard, the opened one first (12 chunks
    # each); with parallel_per_blob (2) workers a shard sees at most 4 responses at once (each worker
    # asks for its next chunk as the last bytes of the one before are sent).
    assert all(peaks[n] >= 5 for n in order), f"more than parallel_per_blob (2) workers at once: {peaks}"
    for n in names:
        assert (snap / n).read_bytes() == (d / n).read_bytes()


def test_a_shard_opened_while_its_snapshot_fills_gets_the_background_connections_too(hub, daemons, sharded_repo):
    """Two readers (two ranks) open two shards at once: the one opened second is read now too, so
    its fill gets the background connections as the first one's does, not parallel_per_blob's,
    while the plan's shards nobody reads yet wait (here the second is the plan's last)."""
    d, names, order = sharded_repo
    commit = hub.add_repo(SHARDED, d)
    env = {
        "NODECACHE_CHUNK_SIZE": str(256 * 1024),
        "NODECACHE_PARALLEL_TOTAL": "8",
        "NODECACHE_PARALLEL_PER_BLOB": "1",
        "NODECACHE_READ_AHEAD_CHUNKS": "0",
    }
    daemon = daemons([SHARDED], env=env)
    snap = snapshot_dir(daemon, SHARDED, commit)
    ids = _blob_ids(snap)
    first, second = order[0], order[3]
    hub.stats.reset()
    hub.rate_limit_bps = 2_000_000  # ~130 ms per chunk: the requests of one shard overlap
    fds = []
    try:
        for name in (first, second):
            fds.append(os.open(snap / name, os.O_RDONLY))
            os.posix_fadvise(fds[-1], 0, 0, os.POSIX_FADV_RANDOM)  # one page asked: the fills do the rest
            assert len(os.pread(fds[-1], 8, 0)) == 8
        wait_until(lambda: verified(snap / first), "the first opened shard filled and proven")
        peak = hub.stats.peak.get(ids[second], 0)
        wait_until(lambda: verified(snap), "the whole snapshot filled and proven")
    finally:
        hub.rate_limit_bps = None
        for fd in fds:
            os.close(fd)
    # One worker (parallel_per_blob) asks for at most 2 chunks at once (the next as the last bytes
    # of the one before are sent); the plan gets to the second shard only after two other shards.
    assert peak >= 3, f"the second opened shard had {peak} responses at once while the first filled"
    for n in names:
        assert (snap / n).read_bytes() == (d / n).read_bytes()


def test_complete_shards_the_loader_reads_next_are_read_into_the_page_cache_ahead_of_it(hub, daemons, sharded_repo):
    """Whole-blob fills write around the page cache, so a shard complete before its open would
    be read from the disk at the loader's pace: the shards after the newest one opened are read
    into it ahead, as far as shard_read_ahead goes (here two shards)."""
    d, names, order = sharded_repo
    commit = hub.add_repo(SHARDED, d)
    size = (d / order[1]).stat().st_size
    daemon = daemons([SHARDED], env={"NODECACHE_SHARD_READ_AHEAD": str(2 * size + size // 2)})
    need_direct_io(daemon.cache_dir)
    snap = snapshot_dir(daemon, SHARDED, commit)
    ids = _blob_ids(snap)
    blob = {n: daemon.cache_dir / "blobs" / ids[n][:2] / ids[n] for n in names}
    with open(snap / order[0], "rb") as f:  # the loader opens the index's first shard
        assert len(f.read(8)) == 8
    wait_until(lambda: verified(snap), "the whole snapshot filled and proven")
    for n in order[1:3]:
        wait_until(lambda n=n: cached_share(blob[n], 0, size) >= 0.5, f"{n} read into the page cache")
    assert not in_page_cache(blob[order[3]], 0, MiB), "the shard past shard_read_ahead is left on the disk"
    with open(snap / order[1], "rb") as f:  # the loader goes on to the next shard
        assert f.read() == (d / order[1]).read_bytes()
    wait_until(lambda: cached_share(blob[order[3]], 0, size) >= 0.5, "the window moved on with the reader")
    for n in names:
        assert (snap / n).read_bytes() == (d / n).read_bytes()


def test_opening_config_json_fills_the_weight_file_a_loader_opens_first(hub, daemons, sharded_repo):
    """A loader reads config.json seconds before the weights (an engine starts its GPUs in
    between): the first shard (name order: the index is not read yet) fills from then on, and
    nothing else until a weight file is opened; that open plans the rest as before."""
    d, names, order = sharded_repo
    commit = hub.add_repo(SHARDED, d)
    daemon = daemons([SHARDED])
    snap = snapshot_dir(daemon, SHARDED, commit)
    ids = _blob_ids(snap)
    hub.stats.reset()
    assert (snap / "config.json").read_bytes() == (d / "config.json").read_bytes()
    wait_until(lambda: verified(snap / names[0]), "the first shard filled and proven")
    wait_until(lambda: (s := daemon.status())["blobs_filling"] == 0 and s["fills_inflight"] == 0, "a quiet node")
    assert sorted(_first_requests(hub, ids)) == ["config.json", names[0]], "the first shard and nothing else"
    with open(snap / order[0], "rb") as f:  # the loader opens the index's first shard
        assert len(f.read(8)) == 8
    wait_until(lambda: verified(snap), "the whole snapshot filled and proven")
    for n in names:
        assert (snap / n).read_bytes() == (d / n).read_bytes()


def test_a_config_json_starts_one_first_shard_at_a_time_and_only_a_models():
    """Configs read at once fill one first shard; a config.json in a folder, of a dataset, or
    beside no `model*.safetensors` starts nothing; a blob the snapshot lists as its root's
    config.json does, wherever its record says it was first seen."""
    import asyncio

    from nodecache.config import Config
    from nodecache.index import BlobRecord

    layouts = {
        "org/a": [_entry("config.json", 10), _entry("model-00001-of-00002.safetensors"), _entry("x-a")],
        "org/b": [_entry("config.json", 20), _entry("model.safetensors"), _entry("x-b")],
        "org/c": [_entry("sub/config.json", 30), _entry("sub/model.safetensors"), _entry("model.gguf")],
        "org/d": [_entry("config.json", 40), _entry("pytorch_model.bin"), _entry("model.fp16.safetensors")],
        "org/e": [_entry("config.json", 50), _entry("model.safetensors", 60)],
    }
    # The bytes of org/c's sub/config.json are org/f's root config.json: its record names where it was seen first.
    layouts["org/f"] = [
        FileEntry("config.json", 30, layouts["org/c"][0].blob_id),
        _entry("model-001-of-002.safetensors"),
    ]
    records: dict[str, BlobRecord] = {}
    for r, files in layouts.items():
        for f in files:
            records.setdefault(
                f.blob_id, BlobRecord(f.blob_id, f.size, "sha256", MiB, repo_id=r, commit=C, path=f.path)
            )
    index = SimpleNamespace(
        refs=SimpleNamespace(of=lambda repo_type, repo_id: {"main": C}),
        snapshots=SimpleNamespace(get=lambda repo_type, repo_id, commit: layouts[repo_id]),
    )
    started: list[str] = []

    async def main() -> None:
        running = asyncio.get_running_loop().create_future()

        def start(blob_id: str, n: int | None) -> asyncio.Future:
            started.append(blob_id)
            assert n == Config().parallel_total, "a worker per slot, as the shard a loader opens"
            return running

        fills = SnapshotFills(Config(), index, start, None, records.get, None, None)
        config = {r: files[0].blob_id for r, files in layouts.items()}
        assert fills.opened("model", "org/a", config["org/a"]) is running
        assert fills.opened("model", "org/b", config["org/b"]) is None, "one first shard at a time"
        running.set_result(None)
        assert fills.opened("model", "org/b", config["org/b"]) is None, "looked at once a while per blob"
        assert fills.opened("dataset", "org/a", config["org/a"]) is None
        for r in ("org/c", "org/d"):
            assert fills.opened("model", r, config[r]) is None, r
        off = SnapshotFills(Config(fill_snapshot_on_open=False), index, start, None, records.get, None, None)
        assert off.opened("model", "org/e", config["org/e"]) is None
        assert started == [layouts["org/a"][1].blob_id]
        assert fills.opened("model", "org/e", config["org/e"]) is running, "once the one before ended"
        assert started == [layouts["org/a"][1].blob_id, layouts["org/e"][1].blob_id]
        assert fills.opened("model", "org/f", config["org/f"]) is running, "listed as the root's config.json"
        assert started[-1] == layouts["org/f"][1].blob_id

    from nodecache.snapfill import SnapshotFills

    asyncio.run(main())


def test_the_shards_of_a_model_larger_than_the_cache_are_filled_only_as_they_are_read(hub, daemons, sharded_repo):
    """4 x 3 MiB into 8 MiB: filled ahead of the loader, the shards would evict those it has not read yet."""
    d, names, order = sharded_repo
    commit = hub.add_repo(SHARDED, d)
    daemon = daemons([SHARDED], env={"NODECACHE_DISK_MAX": str(8 * MiB), "NODECACHE_MIN_FREE": "0"})
    snap = snapshot_dir(daemon, SHARDED, commit)
    ids = _blob_ids(snap)
    hub.stats.reset()
    with open(snap / order[0], "rb") as f:
        assert len(f.read(8)) == 8
    wait_until(lambda: verified(snap / order[0]), "the opened shard filled and proven")
    wait_until(lambda: "its weights do not fit this node's cache" in daemon.log(), "the plan said why")
    wait_until(lambda: (s := daemon.status())["blobs_filling"] == 0 and s["fills_inflight"] == 0, "a quiet node")
    assert not set(_first_requests(hub, ids)) & set(order[1:]), "no other shard was fetched"
    assert (snap / order[1]).read_bytes() == (d / order[1]).read_bytes(), "read, it is filled"


def test_fill_snapshot_on_open_false_fills_only_what_is_opened(hub, daemons, sharded_repo):
    d, names, order = sharded_repo
    commit = hub.add_repo(SHARDED, d)
    daemon = daemons([SHARDED], env={"NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false"})
    snap = snapshot_dir(daemon, SHARDED, commit)
    ids = _blob_ids(snap)
    hub.stats.reset()
    assert (snap / names[0]).read_bytes() == (d / names[0]).read_bytes()
    wait_until(lambda: verified(snap / names[0]), "the opened shard filled and proven")
    wait_until(lambda: (s := daemon.status())["blobs_filling"] == 0 and s["fills_inflight"] == 0, "a quiet node")
    assert _first_requests(hub, ids) == [names[0]], "nothing but the opened file was fetched"


def test_an_open_reads_no_file_list_unless_it_may_be_a_weight_file_of_a_snapshot_not_planned_lately():
    """A dataset opens 10^5-10^6 files: an open of a blob recorded under a non-weight name, or of a
    snapshot planned in the last minute, must not read (decode) the snapshot's whole file list."""
    import asyncio

    from nodecache.config import Config
    from nodecache.index import BlobRecord
    from nodecache.snapfill import SnapshotFills

    files = [_entry(f"data/part-{i:05d}.parquet") for i in range(50)] + [
        _entry(f"model-0000{i}-of-00002.safetensors", 10 * MiB) for i in (1, 2)
    ]
    records = {
        f.blob_id: BlobRecord(f.blob_id, f.size, "sha256", MiB, repo_id="org/d", commit=C, path=f.path) for f in files
    }

    class Refs:
        def of(self, repo_type, repo_id):
            return {"main": C}

    class Snapshots:
        def get(self, repo_type, repo_id, commit):
            Index.file_lists_read += 1
            return files

    class Index:
        file_lists_read = 0
        refs, snapshots = Refs(), Snapshots()

    started: list[str] = []

    async def claimed(blob_id: str) -> None:
        return None

    async def main() -> None:
        fills = SnapshotFills(Config(), Index(), lambda b, n: started.append(b), claimed, records.get, None, None)
        for f in files[:50]:
            assert fills.opened("model", "org/d", f.blob_id) is None
        assert Index.file_lists_read == 0, "parquet opens read no file list"
        task = fills.opened("model", "org/d", files[50].blob_id)
        assert task is not None and Index.file_lists_read == 1
        await task
        assert fills.opened("model", "org/d", files[51].blob_id) is None
        assert Index.file_lists_read == 1, "the snapshot was planned a moment ago: no second read"
        assert files[51].blob_id in started

    asyncio.run(main())


def _fills(files: list[FileEntry], **cfg):
    """SnapshotFills over a snapshot whose blobs are all complete (a prefetch), on the
    running loop; the blob ids it warms, in order, and those whose record it looks up."""
    from nodecache.config import Config
    from nodecache.index import BlobRecord
    from nodecache.snapfill import SnapshotFills

    records = {
        f.blob_id: BlobRecord(
            f.blob_id, f.size, "sha256", MiB, state="complete", repo_id="org/d", commit=C, path=f.path
        )
        for f in files
    }

    index = SimpleNamespace(
        refs=SimpleNamespace(of=lambda repo_type, repo_id: {"main": C}),
        snapshots=SimpleNamespace(get=lambda repo_type, repo_id, commit: files),
    )

    async def claimed(blob_id: str) -> None:
        return None

    warmed: list[str] = []
    asked: list[str] = []

    def record(blob_id: str) -> BlobRecord | None:
        asked.append(blob_id)
        return records.get(blob_id)

    async def warm(blob_id: str) -> None:
        warmed.append(blob_id)

    fills = SnapshotFills(Config(**cfg), index, lambda b, n: None, claimed, record, None, warm)
    return fills, warmed, asked


def test_the_read_ahead_does_not_wrap_to_the_shards_before_the_one_that_planned_it():
    """A load that takes longer than a minute has its snapshot planned again at the shard opened
    then: the shards before it in loader order were read already. They are filled last (another
    loader may come), but not read into the page cache ahead of this one."""
    import asyncio

    files = [_entry(f"model-0000{i}-of-00006.safetensors", 10 * MiB) for i in range(1, 7)]
    ids = [f.blob_id for f in files]

    async def main() -> None:
        fills, warmed, _ = _fills(files, shard_read_ahead=1 << 30)
        await fills.opened("model", "org/d", ids[3])
        fills.opened("model", "org/d", ids[5])  # the loader opens the last shard
        await asyncio.gather(*fills.tasks())
        assert warmed == ids[4:], "only the shards after the one opened, in loader order"

    asyncio.run(main())


def test_a_mirror_client_moves_no_read_ahead_window_a_reader_of_the_mount_does():
    """A mirror download's client keeps its own copy: the shards after it are filled, not read
    into this node's page cache; a loader opening one through the mount starts the window."""
    import asyncio

    files = [_entry(f"model-0000{i}-of-00004.safetensors", 10 * MiB) for i in range(1, 5)]
    ids = [f.blob_id for f in files]

    async def main() -> None:
        fills, warmed, _ = _fills(files, shard_read_ahead=1 << 30)
        await fills.opened("model", "org/d", ids[0], reads_here=False)
        fills.opened("model", "org/d", ids[1], reads_here=False)
        await asyncio.gather(*fills.tasks())
        assert warmed == [], "nothing read ahead for mirror clients"
        fills.opened("model", "org/d", ids[2])  # a loader on this node
        await asyncio.gather(*fills.tasks())
        assert warmed == ids[3:]

    asyncio.run(main())


def test_shard_read_ahead_0_reads_nothing_ahead():
    """0 turns it off: an empty shard fits in 0 bytes, but nothing is read ahead."""
    import asyncio

    files = [_entry(f"model-0000{i}-of-00003.safetensors", size) for i, size in ((1, MiB), (2, 0), (3, MiB))]

    async def main() -> None:
        fills, warmed, _ = _fills(files, shard_read_ahead=0)
        await fills.opened("model", "org/d", files[0].blob_id)
        await asyncio.gather(*fills.tasks())
        assert warmed == []

    asyncio.run(main())


def test_each_open_costs_the_read_ahead_the_shards_it_brings_into_the_window_not_the_window():
    """A repo may list 10^5 tiny shards of one series, all in the window: a loader opening them
    one after another must not make each open look over the window (or the series) again."""
    import asyncio

    n = 3000
    files = [_entry(f"m-{i:05d}-of-{n:05d}.safetensors", 1000) for i in range(1, n + 1)]
    ids = [f.blob_id for f in files]

    async def main() -> None:
        fills, warmed, asked = _fills(files)
        await fills.opened("model", "org/d", ids[0])
        for b in ids[1:]:
            fills.opened("model", "org/d", b)
        await asyncio.gather(*fills.tasks())
        assert sorted(warmed) == sorted(ids[1:]), "every shard read ahead once"
        assert len(asked) <= 3 * n, f"{len(asked)} record lookups for {n} opens"

    asyncio.run(main())
