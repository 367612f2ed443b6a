"""Metadata at scale on a real mount: big folders, kernel caches, per-repo changes (issue 15).

The bench (bench/scale.py) carries the big N; these keep to a few thousand files
and check the behaviour the figures rest on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import socket
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import BIG, SMALL, MiB, counter, snapshot_dir
from test_node_ops import api
from test_updates import wait_for

from nodecache.index import Index
from nodecache.layout import FileEntry, RepoSpec, repo_folder_name
from nodecache.metrics import Metrics
from nodecache.repos import ensure_repo
from nodecache.testing.daemon import DaemonProcess, KeeperProcess
from nodecache.upstream import UpstreamError
from nodecache.upstream.hf import HfUpstream

REVISION, TREE = "/api/models/org/x/revision/main", "/api/models/org/x/tree/"


@contextlib.asynccontextmanager
async def stand_in_hub(routes: dict) -> AsyncIterator[str]:
    """A Hub stand-in answering `routes` (path -> aiohttp handler) on 127.0.0.1: its base URL."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


FLAT = "org/flat"
N_FLAT = 3000


def requests(d, op: str) -> float:
    return counter(d, "nodecache_fuse_requests_total", op=op)


def flat_repo(hub, tmp_path) -> str:
    src = tmp_path / "flat"
    (src / "data").mkdir(parents=True)
    for i in range(N_FLAT):
        (src / "data" / f"shard-{i:05d}.parquet").write_bytes(b"row %d\n" % i)
    return hub.add_repo(FLAT, src)


def test_big_folder_lists_every_entry_once_in_order(hub, daemons, tmp_path):
    """readdir continues from its offset over the folder's kept sorted names: many pages, no gap, no repeat."""
    commit = flat_repo(hub, tmp_path)
    d = daemons(repos=(FLAT,))
    folder = snapshot_dir(d, FLAT, commit) / "data"
    names = [e.name for e in os.scandir(folder)]  # READDIRPLUS pages of ~4 KiB
    assert names == [f"shard-{i:05d}.parquet" for i in range(N_FLAT)]
    assert requests(d, "readdir") > 1, "a folder this big takes more than one reply: continued from an offset"
    data = b"row 42\n"
    oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's id of a small (non-LFS) file
    assert os.readlink(folder / "shard-00042.parquet") == "../../../blobs/" + oid
    assert (folder / "shard-00042.parquet").read_bytes() == data


def test_second_walk_of_a_snapshot_is_answered_by_the_kernel(hub, daemons, tmp_path):
    """Long entry/attr timeouts for snapshots/ and READDIRPLUS entries: a warm walk asks the daemon
    nothing about its entries, and nothing about the folders above them (hub/, the repo's, snapshots/,
    blobs/: kept a day too, dropped explicitly when the repo changes) even when it starts after the
    1 s the kernel kept those before. The walked entries are held (O_PATH) while it runs: memory
    pressure from other processes cannot make the kernel forget them."""
    commit = flat_repo(hub, tmp_path)
    d = daemons(repos=(FLAT,))
    snap = snapshot_dir(d, FLAT, commit)

    def walk() -> int:
        n = 0
        for dirpath, dirnames, filenames in os.walk(snap):
            for name in dirnames + filenames:
                os.lstat(os.path.join(dirpath, name))
                n += 1
        return n

    assert walk() == N_FLAT + 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * N_FLAT)), hard))
    held = []
    try:
        for entry in os.scandir(snap / "data"):  # the link (its dentry, inode) and its blob's
            held += [os.open(entry.path, os.O_PATH | os.O_NOFOLLOW), os.open(entry.path, os.O_PATH)]
        time.sleep(1.5)  # past the 1 s timeout of what is not kept a day
        ops = ("lookup", "getattr", "readlink", "opendir", "readdir")
        before = {op: requests(d, op) for op in ops}
        assert walk() == N_FLAT + 1
        asked = {op: requests(d, op) - before[op] for op in ops}
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # data/'s listing came from the kernel's cache (its OPENDIR is ours); its GETATTR: listing it dropped its atime.
    # The kernel keeps link targets in its page cache, which reclaim shrinks on a machine whose page cache
    # is full (a fresh clone's suite after other runs: 4 of 3,000 links read again, each also dropping its
    # link's atime, so a GETATTR), and now and then asks again about some entries' attributes (2-161 of
    # 3,000 in 1 of ~8 runs on this VM, with no link read again, not explained yet; 68 links read again
    # once): up to a quarter is allowed, where short timeouts would ask about every entry.
    # The kernel's copy of a listing lives in the folder's page cache too: reclaimed, the folder is
    # read again (2 READDIRs for data/ in one fresh clone's suite), a few requests, not one per entry.
    few = N_FLAT // 4
    assert (asked["lookup"], asked["opendir"]) == (0, 2) and asked["readdir"] <= N_FLAT // 100, asked
    assert asked["readlink"] <= few and 1 <= asked["getattr"] <= 1 + asked["readlink"] + few, asked


