"""The peer face: `GET /v1/blobs/{id}?chunk=k` serves one chunk to another node.

The owner of a chunk fills through on a miss (coalesced with its own readers),
using only its upstreams when it is not the owner itself, so a request never
hops to a third node. Requests need the cluster token; each reply carries the
chunk's xxh3, which the receiver checks before using a byte.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING

import xxhash
from aiohttp import web

from .index import BlobRecord
from .layout import COMMIT_RE, validate_blob_id, validate_relpath, validate_repo_id, validate_repo_type
from .peers import XXH3_HEADER, RateLimit, rank

if TYPE_CHECKING:
    from .daemon import Daemon


def _int(query, key: str, default: int | None = None) -> int:
    raw = query.get(key)
    if raw is None and default is not None:
        return default
    if raw is None or not raw.isdigit() or len(raw) > 18:
        raise ValueError(f"query parameter {key!r} must be a non-negative integer")
    return int(raw)


def _record_from_descriptor(daemon: Daemon, blob_id: str, query) -> BlobRecord:
    """A blob this node never saw: learn how to fill it from the asking peer."""
    commit = query.get("commit", "")
    kind = query.get("kind", "")
    if not COMMIT_RE.fullmatch(commit) or kind not in ("sha256", "gitsha1"):
        raise ValueError("fill descriptor needs a 40-hex 'commit' and kind 'sha256' or 'gitsha1'")
    rec = BlobRecord(
        blob_id=blob_id,
        size=_int(query, "size"),
        kind=kind,
        chunk_size=daemon.cfg.chunk_size,
        repo_type=validate_repo_type(query.get("repo_type", "model")),
        repo_id=validate_repo_id(query.get("repo", "")),
        commit=commit,
        path=validate_relpath(query.get("path", "")),
    )
    daemon.index.put_blob(rec)
    return daemon.store.record(blob_id) or rec


def add_routes(app: web.Application, daemon: Daemon) -> None:
    uploads: list[asyncio.Semaphore] = []  # created on the serving loop
    pacer = RateLimit(daemon.cfg.peer_upload_bps)

    async def chunk(request: web.Request) -> web.Response:
        token = daemon.cfg.cluster_token
        if token:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise web.HTTPUnauthorized(reason="cluster token required", text="peer API needs the cluster token")
        blob_id = validate_blob_id(request.match_info["id"])
        q = request.query
        k = _int(q, "chunk")
        if _int(q, "chunk_size", daemon.cfg.chunk_size) != daemon.cfg.chunk_size:
            raise web.HTTPConflict(reason="chunk_size_mismatch", text="peers must share one chunk_size")
        rec = daemon.store.record(blob_id) or _record_from_descriptor(daemon, blob_id, q)
        if rec.state == "quarantined":
            raise web.HTTPNotFound(reason="not_found", text=f"blob {blob_id} is quarantined here")
        if k >= rec.n_chunks:
            raise web.HTTPRequestRangeNotSatisfiable(reason="bad_chunk", text=f"chunk {k} >= {rec.n_chunks}")
        me_owner = daemon.peers is None or rank(daemon.membership.live(), blob_id, k)[0] == daemon.cfg.me
        sources = None if me_owner else daemon.upstream_chain(rec)  # never a second peer hop
        if not uploads:
            uploads.append(asyncio.Semaphore(daemon.cfg.peer_uploads))
        async with uploads[0]:
            data = await daemon.filler.read_chunk(blob_id, k, sources=sources, local_only=q.get("local_only") == "1")
        if data is None:
            raise web.HTTPNotFound(reason="not_found", text=f"chunk {k} of {blob_id} is not here")
        digest = f"{xxhash.xxh3_64_intdigest(data):016x}"
        if daemon.cfg.peer_fault == "flip":  # testing: a peer with bad memory or disk
            data = bytes([data[0] ^ 0x01]) + data[1:]
        await pacer.take(len(data))
        daemon.metrics.peer_bytes_sent.inc(len(data))
        return web.Response(body=data, headers={XXH3_HEADER: digest}, content_type="application/octet-stream")

    app.router.add_get("/v1/blobs/{id}", chunk)
