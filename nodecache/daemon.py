"""Wires index, store, upstream, fill, FUSE and HTTP on one asyncio loop.

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
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from aiohttp import web

from . import layout, mounts
from .backoff import delays
from .ccpeers import PeerSnapshots
from .compilecache import CompileCaches
from .config import Config
from .expiring import ExpiringSet
from .fill import Filler
from .fusefs import NodecacheFS
from .fusesession import Session
from .index import BlobRecord, Index
from .jobs import Job, Jobs
from .labels import NodeLabeler, label_key
from .layout import RepoSpec
from .metrics import Metrics
from .peers import Membership, Peers
from .policy import RepoPolicy
from .repos import RepoRef, ensure_repo, snapshot_blobs
from .scrub import Scrubber
from .server import OneLineBadRequests, make_app
from .store import Store, Tier
from .tree import HubTree
from .upstream import NotFound, UpstreamError
from .upstream.hf import HfUpstream
from .upstream.sources import build_sources

log = logging.getLogger(__name__)


class Daemon:
    """One node's cache. `open()` and `close()` bracket everything; `run()` serves."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.metrics = Metrics()
        self.ready = False
        self._stop = asyncio.Event()
        self.fs: NodecacheFS | None = None
        self.fuse_session: Session | None = None
        self.policy = RepoPolicy.from_config(cfg)
        self._not_found = ExpiringSet(ttl=30.0, max_items=10_000)  # on-demand lookups that failed
        self._resolving: dict[tuple[RepoSpec, str], asyncio.Future] = {}  # (spec, kind) -> one resolution
        self.failing: dict[str, dict] = {}  # configured repos that did not resolve: spec -> error, next retry
        self._background: set[asyncio.Task] = set()

    async def open(self) -> None:
        """Everything but the faces: usable for standalone prefetch too."""
        cfg = self.cfg
        self.index = Index(cfg.cache_dir / "index", on_invalid=lambda db: self.metrics.index_invalid.labels(db).inc())
        marks = (cfg.high_watermark, cfg.low_watermark, cfg.min_free)
        tiers = [Tier("disk", cfg.cache_dir, cfg.disk_max, *marks)]
        if cfg.shm_dir is not None:
            tiers.insert(0, Tier("shm", cfg.shm_dir, cfg.shm_max, *marks))
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
        )
        self.store.placement = self._place
        self._hot: set[str] = set()
        dropped = self.store.recover()
        if dropped:
            log.warning("dropped %d chunk(s) that failed re-verification after a crash", dropped)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
        connector = aiohttp.TCPConnector(limit=max(64, cfg.parallel_total * 2))
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)
        self.upstream = HfUpstream(cfg.hub_url, self.session, self.metrics, token=cfg.hub_token)
        self.filler = Filler(cfg, self.index, self.store, self.upstream, self.metrics, self._quarantined)
        self.sources = build_sources(cfg, self.session, self.metrics, self.upstream)  # per-repo chains (issue 6)
        self.filler.sources = self.sources.chain
        self.membership = Membership(cfg.me, cfg.peers, cfg.peers_dns)
        self.peers: Peers | None = None
        if cfg.peers or cfg.peers_dns:
            self.peers = Peers(self.membership, self.session, cfg.cluster_token, self.metrics, cfg.peer_timeout)
            self.filler.sources = lambda rec, k: self.peers.chain(self.upstream_chain(rec), rec, k)
        for view in self.index.views():
            for files in view.snapshots.values():
                self._verify_first(view.repo_id, files)
        self.jobs = Jobs(self.filler)
        self.scrubber = Scrubber(self.store, self.filler, self.metrics, cfg.scrub_bps, cfg.scrub_interval)
        self.labeler = NodeLabeler.from_config(cfg, self.session)
        self.refresh_pins()
        self.compile_caches = self._compile_caches()

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

    def upstream_chain(self, rec: BlobRecord) -> list:
        """The upstream sources of a blob, in order (peers come before these)."""
        return self.sources.chain(rec)

    async def close(self) -> None:
        await self.jobs.close()
        await self.scrubber.close()
        await self.filler.close()
        await self.sources.close()
        await self.session.close()
        await self.store.settle()
        self.store.close()
        self.index.close()

    def _verify_first(self, repo_id: str, files: list) -> None:
        """Blobs shown under a verify_before_serve name anywhere are read only once proven."""
        self.filler.verify_first.update(f.blob_id for f in files if self.cfg.verify_first(repo_id, f.path))

    def _resolved(self, ref: RepoRef) -> RepoRef:
        self._verify_first(ref.repo_id, self.index.get_snapshot(ref.repo_type, ref.repo_id, ref.commit) or [])
        return ref

    def may_fetch(self, repo_type: str, repo_id: str) -> bool:
        """May a request (a peer's, a lookup's) make this node resolve the repo upstream?"""
        return self.policy.allows(repo_type, repo_id) or self.index.has_repo(repo_type, repo_id)

    async def add_repo(self, spec: RepoSpec, public_only: bool = False) -> tuple[RepoRef, int, list[str]]:
        """Resolve a repo into the index and show it in the tree; (ref, bytes, blob ids).

        Concurrent calls for one spec share one resolution. `public_only`
        (requests nobody configured) refuses a repo the Hub does not call public.
        """
        key = (spec, "public" if public_only else "any")
        pending = self._resolving.get(key)
        if pending is None:
            pending = self._resolving[key] = asyncio.ensure_future(self._add_repo(spec, public_only))
            pending.add_done_callback(lambda _: self._resolving.pop(key, None))
        return await asyncio.shield(pending)

    async def _add_repo(self, spec: RepoSpec, public_only: bool) -> tuple[RepoRef, int, list[str]]:
        def public(res) -> str:
            return "" if res.visibility == "public" else f"{res.visibility} repos are resolved only when named"

        ref = self._resolved(
            await ensure_repo(self.index, self.sources, self.cfg.chunk_size, spec, public if public_only else None)
        )
        blobs = snapshot_blobs(self.index, ref)
        if self.fs is not None:
            self.fs.repo_changed(ref.repo_type, ref.repo_id)
        total = sum(self.filler.record(b).size for b in dict.fromkeys(blobs))
        return ref, total, blobs

    async def prefetch(self, spec: RepoSpec) -> Job:
        ref, total, blobs = await self.add_repo(spec)
        return self.jobs.start(ref, blobs, total)

    # placement, pins, eviction -------------------------------------------------

    def _place(self, rec: BlobRecord) -> str:
        """Small files and blobs of "hot" pins go to shm while it has room."""
        shm = self.store.tiers.get("shm")
        if shm is not None and (rec.size <= self.cfg.shm_file_max or rec.blob_id in self._hot):
            if shm.fits(rec.size, shm.high):
                return "shm"
        return "disk"

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

    def pinned_refs(self) -> list[tuple[RepoRef, str]]:
        out = []
        for repo_type, repo_id, revision, mode in self.index.pins():
            commit = self.index.commit_of(repo_type, repo_id, revision)
            if commit:
                out.append((RepoRef(repo_type, repo_id, revision, commit), mode))
        return out

    def refresh_pins(self) -> None:
        pinned: set[str] = set()
        hot: set[str] = set()
        for ref, mode in self.pinned_refs():
            blobs = snapshot_blobs(self.index, ref)
            pinned.update(blobs)
            if mode == "hot":
                hot.update(blobs)
        self.filler.pinned, self._hot = pinned, hot

    async def pin(self, spec: RepoSpec, mode: str = "pin") -> Job:
        """Keep a revision forever (mode "hot": in shm when it fits) and fill it now."""
        if mode not in ("pin", "hot"):
            raise ValueError(f"pin mode must be 'pin' or 'hot', not {mode!r}")
        ref, total, blobs = await self.add_repo(spec)
        self.index.put_pin(ref.repo_type, ref.repo_id, ref.revision, mode)
        self.refresh_pins()
        return self.jobs.start(ref, blobs, total)

    def unpin(self, spec: RepoSpec) -> bool:
        found = self.index.delete_pin(spec.repo_type, spec.repo_id, spec.rev)
        self.refresh_pins()
        return found

    def cached_blobs(self, spec: RepoSpec | None) -> tuple[RepoRef | None, list[str]]:
        """The blobs of one cached repo (every snapshot, or the revision in `spec`), or of the whole
        cache (spec None); KeyError if the repo is not in the cache. The ref names what was asked."""
        if spec is None:
            return None, [r.blob_id for r in self.index.all_blobs()]
        repo_type, repo_id, revision = spec.repo_type, spec.repo_id, spec.revision
        view = next((v for v in self.index.views() if (v.repo_type, v.repo_id) == (repo_type, repo_id)), None)
        if view is None:
            raise KeyError(f"{repo_type} {repo_id} is not in the cache")
        if revision is None:
            ref = RepoRef(repo_type, repo_id, "", "")
            commits = list(view.snapshots)
        else:
            ref = RepoRef(repo_type, repo_id, revision, view.refs.get(revision, revision))
            commits = [ref.commit]
        return ref, list(dict.fromkeys(f.blob_id for c in commits for f in view.snapshots.get(c, [])))

    def verify(self, spec: RepoSpec | None) -> Job:
        """Re-check the stored bytes of one repo (or revision), or of the whole cache, as a job."""
        ref, blob_ids = self.cached_blobs(spec)
        total = sum(rec.size for b in blob_ids if (rec := self.store.record(b)) is not None)
        return self.jobs.start(ref, blob_ids, total, kind="verify", work=self.scrubber.verify)

    def evict(self, spec: RepoSpec | None) -> tuple[int, int, int]:
        """Evict the blobs of one repo (or revision), or every unpinned blob.

        Returns (blobs evicted, bytes freed, blobs kept because pinned or in use).
        """
        blob_ids = self.cached_blobs(spec)[1]
        evicted = freed = kept = 0
        for blob_id in dict.fromkeys(blob_ids):
            rec = self.store.record(blob_id)
            if rec is None or self.store.cached_bytes(rec) == 0:
                continue
            if self.filler.protected(blob_id):
                kept += 1
                continue
            freed += self.store.evict(rec)
            evicted += 1
        return evicted, freed, kept

    # status ----------------------------------------------------------------------

    def repos_status(self) -> list[dict]:
        pins = {(r.repo_type, r.repo_id, r.revision): mode for r, mode in self.pinned_refs()}
        out = []
        for view in self.index.views():
            meta = self.index.get_repo_meta(view.repo_type, view.repo_id) or {}
            snaps = []
            for commit, files in view.snapshots.items():
                blobs = {f.blob_id: f.size for f in files}
                recs = [self.store.record(b) for b in blobs]
                snaps.append(
                    {
                        "commit": commit,
                        "revisions": sorted(r for r, c in view.refs.items() if c == commit),
                        "files": len(files),
                        "bytes_total": sum(blobs.values()),
                        "bytes_cached": sum(self.store.cached_bytes(r) for r in recs if r),
                        "complete": all(r is not None and r.state == "complete" for r in recs),
                        "last_access": max((r.last_access for r in recs if r), default=0.0),
                    }
                )
            out.append(
                {
                    "repo": view.repo_id,
                    "repo_type": view.repo_type,
                    "node_label": label_key(view.repo_type, view.repo_id),
                    "visibility": meta.get("visibility", "unknown"),
                    "refs": view.refs,
                    "pinned": {
                        rev: mode for (t, r, rev), mode in pins.items() if (t, r) == (view.repo_type, view.repo_id)
                    },
                    "snapshots": snaps,
                }
            )
        return out

    def status(self) -> dict:
        from . import __version__

        quarantine = self.store.quarantine_usage()
        return {
            "version": __version__,
            "ready": self.ready,
            "mount": str(self.cfg.mount) if self.cfg.mount else None,
            "passthrough": bool(self.fuse_session and self.fuse_session.passthrough and self.ready),
            "tiers": [
                {
                    "name": t.name,
                    "path": str(t.root),
                    "used": t.used,
                    "capacity": t.capacity(),
                    "fs_free": t.fs_free(),
                    "quarantine_files": quarantine[t.name][0],
                    "quarantine_bytes": quarantine[t.name][1],
                }
                for t in self.store.tiers.values()
            ],
            "fills_inflight": self.filler.inflight,
            "blobs_filling": self.filler.filling,
            "jobs": self.jobs.counts(),
            "blobs": self.blob_counts(),
            "pins": [
                {"repo": r.repo_id, "revision": r.revision, "commit": r.commit, "mode": m, "ready": self._complete(r)}
                for r, m in self.pinned_refs()
            ],
            "peers": self.membership.status() if self.peers else [],
            "repos_failing": self.failing,
        }

    def _complete(self, ref: RepoRef) -> bool:
        """Truthful readiness: every blob of the snapshot stored and verified."""
        return all(self.filler.record(b).state == "complete" for b in snapshot_blobs(self.index, ref))

    def blob_counts(self) -> dict[str, int]:
        counts = {"partial": 0, "complete": 0, "quarantined": 0}
        for rec in self.index.all_blobs():
            counts[rec.state] = counts.get(rec.state, 0) + 1
        return counts

    def update_gauges(self) -> None:
        for state, n in self.blob_counts().items():
            self.metrics.blobs.labels(state).set(n)
        for t in self.store.tiers.values():
            self.metrics.cache_bytes.labels(t.name).set(t.used)
            self.metrics.cache_capacity_bytes.labels(t.name).set(t.capacity())
        for tier, (files, nbytes) in self.store.quarantine_usage().items():
            self.metrics.quarantine_files.labels(tier).set(files)
            self.metrics.quarantine_bytes.labels(tier).set(nbytes)
        healthy = sum(p["healthy"] for p in self.membership.status())
        self.metrics.peers.labels("healthy").set(healthy)
        self.metrics.peers.labels("failed").set(len(self.membership.members) - healthy)
        for state, n in self.jobs.counts().items():
            self.metrics.jobs.labels(state).set(n)
        cc = self.compile_caches
        self.metrics.compile_cache_bytes.set(cc.used())
        self.metrics.compile_caches.labels("in_use").set(sum(1 for k in cc.keys.values() if k.users))
        self.metrics.compile_caches.labels("idle").set(sum(1 for k in cc.keys.values() if not k.users))
        for ref, _ in self.pinned_refs():  # bounded cardinality: pinned repos only
            recs = [self.store.record(b) for b in dict.fromkeys(snapshot_blobs(self.index, ref))]
            total = sum(r.size for r in recs if r)
            cached = sum(self.store.cached_bytes(r) for r in recs if r)
            ratio = cached / total if total else 1.0
            if not all(r and r.state == "complete" for r in recs):
                ratio = min(ratio, 0.999)  # 1 only once verified
            self.metrics.repo_cached_ratio.labels(ref.repo_id).set(ratio)

    # revisions that move, repos nobody listed --------------------------------------

    async def refresh_refs(self) -> int:
        """Re-resolve refs older than ref_ttl; a new commit appears as a new snapshot
        beside the old one (which stays readable), and pinned revisions follow it."""
        changed = 0
        for repo_type, repo_id, revision, commit, at in self.index.all_refs():
            if time.time() - at < self.cfg.ref_ttl:
                continue
            try:
                ref = self._resolved(
                    await ensure_repo(
                        self.index, self.sources, self.cfg.chunk_size, RepoSpec(repo_type, repo_id, revision)
                    )
                )
            except (UpstreamError, ValueError) as e:
                log.warning("cannot re-resolve %s@%s: %s", repo_id, revision, e)
                continue
            if ref.commit != commit:
                log.info("%s@%s moved %s -> %s", repo_id, revision, commit[:12], ref.commit[:12])
                changed += 1
                if self.fs is not None:
                    self.fs.repo_changed(repo_type, repo_id)
        if changed:
            self.refresh_pins()
            for ref, _ in self.pinned_refs():
                blobs = snapshot_blobs(self.index, ref)
                if any(self.filler.record(b).state != "complete" for b in blobs):
                    self.jobs.start(ref, blobs, sum(self.filler.record(b).size for b in dict.fromkeys(blobs)))
        return changed

    async def resolve_on_demand(self, folder: str) -> bool:
        """A lookup of `models--org--name` nobody listed: resolve it if `on_demand` allows.

        Any process that sees the mount can look up any name, so a repo matched
        only by a wildcard must be public; private and gated ones must be named.
        """
        parsed = layout.parse_repo_folder(folder)
        if parsed is None or not self.policy.allows(*parsed) or folder in self._not_found:
            return False
        try:
            await self.add_repo(RepoSpec(*parsed), public_only=not self.policy.names(*parsed))
            return True
        except (NotFound, UpstreamError) as e:
            log.info("on-demand %s: %s", folder, e)
            self._not_found.add(folder)
            return False

    async def _preload(self) -> None:
        """Fill the configured preload list at start, one repo at a time, in order."""
        for entry in self.cfg.preload:
            spec, _, mode = entry.partition("=")
            try:
                job = await (self.pin(RepoSpec.parse(spec), mode) if mode else self.prefetch(RepoSpec.parse(spec)))
                if job.task is not None:
                    await asyncio.wait([job.task])
                log.info("preload %s: %s", spec, job.state)
            except (NotFound, UpstreamError, ValueError) as e:
                log.error("preload %s: %s", spec, e)

    def ready_labels(self) -> set[str]:
        """Label keys of repos with at least one snapshot fully cached and verified."""
        return {
            label_key(r["repo_type"], r["repo"])
            for r in self.repos_status()
            if any(s["complete"] for s in r["snapshots"])
        }

    async def _housekeeping(self) -> None:
        """Persist access times (LRU order survives a restart), re-check refs, label the node.

        A round that fails is logged and counted; the next one runs anyway.
        """
        period = max(0.2, min(30.0, self.cfg.ref_ttl / 2))
        while True:
            await asyncio.sleep(period)
            try:
                await self._housekeeping_round()
            except Exception:
                log.exception("housekeeping round failed")
                self.metrics.housekeeping_errors.inc()

    async def _compile_cache_rounds(self) -> None:
        """Seal quiet compile caches and keep their quota; a failed round is logged and the next one runs."""
        period = max(0.2, min(10.0, self.cfg.compile_cache_seal_after / 4))
        while True:
            await asyncio.sleep(period)
            try:
                await self.compile_caches.tick()
            except Exception:
                log.exception("compile-cache round failed")
                self.metrics.housekeeping_errors.inc()

    async def _housekeeping_round(self) -> None:
        self.store.flush_access_times()
        self.store.clean_quarantine()  # the age bound; count and bytes hold at every quarantine
        await self.refresh_refs()
        if self.labeler is not None:
            try:
                await self.labeler.sync(self.ready_labels())
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as e:
                log.warning("node labels: %s", e)

    async def _add_configured(self, specs: list[str]) -> asyncio.Task | None:
        """Resolve the configured repos; one that fails never stops the others (or the start):
        it is named in /v1/status and /readyz and retried with backoff until it resolves.

        A repo the index holds already is shown from it at once (a restart waits on
        no upstream) and re-resolved in the background, like a ref refresh."""
        retry: dict[str, Iterator[float]] = {}
        known = [spec for spec in specs if self._indexed(spec)]
        for spec in specs:
            if spec not in known:
                await self._add_configured_one(spec, retry)

        async def background() -> None:
            for spec in known:
                await self._add_configured_one(spec, retry)
            if retry:
                await self._retry_configured(retry)

        return asyncio.get_running_loop().create_task(background()) if known or retry else None

    def _indexed(self, spec: str) -> bool:
        try:
            parsed = RepoSpec.parse(spec)
        except layout.InvalidName:
            return False
        commit = self.index.commit_of(parsed.repo_type, parsed.repo_id, parsed.rev)
        return commit is not None and commit in self.index.commits(parsed.repo_type, parsed.repo_id)

    async def _add_configured_one(self, spec: str, retry: dict[str, Iterator[float]]) -> None:
        try:
            ref, total, _ = await self.add_repo(RepoSpec.parse(spec))
            log.info("repo %s: %d bytes", ref, total)
        except Exception as e:  # a typo, a 404, the Hub down, metadata we refuse
            retry[spec] = delays(base=2.0, cap=300.0)
            self._failed(spec, e, next(retry[spec]))

    def _failed(self, spec: str, e: Exception, wait: float) -> None:
        log.error("repo %s: %s (retrying in %.0f s)", spec, e, wait)
        self.failing[spec] = {"error": f"{e.__class__.__name__}: {e}", "retry_at": time.time() + wait}

    async def _retry_configured(self, retry: dict[str, Iterator[float]]) -> None:
        while self.failing:
            spec = min(self.failing, key=lambda s: self.failing[s]["retry_at"])
            await asyncio.sleep(max(0.0, self.failing[spec]["retry_at"] - time.time()))
            try:
                ref, total, _ = await self.add_repo(RepoSpec.parse(spec))
            except Exception as e:
                self._failed(spec, e, next(retry[spec]))
                continue
            del self.failing[spec]
            log.info("repo %s: %d bytes (resolved on retry)", ref, total)
            self.refresh_pins()

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
        runner = housekeeping = preload = discovery = retry = compile_caches = scrub = None
        try:
            retry = await self._add_configured([*self.cfg.repos, *self.sources.specs(self.cfg.repos)])
            self.refresh_pins()
            housekeeping = loop.create_task(self._housekeeping())
            compile_caches = loop.create_task(self._compile_cache_rounds())
            preload = loop.create_task(self._preload())
            discovery = loop.create_task(self.membership.run())
            scrub = loop.create_task(self.scrubber.run())
            runner = web.AppRunner(make_app(self), access_log=None, logger=OneLineBadRequests())
            await runner.setup()
            await web.TCPSite(runner, self.cfg.listen_host, self.cfg.listen_port).start()
            if self.cfg.mount is None:
                self.ready = True
                await self._stop.wait()
            else:
                await self._serve_fuse(self.cfg.mount)
        finally:
            self.ready = False
            for task in (housekeeping, preload, discovery, retry, compile_caches, scrub):
                if task is not None:
                    task.cancel()
            await self.close()
            if runner is not None:
                await runner.cleanup()

    async def _serve_fuse(self, mountpoint: Path) -> None:
        if mounts.detach(mountpoint):  # a daemon killed with -9 leaves a dead FUSE mount (ENOTCONN)
            log.warning("detached a stale mount at %s", mountpoint.absolute())
        mountpoint.mkdir(parents=True, exist_ok=True)
        mountpoint = mountpoint.resolve()  # now, before mounting: later it would stat our own mount
        self.fs = NodecacheFS(HubTree(self.index), self.filler, self.metrics, self.cfg.fill_on_open)
        if self.cfg.on_demand:
            self.fs.on_demand = self.resolve_on_demand
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
                self.ready = True
                log.info("mounted at %s (passthrough %s)", mountpoint, "on" if session.passthrough else "off")
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait([main, stop], return_when="FIRST_COMPLETED")
            stop.cancel()
            self.ready = False
            await self.filler.close()  # wake every waiting reader with EIO
            await session.unmount()  # then the mount goes, answering (EIO) until its readers let go
        finally:
            session.close()
            with contextlib.suppress(asyncio.CancelledError):
                await main


def run(cfg: Config) -> None:
    asyncio.run(Daemon(cfg).run())
