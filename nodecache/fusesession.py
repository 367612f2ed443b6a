"""One FUSE connection on the asyncio loop: mount, read requests, answer them, unmount.

The kernel hands us one request per read of /dev/fuse; each becomes a task, so
a read waiting on upstream never holds up a lookup. Every task ends in exactly
one reply (a handler exception becomes EIO): an unanswered request hangs its
caller forever. Filesystem logic lives in `fusefs`; this module only moves
bytes between the kernel and those handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import directio, mounts
from . import fuseproto as p
from .blobfile import FileSlice
from .inodes import PASSTHROUGH, SERVED, InodeTable

log = logging.getLogger(__name__)

_BUF = (1 << 20) + 4096  # the kernel insists on room for max_write plus headers; be generous
SLICE_MIN = 64 * 1024  # a READ at least this large is answered from a reply thread (FileSlice)
_REPLY_THREADS = 2
FSTYPE = "fuse.nodecache"


class FuseError(Exception):
    """Raised by a handler to answer with this errno."""

    def __init__(self, errno_: int):
        super().__init__(os.strerror(errno_))
        self.errno = errno_


@dataclass
class Opened:
    """A handler's answer to open(): our handle, and how the kernel should read it."""

    fh: int
    keep_cache: bool = False
    backing: Path | None = None  # a file the kernel may read itself (passthrough) instead of asking us
    direct_io: bool = False  # every read and write comes to us (the no-op writes of fusefs)


class Operations(Protocol):
    async def lookup(self, parent: int, name: bytes) -> p.Attr: ...
    async def getattr(self, ino: int) -> p.Attr: ...
    async def readlink(self, ino: int) -> bytes: ...
    async def opendir(self, ino: int) -> Opened: ...
    async def readdir(self, fh: int, start: int) -> Iterable[tuple[bytes, p.Attr]]: ...
    async def releasedir(self, fh: int) -> None: ...
    async def statfs(self) -> tuple[int, int]: ...
    async def getxattr(self, ino: int, name: bytes) -> bytes: ...
    async def listxattr(self, ino: int) -> list[bytes]: ...
    async def open(self, ino: int, flags: int) -> Opened: ...
    async def read(self, fh: int, offset: int, size: int) -> bytes: ...
    async def release(self, fh: int) -> None: ...
    async def create(self, parent: int, name: bytes, flags: int) -> tuple[p.Attr, Opened]: ...
    async def write(self, fh: int, offset: int, data: bytes) -> int: ...
    async def flush(self, fh: int) -> None: ...
    async def setattr(self, ino: int, valid: int, size: int) -> p.Attr: ...
    async def unlink(self, parent: int, name: bytes) -> None: ...


