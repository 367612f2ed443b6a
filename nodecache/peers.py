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

import aiohttp
import xxhash

from .config import Config
from .expiring import ExpiringSet
from .index import BlobRecord
from .metrics import Metrics
from .upstream import NotFound, PiecewiseSource, UpstreamError

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


def join_host_port(host: str, port: str | int) -> str:
    """`host:port`, with an IPv6 address in brackets (as URLs need it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


LOWAT = 256 * 1024  # bytes a body's socket gathers per wake-up (asyncio reads at most 256 KiB at a time)


async def body_parts(resp: aiohttp.ClientResponse) -> list[bytes]:
    """A chunk's body as the buffers the socket delivered, never joined: the store gathers
    them into its aligned buffer anyway, and a joined 8 MiB copy lands in fresh pages."""
    parts = []
    with FewerWakeups(resp) as wakeups:
        async for data in resp.content.iter_any():
            wakeups.update()
            parts.append(data)
    return parts


class FewerWakeups:
    """While a large body arrives, wake the event loop once per `LOWAT` bytes, not once per packet.

    A rate-limited stream delivers a few KiB per socket read; each read costs
    the loop a wake-up, the transport, aiohttp's parser and our iteration, in
    Python. SO_RCVLOWAT makes the kernel report the socket readable only once
    LOWAT bytes are queued. It is raised only while more than LOWAT bytes of
    the body are still to come and is 1 again for its tail, so the end of a
    body (and the next response on a kept-alive connection) is never waited
    for. Anything without a socket or a length is left as it is.
    """

    def __init__(self, resp: aiohttp.ClientResponse):
        conn = resp.connection
        transport = conn.transport if conn is not None else None
        self.sock = transport.get_extra_info("socket") if transport is not None else None
        self.content, self.length = resp.content, resp.content_length
        self.raised = False

    def __enter__(self) -> FewerWakeups:
        self.update()
        return self

    def update(self) -> None:
        """After each read: batch while more than LOWAT bytes are still on the wire."""
        if self.sock is None or self.length is None:
            return
        want = self.length - self.content.total_bytes > LOWAT
        if want != self.raised:
            self._set(LOWAT if want else 1)
            self.raised = want

    def _set(self, value: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
        except OSError:
            self.sock = None  # not a TCP socket after all: leave it

    def __exit__(self, *exc: object) -> None:
        if self.raised and self.sock is not None:
            self._set(1)
            self.raised = False


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
        session: aiohttp.ClientSession,
        token: str | None,
        metrics: Metrics,
        membership: Membership,
        timeout: float,
        local_only: bool = False,
    ):
        self.member = member
        self.name = f"peer {member}"
        self.session = session
        self.token = token
        self.metrics = metrics
        self.membership = membership
        self.timeout = timeout
        self.local_only = local_only

    async def close(self) -> None:
        """Nothing of its own: the session is the daemon's."""

    async def fetch(self, rec: BlobRecord, start: int, end: int, background: bool = False) -> list:
        chunk = start // rec.chunk_size
        params = {"chunk": str(chunk), **descriptor(rec)}
        if self.local_only:
            params["local_only"] = "1"
        if background:  # the owner lets its own readers go first
            params["background"] = "1"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        t0 = time.perf_counter()
        try:
            async with self.session.get(
                f"http://{self.member}/v1/blobs/{rec.blob_id}",
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                if resp.status == 404 and self.local_only:
                    raise NotFound(f"{self.name} does not have chunk {chunk}")
                if resp.status != 200:
                    raise UpstreamError(f"{self.name}: HTTP {resp.status}")
                data = await body_parts(resp)
                digest = resp.headers.get(XXH3_HEADER, "")
        except (aiohttp.ClientError, TimeoutError) as e:
            self.membership.failed(self.member)
            self.metrics.peer_fallbacks.labels("unreachable").inc()
            raise UpstreamError(f"{self.name}: {e.__class__.__name__}: {e}") from None
        except UpstreamError:
            self.metrics.peer_fallbacks.labels("error" if not self.local_only else "missing").inc()
            raise
        size = sum(map(len, data))
        if size != end - start:
            self.metrics.peer_fallbacks.labels("truncated").inc()
            raise UpstreamError(f"{self.name}: {size} bytes, want {end - start}")
        h = xxhash.xxh3_64()
        for part in data:
            h.update(part)
        if f"{h.intdigest():016x}" != digest:
            self.metrics.verify_failures.labels("peer").inc()
            self.metrics.peer_fallbacks.labels("verify").inc()
            raise UpstreamError(f"{self.name}: chunk {chunk} of {rec.blob_id} failed xxh3 verification")
        self.membership.ok(self.member)
        self.metrics.peer_bytes_received.inc(size)
        self.metrics.peer_fetch_seconds.observe(time.perf_counter() - t0)
        return data


class Peers:
    """The chain for each chunk: owner (or upstream if we own it), other peers that have it, upstream."""

    def __init__(
        self,
        membership: Membership,
        session: aiohttp.ClientSession,
        token: str | None,
        metrics: Metrics,
        timeout: float,
    ):
        self.membership = membership
        self.session, self.token, self.metrics, self.timeout = session, token, metrics, timeout

    def _source(self, member: str, local_only: bool) -> PeerSource:
        return PeerSource(member, self.session, self.token, self.metrics, self.membership, self.timeout, local_only)

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


def node_peers(cfg: Config, membership: Membership, session: aiohttp.ClientSession, m: Metrics) -> Peers | None:
    """The node's peers, if it is configured with any (static or by DNS)."""
    if not (cfg.peers or cfg.peers_dns):
        return None
    return Peers(membership, session, cfg.cluster_token, m, cfg.peer_timeout)
