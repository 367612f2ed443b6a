"""Our FUSE session against the real kernel: the less common requests, and readers that go away."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import BIG, SMALL, MiB, sha256_file, snapshot_dir


def test_statfs_xattrs_and_unknown_requests(hub, daemons):
    d = daemons(repos=(SMALL,))
    st = os.statvfs(d.mount)
    assert st.f_namemax == 255 and st.f_files > 0 and st.f_bsize == 4096
    path = snapshot_dir(d, SMALL, hub.commits[SMALL]) / "config.json"
    assert os.listxattr(path) == ["user.nodecache.cached"]
    with pytest.raises(OSError) as e:
        os.getxattr(path, "user.other")
    assert e.value.errno == errno.ENODATA
    # lseek(SEEK_DATA) is not implemented by us: the kernel falls back (ENOSYS is remembered), data still reads
    with open(path, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_DATA) == 0
        assert f.read() == path.read_bytes()
    assert os.readlink(path).startswith("../../blobs/")
    assert sorted(os.listdir(path.parent)) == ["README.md", "config.json", "model.safetensors", "tokenizer"]


def test_a_reader_killed_mid_read_leaves_the_daemon_serving(hub, daemons, big_repo):
    """The kernel interrupts the killed reader's requests; our late replies must not break the session."""
    d = daemons(repos=(BIG,), env={"NODECACHE_FILL_ON_OPEN": "false"})
    hub.rate_limit_bps = MiB  # slow enough that the reader is still waiting when it dies
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    reader = subprocess.Popen([sys.executable, "-c", f"open({str(path)!r}, 'rb').read()"])
    try:
        time.sleep(1.0)
        assert reader.poll() is None, "the reader finished before it could be killed"
        reader.send_signal(signal.SIGKILL)
        reader.wait(10)
    finally:
        if reader.poll() is None:
            reader.kill()
    hub.rate_limit_bps = None
    assert sha256_file(path) == sha256_file(big_repo / "weights.bin")
    assert d.status()["ready"]