class Session:
    """A mounted FUSE filesystem served by `ops`. `serve()` returns once it is unmounted or closed.

    The connection may outlive this object: `handover()` stops serving without
    unmounting (another process holds the fd), and `adopt()` serves a connection
    another process mounted. What must survive that lives in `table`.
    """

    def __init__(
        self,
        ops: Operations,
        mountpoint: Path,
        table: InodeTable,
        fsname: str = "nodecache",
        passthrough: bool = True,
        on_open: Callable[[bool], None] = lambda passthrough: None,
    ):
        self.ops = ops
        self.table = table  # inode numbers and open modes: the kernel keeps them past our exit
        self.on_open = on_open  # told, per file open, whether it went to the kernel (passthrough)
        self.mountpoint = mountpoint
        self.fsname = fsname
        # Every listing is READDIRPLUS (not READDIRPLUS_AUTO, which sends attributes with the first
        # reply only): `ls` of a 10^5-file folder then stats from the dentries the listing made,
        # not one LOOKUP per entry past the first reply.
        self.want = p.ASYNC_READ | p.DO_READDIRPLUS | p.PARALLEL_DIROPS | p.MAX_PAGES
        self.want |= p.CACHE_SYMLINKS | p.ATOMIC_O_TRUNC | p.HAS_RESEND | (p.PASSTHROUGH if passthrough else 0)
        self.agreed = 0
        self.minor = 0
        self.initialized = asyncio.Event()
        self._fd = -1
        self._dev = ""  # major:minor of our mount, to unmount it and nothing under it
        self._done: asyncio.Future | None = None
        self._running: dict[int, tuple[int, asyncio.Task]] = {}  # request unique -> (opcode, handler)
        self._handing_over = False
        self._leaving = False  # handing over: a request we stop working on stays unanswered, for the next server
        self._buf = bytearray(_BUF)
        # READ replies of file bytes (FileSlice) are sent by these threads: os.preadv and os.writev
        # release the GIL, so the bytes cost the loop nothing. Their own fd: close() may close ours.
        self._replier: ThreadPoolExecutor | None = None
        self._reply_fd = -1
        self._buffers = threading.local()  # each reply thread's aligned buffer for O_DIRECT reads

    @property
    def passthrough(self) -> bool:
        return bool(self.agreed & p.PASSTHROUGH)

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def dev(self) -> str:
        return self._dev

    def adopt(self, fd: int, dev: str, agreed: int, minor: int) -> None:
        """Serve a connection mounted (and INIT-ed) by another process: no mount, no INIT.
        The kernel keeps every request that server read and did not answer: `resend()`."""
        os.set_blocking(fd, False)
        self._fd, self._dev, self.agreed, self.minor = fd, dev, agreed, minor
        self.initialized.set()

    def resend(self) -> bool:
        """Ask the kernel to queue again the requests a previous server read but never answered
        (Linux >= 6.9); False where the kernel cannot: those readers wait forever (see README)."""
        if not self.agreed & p.HAS_RESEND:
            return False
        try:
            os.write(self._fd, p.notify_resend())
        except OSError as e:
            log.warning("FUSE_NOTIFY_RESEND: %s", e)
            return False
        return True

    async def handover(self, grace: float) -> int:
        """Stop reading requests, answer those in flight for up to `grace` seconds, then let go of
        the connection without unmounting: the next server has the kernel resend what is left
        unanswered. Without FUSE_NOTIFY_RESEND nobody could: those get EIO instead of waiting
        forever. Returns how many requests were left for the next server."""
        if self._fd < 0:
            return 0
        asyncio.get_running_loop().remove_reader(self._fd)
        self._handing_over = True
        running = [task for _, task in self._running.values()]
        if running:
            await asyncio.wait(running, timeout=grace)
        self._leaving = bool(self.agreed & p.HAS_RESEND)
        left = [task for _, task in self._running.values() if not task.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
        os.close(self._fd)
        self._fd = -1
        self._finish()
        return len(left) if self._leaving else 0

    def mount(self) -> None:
        """Open /dev/fuse and mount it at `mountpoint` (needs CAP_SYS_ADMIN).

        Not MS_RDONLY: old clients rewrite `refs/<rev>` with the commit it holds
        and take lock files under `.locks/`, and fusefs lets those no-ops succeed.
        Every other write opcode is refused here (EROFS) or by fusefs."""
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other,max_read={1 << 20}"
        try:
            mounts.mount(self.fsname, str(self.mountpoint), FSTYPE, mounts.MS_NOSUID | mounts.MS_NODEV, opts)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        top = mounts.top(str(self.mountpoint))  # mountinfo as text: no stat of our own mount
        self._dev = top.dev if top is not None else ""

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        loop.add_reader(self._fd, self._on_readable)
        try:
            await self._done
        finally:
            for _, task in list(self._running.values()):
                task.cancel()

    async def unmount(self, grace: float = 2.0) -> None:
        """Detach the mount, answering requests until the kernel lets go of the connection
        (the last open file of the detached mount is closed: ENODEV) or `grace` passes.

        A reader just answered with an error may ask again at once (the kernel
        retries a failed read-ahead as a plain read); dropping the connection under
        it would turn that error into ECONNABORTED.
        """
        if self._fd < 0:
            return
        self._detach()
        if self._done is not None and not self._done.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._done), grace)
        self.close()

    def close(self) -> None:
        """Unmount (lazily: open files elsewhere do not block us) and drop the connection."""
        if self._fd < 0:
            return
        with contextlib.suppress(ValueError):
            asyncio.get_running_loop().remove_reader(self._fd)
        self._detach()
        os.close(self._fd)
        self._fd = -1
        self._finish()

    def _detach(self) -> None:
        """Unmount our mount if it is still on top at the mountpoint, and nothing else: what is under
        it (in a container, the bind of the host's directory the mount dir is) is not ours."""
        top = mounts.top(str(self.mountpoint))
        if top is None or top.dev != self._dev:
            return
        try:
            mounts.unmount(str(self.mountpoint))
        except OSError as e:
            log.warning("unmount %s: %s", self.mountpoint, e)

    def _finish(self) -> None:
        if self._replier is not None:
            self._replier.shutdown(wait=True)  # replies on their way go out (or fail: ENODEV)
            self._replier = None
            os.close(self._reply_fd)
            self._reply_fd = -1
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def invalidate(self, inodes: list[int]) -> int:
        """Drop every page (and the attributes) the kernel caches for these inodes;
        returns how many it knew. The next read of them comes to us.

        Written from a thread: the kernel locks each page to drop it, and a page
        under a read we have not answered yet stays locked until our loop answers.
        An inode the kernel does not know (forgotten, never looked up) is ENOENT.
        """
        return await self._notify([p.notify_inval_inode(ino) for ino in inodes], "inode")

    async def invalidate_entries(self, entries: list[tuple[int, bytes]]) -> int:
        """Make the kernel forget these (parent inode, name) dentries, and all below
        them: the next path walk through them comes to us. Returns how many it had."""
        return await self._notify([p.notify_inval_entry(parent, name) for parent, name in entries], "entry")

    async def _notify(self, messages: list[bytes], what: str) -> int:
        if self._fd < 0 or not messages:
            return 0
        fd = os.dup(self._fd)  # ours: the session may close its fd (and the number be reused) meanwhile

        def work() -> int:
            dropped = 0
            try:
                for message in messages:
                    try:
                        os.write(fd, message)
                        dropped += 1
                    except OSError as e:
                        if e.errno == errno.ENOENT:
                            continue
                        if e.errno != errno.ENODEV:
                            log.error("invalidating an %s: %s", what, e)
                        break  # unmounted under us: nothing left to drop
            finally:
                os.close(fd)
            return dropped

        return await asyncio.get_running_loop().run_in_executor(None, work)

    # reading requests ------------------------------------------------------------

    def _on_readable(self) -> None:
        for _ in range(64):  # then let the loop breathe
            try:
                n = os.readv(self._fd, [self._buf])
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                if e.errno != errno.ENODEV:  # ENODEV: unmounted
                    log.error("reading /dev/fuse: %s", e)
                self._finish()
                return
            try:
                req = p.parse_request(memoryview(self._buf)[:n])
            except p.ProtocolError as e:
                log.error("bad request from the kernel: %s", e)
                continue
            if req.opcode == p.INTERRUPT:
                self._interrupt(req.body)
                continue
            if req.opcode in p.NO_REPLY:
                continue  # inodes live as long as their path
            if req.opcode in p.METADATA:
                self._start(req)
                continue
            self._track(req, asyncio.get_running_loop().create_task(self._handle(req)))

    def _start(self, req: p.Request) -> None:
        """Run a metadata request's handler here, up to its first wait. Those handlers answer from
        memory and the index without waiting (a walk sends one to three per file): no task and no
        turn of the loop between the request and its reply. One that does wait (a lookup that
        resolves a repo on demand) goes on in a task like any other request."""
        coro = self._handle(req)
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
        self._track(req, asyncio.get_running_loop().create_task(_resume(coro, waiting)))

    def _track(self, req: p.Request, task: asyncio.Task) -> None:
        self._running[req.unique] = (req.opcode, task)
        task.add_done_callback(lambda _t, unique=req.unique: self._running.pop(unique, None))

    def _interrupt(self, body: bytes) -> None:
        """A reader got a signal while we work on its request: stop waiting for it and say EINTR.

        Without this a killed process (a pod being deleted) stays in the kernel
        until its read is answered, up to read_timeout. The fill it waited for
        goes on for other readers. The kernel sends INTERRUPT only for requests
        we have read already, so a request not found here was answered.
        """
        (unique,) = p.INTERRUPT_IN.unpack_from(body)
        opcode, task = self._running.get(unique, (None, None))
        if task is not None and opcode in p.INTERRUPTIBLE:
            task.cancel()

    async def _handle(self, req: p.Request) -> None:
        payload = None
        try:
            payload = await self._dispatch(req)
            self.table.commit()  # new inode numbers are on disk before the kernel hears of them
        except FuseError as e:
            self._reply(req.unique, e.errno)
        except asyncio.CancelledError:
            if not self._leaving:  # a signalled reader; or handing over with no resend: EIO, not a hang
                self._reply(req.unique, errno.EIO if self._handing_over else errno.EINTR)
            raise
        except Exception:
            log.exception("FUSE opcode %d failed", req.opcode)
            if isinstance(payload, FileSlice):
                payload.close()
            self._reply(req.unique, errno.EIO)
        else:
            if isinstance(payload, FileSlice):
                await self._reply_slice(req.unique, payload)
            else:
                self._reply(req.unique, 0, payload)

    async def _reply_slice(self, unique: int, sl: FileSlice) -> None:
        """Answer with file bytes from a reply thread. Once handed over, the reply goes out even if
        the request is interrupted meanwhile (never two replies); the thread closes the slice."""
        if self._replier is None:
            if self._fd < 0 or (self._done is not None and self._done.done()):
                sl.close()  # the session is over: nobody to answer
                return
            self._reply_fd = os.dup(self._fd)
            self._replier = ThreadPoolExecutor(_REPLY_THREADS, thread_name_prefix="nodecache-fuse-reply")
        try:
            fut = asyncio.get_running_loop().run_in_executor(self._replier, self._send_slice, unique, sl)
        except RuntimeError:  # the session is over: nobody to answer
            sl.close()
            return
        await asyncio.shield(fut)

    def _send_slice(self, unique: int, sl: FileSlice) -> None:
        """In a reply thread: read the bytes and write the reply. A short read (the file was
        emptied: a failed proof) is EIO, never a reply with fewer or wrong bytes.

        Read with O_DIRECT into this thread's aligned buffer where the slice allows (the
        kernel copies the bytes into the reader's page cache; a second copy in the blob
        file's would cost fresh pages). Not spliced (libfuse's way): a 1 MiB reply and its
        header need a 2 MiB pipe, past pipe-max-size without CAP_SYS_RESOURCE."""
        try:
            data = self._read_direct(sl)
            if data is None:
                data = bytearray(sl.size)
                if os.preadv(sl.fd, [data], sl.offset) != sl.size:
                    data = None
            if data is None:
                self._reply(unique, errno.EIO, fd=self._reply_fd)
            else:
                self._reply(unique, 0, data, fd=self._reply_fd)
        except OSError as e:
            log.error("reading %d bytes for FUSE request %d: %s", sl.size, unique, e)
            self._reply(unique, errno.EIO, fd=self._reply_fd)
        finally:
            sl.close()

    def _read_direct(self, sl: FileSlice) -> memoryview | None:
        """The slice's bytes read with O_DIRECT, or None where they cannot be (no direct fd, an
        unaligned offset, too large, or the file is shorter: the buffered read decides)."""
        if sl.direct_fd < 0 or sl.offset % directio.ALIGN or sl.size > _BUF - directio.ALIGN:
            return None
        buf = getattr(self._buffers, "buf", None)
        if buf is None:
            buf = self._buffers.buf = directio.anonymous(_BUF)  # page-aligned, reused: no fresh pages per reply
        want = -(-sl.size // directio.ALIGN) * directio.ALIGN
        try:
            got = os.preadv(sl.direct_fd, [memoryview(buf)[:want]], sl.offset)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            return None  # refused after all: read it buffered
        return memoryview(buf)[: sl.size] if got >= sl.size else None

    def _reply(
        self, unique: int, error: int, payload: bytes | bytearray | memoryview | list = b"", fd: int | None = None
    ) -> None:
        """Write one reply (`fd`: a reply thread's own fd of the connection)."""
        parts = payload if isinstance(payload, list) else [payload]
        size = sum(len(x) for x in parts)
        try:
            os.writev(self._fd if fd is None else fd, [p.out_header(unique, error, size), *parts])
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):  # interrupted, or gone
                log.error("replying to FUSE request %d: %s", unique, e)

    # dispatch -----------------------------------------------------------------------

    async def _dispatch(self, req: p.Request):
        op, body, ops = req.opcode, req.body, self.ops
        if op == p.INIT:
            reply = p.init_reply(body, self.want)
            self.agreed, self.minor = reply.flags, reply.minor
            asyncio.get_running_loop().call_soon(self.initialized.set)  # after the reply is written
            log.info("FUSE 7.%d, passthrough %s", reply.minor, "on" if reply.passthrough else "off")
            return reply.payload
        if op == p.LOOKUP:
            return p.entry_out(await ops.lookup(req.nodeid, p.name_arg(body)))
        if op == p.GETATTR:
            return p.attr_out(await ops.getattr(req.nodeid))
        if op == p.READLINK:
            return await ops.readlink(req.nodeid)
        if op == p.OPEN:
            flags, _ = p.OPEN_IN.unpack_from(body)
            return await self._open(req.nodeid, flags)
        if op == p.READ:
            fh, offset, size = p.READ_IN.unpack_from(body)
            return await ops.read(fh, offset, size)
        if op == p.RELEASE:
            (fh,) = p.RELEASE_IN.unpack_from(body)
            self._closed(req.nodeid, fh)
            await ops.release(fh)
            return b""
        if op == p.OPENDIR:
            opened = await ops.opendir(req.nodeid)
            return p.open_out(opened.fh, p.FOPEN_CACHE_DIR | p.FOPEN_KEEP_CACHE if opened.keep_cache else 0)
        if op in (p.READDIR, p.READDIRPLUS):
            fh, offset, size = p.READ_IN.unpack_from(body)
            return self._dirents(await ops.readdir(fh, offset), offset, size, op == p.READDIRPLUS)
        if op == p.RELEASEDIR:
            (fh,) = p.RELEASE_IN.unpack_from(body)
            await ops.releasedir(fh)
            return b""
        if op == p.STATFS:
            return p.statfs_out(*await ops.statfs())
        if op == p.GETXATTR:
            size, _ = p.GETXATTR_IN.unpack_from(body)
            return _sized(await ops.getxattr(req.nodeid, p.name_arg(body[p.GETXATTR_IN.size :])), size)
        if op == p.LISTXATTR:
            size, _ = p.GETXATTR_IN.unpack_from(body)
            return _sized(b"".join(n + b"\0" for n in await ops.listxattr(req.nodeid)), size)
        if op == p.CREATE:
            flags, _, _, _ = p.CREATE_IN.unpack_from(body)
            attr, opened = await ops.create(req.nodeid, p.name_arg(body[p.CREATE_IN.size :]), flags)
            self.table.commit()
            self.table.opened(attr.ino, opened.fh, SERVED)
            return p.entry_out(attr) + p.open_out(opened.fh, p.FOPEN_DIRECT_IO)
        if op == p.WRITE:
            fh, offset, size, _, _, _, _ = p.WRITE_IN.unpack_from(body)
            data = bytes(body[p.WRITE_IN.size : p.WRITE_IN.size + size])
            return p.WRITE_OUT.pack(await ops.write(fh, offset, data), 0)
        if op == p.FLUSH:
            (fh,) = p.RELEASE_IN.unpack_from(body)
            await ops.flush(fh)
            return b""
        if op == p.SETATTR:
            valid, _, _, size, *_ = p.SETATTR_IN.unpack_from(body)
            return p.attr_out(await ops.setattr(req.nodeid, valid, size))
        if op == p.UNLINK:
            await ops.unlink(req.nodeid, p.name_arg(body))
            return b""
        if op == p.DESTROY:
            return b""
        raise FuseError(errno.EROFS if op in p.WRITES else errno.ENOSYS)

    async def _open(self, ino: int, flags: int) -> bytes:
        # The kernel refuses (EIO) to mix passthrough and cached opens of one inode, and a second
        # backing file for it: an inode's live opens share one mode, and one backing id. Which
        # handles are open how is in the table: a handle may be released by the next daemon.
        held = self.table.backing(ino)
        if held is not None and held[1]:
            # Its open handles read a backing file that failed verification (emptied), and the
            # kernel takes no other file, nor a served open, for the inode until they are closed.
            log.warning("open of inode %d refused: handles of its failed backing file are still open", ino)
            raise FuseError(errno.EIO)
        opened = await self.ops.open(ino, flags)
        backing_id = None
        if opened.backing is not None and not self.table.open_modes(ino)[1]:
            backing_id = held[0] if held is not None else self._backing_id(ino, opened.backing)
        self.table.opened(ino, opened.fh, SERVED if backing_id is None else PASSTHROUGH)
        self.on_open(backing_id is not None)
        if backing_id is not None:
            return p.open_out(opened.fh, p.FOPEN_PASSTHROUGH, backing_id)
        if opened.direct_io:
            return p.open_out(opened.fh, p.FOPEN_DIRECT_IO)
        return p.open_out(opened.fh, p.FOPEN_KEEP_CACHE if opened.keep_cache else 0)

    def _backing_id(self, ino: int, path: Path) -> int | None:
        """A new backing id for an inode without passthrough opens."""
        if not self.passthrough:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("cannot open %s for passthrough: %s", path, e)
            return None  # this open is served; the fill path will find out what is wrong
        try:
            backing_id = fcntl.ioctl(self._fd, p.BACKING_OPEN, bytearray(p.BACKING_MAP.pack(fd, 0, 0)))
        except OSError as e:
            log.warning("passthrough refused (%s); serving reads ourselves from now on", e)
            self.agreed &= ~p.PASSTHROUGH
            return None
        finally:
            os.close(fd)  # the kernel holds its own reference
        # The kernel looks the id up after our reply, in the opener's context: keep it until the last release.
        self.table.set_backing(ino, backing_id)
        return backing_id

    def in_passthrough(self, ino: int) -> bool:
        """Whether the kernel reads this inode's backing file itself for some open handle."""
        return self.table.backing(ino) is not None

    def retire(self, ino: int) -> None:
        """The inode's backing file failed verification: no new open may share it."""
        held = self.table.backing(ino)
        if held is not None:
            self.table.set_backing(ino, held[0], retired=True)

    def _closed(self, ino: int, fh: int) -> None:
        mode = self.table.released(ino, fh)
        if mode != PASSTHROUGH or self.table.open_modes(ino)[0]:
            return
        held = self.table.backing(ino)
        if held is None:
            return
        self.table.drop_backing(ino)
        try:
            fcntl.ioctl(self._fd, p.BACKING_CLOSE, bytearray(held[0].to_bytes(4, "little")))
        except OSError as e:
            log.warning("closing backing id %d: %s", held[0], e)

    @staticmethod
    def _dirents(entries: Iterable[tuple[bytes, p.Attr]], offset: int, size: int, plus: bool) -> bytes:
        out, used = [], 0
        for i, (name, attr) in enumerate(entries, start=offset + 1):
            rec = p.dirent(name, attr, i, plus)
            if used + len(rec) > size:
                break
            out.append(rec)
            used += len(rec)
        return b"".join(out)


async def _resume(coro, waiting: asyncio.Future | None):
    """Go on with a coroutine that was started outside a task and stopped on `waiting` (the
    future it awaits; None: a bare yield), as a task would: resumed when that is done. A cancel
    of this task cancels what it waits on, and the coroutine sees CancelledError there."""
    cancel = False
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                waiting._asyncio_future_blocking = False
                await asyncio.wait((waiting,))
        except asyncio.CancelledError:
            cancel = waiting is None or not waiting.cancel()  # cancelled: it raises where awaited
        try:
            waiting = coro.throw(asyncio.CancelledError()) if cancel else coro.send(None)
        except StopIteration as e:
            return e.value
        cancel = False


def _sized(value: bytes, size: int) -> bytes:
    """xattr replies: size 0 asks for the length only; too small a buffer is ERANGE."""
    if size == 0:
        return p.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise FuseError(errno.ERANGE)
    return value
