"""Node operations on a real daemon: quotas and LRU eviction, pins, shm tier, control API, CLI, metrics."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import machine
import pytest
from conftest import BIG, SMALL, MiB, counter, sha256_file, snapshot_dir, verified, wait_until
from prometheus_client.parser import text_string_to_metric_families

from nodecache import mounts

EVICT = "org/evict"
PINNED = "org/pinned"
FILES = ("a.bin", "b.bin", "c.bin", "d.bin")


@pytest.fixture(scope="module")
def evict_repos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("evict_repo")
    for name in FILES:
        (d / name).write_bytes(os.urandom(12 * MiB))
    p = tmp_path_factory.mktemp("pinned_repo")
    (p / "w.bin").write_bytes(os.urandom(12 * MiB))
    return {EVICT: d, PINNED: p}


def api(d, method: str, path: str, body=None, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(d.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def cached(path: Path) -> float:
    return float(os.getxattr(path, "user.nodecache.cached"))


def wait_job(d, job: dict, token: str | None = None) -> dict:
    """The job once it has ended (the daemon answers ?wait when it does)."""
    return api(d, "GET", f"/v1/jobs/{job['id']}?wait=60", token=token)[1]


def disk_used(d) -> int:
    return next(t["used"] for t in api(d, "GET", "/v1/status")[1]["tiers"] if t["name"] == "disk")


def test_lru_eviction_spares_open_and_pinned_blobs(hub, daemons, evict_repos):
    commits = {r: hub.add_repo(r, p) for r, p in evict_repos.items()}
    quota = 32 * MiB
    # Only what is read: the snapshot fill of the siblings (.bin files are weights) holds their chunks
    # while it runs, and a read then found the quota full (ENOSPC, under CPU load, 1 in ~10 suites).
    env = {"NODECACHE_DISK_MAX": str(quota), "NODECACHE_MIN_FREE": "0", "NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false"}
    d = daemons(repos=(EVICT, PINNED), env=env)
    snap = snapshot_dir(d, EVICT, commits[EVICT])
    want = {n: sha256_file(evict_repos[EVICT] / n) for n in FILES}
    slack = 8 * MiB  # at most the chunks in flight (parallel_per_blob x 1 MiB)

    assert sha256_file(snap / "a.bin") == want["a.bin"]
    assert sha256_file(snap / "b.bin") == want["b.bin"]
    wait_until(lambda: verified(snap / "a.bin") and verified(snap / "b.bin"), "a and b verified")
    with open(snap / "a.bin", "rb") as held:  # a is the least recently used, but open
        assert sha256_file(snap / "c.bin") == want["c.bin"]
        wait_until(lambda: verified(snap / "c.bin"), "c verified")
        assert disk_used(d) <= quota + slack
        assert cached(snap / "a.bin") == 1.0, "an open blob is never evicted"
        assert cached(snap / "b.bin") == 0.0, "the LRU unprotected blob went"
        assert cached(snap / "c.bin") == 1.0
        assert held.read(16) == (evict_repos[EVICT] / "a.bin").read_bytes()[:16]

    status, job = api(d, "POST", "/v1/pin", {"repo": PINNED})
    assert status == 202 and wait_job(d, job)["state"] == "ready"
    pinned = snapshot_dir(d, PINNED, commits[PINNED]) / "w.bin"
    for name in ("b.bin", "d.bin", "a.bin", "b.bin"):  # churn through the quota
        assert sha256_file(snap / name) == want[name], "an evicted file is fetched again, correctly"
        assert disk_used(d) <= quota + slack
        assert cached(pinned) == 1.0, "a pinned blob is never evicted"
    families = {f.name: f for f in text_string_to_metric_families(d.metrics())}
    evictions = sum(s.value for s in families["nodecache_evictions"].samples if s.name.endswith("_total"))
    assert evictions >= 3
    # the files on disk agree with the accounting
    on_disk = sum(p.stat().st_blocks * 512 for p in (d.cache_dir / "blobs").rglob("*") if p.is_file())
    assert on_disk <= quota + slack + 1 * MiB


def test_enospc_when_nothing_can_be_evicted(hub, daemons, evict_repos, tmp_path):
    """ENOSPC from FUSE, 507 from HTTP (the mirror and the peer API), an error from a prefetch;
    a prefetch of a repo larger than the whole cache is refused before a byte is fetched."""
    commit = hub.add_repo(EVICT, evict_repos[EVICT])
    env = {"NODECACHE_DISK_MAX": str(8 * MiB), "NODECACHE_MIN_FREE": "0", "NODECACHE_CLUSTER_TOKEN": "tok"}
    # Only a.bin is filled: the snapshot fill would also start its siblings, whose partial chunks
    # the second daemon could evict for the requests that must find the store full (flaky 1 in ~8).
    first = {**env, "NODECACHE_PEERS": "127.0.0.1:9", "NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false"}
    d = daemons(repos=(EVICT,), env=first)
    snap = snapshot_dir(d, EVICT, commit)
    with pytest.raises(OSError) as e:
        (snap / "a.bin").read_bytes()  # 12 MiB into 8: its own chunks are not evictable while it fills
    assert e.value.errno == errno.ENOSPC
    d.stop()
    d = daemons(repos=(EVICT,), env={**env, "NODECACHE_FILL_ON_OPEN": "false", "NODECACHE_READ_AHEAD_CHUNKS": "0"})
    with open(snap / "c.bin", "rb") as held:  # 8 MiB of an open file: the quota is full, nothing evictable
        os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead past them
        assert held.read(8 * MiB) == (evict_repos[EVICT] / "c.bin").read_bytes()[: 8 * MiB]
        # A read returns once its chunks are stored: the quota is full, and counted so. The first
        # daemon's stop cancelled a.bin's writers while the group commit recorded their chunks;
        # counting those as given back let b.bin's chunks overrun the quota here (under load: the
        # mirror or the peer API then answered 200 from them).
        assert cached(snap / "c.bin") >= 8 / 12 and disk_used(d) == 8 * MiB
        with pytest.raises(OSError) as e:
            (snap / "b.bin").read_bytes()
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(f"{d.url}/{EVICT}/resolve/main/b.bin", timeout=60)
        assert http.value.code == 507 and "full" in http.value.headers["X-Error-Message"]
        blob = sha256_file(evict_repos[EVICT] / "d.bin")
        req = urllib.request.Request(f"{d.url}/v1/blobs/{blob}?chunk=0", headers={"Authorization": "Bearer tok"})
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(req, timeout=60)
        assert http.value.code == 507 and json.load(http.value)["error"] == "insufficient_storage"
        # 48 MiB can never be whole in 8: refused at once (filling it would evict all else, then itself)
        fetched = hub.stats.data_bytes
        status, body = api(d, "POST", "/v1/prefetch", {"repo": EVICT})
        assert status == 507 and body["error"] == "insufficient_storage", body
        assert f"{EVICT}@main ({commit[:12]}): 50,331,648 bytes do not fit this node's cache" in body["detail"]
        assert api(d, "POST", "/v1/pin", {"repo": EVICT})[0] == 507
        out = cli(d, "prefetch", EVICT)
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and "do not fit" in out.stderr, out.stderr
        assert hub.stats.data_bytes == fetched and disk_used(d) == 8 * MiB, "nothing fetched"
        # 4 MiB fits the cache, not the room left beside the open file: the job ends in error
        (tmp_path / "small").mkdir()
        (tmp_path / "small" / "s.bin").write_bytes(os.urandom(4 * MiB))
        hub.add_repo("org/small-one", tmp_path / "small")
        status, body = api(d, "POST", "/v1/prefetch", {"repo": "org/small-one"})
        job = wait_job(d, body)
        assert status == 202 and job["state"] == "error" and "full" in job["error"], job
        assert f"prefetch job {job['id']} (org/small-one@main " in d.log(), "a failed job says why in the log"


def test_a_prefetch_with_readers_on_a_full_tier_gives_right_bytes_or_enospc(hub, daemons, evict_repos):
    """A prefetch of a repo larger than the quota while every file of it is read through the
    mount at once: each read returns the file's bytes or fails with ENOSPC, never EIO (a fill
    whose added worker hit the full tier proved a file with chunks missing and quarantined it:
    5 failed proofs in 12 runs), nor a wait out to read_timeout; the job ends in error."""
    import threading

    commit = hub.add_repo(EVICT, evict_repos[EVICT])
    other = hub.add_repo(PINNED, evict_repos[PINNED])
    # 48 MiB fit a 56 MiB cache (50.4 under its high watermark: not refused), not beside a 12 MiB
    # file held open (a pin would be counted: the prefetch would be refused)
    d = daemons(repos=(EVICT, PINNED), env={"NODECACHE_DISK_MAX": str(56 * MiB), "NODECACHE_MIN_FREE": "0"})
    with open(snapshot_dir(d, PINNED, other) / "w.bin", "rb") as held:
        assert len(held.read()) == 12 * MiB
        snap = snapshot_dir(d, EVICT, commit)
        want = {n: sha256_file(evict_repos[EVICT] / n) for n in FILES}

        def read(name: str, got: dict[str, object]) -> None:
            try:
                got[name] = sha256_file(snap / name) == want[name]
            except OSError as e:
                got[name] = errno.errorcode.get(e.errno, e.errno)

        for _ in range(4):
            got: dict[str, object] = {}
            status, body = api(d, "POST", "/v1/prefetch", {"repo": EVICT})
            readers = [threading.Thread(target=read, args=(n, got)) for n in FILES]
            for t in readers:
                t.start()
            job = wait_job(d, body)
            for t in readers:
                t.join(60)
            assert status == 202 and not any(t.is_alive() for t in readers)
            assert all(v in (True, "ENOSPC") for v in got.values()), got
            # 48 MiB into 44: a fill runs out of room ("full"), or blobs it filled were evicted for
            # the others' room ("not complete")
            assert job["state"] == "error" and ("full" in job["error"] or "not complete" in job["error"]), job
            assert counter(d, "nodecache_verify_failures_total", source="upstream") == 0, "no proof failed"
            wait_until(lambda: api(d, "GET", "/v1/status")[1]["blobs_filling"] == 0, "the fills ended")
            api(d, "POST", "/v1/evict", {"all": True})


def test_a_revision_is_refused_only_where_it_can_never_be_whole(hub, daemons, evict_repos, tmp_path):
    """A pin's blobs may fill a tier's whole capacity (never evicted), a prefetch's only its high
    watermark (its finished files are evicted past it), a revision whole on the node is never
    refused, and shm counts only for blobs it may take."""
    hub.add_repo(EVICT, evict_repos[EVICT])
    env = {"NODECACHE_DISK_MAX": str(52 * MiB), "NODECACHE_MIN_FREE": "0"}
    d = daemons(repos=(EVICT,), env=env, workdir=tmp_path / "w")
    status, body = api(d, "POST", "/v1/prefetch", {"repo": EVICT})  # 48 MiB: over 0.9 x 52
    assert status == 507 and "(disk 49,073,356 bytes at most)" in body["detail"], body
    status, job = api(d, "POST", "/v1/pin", {"repo": EVICT})  # under 52
    assert status == 202 and wait_job(d, job)["state"] == "ready"
    d.stop()
    d = daemons(repos=(EVICT,), env={**env, "NODECACHE_DISK_MAX": str(40 * MiB)}, workdir=tmp_path / "w")
    fetched = hub.stats.data_bytes
    status, job = api(d, "POST", "/v1/prefetch", {"repo": EVICT})  # whole already, in a cache made smaller
    assert status == 202 and wait_job(d, job)["state"] == "ready" and hub.stats.data_bytes == fetched
    d.stop()
    shm = Path("/dev/shm") / f"nodecache-test-{os.getpid()}-{tmp_path.name}"
    try:  # 32 + 32 MiB, but 12 MiB files never go to shm (shm_file_max 1 MiB)
        env = {"NODECACHE_DISK_MAX": str(32 * MiB), "NODECACHE_MIN_FREE": "0", "NODECACHE_SHM_DIR": str(shm)}
        env |= {"NODECACHE_SHM_MAX": str(32 * MiB), "NODECACHE_SHM_FILE_MAX": str(MiB)}
        d = daemons(repos=(EVICT,), env=env)
        status, body = api(d, "POST", "/v1/prefetch", {"repo": EVICT})
        assert status == 507 and "(disk 30,198,988, shm 30,198,988 bytes at most)" in body["detail"], body
    finally:
        d.stop()
        shutil.rmtree(shm, ignore_errors=True)


def test_a_file_larger_than_the_cache_is_read_lazily_not_filled_whole(hub, daemons, big_repo):
    """A 72 MiB file in a 32 MiB cache is never filled whole on open: its fill's chunks ran ahead
    of the reader until the tier was full of them (its own, in use: not evictable), and the
    reader's next chunk got ENOSPC (a CSI test of a model larger than the cache, 1 suite in ~6).
    It is read lazily: what is read, and the read-ahead."""
    d = daemons(repos=(BIG,), env={"NODECACHE_DISK_MAX": str(32 * MiB), "NODECACHE_MIN_FREE": "0"})
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    want = (big_repo / "weights.bin").read_bytes()
    with open(path, "rb") as f:
        assert f.read(MiB) == want[:MiB]
        time.sleep(0.5)  # a whole-blob fill would be well on its way
        f.seek(40 * MiB)
        assert f.read(MiB) == want[40 * MiB : 41 * MiB]
    wait_until(lambda: api(d, "GET", "/v1/status")[1]["fills_inflight"] == 0, "the read-ahead ended")
    assert hub.stats.data_bytes <= 24 * MiB, f"{hub.stats.data_bytes:,} bytes fetched for 2 MiB read"


def test_the_bytes_other_pins_keep_are_not_room(hub, daemons, evict_repos):
    """48 MiB fit a 56 MiB cache (50.4 under its high watermark), not beside a 12 MiB pin: a
    prefetch and a pin of it are refused, nothing fetched (before, the prefetch filled, evicted
    its own finished files for its others' room and ended "not complete"). A pin whose revision
    moves counts as room what it lets go, not what another pin of the same commit still keeps."""
    a = hub.add_repo(PINNED, evict_repos[PINNED])
    hub.add_repo(EVICT, evict_repos[EVICT])
    d = daemons(repos=(EVICT, PINNED), env={"NODECACHE_DISK_MAX": str(56 * MiB), "NODECACHE_MIN_FREE": "0"})
    for revision in ("main", a):  # two pins of one commit
        status, job = api(d, "POST", "/v1/pin", {"repo": PINNED, "revision": revision})
        assert status == 202 and wait_job(d, job)["state"] == "ready"
    fetched = hub.stats.data_bytes
    kept = "12,582,912 of them kept by other pins)"
    status, body = api(d, "POST", "/v1/prefetch", {"repo": EVICT})
    assert status == 507 and f"(disk 52,848,230 bytes at most, {kept}" in body["detail"], body
    status, body = api(d, "POST", "/v1/pin", {"repo": EVICT})
    assert status == 507 and f"(disk 58,720,256 bytes at most, {kept}" in body["detail"], body
    moved = hub.add_repo(PINNED, evict_repos[EVICT])  # main now names 48 MiB; @a keeps the 12
    status, body = api(d, "POST", "/v1/pin", {"repo": PINNED})
    assert status == 507 and kept in body["detail"], body
    assert hub.stats.data_bytes == fetched, "nothing fetched"
    assert api(d, "DELETE", "/v1/pin", {"repo": PINNED, "revision": a})[0] == 200
    status, job = api(d, "POST", "/v1/pin", {"repo": PINNED})  # what main held is room now
    assert status == 202 and job["commit"] == moved and wait_job(d, job)["state"] == "ready", job
    assert [(p["commit"], p["ready"]) for p in api(d, "GET", "/v1/status")[1]["pins"]] == [(moved, True)]


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs of the test's own, so free space is known and nobody else uses it."""
    if reason := machine.mount_tmpfs():
        pytest.skip(reason)
    fs = tmp_path / "fs"
    fs.mkdir()
    mounts.mount("tmpfs", str(fs), "tmpfs", 0, "size=64m")
    try:
        yield fs
    finally:
        mounts.unmount(str(fs))


def test_min_free_is_always_left_on_the_filesystem(hub, small_fs, daemons, evict_repos):
    """No quota binds (4 x 12 MiB is below 90 % of 64 MiB): only min_free makes room, by evicting."""
    commit = hub.add_repo(EVICT, evict_repos[EVICT])
    min_free, slack = 32 * MiB, 8 * MiB  # slack: chunks reserved together see the same free space
    env = {"NODECACHE_MIN_FREE": str(min_free), "NODECACHE_DIRECT_IO": "false"}
    d = daemons(repos=(EVICT,), env=env, cache_dir=small_fs / "cache")
    snap = snapshot_dir(d, EVICT, commit)

    def free() -> int:
        st = os.statvfs(small_fs)
        return st.f_bavail * st.f_frsize

    for name in FILES:
        assert sha256_file(snap / name) == sha256_file(evict_repos[EVICT] / name)
        wait_until(lambda name=name: verified(snap / name), f"{name} verified")
        # an evicted file is renamed away at once and unlinked by a thread soon after
        wait_until(lambda: free() >= min_free - slack, f"min_free left after {name} ({free():,} free)")
    assert counter(d, "nodecache_evictions_total", tier="disk") >= 1, "min_free made room by evicting"
    tier = d.status()["tiers"][0]
    assert tier["fs_free"] >= min_free - slack and tier["used"] <= 64 * MiB - min_free + slack


def test_shm_tier_takes_small_files_and_hot_pins(hub, daemons, tmp_path, small_repo):
    shm = Path("/dev/shm") / f"nodecache-test-{os.getpid()}-{tmp_path.name}"
    try:
        env = {"NODECACHE_SHM_DIR": str(shm), "NODECACHE_SHM_FILE_MAX": str(MiB), "NODECACHE_SHM_MAX": str(4 * MiB)}
        env["NODECACHE_FILL_SNAPSHOT_ON_OPEN"] = "false"  # only what is read lands: README.md stays upstream
        d = daemons(repos=(SMALL, BIG), env=env)
        snap = snapshot_dir(d, SMALL, hub.commits[SMALL])
        assert (snap / "config.json").read_bytes() == (small_repo / "config.json").read_bytes()
        assert sha256_file(snap / "model.safetensors") == sha256_file(small_repo / "model.safetensors")
        in_shm = {p.name for p in (shm / "blobs").rglob("*") if p.is_file()}
        on_disk = {p.name for p in (d.cache_dir / "blobs").rglob("*") if p.is_file()}
        assert sha256_file(small_repo / "model.safetensors") in on_disk  # > shm_file_max
        assert len(in_shm) == 1 and not in_shm & on_disk  # config.json
        # a hot pin wants shm, but 72 MiB does not fit a 4 MiB shm tier: it lands on disk
        status, job = api(d, "POST", "/v1/pin", {"repo": BIG, "mode": "hot"})
        assert status == 202 and wait_job(d, job)["state"] == "ready"
        tiers = {t["name"]: t for t in api(d, "GET", "/v1/status")[1]["tiers"]}
        assert tiers["shm"]["used"] <= 4 * MiB and tiers["disk"]["used"] >= 72 * MiB
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_a_hot_pin_larger_than_shm_fills_it_to_its_high_watermark_and_the_rest_goes_to_disk(hub, daemons, tmp_path):
    """Each blob is placed counting the blobs placed on shm before it and not yet stored: the
    six shards of a hot pin, prepared together, each found shm empty, all went there, and the
    pin failed "tier shm is full ... nothing more can be evicted" with the disk empty."""
    shm = Path("/dev/shm") / f"nodecache-test-{os.getpid()}-{tmp_path.name}"
    repo = tmp_path / "hot"
    repo.mkdir()
    for i in range(6):
        (repo / f"model-{i + 1:05d}-of-00006.safetensors").write_bytes(os.urandom(4 * MiB))
    commit = hub.add_repo("org/hot", repo)
    try:
        env = {"NODECACHE_SHM_DIR": str(shm), "NODECACHE_SHM_MAX": str(16 * MiB)}
        d = daemons(repos=("org/hot",), env=env)
        status, job = api(d, "POST", "/v1/pin", {"repo": "org/hot", "mode": "hot"})
        assert status == 202 and wait_job(d, job)["state"] == "ready", job
        tiers = {t["name"]: t for t in api(d, "GET", "/v1/status")[1]["tiers"]}
        assert tiers["shm"]["used"] == 12 * MiB, tiers  # three shards under 0.9 x 16 MiB
        assert tiers["disk"]["used"] == 12 * MiB, tiers
        assert len([p for p in (shm / "blobs").rglob("*") if p.is_file()]) == 3
        snap = snapshot_dir(d, "org/hot", commit)
        for p in sorted(repo.iterdir()):
            assert (snap / p.name).read_bytes() == p.read_bytes()
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_control_api(hub, daemons):
    token = "s3cret-admin"
    d = daemons(repos=(SMALL,), env={"NODECACHE_ADMIN_TOKEN": token})
    status, repos = api(d, "GET", "/v1/repos", token=token)
    assert status == 200 and [r["repo"] for r in repos["repos"]] == [SMALL]
    snap = repos["repos"][0]["snapshots"][0]
    assert snap["commit"] == hub.commits[SMALL] and snap["bytes_cached"] == 0 and snap["complete"] is False
    assert api(d, "GET", f"/v1/repos/{SMALL}", token=token)[1]["refs"] == {"main": hub.commits[SMALL]}
    assert api(d, "GET", "/v1/repos/org/unknown", token=token)[0] == 404
    st = api(d, "GET", "/v1/status", token=token)[1]
    assert st["ready"] is True and st["tiers"][0]["name"] == "disk" and st["peers"] == []

    # every /v1 call needs the admin token: mutating ones fill or empty the disk, reads name every repo
    for method, path, body in (
        ("POST", "/v1/prefetch", {"repo": BIG}),
        ("POST", "/v1/pin", {"repo": BIG}),
        ("POST", "/v1/evict", {"all": True}),
        ("DELETE", "/v1/pin", {"repo": BIG}),
        ("GET", "/v1/repos", None),
        ("GET", f"/v1/repos/{SMALL}", None),
        ("GET", "/v1/status", None),
        ("GET", "/v1/jobs/1", None),
    ):
        status, err = api(d, method, path, body)
        assert status == 401 and set(err) == {"error", "detail"}, (path, status, err)
        assert api(d, method, path, body, token="wrong")[0] == 401

    # bad input: JSON errors with 4xx, never a traceback
    for body, code in (
        (b"{not json", 400),
        ({"repo": 5}, 400),
        ({"repo": "../x"}, 400),
        ({"repo": SMALL, "revision": "a/../b"}, 400),
        ({"repo": "org/nope"}, 404),
        ({"repo": SMALL, "revision": "nope"}, 404),
        ({"repo": SMALL, "repo_type": "bucket"}, 400),
    ):
        status, err = api(d, "POST", "/v1/prefetch", body, token=token)
        assert status == code, (body, err)
        assert set(err) == {"error", "detail"} and "Traceback" not in err["detail"]
    assert api(d, "GET", "/v1/jobs/999", token=token)[0] == 404

    status, job = api(d, "POST", "/v1/prefetch", {"repo": SMALL, "revision": "main"}, token=token)
    assert status == 202 and job["total"] > 0
    for bad in ("abc", "-1", "301", "nan"):
        status, err = api(d, "GET", f"/v1/jobs/{job['id']}?wait={bad}", token=token)
        assert status == 400 and "wait" in err["detail"], (bad, err)
    job = api(d, "GET", f"/v1/jobs/{job['id']}?wait=60", token=token)[1]  # answers when the job ends, no polling
    assert job["state"] == "ready" and job["done"] == job["total"] and job["seconds"] > 0
    assert api(d, "GET", "/v1/repos", token=token)[1]["repos"][0]["snapshots"][0]["complete"] is True

    status, job = api(d, "POST", "/v1/pin", {"repo": BIG}, token=token)
    assert status == 202 and wait_job(d, job, token)["state"] == "ready"
    status, out = api(d, "POST", "/v1/evict", {"all": True}, token=token)
    assert status == 200 and out["evicted_blobs"] >= 1 and out["kept_in_use_or_pinned"] >= 1
    assert api(d, "POST", "/v1/evict", {}, token=token)[0] == 400
    assert api(d, "POST", "/v1/evict", {"repo": "org/unknown"}, token=token)[0] == 404
    assert api(d, "DELETE", "/v1/pin", {"repo": BIG}, token=token)[0] == 200
    assert api(d, "DELETE", "/v1/pin", {"repo": BIG}, token=token)[0] == 404
    status, out = api(d, "POST", "/v1/evict", {"repo": BIG}, token=token)
    assert status == 200 and out["evicted_blobs"] >= 1


def cli(d, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nodecache", *args, "--endpoint", d.url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_a_prefetch_waits_for_a_fill_longer_than_read_timeout(hub, daemons, big_repo):
    """read_timeout bounds a reader's wait, not a prefetch's: the shards of a big model share the
    link for longer than a reader waits, and their requests have timeouts of their own (before,
    the job failed with "prefetch: timed out after 1s" while the fill went on)."""
    env = {"NODECACHE_READ_TIMEOUT": "1", "NODECACHE_PARALLEL_TOTAL": "2", "NODECACHE_PARALLEL_PER_BLOB": "2"}
    d = daemons(repos=(BIG,), env=env)
    hub.rate_limit_bps = 12 * MiB  # per response: 72 MiB over 2 connections take ~3 s
    try:
        out = cli(d, "prefetch", BIG)
    finally:
        hub.rate_limit_bps = None
    assert out.returncode == 0, out.stderr
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    assert verified(path) and sha256_file(path) == sha256_file(big_repo / "weights.bin")


def test_cli_against_a_live_daemon_and_pins_survive_restart(hub, daemons, big_repo):
    d = daemons(repos=(SMALL,))
    out = cli(d, "pin", BIG, "--wait")
    assert out.returncode == 0, out.stderr
    assert "ready:" in out.stdout
    listing = json.loads(cli(d, "ls", "--json").stdout)
    big = next(r for r in listing if r["repo"] == BIG)
    assert big["pinned"] == {"main": "pin"} and big["snapshots"][0]["complete"] is True
    table = cli(d, "ls").stdout.splitlines()
    assert table[0].split() == ["REPO", "REVISION", "COMMIT", "SIZE", "CACHED", "PINNED", "LAST", "USED"]
    assert any(line.startswith(BIG) and "100%" in line and "main:pin" in line for line in table)
    assert any(line.startswith(SMALL) and "0.0%" in line for line in table)
    status = json.loads(cli(d, "status", "--json").stdout)
    assert status["pins"][0]["repo"] == BIG
    assert "tier disk" in cli(d, "status").stdout
    out = cli(d, "evict", "--all")
    assert out.returncode == 0 and "kept 2 in use or pinned" in out.stdout  # weights.bin + config.json
    assert cli(d, "evict").returncode == 1  # neither a repo nor --all: one-line error

    d.stop()
    d2 = daemons(repos=(SMALL,), cache_dir=d.cache_dir)
    status = json.loads(cli(d2, "status", "--json").stdout)
    assert [(p["repo"], p["mode"]) for p in status["pins"]] == [(BIG, "pin")]
    path = snapshot_dir(d2, BIG, hub.commits[BIG]) / "weights.bin"
    before = hub.stats.data_bytes
    assert sha256_file(path) == sha256_file(big_repo / "weights.bin")
    assert hub.stats.data_bytes == before, "pinned bytes survived the restart"
    assert cli(d2, "unpin", BIG).returncode == 0
    bad = subprocess.run(
        [sys.executable, "-m", "nodecache", "ls", "--endpoint", "http://127.0.0.1:9"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and bad.stderr.startswith("nodecache: error: cannot reach the daemon")


def test_metrics_move_with_local_and_upstream_reads(hub, daemons, small_repo):
    # Reads of a complete blob reach us; the one blob read is the one complete (no snapshot fill).
    d = daemons(repos=(SMALL,), env={"NODECACHE_PASSTHROUGH": "false", "NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false"})

    def samples() -> dict:
        out = {}
        for fam in text_string_to_metric_families(d.metrics()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    path = snapshot_dir(d, SMALL, hub.commits[SMALL]) / "model.safetensors"
    size = path.stat().st_size
    path.read_bytes()
    first = samples()
    assert first[("nodecache_read_bytes_total", (("source", "upstream"),))] > 0
    assert first[("nodecache_upstream_bytes_total", (("upstream", "hf"),))] >= size
    with open(path, "rb") as f:  # drop this file's pages, not the host's: the kernel asks the daemon again
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    path.read_bytes()
    wait_until(lambda: d.status()["blobs"]["complete"] == 1, "model.safetensors verified")
    second = samples()
    local = ("nodecache_read_bytes_total", (("source", "local"),))
    assert second.get(local, 0) > first.get(local, 0)
    assert (
        second[("nodecache_upstream_bytes_total", (("upstream", "hf"),))]
        == first[("nodecache_upstream_bytes_total", (("upstream", "hf"),))]
    )
    assert second[("nodecache_cache_bytes", (("tier", "disk"),))] >= size
    assert second[("nodecache_cache_capacity_bytes", (("tier", "disk"),))] > 0
    assert second[("nodecache_blobs", (("state", "complete"),))] >= 1
    reads = ("nodecache_fuse_read_seconds_count", ())
    assert second[reads] > first[reads] > 0, "every read the daemon served is timed"


def test_grafana_dashboard_only_uses_metrics_the_daemon_exports(hub, daemons):
    import re

    dashboard = json.loads((Path(__file__).parent.parent / "daemonset" / "dashboards" / "nodecache.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(total|bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"nodecache_[a-z_]+", e)}
    d = daemons(repos=(SMALL,))
    exported = {re.sub(r"_total$", "", m) for m in re.findall(r"^# TYPE (nodecache_[a-z_]+) ", d.metrics(), re.M)}
    assert used and used <= exported, used - exported
