"""Compile-cache snapshots between nodes: ask every peer for a key's newest manifest, fetch blobs verified.

Peers are trusted with bytes only as far as their hashes hold: a manifest is
parsed as hostile input (ccmanifest.parse, for the key asked), a blob is kept
only if its size and sha256 are what the manifest says, else the next peer is
asked. Small blobs come in batches (see ccframes), big ones one stream each.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from . import ccframes as cf
from . import ccmanifest as cm
from .ccmanifest import BadManifest, Manifest

log = logging.getLogger(__name__)


class PeerSnapshots:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        token: str | None,
        members: Callable[[], list[str]],
        me: str,
        timeout: float = 20.0,
        on_verify_failure: Callable[[], None] | None = None,
    ):
        self.session = session
        self.token = token
        self.members = members
        self.me = me
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=timeout)
        self.on_verify_failure = on_verify_failure or (lambda: None)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _manifest(self, peer: str, key: str) -> Manifest | None:
        url = f"http://{peer}/v1/compile-caches/peer/{cm.key_name(key)}/manifest"
        try:
            async with self.session.get(url, headers=self._headers(), timeout=self.timeout) as r:
                if r.status != 200:
                    return None
                data = bytearray()
                async for chunk in r.content.iter_chunked(1 << 20):
                    data += chunk
                    if len(data) > cm.MAX_MANIFEST:
                        break  # parse refuses it, named
            return cm.parse(bytes(data), key)
        except BadManifest as e:
            log.warning("compile cache %s: refused the manifest of peer %s: %s", key, peer, e)
            return None
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            log.info("compile cache %s: peer %s: %s", key, peer, e)
            return None

    async def newest(self, key: str) -> tuple[Manifest, PeerSource] | None:
        """The newest snapshot any peer has, and where to fetch its blobs: the peers that have exactly it
        first (batches are spread over them), then the others."""
        peers = [p for p in self.members() if p != self.me]
        found = await asyncio.gather(*(self._manifest(p, key) for p in peers))
        best: Manifest | None = None
        for m in found:
            if m is not None and m.newer_than(best):
                best = m
        if best is None:
            return None
        exact = [p for p, m in zip(peers, found, strict=True) if m is not None and m.id == best.id]
        return best, PeerSource(self, exact, [p for p in peers if p not in exact])

    async def fetch_batch(self, peer: str, items: list[tuple[str, int]]) -> dict[str, bytes]:
        """The blobs of `items` (sha256, size) this peer serves intact, as frames of one POST; each checked."""
        url = f"http://{peer}/v1/compile-caches/peer/blobs"
        frames: list[tuple[str, bytes]] = []
        try:
            body = {"ids": [sha for sha, _ in items]}
            async with self.session.post(url, json=body, headers=self._headers(), timeout=self.timeout) as r:
                if r.status != 200:
                    log.info("compile-cache blobs from %s: HTTP %d", peer, r.status)
                    return {}
                for sha, size in items:
                    (n,) = cf.HEADER.unpack(await r.content.readexactly(cf.HEADER.size))
                    if n == cf.ABSENT:
                        continue
                    if n != size:  # the rest of this answer cannot be framed: stop reading it
                        log.warning("compile-cache blob %s from %s: %d bytes, want %d", sha[:12], peer, n, size)
                        self.on_verify_failure()
                        break
                    frames.append((sha, await r.content.readexactly(n)))
        except (aiohttp.ClientError, TimeoutError, OSError, asyncio.IncompleteReadError) as e:
            log.info("compile-cache blobs from %s: %s", peer, e.__class__.__name__)
        good = await asyncio.to_thread(lambda: [hashlib.sha256(data).hexdigest() == sha for sha, data in frames])
        out = {}
        for (sha, data), ok in zip(frames, good, strict=True):
            if ok:
                out[sha] = data
            else:
                log.warning("compile-cache blob %s from %s failed verification", sha[:12], peer)
                self.on_verify_failure()
        return out

    async def fetch_blob(self, sha: str, size: int, dest: Path, peers: list[str]) -> bool:
        """Write the blob to dest from the first peer that serves it with the right size and hash."""
        for peer in peers:
            url = f"http://{peer}/v1/compile-caches/peer/blobs/{sha}"
            try:
                async with self.session.get(url, headers=self._headers(), timeout=self.timeout) as r:
                    if r.status != 200:
                        continue
                    h, n = hashlib.sha256(), 0
                    with open(dest, "wb") as f:
                        async for chunk in r.content.iter_chunked(1 << 20):
                            n += len(chunk)
                            if n > size:
                                break
                            h.update(chunk)
                            f.write(chunk)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                log.info("compile-cache blob %s from %s: %s", sha[:12], peer, e)
                continue
            if n == size and h.hexdigest() == sha:
                return True
            log.warning("compile-cache blob %s from %s failed verification; trying the next peer", sha[:12], peer)
            self.on_verify_failure()
        return False


@dataclass
class PeerSource:
    """Where one snapshot's blobs come from: the peers that sealed or filled exactly it, then the rest."""

    peers: PeerSnapshots
    exact: list[str]
    others: list[str]
    name: str = "peer"

    def order(self, i: int) -> list[str]:
        """Peers to ask for batch i: the exact ones rotated by i (to share the load), then the others."""
        j = i % len(self.exact) if self.exact else 0
        return self.exact[j:] + self.exact[:j] + self.others

    async def fetch_small(self, items: list[tuple[str, int]], i: int) -> dict[str, bytes]:
        """One batch of small blobs, verified; what a peer lacks or corrupts is asked of the next one."""
        got: dict[str, bytes] = {}
        for peer in self.order(i):
            want = [(sha, n) for sha, n in items if sha not in got]
            if not want:
                break
            got.update(await self.peers.fetch_batch(peer, want))
        return got

    async def fetch_blob(self, sha: str, size: int, dest: Path) -> bool:
        return await self.peers.fetch_blob(sha, size, dest, self.order(0))
