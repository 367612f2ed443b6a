"""FUSE passthrough: complete blobs are read by the kernel straight from the store file."""

from __future__ import annotations

import os
import time

import machine
import numpy as np
import pytest
from conftest import BIG, SMALL, MiB, counter, sha256_file, snapshot_dir
from safetensors.numpy import load_file


def passthrough_daemon(daemons, **kw):
    """A daemon on a machine whose kernel has passthrough: it must use it (decided from the
    kernel, not from what the daemon reports, so a regression fails instead of skipping)."""
    if reason := machine.passthrough():
        pytest.skip(reason)
    # These tests count complete blobs: only the files they read may complete (no snapshot fill).
    kw["env"] = {"NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false", **kw.get("env", {})}
    d = daemons(**kw)
    assert d.status()["passthrough"] is True, f"this kernel has FUSE passthrough; the daemon did not use it:\n{d.log()}"
    return d


def wait_complete(d, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while d.status()["blobs"].get("complete", 0) < n:
        assert time.monotonic() < deadline, f"blobs never completed: {d.status()['blobs']}"
        time.sleep(0.05)


def opens(d, mode: str) -> float:
    return counter(d, "nodecache_fuse_opens_total", mode=mode)


def fuse_reads(d) -> float:
    return counter(d, "nodecache_fuse_requests_total", op="read")


def test_complete_blob_is_read_by_the_kernel(hub, daemons, small_repo):
    d = passthrough_daemon(daemons, repos=(SMALL,))
    snap = snapshot_dir(d, SMALL, hub.commits[SMALL])
    path = snap / "model.safetensors"
    assert sha256_file(path) == sha256_file(small_repo / "model.safetensors")  # first open: served, fills
    wait_complete(d, 1)
    before_opens, before_reads = opens(d, "passthrough"), fuse_reads(d)
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert sha256_file(path) == sha256_file(small_repo / "model.safetensors")
    want = load_file(str(small_repo / "model.safetensors"))
    got = load_file(str(path))  # mmap of a passthrough file
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert opens(d, "passthrough") >= before_opens + 2
    assert fuse_reads(d) == before_reads, "the daemon served reads of a passthrough file"


def test_many_open_files_share_one_backing_file(hub, daemons, small_repo):
    """The kernel refuses a second backing file for one inode (EBUSY, seen as EIO by open)."""
    d = passthrough_daemon(daemons, repos=(SMALL,))
    path = snapshot_dir(d, SMALL, hub.commits[SMALL]) / "model.safetensors"
    want = (small_repo / "model.safetensors").read_bytes()
    assert path.read_bytes() == want
    wait_complete(d, 1)
    files = [open(path, "rb") for _ in range(8)]
    try:
        for i, f in enumerate(files):
            f.seek(i * 1000)
            assert f.read(4096) == want[i * 1000 : i * 1000 + 4096]
    finally:
        for f in files:
            f.close()
    assert opens(d, "passthrough") >= 8
    assert path.read_bytes() == want  # the backing id was dropped with the last close; a new one works


def test_open_while_filling_stays_cached_until_closed(hub, daemons, big_repo):
    """The kernel refuses (EIO) to mix modes on one inode: new opens follow the live ones."""
    d = passthrough_daemon(daemons, repos=(BIG,))
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    want = sha256_file(big_repo / "weights.bin")
    with open(path, "rb") as first:
        assert len(first.read(MiB)) == MiB  # served; the whole blob fills in the background
        wait_complete(d, 1)
        served = opens(d, "served")
        assert sha256_file(path) == want  # a second open while the first is live
        assert opens(d, "served") == served + 1
        first.seek(0)
        assert len(first.read()) == 72 * MiB
    passthrough = opens(d, "passthrough")
    assert sha256_file(path) == want
    assert opens(d, "passthrough") == passthrough + 1


def test_passthrough_can_be_turned_off(hub, daemons, small_repo):
    d = daemons(repos=(SMALL,), env={"NODECACHE_PASSTHROUGH": "false"})
    assert d.status()["passthrough"] is False
    path = snapshot_dir(d, SMALL, hub.commits[SMALL]) / "config.json"
    assert path.read_bytes() == (small_repo / "config.json").read_bytes()
    wait_complete(d, 1)
    assert path.read_bytes() == (small_repo / "config.json").read_bytes()
    assert opens(d, "passthrough") == 0 and opens(d, "served") == 2
