"""Restarts and crashes: the index is the truth, no wrong byte is ever served."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from pathlib import Path

import pytest
from conftest import BIG, SMALL, MiB, counter, sha256_file, snapshot_dir, wait_until

from nodecache import mounts
from nodecache.testing.hub import Fault


def test_restart_serves_everything_with_upstream_gone(hub, daemons, small_repo):
    d = daemons(repos=(SMALL,))
    snap = snapshot_dir(d, SMALL, hub.commits[SMALL])
    want = {p.relative_to(small_repo): sha256_file(p) for p in small_repo.rglob("*") if p.is_file()}
    assert {rel: sha256_file(snap / rel) for rel in want} == want
    wait_until(lambda: d.status()["blobs"]["complete"] == len(want), "every blob verified")
    assert d.stop() == 0
    hub.stop()  # upstream is gone for good
    d2 = daemons(repos=(SMALL,), cache_dir=d.cache_dir)
    assert {rel: sha256_file(snap / rel) for rel in want} == want
    assert "cannot resolve upstream" in d2.log() and "serving org/small@main from the index" in d2.log()


def test_kill9_during_fill_resumes_without_wrong_bytes(hub, daemons, big_repo):
    # The 10th data response waits for the test: the crash lands mid-fill, whatever the machine's speed.
    held = Fault("hold", after=9)
    hub.faults.append(held)
    # Every data response is one of weights.bin's: the snapshot fill would also fetch config.json,
    # and under load its response was once the 10th, held, while weights.bin completed.
    d = daemons(repos=(BIG,), env={"NODECACHE_FSYNC": "true", "NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false"})
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    with open(path, "rb") as f:
        head = f.read(MiB)  # opens the blob: background fill starts
    try:
        assert held.reached.wait(30), "the fill never got to its 10th request"
        wait_until(lambda: float(_cached(path)) >= 0.1, "some chunks recorded")  # 9 responses of 1-2 chunks
        frac_before = float(_cached(path))
        assert frac_before < 1, "the held chunk is missing"
        d.kill9()
        hub.stats.reset()  # the held response is counted when released, after the restart's reads
        d2 = daemons(repos=(BIG,), cache_dir=d.cache_dir)
        want = (big_repo / "weights.bin").read_bytes()
        assert head == want[:MiB]
        assert float(_cached(path)) >= frac_before - 1 / 72, "verified chunks survive the crash"
        got = path.read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest()
        refetched = sum(e - s for _, s, e in hub.stats.ranges)
        assert refetched < len(want), "the restart resumed instead of starting over"
        assert d2.proc.poll() is None
    finally:
        held.release.set()


def _cached(path) -> str:
    import os

    return os.getxattr(path, "user.nodecache.cached").decode()


def test_kill9_during_eviction_churn_leaves_a_consistent_store(hub, daemons, tmp_path):
    """Crash repeatedly while reads force evictions; every restart must agree with the disk."""
    import json
    import os
    import random
    import threading
    import urllib.request

    files = {f"f{i}.bin": os.urandom(6 * MiB) for i in range(6)}
    commit = hub.add_repo("org/churn", files)
    env = {"NODECACHE_DISK_MAX": str(16 * MiB), "NODECACHE_MIN_FREE": "0", "NODECACHE_FSYNC": "true"}
    cache = tmp_path / "cache"
    rng = random.Random(3)
    for round_ in range(3):
        d = daemons(repos=("org/churn",), env=env, cache_dir=cache, workdir=tmp_path)
        snap = snapshot_dir(d, "org/churn", commit)

        def churn(snap=snap) -> None:
            try:
                for name in [*rng.sample(sorted(files), k=len(files))] * 2:  # 72 MiB through 16
                    (snap / name).read_bytes()
            except OSError:  # the crash lands mid-read
                pass

        t = threading.Thread(target=churn)
        t.start()
        wait_until(  # a little later each round
            lambda d=d, n=1 + round_: counter(d, "nodecache_evictions_total", tier="disk") >= n,
            "reads forcing evictions",
        )
        held = Fault("hold")  # the next data response waits for the test: the crash lands mid-fill
        hub.faults.append(held)
        assert held.reached.wait(60), "the churn fetched nothing more"
        d.kill9()
        held.release.set()
        t.join(30)  # the next `serve` detaches the dead mount itself

    d = daemons(repos=("org/churn",), env=env, cache_dir=cache, workdir=tmp_path)
    snap = snapshot_dir(d, "org/churn", commit)
    for name, data in files.items():
        assert hashlib.sha256((snap / name).read_bytes()).digest() == hashlib.sha256(data).digest(), name

    def disk_agrees() -> bool:  # an evicted file is renamed away at once, unlinked by a thread soon after
        with urllib.request.urlopen(d.url + "/v1/status") as r:
            used = json.load(r)["tiers"][0]["used"]
        on_disk = [p for p in (cache / "blobs").rglob("*") if p.is_file()]
        allocated = sum(p.stat().st_blocks * 512 for p in on_disk)
        agree = used <= 16 * MiB + 8 * MiB and allocated <= used + MiB
        return agree and {p.name for p in on_disk} <= {hashlib.sha256(v).hexdigest() for v in files.values()}

    wait_until(disk_agrees, "the tier's usage to match the blob files on disk", timeout=30)


def test_a_complete_blob_whose_file_is_gone_is_read_right_not_from_a_new_empty_file(hub, daemons, tmp_path):
    """A complete record without its file: a kill -9 in an eviction between the file's rename and
    the record left it so (before the record went first), a tier may lose a file. The open of a
    weight file whose snapshot fill runs starts that blob's fill, which makes a new sparse file
    and records the blob partial: the open must not hand that file to the kernel as the complete
    blob's (passthrough), whose reader read its zeros (a kill -9 churn test read a file so)."""
    import os

    files = {"f0.bin": os.urandom(2 * MiB), "f1.bin": os.urandom(2 * MiB)}
    commit = hub.add_repo("org/vanished", files)
    cache = tmp_path / "cache"
    d = daemons(repos=("org/vanished",), cache_dir=cache, workdir=tmp_path)
    snap = snapshot_dir(d, "org/vanished", commit)
    assert (snap / "f1.bin").read_bytes() == files["f1.bin"]
    wait_until(lambda: d.status()["blobs"]["complete"] >= 1, "f1.bin verified")
    d.kill9()
    [gone] = cache.glob(f"blobs/*/{hashlib.sha256(files['f1.bin']).hexdigest()}")
    gone.unlink()

    d = daemons(repos=("org/vanished",), cache_dir=cache, workdir=tmp_path)
    snap = snapshot_dir(d, "org/vanished", commit)
    assert (snap / "f0.bin").read_bytes() == files["f0.bin"]  # the snapshot's fill runs from here on
    got = (snap / "f1.bin").read_bytes()
    assert got == files["f1.bin"], f"{got.count(0)} of {len(got)} bytes are zeros"


