"""The FUSE wire protocol (linux/fuse.h, 7.x), as pure packing and unpacking.

We speak it ourselves instead of through libfuse because the one thing that
makes a cached blob as fast as a local file, FUSE passthrough (kernel >= 6.9,
protocol 7.40), needs an INIT flag, an ioctl and an open-reply field that
libfuse 3.14 (what pyfuse3 links against on Debian 12) cannot send. A
read-only tree needs only a dozen opcodes, so the protocol stays small.
No I/O here: `fusesession` owns /dev/fuse.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from typing import NamedTuple

KERNEL_MAJOR = 7
KERNEL_MINOR = 40  # passthrough arrived in 7.40; nothing newer is needed

# opcodes we answer (others get ENOSYS, which the kernel remembers where it matters)
LOOKUP, FORGET, GETATTR, READLINK, OPEN, READ, STATFS, RELEASE = 1, 2, 3, 5, 14, 15, 17, 18
GETXATTR, LISTXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 22, 23, 25, 26, 27, 28, 29
INTERRUPT, DESTROY, BATCH_FORGET, READDIRPLUS = 36, 38, 42, 44
SETATTR, UNLINK, WRITE, CREATE = 4, 10, 16, 35  # answered only for no-op writes (see fusefs)
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})
# requests about names and attributes, answered from memory: started at once, not as a task
METADATA = frozenset(
    {LOOKUP, GETATTR, READLINK, OPENDIR, READDIR, READDIRPLUS, RELEASEDIR, STATFS, GETXATTR, LISTXATTR}
)
# what an INTERRUPT may cancel: a read can wait minutes for its bytes, a lookup for a repo
# resolved on demand (tens of seconds at 10^6 files); nothing else holds state that a cancel
# half way would leak (an open's backing file, a release)
INTERRUPTIBLE = frozenset({READ, LOOKUP})
# opcodes that would change the tree; a read-only mount mostly stops them in the VFS
WRITES = frozenset({4, 6, 8, 9, 10, 11, 12, 13, 16, 20, 21, 24, 30, 35, 43, 45, 47, 51})

# INIT flags (64 bits: the upper half travels in flags2)
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3  # O_TRUNC comes with OPEN, not as a SETATTR before it
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37
HAS_RESEND = 1 << 39  # the kernel re-queues requests read but not answered when told (NOTIFY_RESEND)

# open reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PASSTHROUGH = 1 << 7

ENOATTR = 61  # ENODATA: what getxattr returns for a missing attribute

# notifications: unsolicited messages to the kernel (unique 0, the code where a reply has its error)
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_RESEND = 7  # no payload
UNIQUE_RESEND = 1 << 63  # set in the unique of a request the kernel sends again

# ioctls on /dev/fuse: register / drop a backing file for passthrough
_IOC_WRITE = 1
BACKING_OPEN = (_IOC_WRITE << 30) | (16 << 16) | (229 << 8) | 1  # _IOW(229, 1, struct fuse_backing_map)
BACKING_CLOSE = (_IOC_WRITE << 30) | (4 << 16) | (229 << 8) | 2  # _IOW(229, 2, uint32_t)

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIIII")  # major minor max_readahead flags flags2 (then unused words)
INIT_OUT = struct.Struct("<IIIIHHIIHHII2H20x")  # ... max_pages map_alignment flags2 max_stack_depth (64 bytes)
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid (+nsec)
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQI")  # fh offset size (then read_flags lock_owner flags)
RELEASE_IN = struct.Struct("<Q")  # fh
INTERRUPT_IN = struct.Struct("<Q")  # unique of the request to interrupt
GETXATTR_IN = struct.Struct("<II")  # size padding, then the name NUL-terminated
GETXATTR_OUT = struct.Struct("<II")  # size padding
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags, then the name NUL-terminated
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding, then the data
WRITE_OUT = struct.Struct("<II")  # size padding
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # valid padding fh size lock_owner a/m/ctime (+nsec) mode ...
FATTR_MODE, FATTR_SIZE, FATTR_FH, FATTR_LOCKOWNER, FATTR_KILL_SUIDGID = 1 << 0, 1 << 3, 1 << 6, 1 << 9, 1 << 11
FATTR_TIMES = (1 << 4) | (1 << 5) | (1 << 7) | (1 << 8) | (1 << 10)  # atime mtime atime_now mtime_now ctime
DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type
KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare
BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino off len
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent namelen flags, then the name NUL-terminated
INIT_OUT_SIZE = 64


@dataclass
class Attr:
    """What the kernel caches about an inode, and for how long."""

    ino: int
    mode: int
    size: int = 0
    nlink: int = 1
    timeout: float = 1.0
    time_ns: int = 0
    blksize: int = 1 << 20

    def pack(self) -> bytes:
        sec, nsec = divmod(self.time_ns, 1_000_000_000)
        blocks = -(-self.size // 512)
        return ATTR.pack(
            self.ino,
            self.size,
            blocks,
            sec,
            sec,
            sec,
            nsec,
            nsec,
            nsec,
            self.mode,
            self.nlink,
            0,
            0,
            0,
            self.blksize,
            0,
        )


class Request(NamedTuple):  # a tuple: made once per request, ~3x cheaper than a frozen dataclass
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: bytes


class ProtocolError(ValueError):
    pass


def parse_request(buf: bytes | memoryview) -> Request:
    """One request as read from /dev/fuse (a read returns exactly one)."""
    if len(buf) < IN_HEADER.size:
        raise ProtocolError(f"short request: {len(buf)} bytes")
    length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(buf)
    if length != len(buf):
        raise ProtocolError(f"request says {length} bytes, read {len(buf)}")
    return Request(opcode, unique, nodeid, uid, gid, pid, bytes(buf[IN_HEADER.size :]))


def out_header(unique: int, error: int = 0, payload_len: int = 0) -> bytes:
    """error is a positive errno; the wire wants it negated."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload_len, -error, unique)


