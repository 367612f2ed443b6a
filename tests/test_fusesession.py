"""Our FUSE session against the real kernel: the less common requests, and readers that go away."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import machine
import pytest
from conftest import BIG, SMALL, sha256_file, snapshot_dir

from nodecache import fuseproto as p
from nodecache.fuseproto import ENOATTR, Attr
from nodecache.fusesession import FuseError, Opened, Session
from nodecache.inodes import InodeTable
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


class _Folder:
    """Operations of a mount with one folder of `n` files, and `wait/` (ino 2), whose lookups wait
    on `gate` (a handler that cannot answer at once, like a repo resolved on demand)."""

    def __init__(self, n: int):
        self.n = n
        self.gate: asyncio.Event | None = None
        self.cancelled = 0

    def _attr(self, ino: int) -> Attr:
        if ino in (1, 2):
            return Attr(ino, stat.S_IFDIR | 0o555, nlink=2, timeout=0)
        if 10 <= ino < 10 + self.n:
            return Attr(ino, stat.S_IFREG | 0o444, size=ino, timeout=0)
        raise FuseError(errno.ENOENT)

    async def lookup(self, parent: int, name: bytes) -> Attr:
        if parent == 1 and name == b"wait":
            return self._attr(2)
        if parent == 2:
            try:
                if name.startswith(b"t"):  # a wait on a task of its own, as a repo resolved on demand
                    await asyncio.get_running_loop().create_task(self.gate.wait())
                else:
                    await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            if name == b"boom":
                raise RuntimeError("a handler that fails after its wait")
            return self._attr(10)
        if parent == 1 and name.startswith(b"f") and name[1:].isdigit():
            return self._attr(10 + int(name[1:]))
        raise FuseError(errno.ENOENT)

    async def getattr(self, ino: int) -> Attr:
        return self._attr(ino)

    async def opendir(self, ino: int) -> Opened:
        return Opened(ino)

    async def readdir(self, fh: int, start: int):
        return ((b"f%d" % i, self._attr(10 + i)) for i in range(start, self.n))

    async def releasedir(self, fh: int) -> None:
        return None

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        raise FuseError(ENOATTR)

    async def listxattr(self, ino: int) -> list[bytes]:
        return []


def _folder_mount(tmp_path, n: int) -> tuple[_Folder, Path]:
    """A `_Folder` of n files and an empty mountpoint for it; skips where FUSE cannot mount."""
    machine_reason = machine.fuse()
    if machine_reason:
        pytest.skip(machine_reason)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return _Folder(n), mnt


def test_metadata_requests_are_answered_without_a_task_each(tmp_path):
    """A walk sends one to three metadata requests per file, each answered from memory: the session
    runs their handlers as they are read, with no asyncio task (nor a turn of the loop) per request.
    One whose handler waits goes on in a task: answered after its wait, EIO if it fails after it,
    and a daemon that stops cancels it (no request is left without a reply)."""
    n = 300
    ops, mnt = _folder_mount(tmp_path, n)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ops.gate = asyncio.Event()
        tasks = []
        default = loop.get_task_factory()

        def counting(loop, coro, **kw):
            task = asyncio.Task(coro, loop=loop, **kw) if default is None else default(loop, coro, **kw)
            tasks.append(coro.__qualname__)
            return task

        session = Session(ops, mnt, InodeTable(tmp_path / "inodes"), passthrough=False)
        session.mount()
        serving = loop.create_task(session.serve())
        try:
            await asyncio.to_thread(os.stat, mnt)  # INIT, then the first requests
            loop.set_task_factory(counting)

            def walk() -> int:
                entries = [e.name for e in os.scandir(mnt)]
                for name in entries:
                    os.lstat(mnt / name)  # timeout 0: a GETATTR or a LOOKUP for each
                    os.lstat(mnt / name)
                return len(entries)

            assert await asyncio.to_thread(walk) == n + 0  # wait/ is not listed
            metadata = [t for t in tasks if "_handle" in t or "_resume" in t]
            assert metadata == [], f"{len(metadata)} tasks for the metadata requests of a walk of {n} entries"

            slow = asyncio.ensure_future(asyncio.to_thread(os.stat, mnt / "wait" / "x"))
            boom = asyncio.ensure_future(asyncio.to_thread(os.stat, mnt / "wait" / "boom"))
            while sum("_resume" in t for t in tasks) < 2:
                await asyncio.sleep(0.01)  # both lookups read and waiting, each in a task now
            assert not slow.done() and not boom.done()
            ops.gate.set()
            assert (await slow).st_size == 10
            with pytest.raises(OSError) as e:
                await boom
            assert e.value.errno == errno.EIO

            ops.gate.clear()
            stuck = asyncio.ensure_future(asyncio.to_thread(os.stat, mnt / "wait" / "y"))
            while sum("_resume" in t for t in tasks) < 3:
                await asyncio.sleep(0.01)
            running = [task for _, task in session._running.values()]
            assert len(running) == 1
            running[0].cancel()  # what serve()'s end and an INTERRUPT do: the handler sees the cancel
            with pytest.raises(OSError) as e:
                await stuck
            assert e.value.errno == errno.EINTR and ops.cancelled == 1
        finally:
            loop.set_task_factory(default)
            await session.unmount()
            await serving

    asyncio.run(main())


def test_a_metadata_request_waiting_on_a_task_is_cancelled_as_a_task_would_be(tmp_path):
    """A lookup that waits on a task of its own (fusefs resolves a repo on demand in one): a cancel
    (serve()'s end, a hand-over) reaches the handler as CancelledError once that task is cancelled,
    never as "await wasn't used with future" (EIO); and a hand-over to a server that asks the kernel
    to resend leaves the request unanswered, for the next server to answer."""
    ops, mnt = _folder_mount(tmp_path, 3)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ops.gate = asyncio.Event()
        table = InodeTable(tmp_path / "inodes")
        session = Session(ops, mnt, table, passthrough=False)
        session.mount()
        serving = loop.create_task(session.serve())
        nxt, serving_next = None, None
        try:
            await asyncio.to_thread(os.stat, mnt)  # INIT

            async def stuck(name: str) -> asyncio.Future:
                started = len(session._running)
                waiting = asyncio.ensure_future(asyncio.to_thread(os.stat, mnt / "wait" / name))
                while len(session._running) == started:
                    await asyncio.sleep(0.01)  # read, and waiting on its task
                return waiting

            first = await stuck("t1")
            [(_, task)] = session._running.values()
            task.cancel()
            with pytest.raises(OSError) as e:
                await first
            assert e.value.errno == errno.EINTR and ops.cancelled == 1

            if not session.agreed & p.HAS_RESEND:
                return  # the kernel cannot resend: the hand-over answers EIO (see Session.handover)
            second = await stuck("t2")
            fd = os.dup(session.fd)  # what the keeper holds
            assert await session.handover(grace=0.05) == 1
            await serving
            assert not second.done() and ops.cancelled == 2
            nxt = Session(ops, mnt, table, passthrough=False)
            nxt.adopt(fd, session.dev, session.agreed, session.minor)
            serving_next = loop.create_task(nxt.serve())
            ops.gate.set()
            assert nxt.resend()
            assert (await asyncio.wait_for(second, 10)).st_size == 10  # answered by the next server
        finally:
            ops.gate.set()
            last = nxt if nxt is not None else session
            await last.unmount()
            if serving_next is not None:
                await serving_next
            if not serving.done():
                await serving

    asyncio.run(main())


def test_a_process_killed_while_its_lookup_waits_leaves_at_once(tmp_path):
    """A lookup can wait long (a repo resolved on demand: tens of seconds at 10^6 files), and the
    kernel keeps a killed process until its request is answered: the INTERRUPT it sends for the
    lookup is answered EINTR at once, and the handler sees the cancel."""
    ops, mnt = _folder_mount(tmp_path, 3)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ops.gate = asyncio.Event()
        session = Session(ops, mnt, InodeTable(tmp_path / "inodes"), passthrough=False)
        session.mount()
        serving = loop.create_task(session.serve())
        looker = None
        try:
            await asyncio.to_thread(os.stat, mnt)  # INIT
            code = f"import os; os.stat({str(mnt / 'wait' / 't1')!r})"
            looker = subprocess.Popen([sys.executable, "-c", code])
            while not session._running:
                await asyncio.sleep(0.01)  # the lookup is read and waits on its task
            looker.send_signal(signal.SIGKILL)
            # until answered, the killed process stays in the kernel: here until the gate opens
            assert await asyncio.to_thread(looker.wait, 10) == -signal.SIGKILL
            assert ops.cancelled == 1 and not session._running
        finally:
            ops.gate.set()  # a looker still held is answered now (by this loop: never block it)
            try:
                if looker is not None and looker.poll() is None:
                    looker.kill()
                    await asyncio.to_thread(looker.wait, 10)
            finally:
                await session.unmount()
                await serving

    asyncio.run(main())
