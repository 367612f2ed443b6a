"""The FUSE face's caches of a walk (issue 15) against a real mount, served in-process: what the
kernel keeps and what the face keeps, when repos come and go, and what they hold in memory."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import machine
import pytest
from conftest import SMALL, MiB
from test_updates import wait_for

from nodecache.folders import Block
from nodecache.fusefs import NodecacheFS
from nodecache.fusesession import Session
from nodecache.index import BlobRecord, Index
from nodecache.inodes import InodeTable
from nodecache.layout import FileEntry, repo_folder_name
from nodecache.metrics import Metrics
from nodecache.testing.daemon import KeeperProcess
from nodecache.tree import HubTree


def _commit(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def _put_repo(index: Index, repo_id: str, n: int) -> str:
    """A model repo of `n` one-byte files, 100 per folder, its `main` at a commit of its own."""
    recs = [BlobRecord(hashlib.sha256(f"{repo_id}/{i}".encode()).hexdigest(), 1, "sha256", MiB) for i in range(n)]
    index.blobs.add(recs)
    commit = _commit(repo_id)
    index.snapshots.put(
        "model", repo_id, commit, [FileEntry(f"d{i // 100}/f{i}", 1, r.blob_id) for i, r in enumerate(recs)]
    )
    index.refs.put("model", repo_id, "main", commit)
    return commit


def _serve(tmp_path: Path, index: Index, cache_bytes: int, work: Callable[[NodecacheFS, Path], None]) -> None:
    """Mount the index's tree at tmp_path/mnt and run `work(fs, mount)` in a thread (the loop serves)."""
    reason = machine.fuse()
    if reason:
        pytest.skip(reason)
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    async def main() -> None:
        table = InodeTable(tmp_path / "inodes")
        fs = NodecacheFS(HubTree(index, cache_bytes), None, Metrics(), table)
        session = Session(fs, mnt, table, passthrough=False)
        session.mount()
        serving = asyncio.get_running_loop().create_task(session.serve())
        try:
            await asyncio.to_thread(work, fs, mnt)
        finally:
            await session.unmount()
            await serving
            table.close()

    asyncio.run(main())


def test_a_repo_looked_up_before_it_existed_shows_once_it_does(tmp_path):
    """A lookup answered ENOENT is not kept by the kernel (hub/ and a repo's folder are kept a day,
    what is not there is not): the name shows as soon as the tree has it, even before (or without)
    the explicit invalidation of its entry."""
    index = Index(tmp_path / "index", map_size=1 << 28)
    try:
        _put_repo(index, "org/early", 10)

        def work(fs: NodecacheFS, mnt: Path) -> None:
            late = mnt / "hub" / repo_folder_name("model", "org/late")
            assert (mnt / "hub" / repo_folder_name("model", "org/early") / "snapshots").is_dir()
            for _ in range(2):
                assert not late.exists() and not (late / "snapshots").exists()
            commit = _put_repo(index, "org/late", 10)
            assert fs.repo_changed("model", "org/late") is not None  # the kernel is not told
            assert os.readlink(late / "snapshots" / commit / "d0" / "f3").endswith(
                index.snapshots.get("model", "org/late", commit)[3].blob_id
            )
            assert sorted(os.listdir(late / "snapshots")) == [commit]

        _serve(tmp_path, index, 1 << 20, work)
    finally:
        index.close()


def _blocks(*held) -> dict[int, Block]:
    """The distinct blocks below these containers (tables, lists of (commit, block), blocks)."""
    found: dict[int, Block] = {}

    def visit(x) -> None:
        if isinstance(x, Block):
            found[id(x)] = x
        elif hasattr(x, "block"):
            visit(x.block)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, list | tuple):
            for v in x:
                visit(v)

    for x in held:
        visit(x)
    return found


def test_a_walk_of_many_repos_keeps_the_blocks_it_holds_bounded_in_bytes(tmp_path):
    """The tree keeps folder blocks within its cache's bytes; the FUSE face's own tables (the last
    folders' and repos' blob lists, kept for the next requests of a walk) hold blocks beyond it, and
    those are bounded in bytes too, not in count: a walk of many big repos (huggingface_hub's
    scan_cache_dir stats every blob of every repo) leaves at most that much behind."""
    index = Index(tmp_path / "index", map_size=1 << 28)
    repos, n, cache = 10, 3000, 400_000  # each repo's blob list: 135 kB (under half the cache); all: 1.35 MB
    try:
        for r in range(repos):
            _put_repo(index, f"org/r{r}", n)

        def work(fs: NodecacheFS, mnt: Path) -> None:
            listed = 0
            for r in range(repos):
                repo = mnt / "hub" / repo_folder_name("model", f"org/r{r}")
                for blob in sorted(os.listdir(repo / "blobs"))[:50]:
                    assert os.stat(repo / "blobs" / blob).st_size == 1
                    listed += 1
                snap = repo / "snapshots" / _commit(f"org/r{r}")
                for folder in sorted(os.listdir(snap))[:3]:
                    for name in os.listdir(snap / folder):
                        assert os.stat(snap / folder / name).st_size == 1  # follows the link: a blob's LOOKUP
            assert listed == 50 * repos
            tree = _blocks(list(fs.tree.blocks._blocks.values()))
            face = _blocks(list(fs._tables.values()), list(fs._commit_blobs.values()))
            beyond = sum(b.nbytes() for i, b in face.items() if i not in tree)
            assert sum(b.nbytes() for b in tree.values()) <= cache
            assert beyond <= cache, f"the FUSE face holds {beyond} bytes of blocks beyond the tree's {cache}"

        _serve(tmp_path, index, cache, work)
    finally:
        index.close()