def test_a_walk_numbers_each_snapshot_folder_and_blob_list_once(hub, daemons, tmp_path):
    """Entries of a snapshot folder and blobs are numbered by ranges: a walk that follows every link
    (os.walk stats each) leaves a few rows in the inode table, not two per file; the next daemon
    (the connection handed over) serves the numbers the kernel holds."""
    import lmdb

    commit = flat_repo(hub, tmp_path)
    with KeeperProcess(tmp_path) as keeper:
        d = daemons(repos=(FLAT,), keeper=keeper)
        data = snapshot_dir(d, FLAT, commit) / "data"
        inos = {e.name: (e.stat(follow_symlinks=False).st_ino, e.stat().st_ino) for e in os.scandir(data)}
        assert len(inos) == N_FLAT and len({n for pair in inos.values() for n in pair}) == 2 * N_FLAT
        env = lmdb.open(str(d.cache_dir / "connection"), readonly=True, lock=False, max_dbs=6)
        with env.begin() as txn:
            rows = txn.stat(env.open_db(b"by_path", txn=txn, create=False))["entries"]
        env.close()
        assert rows < 20, f"{rows} inode rows for a walk of {N_FLAT} files"
        d.stop()
        d.start()
        assert "took over the connection" in d.log()
        for i in (0, 1234, N_FLAT - 1):  # the kernel opens the numbers it holds: the new daemon finds them
            assert (data / f"shard-{i:05d}.parquet").read_bytes() == b"row %d\n" % i
        assert {e.name: (e.stat(follow_symlinks=False).st_ino, e.stat().st_ino) for e in os.scandir(data)} == inos
        d.stop()


def test_ls_of_a_folder_bigger_than_one_reply_stats_from_the_listing(hub, daemons, tmp_path):
    """Every listing reply carries attributes (READDIRPLUS, not READDIRPLUS_AUTO, which sends them
    with the first reply only): `ls -l` of a folder needing several replies asks no LOOKUP per entry."""
    n = 7000  # ~6,000 entries fill a 1 MiB READDIRPLUS reply
    src = tmp_path / "wide"
    (src / "data").mkdir(parents=True)
    for i in range(n):
        (src / "data" / f"shard-{i:05d}.parquet").write_bytes(b"%d" % i)
    commit = hub.add_repo("org/wide", src)
    d = daemons(repos=("org/wide",))
    folder = snapshot_dir(d, "org/wide", commit) / "data"
    lookups, readdirs = requests(d, "lookup"), requests(d, "readdir")
    names = os.listdir(folder)
    assert len(names) == n and requests(d, "readdir") - readdirs > 1, "more than one reply"
    assert all(stat.S_ISLNK(os.lstat(folder / name).st_mode) for name in names)
    asked = requests(d, "lookup") - lookups
    assert asked < 10, f"{asked:.0f} lookups to lstat {n} listed entries"


def test_a_repo_added_while_mounted_appears_and_the_others_keep_their_caches(hub, daemons):
    d = daemons(repos=(SMALL,))
    small = snapshot_dir(d, SMALL, hub.commits[SMALL])
    assert (small / "config.json").exists()
    assert repo_folder_name("model", BIG) not in os.listdir(d.hub)
    lookups = requests(d, "lookup")
    status, job = api(d, "POST", "/v1/prefetch", {"repo": BIG})
    assert status in (200, 202), job
    assert repo_folder_name("model", BIG) in os.listdir(d.hub)
    assert os.path.getsize(snapshot_dir(d, BIG, hub.commits[BIG]) / "config.json") == 2
    assert (d.hub / ".locks" / repo_folder_name("model", BIG)).is_dir()
    seen = requests(d, "lookup")
    assert (small / "config.json").exists()
    assert requests(d, "lookup") == seen, "adding a repo leaves the kernel's entries of the others alone"
    assert seen > lookups


