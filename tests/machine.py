"""What this machine can do, decided from the machine alone: kernel version and
config, privileges, devices, a probe of the filesystem. Never from the product
under test: a regression must fail, not turn into a skip.

Each check returns None when the machine can, else the reason to skip with.
Every reason here is listed in tests/allowed_skips.txt; the skip guard in
conftest.py fails the run on any other skip.
"""

from __future__ import annotations

import errno
import gzip
import mmap
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

CAP_SYS_ADMIN = 21


def kernel_version(release: str | None = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(m[1]), int(m[2])) if m else (0, 0)


def kernel_config(option: str) -> str | None:
    """The value of CONFIG_<option> ("y", "m", "n"), or None when the config is not readable."""
    texts = []
    if os.path.exists("/proc/config.gz"):
        with gzip.open("/proc/config.gz", "rt") as f:
            texts.append(f.read())
    boot = Path(f"/boot/config-{platform.release()}")
    if boot.exists():
        texts.append(boot.read_text())
    if not texts:
        return None
    for text in texts:
        m = re.search(rf"^CONFIG_{option}=(\S+)$", text, re.M)
        if m:
            return m[1]
    return "n"  # "# CONFIG_X is not set", or absent from a kernel that predates it


def has_cap(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def fuse() -> str | None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        return "machine: needs root and /dev/fuse (run the suite as root on a host with FUSE)"
    return None


def passthrough() -> str | None:
    """FUSE passthrough: Linux >= 6.9 with CONFIG_FUSE_PASSTHROUGH (default y), as root."""
    if reason := fuse():
        return reason
    if kernel_version() < (6, 9):
        return f"machine: kernel {platform.release()} < 6.9 has no FUSE passthrough"
    if kernel_config("FUSE_PASSTHROUGH") == "n":
        return f"machine: kernel {platform.release()} is built without CONFIG_FUSE_PASSTHROUGH"
    return None


def direct_io(directory: Path) -> str | None:
    """Whether the filesystem of `directory` takes an aligned O_DIRECT write (tmpfs before 6.6 does not)."""
    probe = directory / f".odirect-probe-{os.getpid()}"
    buf = mmap.mmap(-1, 4096)  # page-aligned
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
        try:
            os.pwrite(fd, buf, 0)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return f"machine: the filesystem of {directory} refuses O_DIRECT"
        raise
    finally:
        buf.close()
        probe.unlink(missing_ok=True)
    return None


def netns() -> str | None:
    """Network namespaces (the multi-node cluster): root, FUSE, iproute2, and unshare(CLONE_NEWNET) allowed."""
    if reason := fuse():
        return reason
    tools = shutil.which("ip") and shutil.which("unshare")
    if not has_cap(CAP_SYS_ADMIN) or not tools or subprocess.run(["unshare", "--net", "true"]).returncode != 0:
        return "machine: needs CAP_SYS_ADMIN and iproute2 for network namespaces"
    return None


def mount_tmpfs() -> str | None:
    if os.geteuid() != 0 or not has_cap(CAP_SYS_ADMIN):
        return "machine: needs root with CAP_SYS_ADMIN to mount a tmpfs"
    return None
