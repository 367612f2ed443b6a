"""Compile caches on this node's disk: one writable directory per key, sealed into snapshots, filled from peers.

Layout under `<cache_dir>/compile-caches/`:
  keys/<name>/meta.json    the key's text, times, the CSI targets that use it (cckeys)
  keys/<name>/tree/        the directory pods write into (bound read-write by the CSI plugin; cctree)
  keys/<name>/sealed.json  the newest snapshot of the tree (a manifest, see ccmanifest; ccseal)
  blobs/<sha256>           file contents of sealed snapshots, one copy per content (ccblobs)
  tmp/                     staging; emptied at start

Snapshots travel between nodes (ccpeers: small blobs in batches, see
ccframes) and, with `compile_cache_upstream`, through a bucket (ccupstream):
a node uploads what it sealed itself (ccupload); a publish takes the newest
snapshot of its peers and the bucket, whichever is newer (ccfill).

This module holds the keys' life: publish (acquire/release), quota, seal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from . import ccmanifest as cm
from .ccblobs import BlobDir
from .ccfill import SnapshotFills
from .cckeys import Key, KeyDirs
from .ccmanifest import BadManifest, Manifest
from .ccpeers import PeerSnapshots
from .ccseal import seal
from .ccupload import Uploads
from .ccupstream import S3Snapshots
from .config import Config
from .metrics import Metrics

log = logging.getLogger(__name__)


class InUse(Exception):
    """The key is published to a pod: it is not evicted."""


class CompileCaches:
    """Every compile-cache key of this node: publish (acquire/release), quota, seal."""

    def __init__(
        self,
        root: Path,
        node: str,
        max_bytes: int = 0,
        seal_after: float = 60.0,
        fill_timeout: float = 60.0,
        peers: PeerSnapshots | None = None,
        on_invalid: Callable[[str], None] | None = None,
        on_event: Callable[[str], None] | None = None,
        upstream: S3Snapshots | None = None,
    ):
        self.node = node
        self.max_bytes = max_bytes
        self.seal_after = seal_after
        self.fill_timeout = fill_timeout
        self.on_event = on_event or (lambda event: None)  # seal, fill, fill_timeout, fill_failed, eviction, upload
        for sub in ("keys", "blobs", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / "tmp", ignore_errors=True)
        (root / "tmp").mkdir(exist_ok=True)
        self.tmp = root / "tmp"
        self.blobs = BlobDir(root / "blobs", self.tmp)
        self.dirs = KeyDirs(root / "keys", on_invalid or (lambda what: None))
        self.fills = SnapshotFills(self.dirs, self.blobs, peers, upstream, self.on_event)
        self.uploads = None
        if upstream is not None:
            current = lambda k: self.keys.get(k.name) is k  # noqa: E731  (not evicted meanwhile)
            self.uploads = Uploads(upstream, node, self.blobs.path, current, self.dirs.save, self.on_event)
        self._locks: dict[str, asyncio.Lock] = {}
        self.keys: dict[str, Key] = self.dirs.load()

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def find(self, key: str) -> Key | None:
        return self.keys.get(cm.key_name(key))

    def listing(self) -> list[dict]:
        return sorted((k.as_dict() for k in self.keys.values()), key=lambda d: -d["last_used"])

    # -- publish ---------------------------------------------------------------------

    async def acquire(self, key: str, target: str) -> tuple[Path, str]:
        """The key's tree for a pod at `target`; filled from the newest peer snapshot first if that is newer
        than what is here and nobody uses it (bounded by fill_timeout, else as it is). -> (tree, how)."""
        name = cm.key_name(key)
        _check_target(target)
        async with self.lock(name):
            k = self.keys.get(name)
            how = "local"
            if k is None:
                k = self.keys[name] = self.dirs.create(key, name, time.time())
                how = "empty"
            if not k.users and self.fills.any:  # in use: never swapped
                how = await self.fills.fill(k, self.fill_timeout) or how
            k.users.add(target)
            k.last_used = time.time()
            self.dirs.save(k)
            return self.dirs.tree(name), how

    def adopt(self, name: str, target: str) -> str:
        """Record `target` as a user of the key named `name` (its hashed directory), as the CSI plugin sees
        it bound: no fill, no swap. For binds the daemon forgot (its state lost or restored). -> the key."""
        if not cm.NAME_RE.fullmatch(name) or name not in self.keys:
            raise KeyError(f"no compile cache named {name!r} on this node")
        _check_target(target)
        k = self.keys[name]
        if target not in k.users:
            k.users.add(target)
            k.last_used = time.time()
            self.dirs.save(k)
            log.info("compile cache %s: %s is bound to it (told by the CSI plugin)", k.key, target)
        return k.key

    def users(self) -> dict[str, str]:
        """target -> key name, for every target some key believes uses it."""
        return {t: k.name for k in self.keys.values() for t in k.users}

    def release(self, target: str) -> list[str]:
        """Forget `target` as a user of whichever key had it; the keys it used."""
        out = []
        for k in self.keys.values():
            if target in k.users:
                k.users.discard(target)
                k.last_used = time.time()
                self.dirs.save(k)
                out.append(k.key)
        return out

    # -- space -----------------------------------------------------------------------

    def evict(self, key: str) -> int:
        name = cm.key_name(key)
        k = self.keys.get(name)
        if k is None:
            raise KeyError(f"no compile cache {key!r} on this node")
        if k.users:
            raise InUse(f"compile cache {key!r} is published to {len(k.users)} volume(s)")
        freed = k.bytes
        del self.keys[name]
        trash = self.blobs.aside(f"evict-{name}")
        os.replace(self.dirs.dir(name), trash)
        shutil.rmtree(trash, ignore_errors=True)
        self.on_event("eviction")
        self.gc_blobs()
        log.info("compile cache %s evicted (%d bytes)", key, freed)
        return freed

    def used(self) -> int:
        return sum(k.bytes for k in self.keys.values()) + self.blobs.nbytes()

    def enforce_quota(self) -> list[str]:
        """Evict idle keys, least recently used first, until trees + blobs fit compile_cache_max."""
        if not self.max_bytes:
            return []
        out = []
        for k in sorted(self.keys.values(), key=lambda k: k.last_used):
            if self.used() <= self.max_bytes:
                break
            if k.users or self.lock(k.name).locked():
                continue
            self.evict(k.key)
            out.append(k.key)
        return out

    def gc_blobs(self) -> int:
        """Delete the blobs no sealed snapshot lists and no fill is fetching."""
        keep = set().union(*(k.sealed.blobs() for k in self.keys.values() if k.sealed), *self.fills.fetching.values())
        return self.blobs.gc(keep)

    # -- sealing ---------------------------------------------------------------------

    async def seal(self, key: str) -> Manifest:
        name = cm.key_name(key)
        k = self.keys.get(name)
        if k is None:
            raise KeyError(f"no compile cache {key!r} on this node")
        async with self.lock(name):
            m = await asyncio.to_thread(seal, self.dirs, self.blobs, k, self.node)
            self.dirs.publish(k, m)
            self.gc_blobs()
            self.on_event("seal")
            log.info("compile cache %s sealed: %d files, %d bytes, %s", key, m.files, m.bytes, m.id[:12])
            return m

    async def tick(self) -> None:
        """Measure every tree; seal those changed since their last seal and quiet for seal_after; upload
        what this node sealed; keep the quota."""
        now = time.time()
        for k in list(self.keys.values()):
            if self.lock(k.name).locked():
                continue
            await asyncio.to_thread(self.dirs.measure, k)
            if k.fingerprint != k.sealed_fingerprint and k.files and now - k.newest_mtime >= self.seal_after:
                try:
                    await self.seal(k.key)
                except (OSError, BadManifest) as e:
                    log.warning("compile cache %s: seal failed: %s", k.key, e)
            if self.uploads is not None:
                self.uploads.start(k, now)
        self.enforce_quota()

    async def close(self) -> None:
        if self.uploads is not None:
            await self.uploads.close()


def _check_target(target: str) -> None:
    if not target.startswith("/") or "\0" in target or len(target) > cm.MAX_PATH:
        raise ValueError("target must be an absolute path")


def node_compile_caches(
    cfg: Config, m: Metrics, session: aiohttp.ClientSession, live: Callable[[], list[str]], with_peers: bool
) -> CompileCaches:
    """A node's compile caches from its config, shared with its peers as sealed snapshots if it has any."""
    peers = upstream = None
    if with_peers:
        verify = m.verify_failures.labels("compile_cache_peer").inc
        peers = PeerSnapshots(session, cfg.cluster_token, live, cfg.me, cfg.peer_timeout, verify)
    if cfg.compile_cache_upstream:
        upstream = S3Snapshots(
            cfg.compile_cache_upstream,
            endpoint_url=cfg.s3_endpoint_url,
            region=cfg.s3_region,
            path_style=cfg.s3_path_style,
            on_verify_failure=m.verify_failures.labels("compile_cache_upstream").inc,
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
        upstream=upstream,
    )
