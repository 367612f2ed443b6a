"""Upstream failures: retried until the read's deadline, then EIO; the next read tries again."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import BIG, SMALL, MiB, counter, sha256_file, snapshot_dir, verified, wait_until

from nodecache.testing.hub import Fault


def test_500_reset_and_truncation_are_retried(hub, daemons, big_repo):
    d = daemons(repos=(BIG,))
    hub.faults.extend(
        [Fault("500"), Fault("reset"), Fault("truncate"), Fault("500"), Fault("reset"), Fault("truncate")]
    )
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    assert sha256_file(path) == sha256_file(big_repo / "weights.bin")
    assert hub.faults == [], "every injected fault was hit"
    assert 'code="500"' in d.metrics()


def test_upstream_down_gives_eio_in_bounded_time_then_recovers(hub, daemons, small_repo):
    d = daemons(repos=(SMALL,), env={"NODECACHE_READ_TIMEOUT": "3"})
    path = snapshot_dir(d, SMALL, hub.commits[SMALL]) / "model.safetensors"
    hub.down = True
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        path.read_bytes()
    elapsed = time.monotonic() - t0
    assert e.value.errno == errno.EIO
    assert elapsed < 15, f"EIO must come within the bound, took {elapsed:.1f}s"
    hub.down = False
    assert sha256_file(path) == sha256_file(small_repo / "model.safetensors")
    assert 'nodecache_fuse_errors_total{errno="EIO"}' in d.metrics()


def test_wrong_ranges_and_ignored_ranges_never_reach_a_reader(hub, daemons, big_repo):
    """A response for another range (its Content-Range says so) is refused and retried; a
    200 with the whole file (Range ignored) is cut to the range asked for."""
    d = daemons(repos=(BIG,), env={"NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false"})  # the faults are for weights.bin
    hub.faults.extend([Fault("wrong_range"), Fault("whole"), Fault("wrong_range"), Fault("whole")])
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    assert sha256_file(path) == sha256_file(big_repo / "weights.bin")
    assert hub.faults == [], "every injected fault was hit"
    assert "wrong Content-Range" in d.log()
    wait_until(lambda: d.status()["blobs"]["complete"] == 1, "the blob proven")
    assert counter(d, "nodecache_verify_failures_total", source="upstream") == 0


@pytest.mark.parametrize(
    "kind, options",
    [("flip", {}), ("other_file", {}), ("flip", {"at": 100, "whole": True})],
    ids=["flipped-206", "other-file", "flipped-200"],
)
def test_corrupted_bytes_from_upstream_never_reach_a_verified_reader(hub, daemons, kind, options):
    """Bytes that look right (status, length, Content-Range) but are not. A file under
    verify_before_serve (here *.bin, as by default) is read only after its proof: the failed proof
    is counted, the blob fetched again, and the reader gets the right bytes. A prefetch ends
    ready only on a refetched, proven blob."""
    files = {"w.bin": os.urandom(4 * MiB), "w.safetensors": os.urandom(4 * MiB)}
    commit = hub.add_repo("org/corrupt", files)
    # chunk 0 asked first (one worker; the snapshot fill would give the opened weight file more)
    env = {"NODECACHE_VERIFY_BEFORE_SERVE": "*.bin", "NODECACHE_PARALLEL_PER_BLOB": "1"}
    env["NODECACHE_FILL_SNAPSHOT_ON_OPEN"] = "false"
    d = daemons(repos=("org/corrupt",), env=env)
    snap = snapshot_dir(d, "org/corrupt", commit)
    hub.faults.append(Fault(kind, **options))
    assert (snap / "w.bin").read_bytes() == files["w.bin"]
    assert hub.faults == [], "the fault was hit"
    assert counter(d, "nodecache_verify_failures_total", source="upstream") == 1
    hub.faults.append(Fault(kind, **options))  # now for the lazy file, filled by a prefetch
    cmd = [sys.executable, "-m", "nodecache", "prefetch", "org/corrupt", "--endpoint", d.url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ready: org/corrupt@main"), out.stderr
    assert hub.faults == [] and counter(d, "nodecache_verify_failures_total", source="upstream") == 2
    assert verified(snap / "w.safetensors") and (snap / "w.safetensors").read_bytes() == files["w.safetensors"]
    with urllib.request.urlopen(f"{d.url}/org/corrupt/resolve/main/w.safetensors", timeout=30) as r:
        assert r.read() == files["w.safetensors"]