def test_kept_tables_are_bounded_in_count_and_bytes_and_a_big_one_is_kept_alone():
    from nodecache.fusefs import _Kept

    kept = _Kept(3, 100, len)
    for key, size in (("a", 40), ("b", 40), ("c", 10)):
        kept.put(key, "x" * size)
    assert (len(kept), kept.nbytes) == (3, 90)
    kept.put("d", "x" * 30)  # over the bytes, and the count: the oldest go
    assert [kept.get(k) is not None for k in "abcd"] == [False, True, True, True] and kept.nbytes == 80
    kept.put("b", "x" * 5)  # put again: counted once
    assert kept.nbytes == 45 and len(kept) == 3
    kept.put("huge", "x" * 500)  # bigger than all: alone
    assert kept.values() == ["x" * 500] and kept.nbytes == 500
    kept.put("e", "x" * 10)
    assert kept.values() == ["x" * 10] and kept.nbytes == 10
    kept.clear()
    assert (len(kept), kept.nbytes, kept.get("e")) == (0, 0, None)


def test_a_failure_inside_a_metadata_handler_is_eio_and_the_mount_keeps_serving(tmp_path):
    """Metadata handlers run as their requests are read, on the session's loop, with no task of
    their own: one that fails (here a listing meeting an entry a tampered index made, past the
    handler's own guard, as the reply is packed) answers EIO, and the next requests are served."""
    from nodecache.folders import pack
    from nodecache.index.keys import repo_key

    index = Index(tmp_path / "index", map_size=1 << 28)
    try:
        commit = _put_repo(index, "org/tampered", 300)
        blob = bytes.fromhex(index.snapshots.get("model", "org/tampered", commit)[0].blob_id)
        with index.snapshots.db.write() as txn:  # d1/ lists a name no folder may hold
            key = repo_key("model", "org/tampered") + commit.encode() + b"/d1"
            txn.put(key, pack([(b"a/b", blob), (b"f100", blob)]), db=index.snapshots.folders)

        def work(fs: NodecacheFS, mnt: Path) -> None:
            snap = mnt / "hub" / repo_folder_name("model", "org/tampered") / "snapshots" / commit
            for _ in range(2):
                with pytest.raises(OSError) as e:
                    os.listdir(snap / "d1")
                assert e.value.errno == errno.EIO
                assert os.path.islink(snap / "d1" / "f100")  # a lookup of a good entry still answers
                assert len(os.listdir(snap / "d2")) == 100 and os.path.isfile(snap / "d2" / "f250")

        _serve(tmp_path, index, 1 << 20, work)
    finally:
        index.close()


@pytest.fixture
def keeper(tmp_path):
    with KeeperProcess(tmp_path) as k:
        yield k


def test_a_ref_moved_while_the_connection_was_handed_over_shows_the_new_commit(hub, keeper, daemons, small_repo):
    """The kernel keeps hub/, the repo's folder and snapshots/ a day: a ref that moved upstream
    while no daemon served (the next one re-resolves it in the background after taking the
    connection over) shows its new commit beside the old one, through the entries cached before."""
    d = daemons(keeper=keeper, repos=(SMALL,))
    old = hub.commits[SMALL]
    repo = d.hub / repo_folder_name("model", SMALL)
    assert (repo / "snapshots" / old / "config.json").read_bytes() == (small_repo / "config.json").read_bytes()
    assert os.listdir(repo / "snapshots") == [old]
    d.stop()
    new = hub.add_repo(SMALL, {"config.json": b'{"v": 2}'})
    d.start()
    assert "took over the connection" in d.log()
    assert wait_for(lambda: (repo / "refs" / "main").read_text() == new)
    assert sorted(os.listdir(repo / "snapshots")) == sorted([old, new])
    assert (repo / "snapshots" / new / "config.json").read_bytes() == b'{"v": 2}'
    assert (repo / "snapshots" / old / "config.json").read_bytes() == (small_repo / "config.json").read_bytes()
