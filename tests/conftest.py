"""Fixtures: generated repos, a real Hub emulator, real daemons with real FUSE mounts.

Also the skip guard: every skip is listed with its reason at the end of a run,
and a skip whose reason is not in allowed_skips.txt (what this machine cannot
do, see machine.py) fails the run, so `python3 -m pytest tests -q` passes only
when everything this machine can run did run.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
import socket
import time
from pathlib import Path

import machine
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import save_file
from skipguard import SkipGuard

from nodecache.testing.daemon import DaemonProcess, LeftBehind
from nodecache.testing.hub import HubEmulator

MiB = 1024 * 1024
SMALL = "org/small"
BIG = "org/big"


ALLOWED_SKIPS = Path(__file__).with_name("allowed_skips.txt")


def _need_fuse() -> None:
    if reason := machine.fuse():
        pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipGuard(ALLOWED_SKIPS), "nodecache-skip-guard")


@pytest.fixture(scope="session")
def small_repo(tmp_path_factory) -> Path:
    """A tiny model: real safetensors weights, config, and a nested tokenizer dir."""
    d = tmp_path_factory.mktemp("small_repo")
    rng = np.random.default_rng(7)
    tensors = {
        "embed.weight": rng.standard_normal((1024, 512), dtype=np.float32),  # 2 MiB
        "layer.0.weight": rng.standard_normal((512, 512), dtype=np.float32),
        "layer.0.bias": rng.standard_normal(512, dtype=np.float32),
        "ids": np.arange(1000, dtype=np.int64),
    }
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "np"})
    (d / "config.json").write_text('{"hidden_size": 512, "model_type": "tiny"}')
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(5000)))
    (d / "README.md").write_text("# tiny test model\n")
    return d


@pytest.fixture(scope="session")
def big_repo(tmp_path_factory) -> Path:
    """One 72 MiB LFS blob of random bytes: many chunks, for coalescing and faults."""
    d = tmp_path_factory.mktemp("big_repo")
    (d / "weights.bin").write_bytes(os.urandom(72 * MiB))
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture
def hub(small_repo, big_repo):
    with HubEmulator() as h:
        h.commits = {SMALL: h.add_repo(SMALL, small_repo), BIG: h.add_repo(BIG, big_repo)}
        yield h


@pytest.fixture
def daemons(tmp_path, hub):
    """Factory for real daemons; every one started is stopped and unmounted after the test."""
    _need_fuse()
    started: list[DaemonProcess] = []

    def make(repos=(SMALL,), env=None, workdir: Path | None = None, start=True, **kw) -> DaemonProcess:
        base = {"NODECACHE_CHUNK_SIZE": str(MiB), "NODECACHE_READ_TIMEOUT": "20", "NODECACHE_FSYNC": "false"}
        # Lazy reads of weights.bin are what most tests are about; test_verification covers the default.
        base["NODECACHE_VERIFY_BEFORE_SERVE"] = ""
        d = DaemonProcess(workdir or tmp_path, hub.url, list(repos), env={**base, **(env or {})}, **kw)
        started.append(d)
        return d.start() if start else d

    yield make
    left = []
    for d in started:  # all of them, even if one left something behind
        try:
            d.stop()
        except LeftBehind as e:
            left.append(e)
    if left:
        raise left[0]


def wait_until(pred, what: str, timeout: float = 60.0, every: float = 0.05):
    """Poll `pred` until it returns something truthy, and return that; fail naming `what`.

    The way to wait in a test: for an event the product exposes (a status field, a
    metric, an xattr, a log line, an emulator's `Fault.reached`), never a bare sleep.
    The timeout only bounds a failure; a slow machine just waits longer.
    """
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
    return got


def verified(path: Path) -> bool:
    """The xattr says 1 only once every blob below `path` is stored and its hash proven."""
    return float(os.getxattr(path, "user.nodecache.cached")) == 1.0


def counter(daemon: DaemonProcess, name: str, **labels: str) -> float:
    """One sample of the daemon's /metrics; 0 if no sample has these labels yet (a labelled
    counter appears on its first increment), but the family must exist: a typo raises."""
    families = list(text_string_to_metric_families(daemon.metrics()))
    if not any(name == f.name or name.startswith(f.name + "_") for f in families):
        raise KeyError(f"the daemon exports no metric {name}")
    for fam in families:
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def files_containing(root: Path, secret: str) -> list[Path]:
    """Files under root (the LMDB index with its free pages, blobs, quarantine) holding `secret`."""
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(4 * MiB):
            h.update(buf)
    return h.hexdigest()


def snapshot_dir(daemon: DaemonProcess, repo: str, commit: str) -> Path:
    return daemon.hub / ("models--" + repo.replace("/", "--")) / "snapshots" / commit


def cached_share(path: Path, offset: int, size: int) -> float:
    """The share of these bytes' pages in the page cache (mincore(2) of a mapping: unlike a
    read, asking does not trigger read-ahead). Pages read through the cache are ordinary LRU
    pages the kernel may reclaim under pressure: a test that asserts bytes went through it
    asks for most of them, one that asserts they went around it for (nearly) none."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = offset // page * page, offset + size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, end - start, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        vec = (ctypes.c_ubyte * ((end - start + page - 1) // page))()
        try:
            assert libc.mincore(addr, end - start, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, end - start)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / max(1, len(vec))


def in_page_cache(path: Path, offset: int, size: int) -> bool:
    """Whether every page of these bytes is in the page cache."""
    return cached_share(path, offset, size) == 1.0


def need_direct_io(directory: Path) -> None:
    """Decided by a probe of the filesystem, not by what the store did: where O_DIRECT
    works, the store must use it."""
    if reason := machine.direct_io(directory):
        pytest.skip(reason)


@contextlib.contextmanager
def full_listener():
    """(listener, port) on 127.0.0.1 whose accept queue is full: a connect to it hangs (its SYNs
    are dropped), as to a vanished node's address, until the listener accepts."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):  # the queue of a backlog-0 listener holds one; then SYNs are dropped
            s = socket.socket()
            fillers.append(s)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
        yield listener, port
    finally:
        for s in fillers:
            s.close()
        listener.close()