@pytest.mark.parametrize("flags", ["os.O_RDONLY", "os.O_RDONLY | os.O_DIRECT"], ids=["buffered", "O_DIRECT"])
def test_sigterm_gives_waiting_readers_eio_then_the_mount_goes(hub, daemons, flags):
    """What kubelet does to the pod: SIGTERM. A reader waiting for upstream bytes gets EIO from
    the daemon (not ENOTCONN or ECONNABORTED from a connection already gone: a buffered
    reader's failed read-ahead is retried at once), then `serve` unmounts and exits 0."""
    import signal
    import subprocess
    import sys

    from nodecache import mounts

    d = daemons(repos=(BIG,), env={"NODECACHE_FILL_ON_OPEN": "false", "NODECACHE_READ_AHEAD_CHUNKS": "0"})
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    held = Fault("hold")
    hub.faults.append(held)
    code = (
        f"import errno, mmap, os; fd = os.open({str(path)!r}, {flags})\n"
        "try:\n    os.preadv(fd, [mmap.mmap(-1, 4096)], 0); print('data')\n"
        "except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    )
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert held.reached.wait(30), "the read never reached upstream"
        d.proc.send_signal(signal.SIGTERM)
        assert reader.communicate(timeout=30)[0].strip() == "EIO", d.log()
        assert d.proc.wait(30) == 0
    finally:
        held.release.set()
        if reader.poll() is None:
            reader.kill()
    assert mounts.at(str(d.mount)) == [], "serve unmounted on its way out"
    assert d.stop() == 0  # nothing left for the harness to clean


def test_the_mount_dir_bind_of_a_container_stays_and_the_host_sees_every_mount(hub, daemons, tmp_path):
    """In the DaemonSet the mount dir is a hostPath bind (Bidirectional). The daemon mounts on top of
    it, also after a kill -9, and never detaches the bind itself: the host would lose every later mount."""
    host = tmp_path / "host-mnt"  # the node's directory, on a shared mount as on a systemd host
    host.mkdir()
    subprocess.run(["mount", "--bind", str(host), str(host)], check=True)
    d = daemons(start=False)
    try:
        subprocess.run(["mount", "--make-shared", str(host)], check=True)
        d.mount.mkdir(parents=True)
        subprocess.run(["mount", "--bind", str(host), str(d.mount)], check=True)  # the container's view
        [bind] = mounts.at(str(d.mount))
        d.start()
        config = Path("hub", "models--" + SMALL.replace("/", "--"), "snapshots", hub.commits[SMALL], "config.json")
        want = (d.mount / config).read_bytes()
        assert (host / config).read_bytes() == want, "the host reads the daemon's mount"
        d.kill9()
        d2 = daemons(cache_dir=d.cache_dir)
        assert [e.fstype for e in mounts.at(str(d.mount))] == [bind.fstype, "fuse.nodecache"]
        assert mounts.at(str(d.mount))[0] == bind, "the bind under the dead mount was kept"
        assert (host / config).read_bytes() == want, "the host reads the new mount"
        assert d2.stop() == 0
        assert mounts.at(str(d.mount)) == [bind] and mounts.at(str(host))[-1].fstype == bind.fstype
    finally:
        d.stop()
        for path in (d.mount, host):
            with contextlib.suppress(OSError):
                mounts.unmount_all(str(path))


def test_sigterm_during_a_first_resolve_at_start_stops_at_once(tmp_path):
    """A start resolves the configured repos the index lacks before it serves (10^6 files take
    ~30 s, kubelet's grace is 30 s): SIGTERM then stops the resolution, the daemon exits 0 with
    nothing of the repo recorded, and the next start resolves it. Here the Hub holds the second
    tree page until the daemon has exited (or 60 s): a daemon that waited for it would not exit."""
    import asyncio
    import signal
    import threading
    import time

    from aiohttp import web
    from conftest import _need_fuse

    from nodecache.testing.daemon import DaemonProcess

    _need_fuse()
    commit = "c" * 40
    held, release = threading.Event(), threading.Event()
    ready: dict = {}

    async def revision(request: web.Request) -> web.Response:
        return web.json_response({"_id": "x", "id": "org/x", "sha": commit, "private": False, "gated": False})

    async def tree(request: web.Request) -> web.Response:
        if "cursor" not in request.query:
            nxt = f'<http://{request.host}{request.path}?cursor=1>; rel="next"'
            return web.json_response(
                [{"type": "file", "oid": "b" * 40, "size": 5, "path": "a.txt"}], headers={"Link": nxt}
            )
        if not release.is_set():
            held.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 60)
        return web.json_response([{"type": "file", "oid": "d" * 40, "size": 7, "path": "b.txt"}])

    def serve() -> None:
        async def main() -> None:
            app = web.Application()
            app.router.add_get("/api/models/org/x/revision/main", revision)
            app.router.add_get("/api/models/org/x/tree/" + commit, tree)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            ready["port"] = site._server.sockets[0].getsockname()[1]
            ready["stop"] = asyncio.Event()
            ready["loop"] = asyncio.get_running_loop()
            await ready["stop"].wait()
            await runner.cleanup()

        asyncio.run(main())

    server = threading.Thread(target=serve)
    server.start()
    wait_until(lambda: "stop" in ready, "the stand-in Hub listening")
    env = {"NODECACHE_FSYNC": "false", "NODECACHE_VERIFY_BEFORE_SERVE": ""}
    d = DaemonProcess(tmp_path, f"http://127.0.0.1:{ready['port']}", ["org/x"], env=env)
    try:
        d.mount.mkdir(parents=True, exist_ok=True)
        with open(d.log_path, "ab") as log:  # not d.start(): it waits for ready, after the resolution
            d.proc = subprocess.Popen(d.args, env=d.env, stdout=log, stderr=subprocess.STDOUT)
        assert held.wait(60), f"the resolution never asked the second tree page:\n{d.log()}"
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        try:
            code = d.proc.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - t0
        release.set()
        assert code == 0 and took < 10, f"exit {code} {took:.1f} s after SIGTERM:\n{d.log()[-3000:]}"
        assert "registered" not in d.log()
        assert mounts.at(str(d.mount)) == [], "serve unmounted on its way out"
        d.start()  # the tree is answered at once now
        snap = d.hub / "models--org--x" / "snapshots" / commit
        assert sorted(p.name for p in snap.iterdir()) == ["a.txt", "b.txt"]
    finally:
        release.set()
        d.stop()
        ready["loop"].call_soon_threadsafe(ready["stop"].set)
        server.join(30)
