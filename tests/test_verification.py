"""Verification that holds: failed proofs, the kernel's page cache, quarantine, retries, scrub.

Every test runs a real daemon with a real FUSE mount against the Hub emulator,
and waits for events (metrics, job states), never for a fixed time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import MiB, snapshot_dir
from prometheus_client.parser import text_string_to_metric_families

from nodecache.config import Config, ConfigError, load
from nodecache.store import proof_backoff, quarantine_excess
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
    commit = hub.add_repo(REPO, {"w.safetensors": data})
    return data, commit


def test_a_failed_proof_drops_cached_pages_fails_open_handles_and_is_fetched_again(hub, daemons, repo):
    """A lazy read serves a corrupted chunk before the blob can be proven (documented).
    Once the proof fails: the kernel must not serve those pages from its cache any more
    (keep_cache; FUSE_NOTIFY_INVAL_INODE drops them), the handle that read them gets EIO,
    the bad bytes are kept in quarantine, and the blob is fetched again and proven."""
    data, commit = repo
    d = daemons(
        repos=(REPO,),
        env={"NODECACHE_FILL_ON_OPEN": "false", "NODECACHE_READ_AHEAD_CHUNKS": "0"},
        extra_args=["--no-passthrough"],
    )
    path = snapshot_dir(d, REPO, commit) / "w.safetensors"
    hub.faults.append(Fault("corrupt"))  # the first data response: chunk 0, first byte flipped
    with open(path, "rb") as old:
        assert os.pread(old.fileno(), 4096, 0) == bytes([data[0] ^ 0xFF]) + data[1:4096]  # served before any proof
        assert pread(path, 0, 4096)[0] == data[0] ^ 0xFF  # and now cached by the kernel

        job = api(d, "POST", "/v1/prefetch", {"repo": REPO})
        job = api(d, "GET", f"/v1/jobs/{job['id']}?wait=60")
        assert job["state"] == "ready", job  # the second attempt was proven
        wait_for("the kernel's pages to be dropped", lambda: counter(d, "nodecache_page_cache_invalidations_total"))
        assert counter(d, "nodecache_verify_failures_total", source="upstream") == 1

        assert pread(path, 0, 4096) == data[:4096], "a new open read the kernel's stale pages"
        with pytest.raises(OSError) as e:  # it may have used wrong bytes already: it must not read on
            os.pread(old.fileno(), 4096, MiB)
        assert e.value.errno == errno.EIO
    assert pread(path, 0, len(data)) == data
    blob = hashlib.sha256(data).hexdigest()
    kept = d.cache_dir / "quarantine" / blob
    assert kept.read_bytes()[:1] == bytes([data[0] ^ 0xFF]) and kept.stat().st_size == len(data)
    tiers = {t["name"]: t for t in d.status()["tiers"]}
    assert tiers["disk"]["quarantine_files"] == 1 and tiers["disk"]["quarantine_bytes"] == len(data)
    assert tiers["disk"]["used"] >= 2 * len(data)  # the good copy and the quarantined one
    assert d.status()["blobs"]["quarantined"] == 0


def test_a_failed_attempt_is_retried_from_the_next_source(hub, daemons, repo, tmp_path):
    """The sources that served the failed attempt are asked last next time: here the Hub
    sent a wrong byte, so the retry reads a directory copy of the repo instead."""
    data, commit = repo
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "w.safetensors").write_bytes(data)
    d = daemons(repos=(REPO,), env={"NODECACHE_SOURCES": f"{REPO}=hf,file://{copy}"})
    hub.faults.append(Fault("corrupt"))
    job = api(d, "POST", "/v1/prefetch", {"repo": REPO})
    assert api(d, "GET", f"/v1/jobs/{job['id']}?wait=60")["state"] == "ready"
    assert counter(d, "nodecache_verify_failures_total", source="upstream") == 1
    hf = counter(d, "nodecache_upstream_bytes_total", upstream="hf")
    local = counter(d, "nodecache_upstream_bytes_total", upstream="local")
    assert local == len(data) and hf == len(data), (hf, local)  # every retried chunk from the copy
    assert pread(snapshot_dir(d, REPO, commit) / "w.safetensors", 0, len(data)) == data


def test_shm_blobs_are_quarantined_in_their_tier_within_bounds(hub, daemons, tmp_path):
    """No EXDEV: each tier has its own quarantine dir. Its files count in the tier's usage
    and metrics, and only the newest `quarantine_files` are kept."""
    files = {f"{n}.safetensors": os.urandom(MiB // 2) for n in "ab"}
    commit = hub.add_repo(REPO, files)
    shm = Path("/dev/shm") / f"nodecache-test-{os.getpid()}-{tmp_path.name}"
    try:
        env = {"NODECACHE_SHM_DIR": str(shm), "NODECACHE_QUARANTINE_FILES": "1"}
        d = daemons(repos=(REPO,), env=env)
        hub.faults += [Fault("corrupt"), Fault("corrupt")]  # the first response of each blob
        job = api(d, "POST", "/v1/prefetch", {"repo": REPO})
        assert api(d, "GET", f"/v1/jobs/{job['id']}?wait=60")["state"] == "ready"
        assert counter(d, "nodecache_verify_failures_total") == 2
        kept = list((shm / "quarantine").iterdir())
        assert len(kept) == 1 and kept[0].stat().st_size == MiB // 2  # the older one was cleaned
        assert not (d.cache_dir / "quarantine").exists() or not list((d.cache_dir / "quarantine").iterdir())
        assert counter(d, "nodecache_quarantine_files", tier="shm") == 1
        assert counter(d, "nodecache_quarantine_bytes", tier="shm") == MiB // 2
        assert counter(d, "nodecache_cache_bytes", tier="shm") == 3 * (MiB // 2)  # two blobs + one kept
        for name, want in files.items():
            assert pread(snapshot_dir(d, REPO, commit) / name, 0, MiB) == want
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_verify_before_serve_holds_reads_until_the_proof(hub, daemons):
    """A file matching verify_before_serve is never read before its whole-blob proof: a
    read starts the whole fill and waits; a corrupted upstream body never reaches the
    reader (FUSE or mirror), it is retried. Other files stay lazy."""
    files = {"w.bin": os.urandom(4 * MiB), "x.pt": os.urandom(4 * MiB), "w.safetensors": os.urandom(4 * MiB)}
    commit = hub.add_repo(REPO, files)
    env = {
        "NODECACHE_VERIFY_BEFORE_SERVE": "*.bin,*.pt,other/*=*.safetensors",
        "NODECACHE_FILL_ON_OPEN": "false",
        "NODECACHE_READ_AHEAD_CHUNKS": "0",
    }
    d = daemons(repos=(REPO,), env=env)
    snap = snapshot_dir(d, REPO, commit)

    hub.faults.append(Fault("corrupt"))  # the first response: chunk 0 of w.bin, first byte flipped
    assert pread(snap / "w.bin", 0, 4096) == files["w.bin"][:4096]
    assert d.status()["blobs"]["complete"] == 1, "the read returned before the proof"
    assert counter(d, "nodecache_verify_failures_total", source="upstream") == 1  # and it was retried

    hub.faults.append(Fault("corrupt"))
    with urllib.request.urlopen(f"{d.url}/{REPO}/resolve/main/x.pt", timeout=60) as r:
        assert r.read() == files["x.pt"]
    assert counter(d, "nodecache_verify_failures_total", source="upstream") == 2

    assert pread(snap / "w.safetensors", 0, 4096) == files["w.safetensors"][:4096]  # lazy: no proof yet
    assert d.status()["blobs"] == {"partial": 1, "complete": 2, "quarantined": 0}


def test_verify_before_serve_config():
    default = Config()
    assert default.verify_first("org/m", "pytorch_model.bin") and default.verify_first("org/m", "sub/opt.pt")
    assert default.verify_first("org/m", "a.pkl") and not default.verify_first("org/m", "model.safetensors")
    some = Config(verify_before_serve=("org/*=*.safetensors", "*.gguf"))
    assert some.verify_first("org/m", "x/model.safetensors") and not some.verify_first("other/m", "model.safetensors")
    assert some.verify_first("other/m", "q.gguf") and not some.verify_first("org/m", "pytorch_model.bin")
    assert Config(verify_before_serve=("*",)).verify_first("a/b", "config.json")
    assert not Config(verify_before_serve=()).verify_first("a/b", "x.bin")
    env = {"NODECACHE_VERIFY_BEFORE_SERVE": "true"}
    assert load(environ=env).verify_before_serve == ("*",)
    assert load(environ={"NODECACHE_VERIFY_BEFORE_SERVE": "false"}).verify_before_serve == ()
    assert load(environ={"NODECACHE_VERIFY_BEFORE_SERVE": "*.bin, org/*=*.pt"}).verify_before_serve == (
        "*.bin",
        "org/*=*.pt",
    )
    for bad in ("=*.bin", "org/*="):
        with pytest.raises(ConfigError, match="verify_before_serve"):
            Config(verify_before_serve=(bad,))


def test_quarantine_bounds_count_bytes_and_age():
    now = 1000.0
    entries = [("old", 10, now - 50), ("mid", 10, now - 20), ("new", 10, now - 1)]
    assert quarantine_excess(entries, now, 16, 1 << 30, 100) == []
    assert quarantine_excess(entries, now, 2, 1 << 30, 100) == ["old"]  # count: the newest stay
    assert sorted(quarantine_excess(entries, now, 16, 25, 100)) == ["old"]  # bytes: 20 of 25 kept
    assert sorted(quarantine_excess(entries, now, 16, 15, 100)) == ["mid", "old"]
    assert sorted(quarantine_excess(entries, now, 16, 1 << 30, 30)) == ["old"]  # age
    assert quarantine_excess([("huge", 100, now)], now, 16, 50, 100) == ["huge"]  # bigger than the cap: not kept
    assert [proof_backoff(n, 0.2) for n in (1, 2, 3)] == [0.2, 0.8, 3.2] and proof_backoff(20, 0.2) == 300
