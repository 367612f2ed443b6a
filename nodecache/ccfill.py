"""Filling a key from the newest snapshot of the peers and the bucket, when it is newer than ours
and our tree is clean (local writes not sealed yet are never overwritten).

Missing blobs are fetched from the snapshot's source, small ones in batches (ccframes) and big ones
streamed, each verified; the first failure cancels the rest. The tree is then built beside the old
one and swapped in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from . import ccframes as cf
from .ccblobs import BlobDir
from .cckeys import Key, KeyDirs
from .ccmanifest import BadManifest, Manifest
from .ccpeers import PeerSnapshots
from .cctree import build
from .ccupstream import S3Snapshots, UpstreamFailed

log = logging.getLogger("nodecache.compilecache")

FETCHES = 8  # batch requests (and big-blob streams) in flight during one fill


class SnapshotFills:
    def __init__(
        self,
        keys: KeyDirs,
        blobs: BlobDir,
        peers: PeerSnapshots | None,
        upstream: S3Snapshots | None,
        on_event: Callable[[str], None],
    ):
        self.keys, self.blobs, self.peers, self.upstream, self.on_event = keys, blobs, peers, upstream, on_event
        self.fetching: dict[str, set[str]] = {}  # key name -> blobs of the snapshot being filled (kept by gc)

    @property
    def any(self) -> bool:
        """Is there anywhere to fill from?"""
        return self.peers is not None or self.upstream is not None

    async def fill(self, k: Key, timeout: float) -> str | None:
        """Fill the key if a newer snapshot is found and fetched within `timeout` (building the tree is
        local and always finishes). -> where it came from (peer|upstream), or None: as it is."""
        try:
            fetched = await asyncio.wait_for(self._fetch_newest(k), timeout)
            if fetched is not None:
                await self._install(k, *fetched)
                return fetched[1]
        except TimeoutError:
            log.warning("compile cache %s: no fill within %.0fs; published as it is", k.key, timeout)
            self.on_event("fill_timeout")
        except (OSError, BadManifest) as e:
            log.warning("compile cache %s: fill failed (%s); published as it is", k.key, e)
            self.on_event("fill_failed")
        finally:
            self.fetching.pop(k.name, None)
        return None

    async def _newest_upstream(self, key: str) -> Manifest | None:
        try:
            return await self.upstream.newest(key)
        except UpstreamFailed as e:
            log.warning("compile cache %s: %s", key, e)
            return None

    async def _fetch_newest(self, k: Key) -> tuple[Manifest, str, float] | None:
        """Fetch the blobs of the newest snapshot of the peers and the upstream if it is newer than ours and
        our tree is clean. -> (that snapshot, where it came from: peer|upstream, fetch seconds), or None."""
        peers, remote = await asyncio.gather(
            self.peers.newest(k.key) if self.peers is not None else asyncio.sleep(0),
            self._newest_upstream(k.key) if self.upstream is not None else asyncio.sleep(0),
        )
        best, source = (peers[0], peers[1]) if peers else (None, None)
        if remote is not None and remote.newer_than(best):
            best, source = remote, self.upstream
        if best is None or not best.newer_than(k.sealed):
            return None
        await asyncio.to_thread(self.keys.measure, k)
        if k.files and k.fingerprint != k.sealed_fingerprint:
            log.info("compile cache %s: local writes not sealed yet; keeping them over %s", k.key, best.id[:12])
            return None
        t0 = time.monotonic()
        self.fetching[k.name] = best.blobs()
        await self.fetch(k, best, source)
        return best, source.name, time.monotonic() - t0

    async def fetch(self, k: Key, m: Manifest, source) -> None:
        """Fetch the snapshot's missing blobs from `source`: small ones in batches, big ones
        streamed, each verified; the first failure cancels the rest and is raised."""
        missing = {e.sha256: e.size for e in m.entries if e.type == "file" and self.blobs.path(e.sha256) is None}
        small = [(sha, n) for sha, n in missing.items() if n <= cf.SMALL]
        big = [(sha, n) for sha, n in missing.items() if n > cf.SMALL]
        sem = asyncio.Semaphore(FETCHES)

        async def batch(i: int, items: list[tuple[str, int]]) -> None:
            async with sem:
                got = await source.fetch_small(items, i)
                await asyncio.to_thread(self.blobs.put, got)
            if len(got) < len(items):
                raise OSError(f"{len(items) - len(got)} blob(s) of {k.key!r}: no {source.name} served them intact")

        async def one(sha: str, size: int) -> None:
            async with sem:
                dest = self.blobs.aside(f"fetch-{sha}")
                try:
                    if not await source.fetch_blob(sha, size, dest):
                        raise OSError(f"blob {sha} of {k.key!r}: no {source.name} served it intact")
                    self.blobs.adopt(dest, sha)
                finally:
                    dest.unlink(missing_ok=True)

        tasks = [batch(i, items) for i, items in enumerate(cf.batches(small))] + [one(s, n) for s, n in big]
        try:
            async with asyncio.TaskGroup() as group:
                for t in tasks:
                    group.create_task(t)
        except BaseExceptionGroup as eg:  # the first failure says why; the others were cancelled
            raise eg.exceptions[0] from None

    async def _install(self, k: Key, m: Manifest, source: str, fetch_s: float) -> None:
        """Build the snapshot's tree beside the old one and swap it in (its blobs are all here)."""
        t0 = time.monotonic()
        await asyncio.to_thread(build, self.keys.tree(k.name), m, self.blobs.path, self.blobs.tmp, k.name)
        await asyncio.to_thread(self.keys.measure, k)
        self.keys.publish(k, m)
        self.on_event("fill")
        log.info(
            "compile cache %s filled from %s: %d files, %d bytes, %s; fetch %.2fs, build %.2fs",
            k.key, source, m.files, m.bytes, m.id[:12], fetch_s, time.monotonic() - t0,
        )  # fmt: skip