def test_a_moved_ref_makes_the_kernel_look_the_repo_up_again(hub, daemons, small_repo, tmp_path):
    """FUSE_NOTIFY_INVAL_ENTRY on the repo folder: its cached dentries (a day long) go, refs/main reads the new commit."""
    d = daemons(repos=(SMALL,), env={"NODECACHE_REF_TTL": "1"})
    old = hub.commits[SMALL]
    repo_dir = d.hub / repo_folder_name("model", SMALL)
    assert (snapshot_dir(d, SMALL, old) / "config.json").exists()
    lookups = requests(d, "lookup")
    assert (snapshot_dir(d, SMALL, old) / "config.json").exists()
    assert requests(d, "lookup") == lookups, "cached: no lookup"
    new = hub.add_repo(SMALL, {"config.json": b'{"v": 2}'})
    assert wait_for(lambda: (repo_dir / "refs" / "main").read_text() == new)
    assert sorted(os.listdir(repo_dir / "snapshots")) == sorted([old, new])
    lookups = requests(d, "lookup")
    assert (snapshot_dir(d, SMALL, old) / "config.json").exists()
    assert requests(d, "lookup") > lookups, "the repo's dentries were dropped with the ref move"


def test_cached_xattr_of_hub_and_repo_folders(hub, daemons):
    d = daemons(repos=(SMALL, BIG), env={"NODECACHE_FILL_ON_OPEN": "false"})
    repo = d.hub / repo_folder_name("model", SMALL)
    assert float(os.getxattr(repo, "user.nodecache.cached")) == 0.0
    (snapshot_dir(d, SMALL, hub.commits[SMALL]) / "config.json").read_bytes()
    part = float(os.getxattr(repo, "user.nodecache.cached"))
    assert 0 < part < 1
    whole = float(os.getxattr(d.hub, "user.nodecache.cached"))
    assert 0 < whole < part, "hub/ counts the big repo too"
    assert float(os.getxattr(d.hub / ".locks", "user.nodecache.cached")) == 1.0
    snap = snapshot_dir(d, SMALL, hub.commits[SMALL])
    assert os.getxattr(snap, "user.nodecache.cached") == os.getxattr(repo, "user.nodecache.cached")
    for dirpath, _, filenames in os.walk(snap):  # every blob of the repo read, so stored and proven
        for name in filenames:
            (Path(dirpath) / name).read_bytes()
    assert wait_for(lambda: os.getxattr(repo, "user.nodecache.cached") == b"1.000000")
    assert os.getxattr(snap, "user.nodecache.cached") == b"1.000000"
    assert os.getxattr(d.mount, "user.nodecache.cached") == os.getxattr(d.hub, "user.nodecache.cached")
    assert float(os.getxattr(d.hub, "user.nodecache.cached")) < 1, "the big repo is not read"


def test_cached_xattr_of_a_snapshot_reads_its_counters_not_its_files(tmp_path):
    """`user.nodecache.cached` on a snapshot's folder: the fraction of its blobs' bytes stored, below
    1 while one is not proven, from the index's per-snapshot counters: no blob record is read."""
    from nodecache.fusefs import ROOT_INODE, XATTR_CACHED, NodecacheFS
    from nodecache.index import BlobRecord
    from nodecache.inodes import InodeTable
    from nodecache.layout import FileEntry
    from nodecache.tree import HubTree

    class NoRecords:
        """A filler whose record reads fail the test; nothing is filling."""

        class store:
            @staticmethod
            def filling() -> list:
                return []

        def record(self, blob_id: str):
            raise AssertionError(f"read the record of {blob_id}")

    index = Index(tmp_path / "index", map_size=1 << 28)
    try:
        n, commits = 20_000, ("a" * 40, "b" * 40)
        bid = lambda i: hashlib.sha256(b"%d" % i).hexdigest()  # noqa: E731
        for c, first, complete in ((commits[0], 0, lambda i: i % 3 == 0), (commits[1], n, lambda i: True)):
            recs = [
                BlobRecord(bid(first + i), 100 + i, "sha256", MiB, state="complete" if complete(i) else "partial")
                for i in range(n)
            ]
            index.blobs.add(recs)
            files = [FileEntry(f"d{i // 100}/f{i}", r.size, r.blob_id) for i, r in enumerate(recs)]
            index.snapshots.put("dataset", "org/big", c, files)
        index.refs.put("dataset", "org/big", "main", commits[0])
        fs = NodecacheFS(HubTree(index), NoRecords(), Metrics(), InodeTable(tmp_path / "inodes"))

        async def cached(commit: str) -> bytes:
            ino = ROOT_INODE
            for name in ("hub", repo_folder_name("dataset", "org/big"), "snapshots", commit):
                ino = (await fs.lookup(ino, name.encode())).ino
            return await fs.getxattr(ino, XATTR_CACHED)

        sizes = [100 + i for i in range(n)]
        part = sum(s for i, s in enumerate(sizes) if i % 3 == 0) / sum(sizes)
        assert asyncio.run(cached(commits[0])) == f"{part:.6f}".encode()
        assert asyncio.run(cached(commits[1])) == b"1.000000"
    finally:
        index.close()


