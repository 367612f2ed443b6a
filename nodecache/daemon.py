"""Wires index, store, upstream, fill, FUSE and HTTP on one asyncio loop.

Shutdown order matters: readers still waiting for bytes are woken with EIO
first, then pyfuse3 stops, then the mount goes. Without a SIGTERM handler
the mount would be left stale (ENOTCONN) for every pod bound to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
from collections.abc import Coroutine
from pathlib import Path

import aiohttp
import pyfuse3
import pyfuse3.asyncio
from aiohttp import web

from . import layout
from .config import Config
from .fill import Filler
from .fusefs import NodecacheFS, find_mount, set_read_ahead
from .index import Index
from .metrics import Metrics
from .repos import RepoRef, ensure_repo, snapshot_blobs
from .server import make_app
from .store import Store
from .upstream.hf import HfUpstream

log = logging.getLogger(__name__)


def clear_stale_mount(mountpoint: Path) -> None:
    """A daemon killed with -9 leaves a dead FUSE mount (ENOTCONN): detach it."""
    if find_mount(mountpoint) is not None:
        log.warning("detaching a stale mount at %s", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, capture_output=True)
        if find_mount(mountpoint) is not None:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


class Daemon:
    """One node's cache. `open()` and `close()` bracket everything; `run()` serves."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.metrics = Metrics()
        self.ready = False
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.fs: NodecacheFS | None = None
        self._mounted = False

    async def open(self) -> None:
        """Everything but the faces: usable for standalone prefetch too."""
        cfg = self.cfg
        self.index = Index(cfg.cache_dir / "index")
        self.store = Store(cfg.cache_dir, self.index, fsync=cfg.fsync)
        dropped = self.store.recover()
        if dropped:
            log.warning("dropped %d chunk(s) that failed re-verification after a crash", dropped)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
        connector = aiohttp.TCPConnector(limit=max(64, cfg.parallel_total * 2))
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)
        self.upstream = HfUpstream(cfg.hub_url, self.session, self.metrics, token=cfg.hub_token)
        self.filler = Filler(cfg, self.index, self.store, self.upstream, self.metrics)

    async def close(self) -> None:
        await self.filler.close()
        await self.session.close()
        self.store.close()
        self.index.close()

    async def add_repo(self, spec: str) -> tuple[RepoRef, int, list[str]]:
        """Resolve a repo into the index and show it in the tree; (ref, bytes, blob ids)."""
        ref = await ensure_repo(self.index, self.upstream, self.cfg.chunk_size, spec)
        blobs = snapshot_blobs(self.index, ref)
        if self.fs is not None:
            self.fs.set_tree(layout.build_root(self.index.views()))
        total = sum(self.filler.record(b).size for b in dict.fromkeys(blobs))
        return ref, total, blobs

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def wait(task: asyncio.Task, timeout: float) -> None:
        await asyncio.wait([task], timeout=timeout)

    def update_gauges(self) -> None:
        counts: dict[str, int] = {"partial": 0, "complete": 0, "quarantined": 0}
        for rec in self.index.all_blobs():
            counts[rec.state] = counts.get(rec.state, 0) + 1
        for state, n in counts.items():
            self.metrics.blobs.labels(state).set(n)

    def stop(self) -> None:
        if not self._stop.is_set():
            log.info("stopping")
            self._stop.set()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT; always unmount on the way out."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        await self.open()
        runner = None
        try:
            for spec in self.cfg.repos:
                ref, total, _ = await self.add_repo(spec)
                log.info("repo %s: %d bytes", ref, total)
            runner = web.AppRunner(make_app(self), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.cfg.listen_host, self.cfg.listen_port).start()
            if self.cfg.mount is None:
                self.ready = True
                await self._stop.wait()
            else:
                await self._serve_fuse(self.cfg.mount)
        finally:
            self.ready = False
            await self.close()
            if self._mounted:
                pyfuse3.close(unmount=True)
            if runner is not None:
                await runner.cleanup()

    async def _serve_fuse(self, mountpoint: Path) -> None:
        clear_stale_mount(mountpoint.absolute())
        mountpoint.mkdir(parents=True, exist_ok=True)
        mountpoint = mountpoint.resolve()  # now, before mounting: later it would stat our own mount
        self.fs = NodecacheFS(layout.build_root(self.index.views()), self.filler, self.metrics, self.cfg.fill_on_open)
        options = set(pyfuse3.default_options) | {"fsname=nodecache", "ro", "allow_other", "default_permissions"}
        pyfuse3.init(self.fs, str(mountpoint), options)
        self._mounted = True
        main = asyncio.get_running_loop().create_task(pyfuse3.main(min_tasks=4, max_tasks=64))
        try:
            await asyncio.wait([main, asyncio.ensure_future(self.fs.initialized.wait())], return_when="FIRST_COMPLETED")
            if self.fs.initialized.is_set():
                await asyncio.sleep(0.05)  # the INIT reply resets read_ahead_kb: write after it
                if not set_read_ahead(mountpoint, self.cfg.bdi_read_ahead_kb):
                    log.warning("could not raise read_ahead_kb; reads stay at 128 KiB")
                self.ready = True
                log.info("mounted at %s", mountpoint)
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait([main, stop], return_when="FIRST_COMPLETED")
            stop.cancel()
            if not main.done():
                self.ready = False
                await self.filler.close()  # wake every waiting reader with EIO
                pyfuse3.terminate()
            with contextlib.suppress(asyncio.CancelledError):
                await main
        finally:
            if not main.done():
                main.cancel()


def run(cfg: Config) -> None:
    pyfuse3.asyncio.enable()
    asyncio.run(Daemon(cfg).run())
