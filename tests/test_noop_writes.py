"""Old clients' no-op writes on the mount: an unchanged ref, lock files. Everything else stays EROFS."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import SMALL, snapshot_dir

from nodecache.layout import repo_folder_name

HF026 = Path(__file__).resolve().parent.parent / ".venv-hf026" / "bin" / "python"

HF_ONLINE = """
import json, sys
import huggingface_hub
from huggingface_hub import hf_hub_download, snapshot_download
repo = sys.argv[1]
print(json.dumps({
    "version": huggingface_hub.__version__,
    "snapshot": snapshot_download(repo),
    "config": hf_hub_download(repo, "config.json"),
}))
"""


def test_rewriting_a_ref_with_its_commit_succeeds_and_changes_refused(hub, daemons):
    d = daemons()
    ref = d.hub / repo_folder_name("model", SMALL) / "refs" / "main"
    commit = hub.commits[SMALL]
    with open(ref, "w") as f:  # O_WRONLY|O_CREAT|O_TRUNC, then the same 40 bytes
        f.write(commit)
    ref.write_text(commit)
    with open(ref, "r+b") as f:  # rewriting a part in place with what it holds
        f.seek(10)
        f.write(commit[10:20].encode())
    assert ref.read_text() == commit
    other = "f" * 40
    with pytest.raises(OSError) as e:
        ref.write_text(other)
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:  # a prefix after O_TRUNC would leave the ref cut short
        with open(ref, "w") as f:
            f.write(commit[:20])
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        with open(ref, "a") as f:
            f.write(commit)
    assert e.value.errno == errno.EROFS
    for attempt in (lambda: os.truncate(ref, 0), lambda: os.chmod(ref, 0o600), lambda: os.unlink(ref)):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    assert ref.read_text() == commit


def test_content_is_never_writable(hub, daemons, small_repo):
    """The mount is not `ro` at the kernel level (for the no-op writes above): every other write is refused here."""
    d = daemons()
    repo = d.hub / repo_folder_name("model", SMALL)
    snap = repo / "snapshots" / hub.commits[SMALL]
    blob = next((repo / "blobs").iterdir())
    attempts = {
        "write a snapshot file": lambda: open(snap / "config.json", "r+b").close(),
        "truncate a blob": lambda: open(blob, "wb").close(),
        "append to a blob": lambda: open(blob, "ab").close(),
        "create in a snapshot": lambda: open(snap / "new.txt", "w").close(),
        "mkdir in a snapshot": lambda: os.mkdir(snap / "newdir"),
        "unlink a snapshot link": lambda: os.unlink(snap / "config.json"),
        "rename a snapshot link": lambda: os.rename(snap / "config.json", snap / "c.json"),
        "symlink in blobs": lambda: os.symlink("x", repo / "blobs" / "evil"),
        "chmod a blob": lambda: os.chmod(blob, 0o777),
        "truncate a blob by path": lambda: os.truncate(blob, 0),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS, (what, e.value)
    assert (snap / "config.json").read_bytes() == (small_repo / "config.json").read_bytes()


def test_lock_files_live_in_memory_under_locks_only(hub, daemons):
    d = daemons()
    locks = d.hub / ".locks" / repo_folder_name("model", SMALL)
    lock = locks / ("a" * 64 + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # what filelock does
    try:
        os.fchmod(fd, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"pid")
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    assert os.listdir(locks) == [lock.name] and lock.stat().st_size == 0
    os.unlink(lock)
    assert os.listdir(locks) == []
    snap = snapshot_dir(d, SMALL, hub.commits[SMALL])
    for attempt in (
        lambda: open(snap / "x.lock", "w"),
        lambda: open(d.hub / ".locks" / "x.lock", "w"),  # lock files go in a repo's lock folder
        lambda: os.mkdir(locks / "sub"),
        lambda: os.rename(locks, d.hub / ".locks" / "other"),
        lambda: open(d.hub / "new", "w"),
    ):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS


def test_huggingface_hub_026_online_on_the_mount(hub, daemons):
    """0.26 without HF_HUB_OFFLINE writes refs/main (unchanged) on every snapshot_download."""
    if not HF026.exists():
        pytest.skip(".venv-hf026 is missing: .ci/setup installs huggingface_hub 0.26 there")
    d = daemons()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HUB_CACHE": str(d.hub), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"}
    out = subprocess.run([str(HF026), "-c", HF_ONLINE, SMALL], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    snap = snapshot_dir(d, SMALL, hub.commits[SMALL])
    assert got == {"version": "0.26.5", "snapshot": str(snap), "config": str(snap / "config.json")}
    assert (d.hub / repo_folder_name("model", SMALL) / "refs" / "main").read_text() == hub.commits[SMALL]
