"""Revisions that move upstream, preload lists, on-demand repos, the YAML config file."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import BIG, SMALL, MiB, sha256_file, snapshot_dir
from test_mount import run_hf_offline

from nodecache.layout import repo_folder_name


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def status(d) -> dict:
    with urllib.request.urlopen(d.url + "/v1/status", timeout=10) as r:
        return json.load(r)


def test_new_upstream_commit_appears_beside_the_old_one(hub, daemons, small_repo, tmp_path):
    d = daemons(repos=(SMALL,), env={"NODECACHE_REF_TTL": "1"})
    old = hub.commits[SMALL]
    repo_dir = d.hub / repo_folder_name("model", SMALL)
    handle = open(snapshot_dir(d, SMALL, old) / "config.json", "rb")
    try:
        v2 = tmp_path / "v2"
        v2.mkdir()
        for p in small_repo.rglob("*"):
            if p.is_file():
                (v2 / p.relative_to(small_repo)).parent.mkdir(parents=True, exist_ok=True)
                (v2 / p.relative_to(small_repo)).write_bytes(p.read_bytes())
        (v2 / "config.json").write_text('{"hidden_size": 1024}')
        new = hub.add_repo(SMALL, v2)
        assert new != old
        assert wait_for(lambda: (repo_dir / "refs" / "main").read_text() == new), "refs/main follows upstream"
        assert sorted(os.listdir(repo_dir / "snapshots")) == sorted([old, new])
        assert (snapshot_dir(d, SMALL, new) / "config.json").read_text() == '{"hidden_size": 1024}'
        assert handle.read() == (small_repo / "config.json").read_bytes(), "the old snapshot stays readable"
        assert (snapshot_dir(d, SMALL, old) / "config.json").read_bytes() == (small_repo / "config.json").read_bytes()
        got = run_hf_offline(d.hub, SMALL)
        assert got["snapshot"] == str(snapshot_dir(d, SMALL, new))
    finally:
        handle.close()


def post(d, path: str, body: dict) -> dict:
    req = urllib.request.Request(d.url + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def test_a_pin_follows_its_branch_while_the_new_revision_fits_the_cache(hub, daemons, tmp_path):
    """A pinned branch that moves upstream has its new files filled; one that moves to a
    revision larger than the whole cache is refused (logged once, nothing of it fetched) and the
    pin keeps the commit it holds: its files stay pinned, the new revision's are read lazily and
    evicted like any others (before, the pin went with the branch: the held files became
    evictable and the lazily read ones of the new revision pinned, filling the cache with bytes
    nothing could evict). A later move to a revision that fits is followed again."""
    repo = "org/follow"
    versions = {
        "v1": {"a.bin": MiB},
        "v2": {"a.bin": MiB, "b.bin": 2 * MiB},
        "v3": {"c.bin": 40 * MiB},
        "v4": {"a.bin": MiB, "d.bin": MiB},
    }
    for name, files in versions.items():
        (tmp_path / name).mkdir()
        for f, size in files.items():
            (tmp_path / name / f).write_bytes(os.urandom(size))
    for name in ("v1", "v4"):  # one a.bin throughout
        (tmp_path / name / "a.bin").write_bytes((tmp_path / "v2" / "a.bin").read_bytes())
    hub.add_repo(repo, tmp_path / "v1")
    # A read fills what it reads only: an open's whole-blob fill of c.bin (40 MiB into 32) would
    # still be running (in use, not evicted) when the test evicts, under load.
    env = {"NODECACHE_REF_TTL": "1", "NODECACHE_DISK_MAX": str(32 * MiB), "NODECACHE_FILL_ON_OPEN": "false"}
    d = daemons(repos=(repo,), env=env)
    req = urllib.request.Request(d.url + "/v1/pin", data=json.dumps({"repo": repo}).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 202
    assert wait_for(lambda: status(d)["jobs"]["ready"] == 1)
    v2 = hub.add_repo(repo, tmp_path / "v2")
    b = snapshot_dir(d, repo, v2) / "b.bin"
    assert wait_for(lambda: status(d)["jobs"]["ready"] == 2), "the moved pin's new revision is filled"
    assert os.getxattr(b, "user.nodecache.cached") == b"1.000000"
    fetched = hub.stats.data_bytes
    v3 = hub.add_repo(repo, tmp_path / "v3")
    refused = f"pin: {repo}@main ({v3[:12]}): {versions['v3']['c.bin']:,} bytes do not fit"
    assert wait_for(lambda: refused in d.log())
    assert status(d)["jobs"] == {"running": 0, "ready": 2, "error": 0}
    assert hub.stats.data_bytes == fetched, "nothing of it fetched"
    [pin] = status(d)["pins"]
    assert (pin["commit"], pin["latest"], pin["ready"]) == (v2, v3, True), pin
    cmd = [sys.executable, "-m", "nodecache", "status", "--endpoint", d.url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    assert f"pinned {repo}@main ({v2[:12]}; its revision names {v3[:12]} now) pin" in out, out

    with open(snapshot_dir(d, repo, v3) / "c.bin", "rb") as f:  # read lazily: its first MiB
        assert f.read(MiB) == (tmp_path / "v3" / "c.bin").read_bytes()[:MiB]
    # c.bin is in use until the kernel's RELEASE of its handle and its read-ahead reach the daemon
    # (both lag an HTTP call under load): evicted then; a and b, pinned, stay.
    assert wait_for(lambda: post(d, "/v1/evict", {"repo": repo})["kept_in_use_or_pinned"] == 2)
    assert os.getxattr(snapshot_dir(d, repo, v3) / "c.bin", "user.nodecache.cached") == b"0.000000"
    assert os.getxattr(b, "user.nodecache.cached") == b"1.000000", "the held revision stays whole"

    v4 = hub.add_repo(repo, tmp_path / "v4")
    assert wait_for(lambda: status(d)["pins"][0]["commit"] == v4), "followed again once it fits"
    assert wait_for(lambda: status(d)["pins"][0]["ready"]), "and filled"
    assert os.getxattr(snapshot_dir(d, repo, v4) / "d.bin", "user.nodecache.cached") == b"1.000000"
    assert d.log().count(refused) == 1, "the refusal is logged once, not every round"
    out = post(d, "/v1/evict", {"repo": repo})
    assert out["kept_in_use_or_pinned"] == 2, out  # v4's two files; b.bin of v2 is let go
    assert os.getxattr(b, "user.nodecache.cached") == b"0.000000"


def test_a_branch_refused_beside_another_pin_is_followed_once_that_pin_goes(hub, daemons, tmp_path):
    """A refusal is remembered (logged once) only until the pins change: unpinned, the other
    pin's bytes are room, and the next housekeeping round takes the revision."""
    for name, size in {"v1": MiB, "v2": 24 * MiB, "other": 12 * MiB}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.bin").write_bytes(os.urandom(size))
    hub.add_repo("org/follow", tmp_path / "v1")
    hub.add_repo("org/other", tmp_path / "other")
    env = {"NODECACHE_REF_TTL": "1", "NODECACHE_DISK_MAX": str(32 * MiB), "NODECACHE_MIN_FREE": "0"}
    d = daemons(repos=("org/follow", "org/other"), env=env)
    for repo in ("org/other", "org/follow"):
        post(d, "/v1/pin", {"repo": repo})
    assert wait_for(lambda: all(p["ready"] for p in status(d)["pins"]) and len(status(d)["pins"]) == 2)
    v2 = hub.add_repo("org/follow", tmp_path / "v2")  # 24 MiB: fits 32, not beside the other pin's 12
    assert wait_for(lambda: "kept by other pins" in d.log())
    req = urllib.request.Request(d.url + "/v1/pin", data=json.dumps({"repo": "org/other"}).encode(), method="DELETE")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
    assert wait_for(lambda: [(p["commit"], p["ready"]) for p in status(d)["pins"]] == [(v2, True)]), status(d)["pins"]


