"""Mounts via libc (ctypes) and /proc/self/mountinfo parsing: the FUSE mount and CSI binds.

Every decision about what is mounted where comes from mountinfo text, never
from stat/ismount on the target: a bind of a dead FUSE connection answers
stat with ENOTCONN (and `os.path.ismount` says False), and a hung daemon
would block the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import subprocess
import threading
from dataclasses import dataclass

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

# errnos of a mount whose FUSE daemon is gone or broken
STALE_ERRNOS = {errno.ENOTCONN, errno.ESTALE, errno.EIO, errno.ECONNABORTED, errno.EHOSTDOWN}

log = logging.getLogger(__name__)

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    dev: str  # major:minor
    root: str  # path inside the filesystem that is mounted here ("/" for a whole fs)
    mountpoint: str
    options: frozenset[str]  # per-mount options (ro/rw, nosuid, nodev, ...)
    fstype: str
    source: str

    @property
    def readonly(self) -> bool:
        return "ro" in self.options

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Entries in mountinfo order: for one mountpoint, the later one is on top."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        out.append(
            MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                dev=fields[2],
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                options=frozenset(fields[5].split(",")),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
            )
        )
    return out


def mountinfo() -> list[MountEntry]:
    with open("/proc/self/mountinfo") as f:
        return parse_mountinfo(f.read())


def at(path: str, entries: list[MountEntry] | None = None) -> list[MountEntry]:
    """Every mount stacked at `path` (an absolute, normalised path), bottom first."""
    path = os.path.normpath(path)
    return [e for e in (entries if entries is not None else mountinfo()) if e.mountpoint == path]


def top(path: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    stack = at(path, entries)
    return stack[-1] if stack else None


def is_mounted(path: str | os.PathLike) -> bool:
    """Anything mounted exactly at `path` (read from mountinfo: a dead mount would fail a stat)."""
    return bool(at(os.path.abspath(path)))


def under(path: str | os.PathLike) -> list[str]:
    """Mountpoints at or below `path`."""
    root = os.path.abspath(path).rstrip("/") + "/"
    return [e.mountpoint for e in mountinfo() if (e.mountpoint + "/").startswith(root)]


def set_read_ahead(mountpoint: str | os.PathLike, kb: int) -> bool:
    """Raise the mount's bdi read_ahead_kb: 1 MiB reads instead of 128 KiB ones.

    Must run after FUSE_INIT was answered: the INIT reply resets it. Pure string
    work on mountinfo on purpose: realpath/stat of our own mount from the loop
    thread deadlocks the daemon, so callers resolve the path before mounting.
    """
    entry = top(os.path.abspath(mountpoint))
    if entry is None or kb <= 0:
        return False
    path = f"/sys/class/bdi/{entry.dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
        with open(path) as f:
            return int(f.read()) == kb
    except OSError as e:
        log.warning("cannot set %s: %s", path, e)
        return False


def detach(path: str | os.PathLike) -> bool:
    """Lazily detach the FUSE mounts stacked on top at `path` (left dead by kill -9, ENOTCONN);
    whether any was. Nothing under them: in a container the mount dir is itself a bind of the
    host's directory, and without it the host would never see a later mount. fusermount3 first
    (it works unprivileged on one's own FUSE mounts), then umount2(MNT_DETACH)."""
    target, n = os.path.abspath(path), 0
    while n < 64 and (entry := top(target)) is not None and entry.is_fuse:
        subprocess.run(["fusermount3", "-u", "-z", target], check=False, capture_output=True)
        if top(target) == entry:
            with contextlib.suppress(OSError):
                unmount(target)
            if top(target) == entry:
                break
        n += 1
    return n > 0


def _check(rc: int, what: str, path: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}", path)


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()), "mount", target)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


# The new mount API (Linux >= 5.12 for mount_setattr); these numbers are the same on every architecture.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE, _AT_EMPTY_PATH, _AT_FDCWD, _MOVE_MOUNT_F_EMPTY_PATH = 1, 0x1000, -100, 4
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 1, 2, 4
_libc.syscall.restype = ctypes.c_long