def test_requests_about_a_snapshot_folders_entries_read_its_block_once(tmp_path):
    """The requests of a cold walk (READLINK and GETATTR of each link, LOOKUP of its blob) find the
    folder's entries from the table the first request made, not from the tree's block cache each
    time, also while the repo is re-resolved unchanged (a restart re-resolves every repo in the
    background); the answers are the same as a fresh face's (numbers included)."""
    from nodecache.fusefs import ROOT_INODE, NodecacheFS
    from nodecache.index import BlobRecord
    from nodecache.inodes import InodeTable
    from nodecache.layout import FileEntry
    from nodecache.tree import HubTree

    index = Index(tmp_path / "index", map_size=1 << 28)
    try:
        n, commit = 2000, "c" * 40
        recs = [BlobRecord(hashlib.sha256(b"%d" % i).hexdigest(), 10 + i, "sha256", MiB) for i in range(n)]
        index.blobs.add(recs)
        index.snapshots.put(
            "model",
            "org/walked",
            commit,
            [FileEntry(f"p{i // 100}/f{i}", 10 + i, r.blob_id) for i, r in enumerate(recs)],
        )
        index.refs.put("model", "org/walked", "main", commit)

        async def walk(fs: NodecacheFS, count: list[int] | None = None) -> list:
            repo = (
                await fs.lookup(
                    (await fs.lookup(ROOT_INODE, b"hub")).ino, repo_folder_name("model", "org/walked").encode()
                )
            ).ino
            blobs = (await fs.lookup(repo, b"blobs")).ino
            snap = (await fs.lookup((await fs.lookup(repo, b"snapshots")).ino, commit.encode())).ino
            folders = [a.ino for _, a in await fs.readdir(snap, 0)]
            seen = []
            for folder in folders:
                entries = list(await fs.readdir(folder, 0))
                if count is not None:
                    count[0] = 0  # from here: the walk's requests about this folder's entries
                for name, a in entries:
                    fs.repo_changed("model", "org/walked")  # re-resolved meanwhile, unchanged: nothing dropped
                    target = await fs.readlink(a.ino)
                    blob = await fs.lookup(blobs, target.rsplit(b"/", 1)[1])
                    seen.append((name, a.ino, target, blob.ino, blob.size, (await fs.getattr(a.ino)).size))
                if count is not None:
                    assert count[0] <= 3, f"{count[0]} block reads for the {len(entries)} entries of a folder"
            return seen

        fs = NodecacheFS(HubTree(index), None, Metrics(), InodeTable(tmp_path / "inodes"))
        count, get = [0], fs.tree.blocks.get
        fs.tree.blocks.get = lambda key, load: count.__setitem__(0, count[0] + 1) or get(key, load)
        seen = asyncio.run(walk(fs, count))
        assert len(seen) == n
        fresh = NodecacheFS(HubTree(index), None, Metrics(), fs.table)  # the next daemon, the same numbers
        assert asyncio.run(walk(fresh)) == seen
    finally:
        index.close()