def test_a_pin_written_before_pins_held_a_commit_takes_the_one_its_revision_names(hub, daemons, tmp_path):
    """An index from an older version has pins without a commit: at start each takes the one its
    revision names, so a branch that then outgrows the cache leaves it there (before, such a
    pin followed its branch anywhere, and counted the too-big revision as kept)."""
    import lmdb

    repo = "org/legacy"
    for name, size in {"v1": MiB, "v2": 40 * MiB}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.bin").write_bytes(os.urandom(size))
    v1 = hub.add_repo(repo, tmp_path / "v1")
    d = daemons(repos=(repo,), env={"NODECACHE_REF_TTL": "1", "NODECACHE_DISK_MAX": str(32 * MiB)})
    post(d, "/v1/pin", {"repo": repo})
    assert wait_for(lambda: status(d)["pins"][0]["ready"])
    d.stop()
    env = lmdb.open(str(d.cache_dir / "index"), max_dbs=16)
    with env.begin(write=True) as txn:  # as an older version wrote it
        db = env.open_db(b"pins", txn=txn)
        key = f"model:{repo}\x00main".encode()
        value = json.loads(txn.get(key, db=db))
        del value["commit"]
        txn.put(key, json.dumps(value).encode(), db=db)
    env.close()
    d.start()
    v2 = hub.add_repo(repo, tmp_path / "v2")
    assert wait_for(lambda: "bytes do not fit" in d.log())
    [pin] = status(d)["pins"]
    assert (pin["commit"], pin["latest"], pin["ready"]) == (v1, v2, True), pin


