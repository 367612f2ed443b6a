"""Metadata at scale on a real mount: big folders, kernel caches, per-repo changes (issue 15).

The bench (bench/scale.py) carries the big N; these keep to a few thousand files
and check the behaviour the figures rest on.
"""

from __future__ import annotations

import hashlib
import os
import socket

from conftest import BIG, SMALL, counter, snapshot_dir
from test_node_ops import api
from test_updates import wait_for

from nodecache.layout import repo_folder_name
from nodecache.testing.daemon import DaemonProcess

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
    """Long entry/attr timeouts for snapshots/ and READDIRPLUS entries: a warm walk asks the daemon ~nothing."""
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
    before = requests(d, "lookup") + requests(d, "getattr")
    assert walk() == N_FLAT + 1
    asked = requests(d, "lookup") + requests(d, "getattr") - before
    assert asked < 10, f"{asked:.0f} lookups/getattrs for {N_FLAT} cached entries"


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