def test_restart_shows_indexed_repos_without_waiting_on_the_upstream(hub, daemons, tmp_path):
    """The index is enough to mount: configured repos are re-resolved in the background."""
    d = daemons(repos=(SMALL,))
    snap = snapshot_dir(d, SMALL, hub.commits[SMALL])
    want = (snap / "config.json").read_bytes()
    assert d.stop() == 0
    silent = socket.socket()  # accepts connections (the kernel does) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with DaemonProcess(tmp_path / "again", url, [SMALL], cache_dir=d.cache_dir, env=d.env) as d2:
            assert (snapshot_dir(d2, SMALL, hub.commits[SMALL]) / "config.json").read_bytes() == want
            assert "cannot resolve upstream" not in d2.log(), "mounted while the re-resolution still waits"
    finally:
        silent.close()


def test_a_big_repo_is_read_in_tree_pages_once_per_commit(hub, tmp_path):
    """The revision document names the commit; the file list comes from the paginated tree
    API (1,000 entries a page) only for a commit the index lacks: a re-resolution lists nothing."""
    commit = flat_repo(hub, tmp_path)
    index = Index(tmp_path / "index", map_size=256 * MiB)

    async def resolve_twice() -> tuple[dict, dict]:
        async with aiohttp.ClientSession() as session:
            hf = HfUpstream(hub.url, session, Metrics())
            spec = RepoSpec("model", FLAT)
            assert (await ensure_repo(index, hf, MiB, spec)).commit == commit
            first = dict(hub.stats.requests)
            assert (await ensure_repo(index, hf, MiB, spec)).commit == commit
            return first, dict(hub.stats.requests)

    try:
        first, second = asyncio.run(resolve_twice())
        files = index.snapshots.get("model", FLAT, commit)
        assert sorted(f.path for f in files) == [f"data/shard-{i:05d}.parquet" for i in range(N_FLAT)]
        assert first.get("tree") == 4, "3,000 files and their folder: four pages"
        assert second.get("tree") == first.get("tree") and second["api"] == first["api"] + 1
        assert index.counts.blob_states()["partial"] == N_FLAT
    finally:
        index.close()


@pytest.mark.parametrize(
    "link, page, error",
    [
        ('<http://127.0.0.2:9/api/models/org/x/tree/c?cursor=1>; rel="next"', None, "is not on"),  # another origin
        (
            None,
            [{"type": "file", "oid": "a" * 40, "size": 1, "path": "ok"}, {"type": "file", "path": "../x"}],
            "invalid",
        ),
        (None, [{"type": "file", "oid": "a" * 40, "size": 1, "path": "twice"}] * 2, "listed twice"),
        pytest.param(None, b"[" * 100_000 + b"]" * 100_000, "invalid tree page: RecursionError", id="nested"),
    ],
)
def test_a_hostile_tree_listing_records_nothing(tmp_path, link, page, error):
    """A next page off the Hub's origin (our token would go with it), a bad entry on a later page,
    a path listed twice, a page nested too deep for the JSON parser: an UpstreamError, and no
    blob record, snapshot or ref of it."""
    commit = "c" * 40
    good = [{"type": "file", "oid": "b" * 40, "size": 5, "path": "first.txt"}]

    async def revision(request: web.Request) -> web.Response:
        return web.json_response({"_id": "x", "id": "org/x", "sha": commit, "private": False, "gated": False})

    async def tree(request: web.Request) -> web.Response:
        if "cursor" not in request.query:
            nxt = link or f'<http://{request.host}{request.path}?cursor=1>; rel="next"'
            return web.json_response(good, headers={"Link": nxt})
        return web.Response(body=page) if isinstance(page, bytes) else web.json_response(page)

    async def run() -> None:
        async with stand_in_hub({REVISION: revision, TREE + commit: tree}) as url:
            async with aiohttp.ClientSession() as session:
                hf = HfUpstream(url, session, Metrics(), token="secret")
                with pytest.raises(UpstreamError, match=error):
                    await ensure_repo(index, hf, MiB, RepoSpec("model", "org/x"))

    index = Index(tmp_path / "index", map_size=64 * MiB)
    try:
        asyncio.run(run())
        assert index.blobs.all() == [] and index.snapshots.commits("model", "org/x") == []
        assert index.refs.get("model", "org/x", "main") is None
    finally:
        index.close()


