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
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import MiB, snapshot_dir
from prometheus_client.parser import text_string_to_metric_families

from nodecache.backoff import proof_backoff
from nodecache.catalog import Catalog
from nodecache.config import Config, ConfigError, load
from nodecache.index import Index
from nodecache.layout import FileEntry
from nodecache.quarantine import quarantine_excess
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


def api(d, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(d.url + path, data=data, method=method, headers=headers)
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


def test_while_quarantined_reads_fail_with_a_reason_and_peers_are_refused(hub, daemons, repo):
    """During the backoff after a failed proof, a read that cannot wait it out within
    read_timeout gets EIO at once, and the peer API refuses the blob's chunks."""
    data, commit = repo
    env = {"NODECACHE_RETRY_BASE": "600", "NODECACHE_CLUSTER_TOKEN": "peer-secret"}  # backoff 600 s > read_timeout
    d = daemons(repos=(REPO,), env=env)
    hub.faults.append(Fault("corrupt"))
    job = api(d, "POST", "/v1/prefetch", {"repo": REPO})  # it waits out the backoff (5 min at most), then retries
    wait_for("the failed proof", lambda: d.status()["blobs"]["quarantined"] == 1)
    assert api(d, "GET", f"/v1/jobs/{job['id']}")["state"] == "running"
    with pytest.raises(OSError) as e:
        pread(snapshot_dir(d, REPO, commit) / "w.safetensors", 0, 4096)
    assert e.value.errno == errno.EIO
    assert "failed verification; it is fetched again in" in d.log()
    blob = hashlib.sha256(data).hexdigest()
    query = urllib.parse.urlencode(
        {"chunk": 0, "repo": REPO, "commit": commit, "path": "w.safetensors", "size": len(data), "kind": "sha256"}
    )
    req = urllib.request.Request(f"{d.url}/v1/blobs/{blob}?{query}", headers={"Authorization": "Bearer peer-secret"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 404 and "quarantined" in json.loads(e.value.read())["detail"]


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


def test_verify_first_blobs_are_kept_in_the_index(tmp_path: Path):
    """A start reads the verify-first set from the index, not every snapshot, after a clean stop
    and after a crash alike; a change of verify_before_serve, or a write to the stopped index by
    anyone else, chooses again from the snapshots."""
    index = Index(tmp_path / "index", map_size=64 * MiB)
    pt, st, gg = "a" * 64, "b" * 64, "c" * 64
    files = [FileEntry("pytorch_model.bin", 1, pt), FileEntry("model.safetensors", 1, st), FileEntry("q.gguf", 1, gg)]
    index.snapshots.put("model", "org/m", "1" * 40, files)

    def catalog(cfg: Config, as_left: bool = True) -> set[str]:
        filler = SimpleNamespace(verify_first=set())
        Catalog(cfg, index, sources=None, filler=filler, policy=None, on_change=lambda *_: None, index_as_left=as_left)
        return filler.verify_first

    reads = []
    views = index.views
    index.views = lambda: reads.append(1) or views()
    try:
        assert catalog(Config()) == {pt} and len(reads) == 1, "an index from before the set: chosen once"
        assert catalog(Config()) == {pt} and len(reads) == 1, "a start reads no snapshot"
        assert catalog(Config(verify_before_serve=("*.gguf",))) == {gg} and len(reads) == 2
        assert catalog(Config(verify_before_serve=("*.gguf",)), as_left=False) == {gg} and len(reads) == 3, (
            "someone else wrote to the index: every snapshot is read"
        )
    finally:
        index.close()


def test_a_new_snapshots_verify_first_ids_are_written_before_the_snapshot(tmp_path: Path):
    """So a kill -9 between the two leaves extra ids at worst, never a snapshot whose
    verify-first blobs are not in the set a start trusts."""
    import asyncio

    from nodecache.repos import register
    from nodecache.upstream import RemoteFile, Resolved

    index = Index(tmp_path / "index", map_size=64 * MiB)
    seen = []

    def on_new(files) -> None:
        seen.append((len(files), index.snapshots.has_repo("model", "org/m")))

    try:
        res = Resolved("1" * 40, [RemoteFile(FileEntry("pytorch_model.bin", 1, "a" * 64), "sha256")])
        asyncio.run(register(index, 1 << 16, "model", "org/m", "main", res, on_new))
        assert seen == [(1, False)] and index.snapshots.has_repo("model", "org/m")
    finally:
        index.close()


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


def test_verify_first_paths_of_a_repo_answer_as_verify_first():
    """One matcher per repo (its path patterns joined), asked per file of a new snapshot."""
    paths = ["pytorch_model.bin", "sub/opt.pt", "a.pkl", "x/model.safetensors", "q.gguf", "config.json", ".bin", "b"]
    for patterns in (Config().verify_before_serve, ("org/*=*.safetensors", "*.gguf"), ("*",), (), ("a/b=[!x]*",)):
        cfg = Config(verify_before_serve=patterns)
        for repo in ("org/m", "other/m", "a/b"):
            verify = cfg.verify_first_paths(repo)
            assert [verify(p) for p in paths] == [cfg.verify_first(repo, p) for p in paths], (patterns, repo)


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


def flip_on_disk(d, blob: str, offset: int) -> None:
    """Bit rot: one byte of a stored blob file changes under the daemon."""
    path = d.cache_dir / "blobs" / blob[:2] / blob
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, offset)[0] ^ 0x01]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def blob_counts(d, token: str | None = None) -> dict:
    return api(d, "GET", "/v1/status", token=token)["blobs"]


def test_scrub_finds_bit_rot_quarantines_and_refetches(hub, daemons, repo):
    """A complete blob is re-hashed in the background at scrub_bps; a byte flipped on disk
    after its proof is found, the blob quarantined and fetched again, and the mount reads
    the right bytes. A handle the kernel reads itself (passthrough) reads end of file from
    then on, never the rotten byte."""
    data, commit = repo
    bps = 16 * MiB
    env = {"NODECACHE_SCRUB_BPS": str(bps), "NODECACHE_SCRUB_INTERVAL": "0"}  # re-hash without pause
    d = daemons(repos=(REPO,), env=env)
    t0, scrubbed0 = time.monotonic(), counter(d, "nodecache_scrubbed_bytes_total")
    path = snapshot_dir(d, REPO, commit) / "w.safetensors"
    assert pread(path, 0, len(data)) == data
    wait_for("the blob to be proven", lambda: blob_counts(d)["complete"] == 1)
    wait_for("a scrub pass", lambda: counter(d, "nodecache_scrubbed_bytes_total") >= 2 * len(data))
    scrubbed = counter(d, "nodecache_scrubbed_bytes_total") - scrubbed0
    assert scrubbed <= bps * (time.monotonic() - t0) + 8 * MiB, "the scrub ran faster than scrub_bps"
    assert counter(d, "nodecache_verify_failures_total") == 0

    blob = hashlib.sha256(data).hexdigest()
    with open(path, "rb") as old:
        passthrough = d.status()["passthrough"]
        flip_on_disk(d, blob, 5 * MiB + 7)
        if passthrough:  # the kernel reads the store file itself: it is served the rot until the scrub
            assert os.pread(old.fileno(), 1, 5 * MiB + 7) in (bytes([data[5 * MiB + 7] ^ 0x01]), b"")
        wait_for("the scrub to find it", lambda: counter(d, "nodecache_verify_failures_total", source="scrub"))
        wait_for(
            "the blob to be fetched again", lambda: blob_counts(d) == {"partial": 0, "complete": 1, "quarantined": 0}
        )
        try:
            got = os.pread(old.fileno(), 4096, 5 * MiB)
        except OSError as e:
            assert e.errno == errno.EIO
        else:
            assert passthrough and got == b"", "an old handle read on after the blob failed verification"
        if passthrough:  # the kernel takes no new file for the inode while the old one is open
            with pytest.raises(OSError) as e:
                open(path, "rb").close()
            assert e.value.errno == errno.EIO
    assert pread(path, 0, len(data)) == data
    assert counter(d, "nodecache_page_cache_invalidations_total") >= 1
    assert counter(d, "nodecache_verify_failures_total") == 1


def test_nodecache_verify_finds_and_repairs_damage(hub, daemons, repo):
    """`nodecache verify` (POST /v1/verify, admin token) re-hashes complete blobs at full speed,
    re-checks the stored chunks of partial ones, and ends once the damage is fetched again."""
    data, commit = repo
    lazy = os.urandom(3 * MiB)
    commit2 = hub.add_repo("org/lazy", {"l.safetensors": lazy})
    token = "verify-admin"
    env = {"NODECACHE_SCRUB_BPS": "0", "NODECACHE_ADMIN_TOKEN": token, "NODECACHE_FILL_ON_OPEN": "false"}
    d = daemons(repos=(REPO, "org/lazy"), env={**env, "NODECACHE_READ_AHEAD_CHUNKS": "0"})
    job = api(d, "POST", "/v1/prefetch", {"repo": REPO}, token)
    assert api(d, "GET", f"/v1/jobs/{job['id']}?wait=60", token=token)["state"] == "ready"
    lazy_path = snapshot_dir(d, "org/lazy", commit2) / "l.safetensors"
    assert pread(lazy_path, 0, 4096) == lazy[:4096]  # chunk 0 stored, the rest not: partial
    blob = hashlib.sha256(data).hexdigest()
    flip_on_disk(d, blob, 3 * MiB + 1)
    flip_on_disk(d, hashlib.sha256(lazy).hexdigest(), 100)

    cli = [sys.executable, "-m", "nodecache", "verify", "--endpoint", d.url]
    out = subprocess.run([*cli, REPO], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "daemon answered 401" in out.stderr, out  # no admin token
    run_env = {**os.environ, "NODECACHE_ADMIN_TOKEN": token}
    out = subprocess.run([*cli, "org/nothere"], capture_output=True, text=True, timeout=120, env=run_env)
    assert out.returncode == 1 and "404" in out.stderr and out.stderr.count("\n") == 1, out

    out = subprocess.run(cli, capture_output=True, text=True, timeout=120, env=run_env)  # the whole cache
    assert out.returncode == 0, out
    assert f"1 failed (quarantined, fetched again, now proven): {blob}" in out.stdout, out.stdout
    assert "1 stored chunk(s) of partial blobs were damaged" in out.stdout, out.stdout
    assert counter(d, "nodecache_verify_failures_total", source="scrub") == 1
    assert blob_counts(d, token) == {"partial": 1, "complete": 1, "quarantined": 0}
    kept = d.cache_dir / "quarantine" / blob  # no handle read it by passthrough: kept for inspection
    assert kept.read_bytes()[3 * MiB + 1] == data[3 * MiB + 1] ^ 0x01
    assert pread(snapshot_dir(d, REPO, commit) / "w.safetensors", 0, len(data)) == data
    with open(lazy_path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the kernel's copy was read before the rot
    assert pread(lazy_path, 0, 4096) == lazy[:4096]

    out = subprocess.run([*cli, f"{REPO}@main"], capture_output=True, text=True, timeout=120, env=run_env)
    assert out.returncode == 0 and f"verified {REPO}@main: 1 blobs" in out.stdout and "failed" not in out.stdout


def test_scrub_continues_after_a_restart(hub, daemons, tmp_path):
    """The time of each blob's last proof is kept in the index: after a restart the scrub
    goes on with the blob it had not reached, instead of starting over."""
    files = {"a.safetensors": os.urandom(4 * MiB), "b.safetensors": os.urandom(4 * MiB)}
    hub.add_repo(REPO, files)
    ids = {name: hashlib.sha256(b).hexdigest() for name, b in files.items()}
    d = daemons(repos=(REPO,), env={"NODECACHE_SCRUB_BPS": "0"})
    job = api(d, "POST", "/v1/prefetch", {"repo": REPO})
    assert api(d, "GET", f"/v1/jobs/{job['id']}?wait=60")["state"] == "ready"
    d.stop()
    proven = verified_at(d, ids)
    first = min(proven, key=proven.get)  # proven first: scrubbed first

    def scrub_one_blob() -> dict[str, float]:
        # 1 MiB/s: after the first blob (hashed at once), the next waits 4 s for its turn
        s = daemons(repos=(REPO,), env={"NODECACHE_SCRUB_BPS": str(MiB), "NODECACHE_SCRUB_INTERVAL": "0"})
        wait_for("one blob scrubbed", lambda: counter(s, "nodecache_scrubbed_bytes_total") >= 4 * MiB)
        s.stop()
        return verified_at(s, ids)

    after1 = scrub_one_blob()
    assert after1[first] > proven[first] and [n for n in ids if after1[n] != proven[n]] == [first]
    after2 = scrub_one_blob()
    second = next(n for n in ids if n != first)
    assert after2[second] > after1[second] and after2[first] == after1[first], "the scrub started over"


def verified_at(d, ids: dict[str, str]) -> dict[str, float]:
    index = Index(d.cache_dir / "index")
    try:
        return {name: index.blobs.get(blob).verified_at for name, blob in ids.items()}
    finally:
        index.close()
