"""Wires index, store, sources, fill, the catalog of repos, FUSE and HTTP on one asyncio loop.

Policy lives in the modules it wires (catalog, pins, ops, status, startup);
this file only builds them, in dependency order, and runs the loops.
Shutdown order matters: readers still waiting for bytes are woken with EIO
first, then the mount is detached while the session still answers (a reader's
immediate retry gets EIO again, not ECONNABORTED), and the connection goes once
the kernel lets go of it or after a short grace. Without a SIGTERM handler the
mount would be left stale (ENOTCONN) for every pod bound to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from . import mounts
from .catalog import Catalog
from .ccpeers import PeerSnapshots
from .compilecache import CompileCaches
from .config import Config
from .fill import Filler
from .fusefs import NodecacheFS
from .fusesession import Session
from .index import Index
from .jobs import Jobs
from .labels import NodeLabeler
from .metrics import Metrics
from .ops import Operations
from .peers import Membership, Peers
from .pins import Pins
from .policy import RepoPolicy
from .scrub import Scrubber
from .server import Faces, OneLineBadRequests, make_app
from .startup import Configured, preload
from .status import Serving, Status
from .store import Store, Tier
from .tree import HubTree
from .upstream.hf import HfUpstream
from .upstream.sources import build_sources

log = logging.getLogger(__name__)


class Daemon:
    """One node's cache. `open()` and `close()` bracket everything; `run()` serves."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.metrics = Metrics()
        self.serving = Serving()
        self._stop = asyncio.Event()
        self.fs: NodecacheFS | None = None
        self.fuse_session: Session | None = None
        self._background: set[asyncio.Task] = set()

    async def open(self) -> None:
        """Everything but the faces: usable for standalone prefetch too."""
        cfg, m = self.cfg, self.metrics
        self.index = Index(cfg.cache_dir / "index", on_invalid=lambda db: m.index_invalid.labels(db).inc())
        marks = (cfg.high_watermark, cfg.low_watermark, cfg.min_free)
        tiers = [Tier("disk", cfg.cache_dir, cfg.disk_max, *marks)]
        if cfg.shm_dir is not None:
            tiers.insert(0, Tier("shm", cfg.shm_dir, cfg.shm_max, *marks))
        self.pins = Pins(self.index, tiers[0] if tiers[0].name == "shm" else None, cfg.shm_file_max)
        self.store = Store(
            cfg.cache_dir,
            self.index,
            fsync=cfg.fsync,
            tiers=tiers,
            on_evict=self._evicted,
            direct_io=cfg.direct_io,
            hash_memory=cfg.hash_memory,
            retry_base=cfg.retry_base,
            quarantine_limits=(cfg.quarantine_files, cfg.quarantine_max, cfg.quarantine_ttl),
            placement=self.pins.place,
        )
        dropped = self.store.recover()
        if dropped:
            log.warning("dropped %d chunk(s) that failed re-verification after a crash", dropped)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
        connector = aiohttp.TCPConnector(limit=max(64, cfg.parallel_total * 2))
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)
        self.upstream = HfUpstream(cfg.hub_url, self.session, m, token=cfg.hub_token)
        self.sources = build_sources(cfg, self.session, m, self.upstream)  # per-repo chains (issue 6)
        self.membership = Membership(cfg.me, cfg.peers, cfg.peers_dns)
        self.peers: Peers | None = None
        chain = self.sources.chain
        if cfg.peers or cfg.peers_dns:
            peers = self.peers = Peers(self.membership, self.session, cfg.cluster_token, m, cfg.peer_timeout)
            chain = lambda rec, k: peers.chain(self.sources.chain(rec), rec, k)  # noqa: E731
        self.filler = Filler(
            cfg, self.index, self.store, self.upstream, m, self._quarantined, sources=chain, pinned=self.pins.pinned
        )
        policy = RepoPolicy.from_config(cfg)
        self.catalog = Catalog(cfg, self.index, self.sources, self.filler, policy, self._tree_changed)
        self.jobs = Jobs(self.filler)
        self.scrubber = Scrubber(self.store, self.filler, m, cfg.scrub_bps, cfg.scrub_interval)
        self.ops = Operations(self.catalog, self.pins, self.index, self.store, self.filler, self.jobs, self.scrubber)
        self.labeler = NodeLabeler.from_config(cfg, self.session)
        self.pins.refresh()
        self.compile_caches = self._compile_caches()
        self.status = Status(
            cfg, self.serving, self.index, self.store, self.filler, self.jobs, self.pins,
            self.membership, self.peers is not None, self.compile_caches, m,
        )  # fmt: skip

    def _compile_caches(self) -> CompileCaches:
        """Writable per-key directories for compile artifacts, shared with peers as sealed snapshots (issue 19)."""
        cfg, m = self.cfg, self.metrics
        peers = None
        if self.peers is not None:
            verify = m.verify_failures.labels("compile_cache_peer").inc
            peers = PeerSnapshots(
                self.session, cfg.cluster_token, self.membership.live, cfg.me, cfg.peer_timeout, verify
            )
        return CompileCaches(
            cfg.cache_dir / "compile-caches",
            cfg.me,
            cfg.compile_cache_max,
            cfg.compile_cache_seal_after,
            cfg.compile_cache_fill_timeout,
            peers,
            on_invalid=lambda what: m.index_invalid.labels("compile_cache_" + what).inc(),
            on_event=lambda event: m.compile_cache_events.labels(event).inc(),
        )

    async def close(self) -> None:
        await self.jobs.close()
        await self.scrubber.close()
        await self.filler.close()
        await self.sources.close()
        await self.session.close()
        await self.store.settle()
        self.store.close()
        self.index.close()

    def _tree_changed(self, repo_type: str, repo_id: str) -> None:
        """The index changed (a repo resolved, a ref moved): the mounted tree shows it (one call)."""
        if self.fs is not None:
            self.fs.repo_changed(repo_type, repo_id)

    def _quarantined(self, blob_id: str) -> None:
        """A blob failed its proof: the pages the kernel cached of it must go too, and
        handles the kernel reads in passthrough mode must stop reading its file."""
        if self.fs is None or self.fuse_session is None:
            return
        session, inodes = self.fuse_session, self.fs.inodes_of(blob_id)
        if any(session.in_passthrough(ino) for ino in inodes):
            self.store.discard_quarantined(blob_id)
            for ino in inodes:
                session.retire(ino)

        async def drop() -> None:
            self.metrics.page_cache_invalidations.inc(await session.invalidate(inodes))

        task = asyncio.get_running_loop().create_task(drop())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _evicted(self, tier: str, nbytes: int) -> None:
        self.metrics.evictions.labels(tier).inc()
        self.metrics.evicted_bytes.labels(tier).inc(nbytes)

    # loops ------------------------------------------------------------------------

    async def _every(self, period: float, what: str, round: Callable[[], Awaitable[None]]) -> None:
        """Run `round` every `period` seconds; a round that fails is logged and counted, the next one runs."""
        while True:
            await asyncio.sleep(period)
            try:
                await round()
            except Exception:
                log.exception("%s round failed", what)
                self.metrics.housekeeping_errors.inc()

    async def _housekeeping_round(self) -> None:
        """Persist access times (LRU order survives a restart), re-check refs, label the node."""
        self.store.flush_access_times()
        self.store.clean_quarantine()  # the age bound; count and bytes hold at every quarantine
        if await self.catalog.refresh_refs():
            self.ops.fill_pinned()  # pinned revisions follow their refs
        if self.labeler is not None:
            try:
                await self.labeler.sync(self.status.ready_labels())
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as e:
                log.warning("node labels: %s", e)

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
        cfg = self.cfg
        runner = None
        tasks: list[asyncio.Task | None] = []
        try:
            configured = Configured(self.catalog, self.pins, self.serving.failing)
            tasks.append(await configured.add([*cfg.repos, *self.sources.specs(cfg.repos)]))
            self.pins.refresh()
            housekeeping = max(0.2, min(30.0, cfg.ref_ttl / 2))
            tasks.append(loop.create_task(self._every(housekeeping, "housekeeping", self._housekeeping_round)))
            seal = max(0.2, min(10.0, cfg.compile_cache_seal_after / 4))
            tasks.append(loop.create_task(self._every(seal, "compile-cache", self.compile_caches.tick)))
            tasks.append(loop.create_task(preload(self.ops, cfg.preload)))
            tasks.append(loop.create_task(self.membership.run()))
            tasks.append(loop.create_task(self.scrubber.run()))
            runner = web.AppRunner(make_app(self._faces()), access_log=None, logger=OneLineBadRequests())
            await runner.setup()
            await web.TCPSite(runner, cfg.listen_host, cfg.listen_port).start()
            if cfg.mount is None:
                self.serving.ready = True
                await self._stop.wait()
            else:
                await self._serve_fuse(cfg.mount)
        finally:
            self.serving.ready = False
            for task in tasks:
                if task is not None:
                    task.cancel()
            await self.close()
            if runner is not None:
                await runner.cleanup()

    def _faces(self) -> Faces:
        return Faces(
            self.cfg, self.metrics, self.serving, self.status, self.ops, self.catalog, self.index, self.store,
            self.filler, self.sources, self.membership, self.peers, self.compile_caches,
        )  # fmt: skip

    async def _serve_fuse(self, mountpoint: Path) -> None:
        if mounts.detach(mountpoint):  # a daemon killed with -9 leaves a dead FUSE mount (ENOTCONN)
            log.warning("detached a stale mount at %s", mountpoint.absolute())
        mountpoint.mkdir(parents=True, exist_ok=True)
        mountpoint = mountpoint.resolve()  # now, before mounting: later it would stat our own mount
        on_demand = self.catalog.resolve_on_demand if self.cfg.on_demand else None
        self.fs = NodecacheFS(HubTree(self.index), self.filler, self.metrics, self.cfg.fill_on_open, on_demand)
        opens = self.metrics.fuse_opens
        session = self.fuse_session = Session(
            self.fs,
            mountpoint,
            passthrough=self.cfg.passthrough,
            on_open=lambda passthrough: opens.labels("passthrough" if passthrough else "served").inc(),
        )
        self.fs.kernel = session
        try:
            session.mount()
        except OSError as e:  # e.g. no /dev/fuse, not root, mountpoint busy: one clear line
            raise OSError(f"cannot mount FUSE at {mountpoint}: {e.strerror or e}") from None
        main = asyncio.get_running_loop().create_task(session.serve())
        try:
            await asyncio.wait([main, asyncio.ensure_future(session.initialized.wait())], return_when="FIRST_COMPLETED")
            if session.initialized.is_set():
                await asyncio.sleep(0.05)  # the INIT reply resets read_ahead_kb: write after it
                if not mounts.set_read_ahead(mountpoint, self.cfg.bdi_read_ahead_kb):
                    log.warning("could not raise read_ahead_kb; reads stay at 128 KiB")
                self.serving.passthrough = session.passthrough
                self.serving.ready = True
                log.info("mounted at %s (passthrough %s)", mountpoint, "on" if session.passthrough else "off")
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait([main, stop], return_when="FIRST_COMPLETED")
            stop.cancel()
            self.serving.ready = False
            await self.filler.close()  # wake every waiting reader with EIO
            await session.unmount()  # then the mount goes, answering (EIO) until its readers let go
        finally:
            session.close()
            with contextlib.suppress(asyncio.CancelledError):
                await main


def run(cfg: Config) -> None:
    asyncio.run(Daemon(cfg).run())
