"""A real daemon, a real FUSE mount, real huggingface_hub and safetensors reading it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import BIG, SMALL, MiB, counter, sha256_file, snapshot_dir, verified, wait_until
from safetensors.numpy import load_file

from nodecache.layout import repo_folder_name

HF_SCRIPT = """
import json, sys
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download
repo = sys.argv[1]
out = {
    "snapshot": snapshot_download(repo, local_files_only=True),
    "config": hf_hub_download(repo, "config.json", local_files_only=True),
    "nested": hf_hub_download(repo, "tokenizer/vocab.txt", local_files_only=True),
}
info = scan_cache_dir()
out["repos"] = [[r.repo_id, r.size_on_disk, [rev.commit_hash for rev in r.revisions]] for r in info.repos]
out["warnings"] = [str(w) for w in info.warnings]
print(json.dumps(out))
"""


def run_hf_offline(hub_cache: Path, repo: str) -> dict:
    """huggingface_hub in its own process: the test process must stay a plain reader."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", HF_SCRIPT, repo], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_huggingface_hub_offline_reads_the_mount(hub, daemons, small_repo):
    d = daemons()
    commit = hub.commits[SMALL]
    got = run_hf_offline(d.hub, SMALL)
    snap = snapshot_dir(d, SMALL, commit)
    assert got["snapshot"] == str(snap)
    assert got["config"] == str(snap / "config.json")
    assert got["nested"] == str(snap / "tokenizer" / "vocab.txt")
    total = sum(p.stat().st_size for p in small_repo.rglob("*") if p.is_file())
    assert got["repos"] == [[SMALL, total, [commit]]]
    assert got["warnings"] == []
    # every byte through the mount equals the source
    for src in small_repo.rglob("*"):
        if src.is_file():
            assert sha256_file(snap / src.relative_to(small_repo)) == sha256_file(src)
    want = load_file(str(small_repo / "model.safetensors"))
    have = load_file(str(snap / "model.safetensors"))
    assert sorted(have) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(have[name], want[name])


def test_layout_on_the_mount(hub, daemons):
    d = daemons()
    repo_dir = d.hub / repo_folder_name("model", SMALL)
    commit = hub.commits[SMALL]
    assert sorted(os.listdir(d.hub)) == [".locks", "CACHEDIR.TAG", repo_folder_name("model", SMALL)]
    assert sorted(os.listdir(repo_dir)) == ["blobs", "refs", "snapshots"]
    assert (repo_dir / "refs" / "main").read_bytes() == commit.encode()  # no newline
    link = repo_dir / "snapshots" / commit / "tokenizer" / "vocab.txt"
    target = os.readlink(link)
    assert target.startswith("../../../blobs/") and os.path.realpath(link).startswith(str(repo_dir / "blobs"))
    st = os.stat(link)
    assert st.st_size == (d.hub.parent / "hub").joinpath(repo_dir, "blobs", target.rsplit("/", 1)[1]).stat().st_size
    assert (d.hub / ".locks" / repo_folder_name("model", SMALL)).is_dir()
    # the directories clients mkdir(exist_ok=True) already exist, so that passes on a read-only fs
    os.makedirs(repo_dir / "blobs", exist_ok=True)
    os.makedirs(d.hub / ".locks" / repo_folder_name("model", SMALL), exist_ok=True)