def test_a_pinned_branch_the_mirror_moved_is_filled_by_the_next_housekeeping_round(hub, daemons, tmp_path):
    """The mirror re-resolves a branch when a client asks for it, outside the housekeeping's own
    re-resolve: that round then finds no ref moved, yet the pin has a new revision to take and fill
    (before, its files were left to be read lazily)."""
    repo = "org/viamirror"
    for name, files in {"v1": ("a.bin",), "v2": ("a.bin", "b.bin")}.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(os.urandom(MiB))
    hub.add_repo(repo, tmp_path / "v1")
    d = daemons(repos=(repo,), env={"NODECACHE_REF_TTL": "20"})  # a round every 10 s; refs re-resolved after 20
    post(d, "/v1/pin", {"repo": repo})
    assert wait_for(lambda: status(d)["pins"][0]["ready"])
    v2 = hub.add_repo(repo, tmp_path / "v2")
    with urllib.request.urlopen(f"{d.url}/{repo}/resolve/main/a.bin", timeout=30) as r:  # the mirror
        assert r.headers["X-Repo-Commit"] == v2
    b = snapshot_dir(d, repo, v2) / "b.bin"
    assert wait_for(lambda: status(d)["pins"][0]["ready"] and status(d)["pins"][0]["commit"] == v2, timeout=30)
    assert os.getxattr(b, "user.nodecache.cached") == b"1.000000", "filled, never read"


def test_preload_list_is_filled_at_start_and_pinned(hub, daemons, big_repo):
    d = daemons(repos=(), env={"NODECACHE_PRELOAD": f"{BIG}=pin {SMALL}"})
    assert wait_for(lambda: status(d)["jobs"]["ready"] == 2, timeout=60)
    st = status(d)
    assert [(p["repo"], p["mode"], p["ready"]) for p in st["pins"]] == [(BIG, "pin", True)]
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    assert os.getxattr(path, "user.nodecache.cached") == b"1.000000"
    before = hub.stats.data_bytes
    assert sha256_file(path) == sha256_file(big_repo / "weights.bin")
    assert hub.stats.data_bytes == before


def test_a_preload_larger_than_the_cache_is_refused_and_the_next_one_filled(hub, daemons, big_repo):
    before = hub.stats.data_bytes
    d = daemons(repos=(), env={"NODECACHE_PRELOAD": f"{BIG} {SMALL}", "NODECACHE_DISK_MAX": str(32 * MiB)})
    assert wait_for(lambda: status(d)["jobs"]["ready"] == 1, timeout=60)
    said = [line for line in d.log().splitlines() if f"preload {BIG}: " in line]
    assert len(said) == 1 and f"{BIG}@main ({hub.commits[BIG][:12]}): 75,497,47" in said[0], said
    assert "bytes do not fit this node's cache" in said[0] and "ERROR" in said[0], said
    assert status(d)["jobs"]["error"] == 0 and hub.stats.data_bytes - before < 8 * MiB, "nothing of it fetched"
    assert "weights.bin" in os.listdir(snapshot_dir(d, BIG, hub.commits[BIG])), "still listed, read lazily"


def test_on_demand_lookup_resolves_allowed_repos_only(hub, daemons):
    d = daemons(repos=(), env={"NODECACHE_ON_DEMAND": "org/sm*"})
    assert sorted(os.listdir(d.hub)) == [".locks", "CACHEDIR.TAG"]  # nothing listed yet
    assert os.listdir(d.hub / repo_folder_name("model", SMALL) / "snapshots") == [hub.commits[SMALL]]
    assert hub.stats.data_bytes == 0
    for name in (repo_folder_name("model", BIG), "models--org--smallish", "models--../x"):
        with pytest.raises(OSError) as e:
            os.stat(d.hub / name)
        assert e.value.errno == errno.ENOENT


def test_yaml_config_file(hub, daemons, tmp_path):
    cfg = tmp_path / "nodecache.yaml"
    cfg.write_text(f"disk_max: 1Gi\npreload:\n  - repo: {SMALL}\n    pin: true\nread_ahead_chunks: 2\n")
    d = daemons(repos=(), extra_args=["--config", str(cfg)])
    assert wait_for(lambda: status(d)["jobs"]["ready"] == 1, timeout=60)
    st = status(d)
    assert st["tiers"][0]["capacity"] == 1 << 30
    assert st["pins"][0]["repo"] == SMALL
    bad = tmp_path / "bad.yaml"
    bad.write_text("disk_maxx: 1Gi\n")
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "nodecache", "serve", "--config", str(bad), "--mount", str(tmp_path / "m")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "disk_maxx: unknown setting" in out.stderr
