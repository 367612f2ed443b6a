"""The FUSE connection outlives the daemon: restarts (SIGTERM, kill -9, another state format)
under a reader in a private mount namespace, holding an open fd and an mmap, see no error."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BIG, SMALL, MiB, verified, wait_until

from nodecache import mounts
from nodecache.layout import repo_folder_name
from nodecache.testing.daemon import KeeperProcess, free_port
from nodecache.testing.hub import Fault
from testkit import READER


@pytest.fixture
def keeper(tmp_path):
    with KeeperProcess(tmp_path) as k:
        yield k


def snapshot(d, repo: str, commit: str) -> Path:
    return d.hub / repo_folder_name("model", repo) / "snapshots" / commit


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Reader:
    """testkit/reader.py in `unshare --mount --propagation private`."""

    def __init__(self, tmp_path: Path, spec: dict):
        self.out, self.stop_file = tmp_path / "reader.json", tmp_path / "reader.stop"
        spec = {**spec, "out": str(self.out), "stop": str(self.stop_file)}
        (tmp_path / "reader-spec.json").write_text(json.dumps(spec))
        cmd = ["unshare", "--mount", "--propagation", "private", sys.executable, str(READER)]
        self.proc = subprocess.Popen([*cmd, str(tmp_path / "reader-spec.json")], stderr=subprocess.PIPE)

    def stats(self) -> dict:
        try:
            return json.loads(self.out.read_text())
        except (OSError, ValueError):
            return {"rounds": 0, "errors": [], "slow": []}

    def rounds(self) -> int:
        if self.proc.poll() is not None:
            raise AssertionError(f"the reader died ({self.proc.returncode}): {self.proc.stderr.read().decode()}")
        return self.stats()["rounds"]

    def more_rounds(self, n: int = 2) -> None:
        """Wait until the reader did `n` whole rounds more: every kind of request went through."""
        start = self.rounds()
        wait_until(lambda: self.rounds() >= start + n, what="reader rounds")

    def finish(self) -> dict:
        self.stop_file.touch()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return self.stats()


def test_restarts_under_a_private_reader_with_an_open_fd_and_an_mmap(hub, keeper, daemons, tmp_path, small_repo):
    d = daemons(keeper=keeper)
    snap = snapshot(d, SMALL, hub.commits[SMALL])
    for f in small_repo.rglob("*"):
        if f.is_file():  # each open fills its blob
            assert (snap / f.relative_to(small_repo)).read_bytes() == f.read_bytes()
    wait_until(lambda: verified(snap), what="the snapshot verified (passthrough opens)")
    files = ("model.safetensors", "config.json", "tokenizer/vocab.txt")
    reader = Reader(
        tmp_path,
        {
            "files": {str(snap / f): sha256(small_repo / f) for f in files},
            "hold": str(snap / "model.safetensors"),
            "hold_sha256": sha256(small_repo / "model.safetensors"),
            "list": str(d.hub / repo_folder_name("model", SMALL) / "refs"),
        },
    )
    dev = mounts.top(str(d.mount)).dev
    try:
        reader.more_rounds()
        kinds = ["sigterm"] * 10 + ["kill9"] * 3 + ["format1", "format2"]
        for kind in kinds:
            if kind == "kill9":
                d.kill9()
            else:
                d.stop()
            if kind.startswith("format"):
                d.env["NODECACHE_STATE_FORMAT"] = kind[-1]
            d.start()
            reader.more_rounds()
        stats = reader.finish()
    finally:
        if reader.proc.poll() is None:
            reader.proc.kill()
    assert reader.proc.returncode == 0, f"the reader died: {reader.proc.stderr.read().decode()}"
    assert stats["errors"] == [], stats["errors"][:5]
    assert stats["rounds"] >= 2 * (len(kinds) + 1)
    assert mounts.top(str(d.mount)).dev == dev, "one connection all along: never mounted again"
    log = d.log()
    assert log.count("took over the connection") == len(kinds)
    assert log.count("requests left unanswered resent") == len(kinds)
    # each daemon read the format the one before it wrote: 3 (the default), kept by the daemons set to
    # formats 1 and 2 since the kernel holds numbers given as ranges (a daemon before them could not serve it)
    assert log.count("state format 3;") == len(kinds)
    assert log.count("handing it over in state format 3, not") == 2
    assert "handed the connection over to the keeper" in log


def test_a_fill_in_progress_resumes_across_restarts(hub, keeper, daemons, tmp_path, big_repo):
    """A reader in the middle of a lazily filled blob; the daemon is stopped and killed under it.
    It gets every byte right, and no chunk is fetched twice beyond those in flight at a switch."""
    held = Fault("hold", after=6)  # the 7th data response waits: the first switch lands mid-fill
    hub.faults.append(held)
    # small windows, so that "in flight" is a small bound: the kernel's read-ahead (1 MiB, up to
    # two windows), our read-ahead (2 chunks) and the whole-blob fill (2 requests of up to 2 chunks)
    env = {
        "NODECACHE_PARALLEL_PER_BLOB": "2",
        "NODECACHE_READ_AHEAD_CHUNKS": "2",
        "NODECACHE_BDI_READ_AHEAD_KB": "1024",
        # A weight file: the snapshot fill would give it every background connection instead.
        "NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false",
    }
    d = daemons(repos=(BIG,), keeper=keeper, env=env)
    path = snapshot(d, BIG, hub.commits[BIG]) / "weights.bin"
    want = hashlib.sha256((big_repo / "weights.bin").read_bytes()).hexdigest()
    script = (
        "import hashlib, sys\n"
        "h = hashlib.sha256()\n"
        "with open(sys.argv[1], 'rb') as f:\n"
        "    while b := f.read(1 << 20):\n"
        "        h.update(b)\n"
        "print(h.hexdigest())\n"
    )
    cmd = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script, str(path)]
    reader = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert held.reached.wait(30), "the fill never got to its 7th response"
        d.stop()  # SIGTERM mid-fill, one response held
        held.release.set()
        d.start()
        wait_until(lambda: float(os.getxattr(path, "user.nodecache.cached")) > 0.3, what="the fill going on")
        d.kill9()
        d.start()
        out, err = reader.communicate(timeout=120)
    finally:
        held.release.set()
        if reader.poll() is None:
            reader.kill()
            reader.wait(10)
    assert reader.returncode == 0, err
    assert out.strip() == want
    size = (big_repo / "weights.bin").stat().st_size
    fetched = sum(e - s for _, s, e in hub.stats.ranges)
    # in flight at each of the two switches (chunks of 1 MiB): the reader's read and the kernel's two
    # read-ahead windows, our read-ahead of 2 chunks past each, the whole-blob fill's 2 requests of 2
    # chunks; the held response is counted too, when it is let go
    in_flight = 2 * (3 * (1 + 2) + 2 * 2) * MiB + 2 * MiB
    seen: dict[int, int] = {}
    for _, start, end in hub.stats.ranges:
        for k in range(start // MiB, -(-end // MiB)):
            seen[k] = seen.get(k, 0) + 1
    again = sorted(k for k, n in seen.items() if n > 1)
    assert fetched <= size + in_flight, f"{fetched - size} bytes fetched twice; chunks fetched again: {again}"
    assert d.log().count("took over the connection") == 2


def test_without_a_keeper_a_stop_still_unmounts(hub, tmp_path, daemons):
    """A keeper socket nobody listens on: the daemon mounts and serves; its stop unmounts as before."""
    d = daemons(extra_args=["--keeper-socket", str(tmp_path / "nobody" / "keeper.sock")])
    assert (snapshot(d, SMALL, hub.commits[SMALL]) / "config.json").read_bytes()
    assert "no keeper" in d.log()
    d.stop()
    assert mounts.at(str(d.mount)) == []


def test_the_keeper_coming_back_gets_the_connection_again(hub, tmp_path, daemons):
    """The keeper restarts under a serving daemon: the daemon deposits its fd again, and a
    restart after that is a takeover."""
    k = KeeperProcess(tmp_path).start()
    try:
        d = daemons(keeper=k)
        k.proc.terminate()
        k.proc.wait(10)
        wait_until(lambda: "lost the keeper" in d.log(), what="the daemon noticing")
        k.start()
        wait_until(lambda: d.log().count("the keeper holds the connection") >= 2, what="deposit again")
        d.stop()
        t0 = time.monotonic()
        d.start()
        assert "took over the connection" in d.log()
        assert (snapshot(d, SMALL, hub.commits[SMALL]) / "config.json").read_bytes()
        assert time.monotonic() - t0 < 60
        d.stop()
    finally:
        k.stop()
    assert mounts.at(str(d.mount)) == []


def test_a_second_daemon_never_mounts_over_a_serving_one(hub, keeper, daemons, tmp_path):
    """The keeper gives a connection to one daemon at a time: a second one on the same mount waits
    for the first to let go (keeper_wait), then exits with one line instead of mounting over it."""
    d = daemons(keeper=keeper)
    second = daemons(keeper=keeper, workdir=tmp_path, start=False, env={"NODECACHE_KEEPER_WAIT": "1"})
    second.log_path = tmp_path / "second.log"
    second.args[second.args.index("--listen") + 1] = f"127.0.0.1:{free_port()}"
    with open(second.log_path, "ab") as log:
        rc = subprocess.run(second.args, env=second.env, stdout=log, stderr=subprocess.STDOUT, timeout=60).returncode
    assert rc == 1
    assert "still served by another daemon; not mounting over it" in second.log()
    assert "Traceback" not in second.log()
    assert len(mounts.at(str(d.mount))) == 1
    assert (snapshot(d, SMALL, hub.commits[SMALL]) / "config.json").read_bytes()


# the pieces, without a mount ---------------------------------------------------------------


def test_connection_state_formats_read_each_other_and_refuse_the_unknown():
    from nodecache.connstate import FORMATS, ConnState, StateError, decode, encode

    state = ConnState("/mnt", "0:42", 40, (1 << 37) | 1, conn_id="ab12", max_pages=256, max_background=64)
    for fmt in FORMATS:
        back = decode(encode(state, fmt))
        assert (back.mount, back.dev, back.minor, back.flags, back.format) == ("/mnt", "0:42", 40, state.flags, fmt)
    assert decode(encode(state, 2)).conn_id == "ab12" and decode(encode(state, 1)).conn_id is None
    assert json.loads(encode(state, 3))["compat"] == 3, "a daemon reading up to 2 refuses range numbers"
    assert json.loads(encode(state, 2))["compat"] == 1
    newer = json.loads(encode(state, 2))
    assert decode(json.dumps({**newer, "format": 4, "extra": [1]}).encode()).format == 4, "compat 1: still readable"
    for bad in (
        b"not json",
        b"[]",
        json.dumps({**newer, "format": 4, "compat": 4}).encode(),  # a format we cannot read
        json.dumps({**newer, "minor": "40"}).encode(),
        json.dumps({**newer, "flags": True}).encode(),
        json.dumps({**newer, "conn_id": 7}).encode(),
        b" " * 20000,
    ):
        with pytest.raises(StateError):
            decode(bad)


def test_the_inode_table_survives_a_reopen_and_starts_over_with_a_new_mount(tmp_path):
    from nodecache.inodes import PASSTHROUGH, SERVED, InodeTable

    t = InodeTable(tmp_path / "conn", cache_max=20)
    t.reset()
    conn_id = t.conn_id
    inos = {f"hub/f{i}": t.ino(f"hub/f{i}") for i in range(100)}
    assert len(set(inos.values())) == 100 and 1 not in inos.values()
    t.commit()
    assert len(t._ino_of) <= 20, "memory holds a bounded cache"
    assert {p: t.ino(p) for p in inos} == inos, "an evicted number is read back, never made anew"
    assert {p: t.find(p) for p in inos} == inos and t.find("hub/none") is None, "find gives no number"
    t.opened(inos["hub/f1"], 7, PASSTHROUGH)
    t.opened(inos["hub/f1"], 8, PASSTHROUGH)
    t.opened(inos["hub/f2"], 9, SERVED)
    t.set_backing(inos["hub/f1"], 5)
    t.env.close()  # as a kill -9 leaves it: no commit of anything pending, no close()
    t = InodeTable(tmp_path / "conn")
    assert t.conn_id == conn_id
    assert {p: t.ino(p) for p in inos} == inos and all(t.path(i) == p for p, i in inos.items())
    assert t.ino("hub/new") == max(inos.values()) + 1, "numbers are never reused"
    assert t.open_modes(inos["hub/f1"]) == (2, 0) and t.open_modes(inos["hub/f2"]) == (0, 1)
    assert t.backing(inos["hub/f1"]) == (5, False)
    assert t.released(inos["hub/f1"], 7) == PASSTHROUGH and t.released(inos["hub/f1"], 7) is None  # idempotent
    t.reset()
    assert t.conn_id != conn_id and t.path(inos["hub/f1"]) is None and t.backing(inos["hub/f1"]) is None
    t.close()


def test_an_immutable_folder_is_numbered_as_one_range_that_survives_a_reopen(tmp_path):
    """Entry i of a range is base + i; only (key, base, count) is written, and it outlives the daemon."""
    from nodecache.inodes import InodeTable

    t = InodeTable(tmp_path / "conn", cache_max=20)
    t.reset()
    before = t.ino("hub/x")
    base = t.range("hub/r/snapshots/c#1000", 1000)
    assert base == before + 1 and t.range("hub/r/snapshots/c#1000", 1000) == base, "asked again: the same"
    assert t.in_range(base + 999) == ("hub/r/snapshots/c#1000", 999) and t.in_range(before) is None
    assert t.ino("hub/y") == base + 1000, "a range's numbers are never given to a path"
    assert t.base("hub/r/snapshots/c#7") is None, "base gives no number"
    t.commit()
    others = [t.range(f"hub/r/snapshots/c/f{i}#10", 10) for i in range(50)]  # past the cache bound
    t.commit()
    with t.env.begin() as txn:
        assert txn.stat(t._by_path)["entries"] == 2, "no row per entry of a range"
    t.env.close()  # as a kill -9 leaves it
    t = InodeTable(tmp_path / "conn")
    assert t.base("hub/r/snapshots/c#1000") == base and t.path(base + 5) is None
    assert t.in_range(base + 5) == ("hub/r/snapshots/c#1000", 5)
    assert [t.in_range(b + 9) for b in others] == [(f"hub/r/snapshots/c/f{i}#10", 9) for i in range(50)]
    assert t.in_range(others[-1] + 10) is None and t.in_range(10**12) is None
    assert t.range("hub/new#3", 3) == others[-1] + 10
    t.reset()
    assert t.base("hub/r/snapshots/c#1000") is None and t.in_range(base) is None
    t.close()


def test_a_full_inode_table_grows_instead_of_failing_lookups(tmp_path, caplog):
    """A connection handed from daemon to daemon is never mounted afresh: its table only grows. When
    the map is full, new numbers still get written (the map grows), and survive a reopen."""
    from nodecache.inodes import InodeTable

    t = InodeTable(tmp_path / "conn", map_size=256 * 1024)
    t.reset()
    inos = {}
    with caplog.at_level("WARNING", logger="nodecache.inodes"):
        for batch in range(20):  # ~1 MiB of paths into a 256 KiB map
            for i in range(100):
                path = f"hub/datasets--org--d/snapshots/{'c' * 40}/shard-{batch:03d}/part-{i:05d}.parquet"
                inos[path] = t.ino(path)
            t.commit()
    assert "growing its map" in caplog.text
    t.close()
    t = InodeTable(tmp_path / "conn", map_size=256 * 1024)
    assert all(t.path(i) == p for p, i in inos.items()) and len(set(inos.values())) == 2000
    t.close()


def test_the_keeper_lends_a_connection_to_one_daemon_at_a_time(tmp_path):
    import threading

    from nodecache.keeper import Keeper, KeeperBusy, KeeperClient, KeeperError

    sock = tmp_path / "k" / "keeper.sock"
    stop = threading.Event()
    keeper = Keeper(sock)
    server = threading.Thread(target=keeper.serve, args=(stop,), daemon=True)
    server.start()
    wait_until(sock.exists, what="the keeper's socket")
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    r, w = os.pipe()  # stands in for /dev/fuse: the keeper only holds it
    try:
        first = KeeperClient(sock, timeout=5)
        assert first.take("/mnt") is None
        first.deposit("/mnt", r, b'{"format": 2}')
        second = KeeperClient(sock, timeout=0.5)
        with pytest.raises(KeeperBusy):
            second.take("/mnt")  # the first still holds the lease
        with pytest.raises(KeeperError, match="absolute"):
            second.take("relative")
        first.close()  # the first daemon is gone (however it went)
        wait_until(lambda: keeper.held() == {"/mnt": False}, what="the lease to end")
        fd, state = KeeperClient(sock, timeout=5).take("/mnt")
        assert state == b'{"format": 2}'
        os.write(w, b"same pipe")
        assert os.read(fd, 100) == b"same pipe", "the fd handed back is the one deposited"
        os.close(fd)
    finally:
        stop.set()
        server.join(10)
        os.close(r)
        os.close(w)