def test_lazy_fill_fetches_only_what_is_read(hub, daemons, small_repo):
    hub.stats.reset()
    d = daemons(repos=(SMALL, BIG))
    os.listdir(snapshot_dir(d, BIG, hub.commits[BIG]))
    os.stat(snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin")
    assert hub.stats.data_bytes == 0, "metadata alone must not fetch content"
    # Not config.json: its open starts the model's first weight file too (fill_snapshot_on_open).
    data = (snapshot_dir(d, SMALL, hub.commits[SMALL]) / "tokenizer" / "vocab.txt").read_bytes()
    assert data == (small_repo / "tokenizer" / "vocab.txt").read_bytes()
    fetched = {blob for blob, _, _ in hub.stats.ranges}
    assert len(fetched) == 1
    assert hub.stats.data_bytes == len(data)
    assert counter(d, "nodecache_upstream_bytes_total", upstream="hf") == len(data)
    assert counter(d, "nodecache_read_bytes_total", source="upstream") == len(data)


def test_coalescing_sixteen_cold_readers(hub, daemons, big_repo):
    hub.stats.reset()
    # Only the one blob's bytes, counted exactly: not the snapshot's config.json too.
    d = daemons(repos=(BIG,), env={"NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false"})
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    want = sha256_file(big_repo / "weights.bin")
    results: list[str] = []
    barrier = threading.Barrier(16)

    def reader() -> None:
        barrier.wait()
        results.append(sha256_file(path))

    threads = [threading.Thread(target=reader) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [want] * 16
    # The ranges tile the blob on chunk boundaries, each chunk in exactly one of them;
    # while readers have it open the background fill asks one chunk per request (a
    # run would land chunks out of the order they read them in).
    ranges = sorted((s, e) for blob, s, e in hub.stats.ranges if blob == want)
    size = 72 * MiB
    assert all(s % MiB == 0 and e - s == MiB for s, e in ranges)
    assert [b for _, b in ranges[:-1]] == [a for a, _ in ranges[1:]], "no chunk twice, none missing"
    assert ranges[0][0] == 0 and ranges[-1][1] == size, "each chunk exactly once"
    metrics = d.metrics()
    assert 'nodecache_upstream_bytes_total{upstream="hf"} 7.5497472e+07' in metrics


def test_writes_are_refused(hub, daemons):
    d = daemons()
    snap = snapshot_dir(d, SMALL, hub.commits[SMALL])
    for attempt in (
        lambda: open(snap / "new.txt", "w"),
        lambda: open(snap / "config.json", "w"),
        lambda: os.unlink(snap / "config.json"),
        lambda: os.chmod(snap / "config.json", 0o777),
        lambda: os.mkdir(snap / "newdir"),
        lambda: os.rename(snap / "config.json", snap / "c2.json"),
        lambda: (d.hub / repo_folder_name("model", SMALL) / "refs" / "main").write_text("x"),
    ):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)


@pytest.mark.parametrize("name", ["../../etc/passwd", "x" * 300, "models--..--x", "models--org--", "nope", "a\\b"])
def test_bad_names_are_enoent(hub, daemons, name):
    d = daemons()
    for parent in (
        d.hub,
        d.hub / repo_folder_name("model", SMALL) / "blobs",
        d.hub / repo_folder_name("model", SMALL) / "refs",
    ):
        with pytest.raises(OSError) as e:
            os.stat(parent / name)
        assert e.value.errno in (errno.ENOENT, errno.ENAMETOOLONG)


def test_lookup_handler_refuses_dot_dot_and_long_names(tmp_path):
    """The kernel resolves `..` itself; the handler must refuse it anyway (NFS export, bugs)."""
    import asyncio

    from nodecache.fusefs import ROOT_INODE, NodecacheFS
    from nodecache.fusesession import FuseError
    from nodecache.index import Index
    from nodecache.inodes import InodeTable
    from nodecache.metrics import Metrics
    from nodecache.tree import HubTree

    tree = HubTree(Index(tmp_path / "index"))
    fs = NodecacheFS(tree, filler=None, metrics=Metrics(), table=InodeTable(tmp_path / "inodes"))

    async def lookup(name: bytes) -> int:
        try:
            await fs.lookup(ROOT_INODE, name)
        except FuseError as e:
            return e.errno
        return 0

    assert asyncio.run(lookup(b"hub")) == 0
    for bad in (b"..", b".", b"x" * 300, b"hub/..", b"\xff\xfe"):
        assert asyncio.run(lookup(bad)) == errno.ENOENT, bad


def test_cached_xattr_and_metrics(hub, daemons, big_repo):
    d = daemons(env={"NODECACHE_FILL_ON_OPEN": "false"}, repos=(BIG,))
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    assert float(os.getxattr(path, "user.nodecache.cached")) == 0.0
    with open(path, "rb") as f:
        f.read(MiB)
    frac = float(os.getxattr(path, "user.nodecache.cached"))
    assert 0 < frac < 1, "one chunk plus read-ahead, not the whole blob"
    assert float(os.getxattr(snapshot_dir(d, BIG, hub.commits[BIG]), "user.nodecache.cached")) < 1
    assert sha256_file(path) == sha256_file(big_repo / "weights.bin")  # read everything
    wait_until(lambda: verified(path), "the whole-blob proof")  # 0.999 until then
    # all but config.json's 2 bytes: a partial snapshot never shows more than 99.9 %
    assert os.getxattr(snapshot_dir(d, BIG, hub.commits[BIG]), "user.nodecache.cached") == b"0.999000"


def test_read_ahead_is_raised_to_16_mib_after_init(daemons):
    """The INIT reply resets the mount's bdi read_ahead_kb (128 KiB reads); the daemon raises it after."""
    from nodecache import mounts

    d = daemons()
    dev = mounts.top(str(d.mount)).dev
    assert Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip() == "16384"
