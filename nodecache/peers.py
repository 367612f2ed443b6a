"""Peers: who is in the cluster, who owns which chunk, and fetching a chunk from a peer.

Ownership is rendezvous (HRW) hashing of (blob id, chunk index) over the live
members: every node computes the same owner without talking, and a member
joining or leaving moves only ~1/N of the chunks. The owner fills from
upstream; everybody else asks the owner, so each chunk crosses the WAN once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from contextlib import aclosing
from urllib.parse import urlencode

import xxhash

from .config import Config
from .expiring import ExpiringSet
from .index import BlobRecord
from .metrics import Metrics
from .upstream import NotFound, PiecewiseSource, UpstreamError
from .upstream.receive import Receiver

log = logging.getLogger(__name__)

XXH3_HEADER = "X-Nodecache-Xxh3"
_BACKOFF = 5.0  # a failed peer is skipped this long
_MAX_MEMBERS = 4096  # failed peers remembered at once (a DNS answer names at most a few hundred)


# --- pure ---------------------------------------------------------------------


def score(member: str, blob_id: str, chunk: int) -> int:
    return xxhash.xxh3_64_intdigest(f"{member}\0{blob_id}\0{chunk}".encode())


def rank(members: list[str], blob_id: str, chunk: int) -> list[str]:
    """Members ordered by preference for this chunk; the first is its owner."""
    return sorted(members, key=lambda m: score(m, blob_id, chunk), reverse=True)


class RateLimit:
    """A byte-rate pacer: each take(n) is scheduled after the previous ones at `rate` bytes/s."""

    def __init__(self, rate: int):
        self.rate = rate
        self._next = 0.0

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + n / self.rate
        if start > now:
            await asyncio.sleep(start - now)


def xxh3_of(parts: list) -> str:
    """The xxh3-64 of the parts' bytes in order, as the peer API's header spells it."""
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return f"{h.intdigest():016x}"


def join_host_port(host: str, port: str | int) -> str:
    """`host:port`, with an IPv6 address in brackets (as URLs need it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- membership -----------------------------------------------------------------


class Membership:
    """Static members, or the A records of a headless Service re-resolved every 10 s."""

    def __init__(self, me: str, static: tuple[str, ...] = (), dns: str | None = None, refresh: float = 10.0):
        self.me = me
        self.dns = dns
        self.refresh = refresh
        self.members: list[str] = sorted(set(static) | {me})
        self._failed = ExpiringSet(ttl=_BACKOFF, max_items=_MAX_MEMBERS)  # skipped until they expire

    def live(self) -> list[str]:
        return [m for m in self.members if m == self.me or m not in self._failed]

    def failed(self, member: str) -> None:
        self._failed.add(member)

    def ok(self, member: str) -> None:
        self._failed.discard(member)

    def status(self) -> list[dict]:
        return [{"peer": m, "self": m == self.me, "healthy": m not in self._failed} for m in self.members]

    async def resolve_dns(self) -> None:
        """One DNS refresh: `name:port` -> every address of name, plus ourselves."""
        assert self.dns is not None
        host, _, port = self.dns.rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as e:
            log.warning("peer discovery %s: %s", self.dns, e)
            return
        found = {join_host_port(info[4][0], port) for info in infos}
        members = sorted(found | {self.me})
        if members != self.members:
            log.info("peers: %s", ", ".join(members))
            self.members = members

    async def run(self) -> None:
        while self.dns:
            await self.resolve_dns()
            await asyncio.sleep(self.refresh)


# --- the peer as a fill source ------------------------------------------------


def descriptor(rec: BlobRecord) -> dict[str, str]:
    """The snapshot a blob belongs to: an owner that never heard of it resolves that itself."""
    return {"repo_type": rec.repo_type, "repo": rec.repo_id, "commit": rec.commit, "chunk_size": str(rec.chunk_size)}


class PeerSource(PiecewiseSource):
    """Chunk fetches from one peer; the reply's xxh3 is checked before use."""

    kind = "peer"

    def __init__(
        self,
        member: str,
        receiver: Receiver,
        token: str | None,
        metrics: Metrics,
        membership: Membership,
        timeout: float,
        local_only: bool = False,
    ):
        self.member = member
        self.name = f"peer {member}"
        self.receiver = receiver  # the chunk arrives as the upstreams' do: one readinto into a reused buffer
        self.token = token
        self.metrics = metrics
        self.membership = membership
        self.timeout = timeout
        self.local_only = local_only

    async def close(self) -> None:
        """Nothing of its own: the receiver is the daemon's."""

    async def fetch(self, rec: BlobRecord, start: int, end: int, background: bool = False) -> list:
        chunk = start // rec.chunk_size
        params = {"chunk": str(chunk), **descriptor(rec)}
        if self.local_only:
            params["local_only"] = "1"
        if background:  # the owner lets its own readers go first
            params["background"] = "1"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        url = f"http://{self.member}/v1/blobs/{rec.blob_id}?{urlencode(params)}"
        t0 = time.perf_counter()
        stage = "unreachable"  # what a failure is counted as: refused, reset or silent before the status line
        try:
            async with asyncio.timeout(self.timeout), self.receiver.get(url, headers, self.timeout) as resp:
                if resp.status == 404 and self.local_only:
                    stage = "missing"
                    raise NotFound(f"{self.name} does not have chunk {chunk}")
                stage = "error"
                if resp.status != 200:
                    raise UpstreamError(f"HTTP {resp.status}")
                digest = resp.headers.get(XXH3_HEADER, "")
                stage = "truncated"  # the body broke off, or ran short of the chunk
                async with aclosing(resp.parts(0, end - start, end - start)) as parts:
                    data = [view async for part in parts for view in part]
        except NotFound:
            self.metrics.peer_fallbacks.labels(stage).inc()
            raise
        except UpstreamError as e:
            if stage in ("unreachable", "truncated"):  # gone, or going: skipped a while (its chunks elsewhere)
                self.membership.failed(self.member)
            self.metrics.peer_fallbacks.labels(stage).inc()
            raise UpstreamError(f"{self.name}: {e}") from None
        except TimeoutError:
            self.membership.failed(self.member)
            self.metrics.peer_fallbacks.labels("unreachable").inc()
            raise UpstreamError(f"{self.name}: no chunk within {self.timeout:g} s") from None
        if xxh3_of(data) != digest:
            data = None  # the error's traceback keeps this frame: it must not keep the receiver's buffer
            self.metrics.verify_failures.labels("peer").inc()
            self.metrics.peer_fallbacks.labels("verify").inc()
            raise UpstreamError(f"{self.name}: chunk {chunk} of {rec.blob_id} failed xxh3 verification")
        self.membership.ok(self.member)
        size = end - start
        self.metrics.peer_bytes_received.inc(size)
        self.metrics.peer_fetch_seconds.observe(time.perf_counter() - t0)
        return data


class Peers:
    """The chain for each chunk: owner (or upstream if we own it), other peers that have it, upstream."""

    def __init__(
        self,
        membership: Membership,
        receiver: Receiver,
        token: str | None,
        metrics: Metrics,
        timeout: float,
    ):
        self.membership = membership
        self.receiver, self.token, self.metrics, self.timeout = receiver, token, metrics, timeout

    def _source(self, member: str, local_only: bool) -> PeerSource:
        return PeerSource(member, self.receiver, self.token, self.metrics, self.membership, self.timeout, local_only)

    def chain(self, upstreams: list, rec: BlobRecord, chunk: int) -> list:
        """Owner first; then peers that already have the chunk; then the repo's upstreams."""
        ranked = rank(self.membership.live(), rec.blob_id, chunk)
        others = [self._source(m, local_only=True) for m in ranked[1:] if m != self.membership.me]
        if ranked[0] == self.membership.me:
            return [*upstreams, *others]
        return [self._source(ranked[0], local_only=False), *others, *upstreams]

    def over(self, upstreams: Callable[[BlobRecord], list]) -> Callable[[BlobRecord, int], list]:
        """The fill path's chain for a chunk: `chain` over the repo's upstreams."""
        return lambda rec, chunk: self.chain(upstreams(rec), rec, chunk)


def node_peers(cfg: Config, membership: Membership, receiver: Receiver, m: Metrics) -> Peers | None:
    """The node's peers, if it is configured with any (static or by DNS)."""
    if not (cfg.peers or cfg.peers_dns):
        return None
    return Peers(membership, receiver, cfg.cluster_token, m, cfg.peer_timeout)
