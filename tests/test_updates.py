"""Revisions that move upstream, preload lists, on-demand repos, the YAML config file."""

from __future__ import annotations

import errno
import json
import os
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


def test_a_pin_follows_its_branch_while_the_new_revision_fits_the_cache(hub, daemons, tmp_path):
    """A pinned branch that moves upstream has its new files filled; a revision larger than the
    whole cache is refused (logged), nothing of it fetched."""
    repo = "org/follow"
    versions = {"v1": {"a.bin": MiB}, "v2": {"a.bin": MiB, "b.bin": 2 * MiB}, "v3": {"c.bin": 40 * MiB}}
    for name, files in versions.items():
        (tmp_path / name).mkdir()
        for f, size in files.items():
            (tmp_path / name / f).write_bytes(os.urandom(size))
    hub.add_repo(repo, tmp_path / "v1")
    d = daemons(repos=(repo,), env={"NODECACHE_REF_TTL": "1", "NODECACHE_DISK_MAX": str(32 * MiB)})
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
    assert wait_for(lambda: f"pin: {repo}@main ({v3[:12]}): {versions['v3']['c.bin']:,} bytes do not fit" in d.log())
    assert status(d)["jobs"] == {"running": 0, "ready": 2, "error": 0}
    assert hub.stats.data_bytes == fetched, "nothing of it fetched"


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
