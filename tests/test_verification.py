"""Verification that holds: failed proofs, the kernel's page cache, quarantine, retries, scrub.

Every test runs a real daemon with a real FUSE mount against the Hub emulator,
and waits for events (metrics, job states), never for a fixed time.
"""

from __future__ import annotations

import errno
import json
import os
import time
import urllib.request

import pytest
from conftest import MiB, snapshot_dir
from prometheus_client.parser import text_string_to_metric_families

from nodecache.testing.hub import Fault

REPO = "org/verify"


def counter(d, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(d.metrics()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def wait_for(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


def api(d, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        d.url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def pread(path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), size, offset)


@pytest.fixture
def repo(hub):
    """One 8-chunk LFS file of random bytes (chunk size 1 MiB in the daemons fixture)."""
    data = os.urandom(8 * MiB)
    commit = hub.add_repo(REPO, {"w.safetensors": data, "config.json": b"{}"})
    return data, commit


def test_a_failed_proof_drops_the_pages_the_kernel_cached(hub, daemons, repo):
    """A lazy read serves a corrupted chunk before the blob can be proven (documented);
    once the proof fails, the kernel must not keep serving those pages from its cache
    (keep_cache): FUSE_NOTIFY_INVAL_INODE drops them, so the next read reaches the daemon."""
    data, commit = repo
    d = daemons(
        repos=(REPO,),
        env={"NODECACHE_FILL_ON_OPEN": "false", "NODECACHE_READ_AHEAD_CHUNKS": "0"},
        extra_args=["--no-passthrough"],
    )
    path = snapshot_dir(d, REPO, commit) / "w.safetensors"
    hub.faults.append(Fault("corrupt"))  # the first data response: chunk 0, first byte flipped
    assert pread(path, 0, 4096) == bytes([data[0] ^ 0xFF]) + data[1:4096]  # served before any proof
    assert pread(path, 0, 4096)[0] == data[0] ^ 0xFF  # and now cached by the kernel

    job = api(d, "POST", "/v1/prefetch", {"repo": REPO})
    job = api(d, "GET", f"/v1/jobs/{job['id']}?wait=60")
    assert job["state"] == "error", job
    wait_for("the kernel's pages to be dropped", lambda: counter(d, "nodecache_page_cache_invalidations_total"))
    assert counter(d, "nodecache_verify_failures_total", source="upstream") == 1

    with pytest.raises(OSError) as e:  # reaches the daemon: the blob is quarantined
        pread(path, 0, 4096)
    assert e.value.errno == errno.EIO
