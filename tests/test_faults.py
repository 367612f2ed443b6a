"""Upstream failures: retried until the read's deadline, then EIO; the next read tries again."""

from __future__ import annotations

import errno
import time

import pytest
from conftest import BIG, SMALL, sha256_file, snapshot_dir

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