def test_tree_pages_asks_one_page_ahead_and_cancels_it_when_the_listing_stops(hub, tmp_path):
    """The next page is on its way while one is parsed (the Hub makes it meanwhile); never two
    ahead, and a listing closed early leaves no request running."""
    flat_repo(hub, tmp_path)

    async def run() -> tuple[int, int]:
        async with aiohttp.ClientSession() as session:
            res = await HfUpstream(hub.url, session, Metrics()).resolve("model", FLAT, "main")
            pages = res.pages()
            assert len(await anext(pages)) == 999, "1,000 entries, one of them the folder"
            for _ in range(1000):  # the second page's request reaches the Hub while we hold the first
                if hub.stats.requests["tree"] >= 2:
                    break
                await asyncio.sleep(0.01)
            ahead = hub.stats.requests["tree"]
            await pages.aclose()
            return ahead, hub.stats.requests["tree"]

    before = hub.stats.requests["tree"]
    ahead, after = asyncio.run(run())
    assert (ahead - before, after - before) == (2, 2)


def test_a_tree_page_over_its_bound_is_refused(hub, tmp_path, monkeypatch):
    from nodecache.upstream import hftree

    flat_repo(hub, tmp_path)
    monkeypatch.setattr(hftree, "_MAX_PAGE_BYTES", 10_000)  # a Hub page of 1,000 entries is ~0.2 MB
    index = Index(tmp_path / "index", map_size=64 * MiB)

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(UpstreamError, match="a tree page of more than 10000 bytes"):
                await ensure_repo(index, HfUpstream(hub.url, session, Metrics()), MiB, RepoSpec("model", FLAT))

    try:
        asyncio.run(run())
        assert index.blobs.all() == [] and not index.snapshots.has_repo("model", FLAT)
    finally:
        index.close()


def test_register_names_each_blob_by_its_first_file_and_refuses_an_unknown_hash_kind(tmp_path):
    """Records are written in blob id order (a batch per run of the table), one per blob, named
    by the first file listing it, as in listing order; a kind no proof knows records nothing."""
    from nodecache.repos import register
    from nodecache.upstream import RemoteFile, Resolved

    index = Index(tmp_path / "index", map_size=64 * MiB)
    ids = [hashlib.sha1(b"%d" % i).hexdigest() for i in range(25_000)]
    files = [RemoteFile(FileEntry(f"d{i % 7}/f{i}", i, ids[i % 20_000]), "gitsha1") for i in range(25_000)]
    try:
        asyncio.run(register(index, MiB, "model", "org/m", "main", Resolved("1" * 40, files)))
        recs = {r.blob_id: r for r in index.blobs.all()}
        assert len(recs) == 20_000 and index.counts.blob_states()["partial"] == 20_000
        assert all(recs[ids[i]].path == f"d{i % 7}/f{i}" and recs[ids[i]].size == i for i in range(20_000))
        assert index.snapshots.get("model", "org/m", "1" * 40) == [f.entry for f in files]
        bad = [RemoteFile(FileEntry("a", 1, "2" * 40), "gitsha1"), RemoteFile(FileEntry("b", 1, "3" * 40), "md5")]
        with pytest.raises(UpstreamError, match="hash kind 'md5'"):
            asyncio.run(register(index, MiB, "model", "org/x", "main", Resolved("2" * 40, bad)))
        assert not index.blobs.has("2" * 40) and not index.snapshots.has_repo("model", "org/x")
    finally:
        index.close()


def test_a_small_repos_resolution_is_one_index_commit(hub, tmp_path):
    """Each commit syncs the index: a first resolution of a small repo writes its records,
    snapshot, visibility and ref in one (it was four), a re-resolution its visibility and ref in
    one (it was two). 1,000 small repos made a start wait on thousands of syncs."""
    index = Index(tmp_path / "index", map_size=64 * MiB)

    def txn_id() -> int:
        return index.env.info()["last_txnid"]

    async def resolve() -> None:
        async with aiohttp.ClientSession() as session:
            await ensure_repo(index, HfUpstream(hub.url, session, Metrics()), MiB, RepoSpec("model", SMALL))

    try:
        first = txn_id()
        asyncio.run(resolve())
        second = txn_id()
        asyncio.run(resolve())
        assert (second - first, txn_id() - second) == (1, 1)
        assert index.refs.commit_of("model", SMALL, "main") in index.snapshots.commits("model", SMALL)
        assert index.repo_meta.get("model", SMALL)["visibility"] == "public"
    finally:
        index.close()