def _bind_readonly_at_once(source: str, target: str) -> bool:
    """A bind that is read-only from its first moment (False: the kernel lacks the new mount API).

    Where the target's parent is shared (systemd makes / shared; so is a
    Kubernetes node's), the kernel copies a new bind to every peer as it is
    created; a later MS_REMOUNT|MS_RDONLY changes the original only, and the
    copies stay writable. A detached clone made read-only before it is
    attached is copied read-only.
    """
    fd = _libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, source.encode(), _OPEN_TREE_CLONE | os.O_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        if e == errno.ENOSYS:
            return False
        raise OSError(e, f"open_tree: {os.strerror(e)}", source)
    try:
        attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0)
        if _libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)) < 0:
            e = ctypes.get_errno()
            if e == errno.ENOSYS:
                return False
            raise OSError(e, f"mount_setattr: {os.strerror(e)}", source)
        rc = _libc.syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, target.encode(), _MOVE_MOUNT_F_EMPTY_PATH)
        _check(0 if rc == 0 else -1, "move_mount", target)
        return True
    finally:
        os.close(fd)


def bind_readonly(source: str, target: str) -> None:
    """A read-only, nosuid, nodev bind; on kernels before 5.12: MS_BIND, then
    MS_REMOUNT|MS_BIND|MS_RDONLY|MS_NOSUID|MS_NODEV (a bind ignores flags on creation)."""
    if _bind_readonly_at_once(source, target):
        return
    _check(_libc.mount(source.encode(), target.encode(), None, MS_BIND, None), "bind mount", target)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    rc = _libc.mount(None, target.encode(), None, flags, None)
    if rc != 0:
        e = ctypes.get_errno()
        _libc.umount2(target.encode(), MNT_DETACH)
        raise OSError(e, f"read-only remount: {os.strerror(e)}", target)


def bind_writable(source: str, target: str) -> None:
    """MS_BIND, then MS_REMOUNT|MS_BIND|MS_NOSUID|MS_NODEV: read-write, but no setuid files or devices."""
    _check(_libc.mount(source.encode(), target.encode(), None, MS_BIND, None), "bind mount", target)
    rc = _libc.mount(None, target.encode(), None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV, None)
    if rc != 0:
        e = ctypes.get_errno()
        _libc.umount2(target.encode(), MNT_DETACH)
        raise OSError(e, f"nosuid,nodev remount: {os.strerror(e)}", target)


def unmount(target: str) -> None:
    """Unmount the top mount at `target`; lazily detach it when it is busy or its daemon is gone."""
    if _libc.umount2(target.encode(), UMOUNT_NOFOLLOW) == 0:
        return
    e = ctypes.get_errno()
    if e == errno.EINVAL and not at(target):
        return  # raced with somebody else: nothing mounted there any more
    _check(_libc.umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW), "unmount", target)


def unmount_all(target: str) -> int:
    """Unmount everything stacked at `target`; the number of mounts removed."""
    n = 0
    while at(target):
        unmount(target)
        n += 1
        if n > 64:
            raise OSError(errno.ELOOP, "more than 64 mounts stacked", target)
    return n


_probing: dict[str, tuple[threading.Thread, list[int]]] = {}
_probing_lock = threading.Lock()


def probe(path: str, timeout: float = 5.0) -> int:
    """statfs + stat `path` in a helper thread: 0 if it answers, else the errno (ETIMEDOUT if it hangs).

    A hung FUSE daemon would block the caller forever; the helper thread is
    left behind in that case (daemonic), the caller is not. Concurrent probes
    of one path share the running one (waiting for its answer), so a stuck
    daemon never piles up more than one thread per path.
    """
    result: list[int] = []

    def run() -> None:
        try:
            os.statvfs(path)  # always asks the daemon; a cached stat of a dead mount may still succeed
            os.stat(path)
            result.append(0)
        except OSError as e:
            result.append(e.errno or errno.EIO)
        finally:
            with _probing_lock:
                if _probing.get(path, (None,))[0] is threading.current_thread():
                    del _probing[path]

    with _probing_lock:
        running = _probing.get(path)
        if running is not None and running[0].is_alive():
            t, result = running
        else:
            t = threading.Thread(target=run, daemon=True, name="nodecache-probe")
            _probing[path] = (t, result)
            t.start()
    t.join(timeout)
    return result[0] if result else errno.ETIMEDOUT