def _split(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def entry_out(a: Attr) -> bytes:
    sec, nsec = _split(a.timeout)
    return ENTRY_HEAD.pack(a.ino, 0, sec, sec, nsec, nsec) + a.pack()


def attr_out(a: Attr) -> bytes:
    sec, nsec = _split(a.timeout)
    return ATTR_OUT_HEAD.pack(sec, nsec, 0) + a.pack()


def notify_inval_inode(ino: int, offset: int = 0, length: int = 0) -> bytes:
    """Ask the kernel to drop an inode's cached pages from `offset` (length 0: to the end)
    and its cached attributes. A negative offset drops the attributes only."""
    body = NOTIFY_INVAL_INODE_OUT.pack(ino, offset, length)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_INODE, 0) + body


def notify_inval_entry(parent: int, name: bytes) -> bytes:
    """Ask the kernel to forget the dentry `name` in `parent` (and every dentry below it)."""
    body = NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_ENTRY, 0) + body


def notify_resend() -> bytes:
    """Ask the kernel to send again every request a server read and never answered
    (a server that died, or left them to its successor)."""
    return OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0)


def open_out(fh: int, flags: int = 0, backing_id: int = 0) -> bytes:
    return OPEN_OUT.pack(fh, flags, backing_id)


def name_arg(body: bytes) -> bytes:
    """A NUL-terminated name argument (LOOKUP, GETXATTR after its header)."""
    end = body.find(b"\0")
    return body if end < 0 else body[:end]


def dirent(name: bytes, a: Attr, off: int, plus: bool) -> bytes:
    """One READDIR(PLUS) record, padded to 8 bytes."""
    rec = DIRENT_HEAD.pack(a.ino, off, len(name), stat.S_IFMT(a.mode) >> 12) + name
    rec += b"\0" * (-len(rec) % 8)
    return entry_out(a) + rec if plus else rec


def statfs_out(files: int, namelen: int) -> bytes:
    return KSTATFS.pack(0, 0, 0, files, 0, 4096, namelen, 4096, 0)


@dataclass(frozen=True)
class InitReply:
    payload: bytes
    flags: int  # what was agreed: offered & wanted
    minor: int

    @property
    def passthrough(self) -> bool:
        return bool(self.flags & PASSTHROUGH)


def init_reply(body: bytes, want: int, max_pages: int = 256, max_background: int = 64) -> InitReply:
    """Answer FUSE_INIT: agree on the flags both sides have, and the limits we want."""
    major, minor, max_readahead, flags, flags2 = INIT_IN.unpack_from(body.ljust(INIT_IN.size, b"\0"))
    if major != KERNEL_MAJOR:
        raise ProtocolError(f"kernel speaks FUSE {major}.{minor}, we speak {KERNEL_MAJOR}.x")
    offered = flags | (flags2 << 32 if flags & INIT_EXT else 0)
    if minor < KERNEL_MINOR:
        want &= ~PASSTHROUGH
    agreed = offered & (want | INIT_EXT)
    payload = INIT_OUT.pack(
        KERNEL_MAJOR,
        min(minor, KERNEL_MINOR),
        max_readahead,
        agreed & 0xFFFFFFFF,
        max_background,
        max_background * 3 // 4,
        4096,  # max_write: a read-only tree gets no writes
        1,  # time_gran: nanoseconds
        max_pages,
        0,
        agreed >> 32,
        1 if agreed & PASSTHROUGH else 0,  # max_stack_depth: backing files live on a plain fs
        0,
        0,
    )
    return InitReply(payload, agreed, min(minor, KERNEL_MINOR))