def test_resolutions_commit_together_and_a_failing_one_is_undone_alone(tmp_path):
    """Registrations that finish while a commit runs share the next one (in a thread: each commit
    syncs the index); a write that fails is undone alone and its caller hears why; once closed,
    nothing more is written."""
    from nodecache.repos import Commits, register
    from nodecache.upstream import RemoteFile, Resolved

    index = Index(tmp_path / "index", map_size=64 * MiB)

    async def run() -> tuple[int, list]:
        commits = Commits(index)
        snaps = [
            Resolved(f"{i:040x}", [RemoteFile(FileEntry(f"f{i}", i, f"{i + 100:040x}"), "gitsha1")]) for i in range(8)
        ]
        first = index.env.info()["last_txnid"]
        await asyncio.gather(
            *(register(index, MiB, "model", f"org/m{i}", "main", res, commits=commits) for i, res in enumerate(snaps))
        )
        together = index.env.info()["last_txnid"] - first

        def failing(txn) -> None:
            index.repo_meta.put_in(txn, "model", "org/bad", "public")
            raise ValueError("boom")

        def fine(txn) -> None:
            index.repo_meta.put_in(txn, "model", "org/ok", "public")

        results = await asyncio.gather(commits(failing), commits(fine), return_exceptions=True)
        await commits.close()
        with pytest.raises(UpstreamError, match="stopping"):
            await commits(fine)
        return together, results

    try:
        together, results = asyncio.run(run())
        assert together < 8, f"{together} commits for 8 registrations"
        for i in range(8):
            assert index.refs.commit_of("model", f"org/m{i}", "main") == f"{i:040x}"
            assert index.blobs.get(f"{i + 100:040x}").path == f"f{i}"
        assert isinstance(results[0], ValueError) and results[1] is None
        assert index.repo_meta.get("model", "org/bad") is None and index.repo_meta.get("model", "org/ok") is not None
    finally:
        index.close()


def test_a_revision_document_nested_too_deep_is_an_upstream_error(tmp_path):
    """json.loads of "[[[[…" raises RecursionError, which is no ValueError: the Hub's answer is
    refused as any bad answer is (UpstreamError), not raised to the caller as something else."""

    async def revision(request: web.Request) -> web.Response:
        return web.Response(body=b"[" * 100_000 + b"]" * 100_000, content_type="application/json")

    async def run() -> None:
        async with stand_in_hub({REVISION: revision}) as url:
            async with aiohttp.ClientSession() as session:
                hf = HfUpstream(url, session, Metrics())
                with pytest.raises(UpstreamError, match="RecursionError"):
                    await ensure_repo(index, hf, MiB, RepoSpec("model", "org/x"))

    index = Index(tmp_path / "index", map_size=64 * MiB)
    try:
        asyncio.run(run())
        assert index.snapshots.commits("model", "org/x") == [] and index.refs.get("model", "org/x", "main") is None
    finally:
        index.close()


def test_a_cursor_of_empty_tree_pages_is_refused_at_the_first(tmp_path):
    """A page holds at least one entry: a Hub answering empty pages that each name a next one
    would otherwise be asked up to _MAX_PAGES (2x10^6) times before the listing failed."""
    commit = "c" * 40
    asked: list[str] = []

    async def revision(request: web.Request) -> web.Response:
        return web.json_response({"_id": "x", "id": "org/x", "sha": commit, "private": False, "gated": False})

    async def tree(request: web.Request) -> web.Response:
        asked.append(request.query.get("cursor", ""))
        if len(asked) > 50:
            return web.json_response({"error": "enough"}, status=500)
        page = [{"type": "file", "oid": "b" * 40, "size": 5, "path": "first.txt"}] if len(asked) == 1 else []
        return web.json_response(
            page, headers={"Link": f'<http://{request.host}{request.path}?cursor={len(asked)}>; rel="next"'}
        )

    async def run() -> None:
        async with stand_in_hub({REVISION: revision, TREE + commit: tree}) as url:
            async with aiohttp.ClientSession() as session:
                hf = HfUpstream(url, session, Metrics())
                with pytest.raises(UpstreamError, match="an empty tree page with a next page"):
                    await ensure_repo(index, hf, MiB, RepoSpec("model", "org/x"))

    index = Index(tmp_path / "index", map_size=64 * MiB)
    try:
        asyncio.run(run())
        assert len(asked) <= 3, f"{len(asked)} pages asked: the first, the empty one and at most one ahead"
        assert index.blobs.all() == [] and index.snapshots.commits("model", "org/x") == []
    finally:
        index.close()


