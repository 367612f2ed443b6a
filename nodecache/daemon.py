"""Wires index, store, sources, fill, the catalog of repos, FUSE and HTTP on one asyncio loop.

Policy lives in the modules it wires (catalog, pins, ops, status, startup,
fusemount); this file only builds them, in dependency order, and runs the
loops. Without a SIGTERM handler the mount would be left stale (ENOTCONN) for
every pod bound to it: `run` always stops the FUSE face on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import aiohttp
from aiohttp import web

from .catalog import Catalog
from .compilecache import node_compile_caches
from .config import Config
from .fill import Filler
from .fusemount import FuseMount
from .housekeeping import Housekeeping, every
from .index import Index
from .inuse import InUse
from .jobs import Jobs
from .labels import NodeLabeler
from .metrics import Metrics
from .ops import Operations
from .peers import Membership, node_peers
from .pins import Pins
from .policy import RepoPolicy
from .readiness import ReadyRepos
from .scrub import Scrubber
from .server import Faces, OneLineBadRequests, make_app
from .startup import Configured, preload
from .status import Serving, Status
from .store import Store
from .tier import configured_tiers
from .upstream.hf import HfUpstream
from .upstream.receive import Receiver
from .upstream.sources import build_sources

log = logging.getLogger(__name__)

# At stop, HTTP requests still running (a mirror client that stopped reading) get this long to
# finish, then as long again once aiohttp cancels their request's body, before they are cut;
# aiohttp's default (60 s per connection, so 120 s) outlasts kubelet's grace period.
HTTP_STOP_GRACE = 1.0


class Daemon:
    """One node's cache. `open()` and `close()` bracket everything; `run()` serves."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.metrics = Metrics()
        self.serving = Serving()
        self._stop = asyncio.Event()

    async def open(self) -> None:
        """Everything but the faces: usable for standalone prefetch too."""
        cfg, m = self.cfg, self.metrics
        self.index = Index(cfg.cache_dir / "index", on_invalid=lambda db: m.index_invalid.labels(db).inc())
        tiers = configured_tiers(cfg)
        in_use = InUse()  # what eviction spares: kept by pins, the fill path and jobs
        self.pins = Pins(self.index, tiers[0] if tiers[0].name == "shm" else None, cfg.shm_file_max, in_use)
        self.store = Store(
            cfg.cache_dir,
            self.index,
            fsync=cfg.fsync,
            tiers=tiers,
            on_evict=m.evicted,
            direct_io=cfg.direct_io,
            hash_memory=cfg.hash_memory,
            hash_nice=cfg.hash_nice,
            retry_base=cfg.retry_base,
            quarantine_limits=(cfg.quarantine_files, cfg.quarantine_max, cfg.quarantine_ttl),
            placement=self.pins.place,
            in_use=in_use,
        )
        self.fuse = FuseMount(cfg, self.index, self.store, m, self.serving)
        dropped = self.store.recover()
        if dropped:
            log.warning("dropped %d chunk(s) that failed re-verification after a crash", dropped)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
        connector = aiohttp.TCPConnector(limit=max(64, cfg.parallel_total * 2))
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)
        # Chunk bodies are received in threads (upstream/receive.py): two per fetch slot, so a
        # slow stream never keeps another waiting; buffers for each slot's part and the next.
        self.receiver = Receiver(
            threads=2 * cfg.parallel_total, keep_buffers=2 * cfg.parallel_total, chained=m.upstream_chained.inc
        )
        self.upstream = HfUpstream(cfg.hub_url, self.session, m, token=cfg.hub_token, receiver=self.receiver)
        self.sources = build_sources(cfg, self.session, m, self.upstream)  # per-repo chains (issue 6)
        self.membership = Membership(cfg.me, cfg.peers, cfg.peers_dns)
        self.peers = node_peers(cfg, self.membership, self.receiver, m)
        chain = self.sources.chain if self.peers is None else self.peers.over(self.sources.chain)
        self.filler = Filler(cfg, self.index, self.store, chain, m, self.fuse.quarantined)
        policy = RepoPolicy.from_config(cfg)
        as_left = self.store.start != "written"  # nobody else wrote to the index since this node ran
        self.catalog = Catalog(cfg, self.index, self.sources, self.filler, policy, self.fuse.tree_changed, as_left)
        self.jobs = Jobs(self.filler)
        self.scrubber = Scrubber(self.store, self.filler, m, cfg.scrub_bps, cfg.scrub_interval)
        self.ops = Operations(self.catalog, self.pins, self.index, self.store, self.filler, self.jobs, self.scrubber)
        labeler = NodeLabeler.from_config(cfg, self.session)
        self.housekeeping = Housekeeping(self.store, self.catalog, self.ops, labeler, ReadyRepos(self.index))
        self.pins.refresh()
        self.compile_caches = node_compile_caches(cfg, m, self.session, self.membership.live, self.peers is not None)
        self.status = Status(
            cfg, self.serving, self.index, self.store, self.filler, self.jobs, self.pins,
            self.membership, self.peers is not None, self.compile_caches, m,
        )  # fmt: skip

    async def close(self) -> None:
        await self.jobs.close()
        await self.compile_caches.close()
        await self.catalog.close()
        await self.scrubber.close()
        await self.filler.close()
        await self.sources.close()
        await self.receiver.close()
        await self.session.close()
        await self.store.settle()
        self.store.close()
        self.index.close()

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
        on_demand = self.catalog.resolve_on_demand if cfg.on_demand else None
        try:
            if cfg.mount is not None:  # a connection the keeper holds is served before anything else
                await self.fuse.take_over(cfg.mount, self.filler, on_demand)
            configured = Configured(self.catalog, self.pins, self.serving.failing)
            adding = loop.create_task(configured.add([*cfg.repos, *self.sources.specs(cfg.repos)]))
            if not await self._until_stopped(adding):  # a first resolve of 10^6 files takes ~30 s
                return
            tasks.append(adding.result())
            self.pins.refresh()
            housekeeping = max(0.2, min(30.0, cfg.ref_ttl / 2))
            failed = self.metrics.housekeeping_errors.inc
            tasks.append(loop.create_task(every(housekeeping, "housekeeping", self.housekeeping.round, failed)))
            seal = max(0.2, min(10.0, cfg.compile_cache_seal_after / 4))
            tasks.append(loop.create_task(every(seal, "compile-cache", self.compile_caches.tick, failed)))
            tasks.append(loop.create_task(preload(self.ops, cfg.preload)))
            tasks.append(loop.create_task(self.membership.run()))
            tasks.append(loop.create_task(self.scrubber.run()))
            runner = web.AppRunner(
                make_app(self._faces()), access_log=None, logger=OneLineBadRequests(), shutdown_timeout=HTTP_STOP_GRACE
            )
            await runner.setup()
            await web.TCPSite(runner, cfg.listen_host, cfg.listen_port).start()
            if cfg.mount is None:
                self.serving.ready = True
                await self._stop.wait()
            else:
                await self.fuse.serve(cfg.mount, self.filler, on_demand, self._stop)
        finally:
            self.serving.ready = False
            await self.fuse.release()  # first: the keeper hands the connection to the next daemon
            for task in tasks:
                if task is not None:
                    task.cancel()
            if runner is not None:  # no new request; those running get HTTP_STOP_GRACE, then are cut
                await runner.cleanup()
            await self.close()  # only then what they use: the index, the store, the HTTP session

    async def _until_stopped(self, task: asyncio.Task) -> bool:
        """Wait for `task`, unless SIGTERM comes first: then cancel it and return False (the
        resolutions it started are cancelled by `close`)."""
        stopping = asyncio.get_running_loop().create_task(self._stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if task.done():
            return True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False

    def _faces(self) -> Faces:
        return Faces(
            self.cfg, self.metrics, self.serving, self.status, self.ops, self.catalog, self.index, self.store,
            self.filler, self.sources, self.membership, self.peers, self.compile_caches,
        )  # fmt: skip


def run(cfg: Config) -> None:
    asyncio.run(Daemon(cfg).run())
