"""Our FUSE session against the real kernel: the less common requests, and readers that go away."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys

import pytest
from conftest import BIG, SMALL, sha256_file, snapshot_dir

from nodecache.testing.hub import Fault


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
    held = Fault("hold")  # one response waits for the test: the reader cannot finish the file
    hub.faults.append(held)
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    reader = subprocess.Popen([sys.executable, "-c", f"open({str(path)!r}, 'rb').read()"])
    try:
        assert held.reached.wait(30), "the reader's reads never reached upstream"
        assert reader.poll() is None, "the reader finished without a byte it needs"
        reader.send_signal(signal.SIGKILL)
        reader.wait(10)
    finally:
        held.release.set()  # the late reply lands after its reader is gone
        if reader.poll() is None:
            reader.kill()
    assert sha256_file(path) == sha256_file(big_repo / "weights.bin")
    assert d.status()["ready"]


@pytest.mark.parametrize(
    "how, sig",
    [("O_DIRECT", signal.SIGKILL), ("O_DIRECT", signal.SIGINT), ("buffered", signal.SIGKILL)],
)
def test_a_reader_waiting_on_a_slow_fill_dies_at_once(hub, daemons, big_repo, how, sig):
    """FUSE INTERRUPT. A read the reader waits on directly (O_DIRECT; also every lookup)
    keeps a killed or signalled process in the kernel until it is answered; we answer
    EINTR at once instead of after the fill (here: never, until the test releases it), and the fill goes on. A buffered
    read waits on page locks, which only a fatal signal breaks (the kernel's doing)."""
    d = daemons(repos=(BIG,), env={"NODECACHE_FILL_ON_OPEN": "false", "NODECACHE_READ_AHEAD_CHUNKS": "0"})
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    held = Fault("hold")  # the reader's one request waits upstream until the reader is dead
    hub.faults.append(held)
    flags = "os.O_RDONLY | os.O_DIRECT" if how == "O_DIRECT" else "os.O_RDONLY"
    code = (
        f"import mmap, os; fd = os.open({str(path)!r}, {flags}); print('open', flush=True); "
        "os.preadv(fd, [mmap.mmap(-1, 4096)], 0)"
    )
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "open\n"
        assert held.reached.wait(30), "the read never reached upstream"  # the reader waits on it now
        reader.send_signal(sig)
        # the fill cannot end while held: a reader that waited for it would be here until read_timeout (20 s)
        reader.wait(15)
        assert reader.returncode != 0
    finally:
        held.release.set()
        if reader.poll() is None:
            reader.kill()
            reader.wait(30)
    assert sha256_file(path) == sha256_file(big_repo / "weights.bin"), "the daemon serves on, right bytes"
    assert d.status()["ready"]


def test_a_large_read_of_a_blob_file_cut_short_under_the_daemon_is_eio_never_fewer_bytes(hub, daemons, big_repo):
    """Large READs are answered from the session's reply threads (the bytes never cross the loop):
    a blob file shorter than its recorded chunks (emptied, or damaged on disk) must give EIO there,
    never a short reply or zeros."""
    d = daemons(repos=(BIG,), env={"NODECACHE_FILL_ON_OPEN": "false", "NODECACHE_READ_AHEAD_CHUNKS": "0"})
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    want = (big_repo / "weights.bin").read_bytes()
    blob_id = os.readlink(path).rsplit("/", 1)[1]
    buf = mmap.mmap(-1, 512 * 1024)  # O_DIRECT: every read goes to the daemon, none to the page cache
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], 0) == len(buf) and buf[:] == want[: len(buf)]  # chunk 0 (1 MiB) is stored
        assert os.preadv(fd, [buf], len(buf)) == len(buf) and buf[:] == want[len(buf) : 2 * len(buf)]
        os.truncate(d.cache_dir / "blobs" / blob_id[:2] / blob_id, 4096)
        with pytest.raises(OSError) as e:
            os.preadv(fd, [buf], len(buf))
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert d.status()["ready"]