def test_a_folder_too_deep_for_an_index_key_is_refused_before_anything_is_recorded(tmp_path):
    """A folder's block is keyed `<snapshot key>/<folder path>`, and LMDB keys are at most 511
    bytes: a deeper folder (a name may be 4,096 bytes) failed the snapshot's write with lmdb's
    BadValsizeError after the first batches of records were written. It is refused with the
    listing's other checks; a folder that fills its room exactly is stored and read back."""
    from nodecache.index.keys import MAX_KEY, folder_room
    from nodecache.repos import register
    from nodecache.upstream import RemoteFile, Resolved

    def folder(n: int) -> str:  # a folder path of n bytes, in names of at most 200
        out = "a" * 200
        while len(out) < n:
            out += "/" + "b" * min(200, n - len(out) - 1)
        return out

    room = folder_room("model", "org/m")
    index = Index(tmp_path / "index", map_size=256 * MiB)
    try:
        assert index.env.max_key_size() == MAX_KEY
        many = [RemoteFile(FileEntry(f"d/f{i}", 1, f"{i + 1:040x}"), "gitsha1") for i in range(10_001)]
        deep = RemoteFile(FileEntry(folder(room + 1) + "/x", 1, "f" * 40), "gitsha1")
        with pytest.raises(UpstreamError, match=f"a folder path longer than {room} bytes"):
            asyncio.run(register(index, MiB, "model", "org/m", "main", Resolved("1" * 40, [*many, deep])))
        assert index.blobs.all() == [] and not index.snapshots.has_repo("model", "org/m")

        fits = RemoteFile(FileEntry(folder(room) + "/x", 1, "f" * 40), "gitsha1")
        asyncio.run(register(index, MiB, "model", "org/m", "main", Resolved("1" * 40, [many[0], fits])))
        assert index.snapshots.folder("model", "org/m", "1" * 40, folder(room)) is not None
        assert index.refs.get("model", "org/m", "main") == "1" * 40
    finally:
        index.close()


def test_a_hub_that_compresses_what_the_client_accepts_is_read(tmp_path):
    """A CDN in front of the Hub gzips JSON for a client that accepts it, and aiohttp offers
    gzip by default; the daemon's session does not decompress (it relays bytes as they came),
    so its metadata requests accept only identity, or each answer is gzip read as JSON."""
    commit = "c" * 40
    encodings: list[str] = []

    def compressed(doc: object, headers: dict | None = None) -> web.Response:
        resp = web.json_response(doc, headers=headers)
        resp.enable_compression()  # as the client's Accept-Encoding allows
        return resp

    async def revision(request: web.Request) -> web.Response:
        encodings.append(request.headers.get("Accept-Encoding", ""))
        return compressed({"_id": "x", "id": "org/x", "sha": commit, "private": False, "gated": False})

    async def tree(request: web.Request) -> web.Response:
        encodings.append(request.headers.get("Accept-Encoding", ""))
        if "cursor" not in request.query:
            nxt = f'<http://{request.host}{request.path}?cursor=1>; rel="next"'
            return compressed([{"type": "file", "oid": "b" * 40, "size": 5, "path": "a.txt"}], {"Link": nxt})
        return compressed([{"type": "file", "oid": "d" * 40, "size": 7, "path": "b/c.txt"}])

    async def run() -> None:
        async with stand_in_hub({REVISION: revision, TREE + commit: tree}) as url:
            async with aiohttp.ClientSession(auto_decompress=False) as session:  # as the daemon's
                hf = HfUpstream(url, session, Metrics())
                assert (await ensure_repo(index, hf, MiB, RepoSpec("model", "org/x"))).commit == commit

    index = Index(tmp_path / "index", map_size=64 * MiB)
    try:
        asyncio.run(run())
        assert encodings == ["identity"] * 3
        files = index.snapshots.get("model", "org/x", commit)
        assert files == [FileEntry("a.txt", 5, "b" * 40), FileEntry("b/c.txt", 7, "d" * 40)]
    finally:
        index.close()
