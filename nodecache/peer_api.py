"""The peer face: `GET /v1/blobs/{id}?chunk=k&repo=…&commit=…` serves one chunk to another node.

Only nodes holding the cluster token may ask; a node without one serves no
peer at all. A request names a snapshot, not a blob's shape: the owner looks
the blob up in its own index, or resolves `(repo, commit)` through its own
sources, and serves only blobs that belong to that snapshot, with sizes it
resolved itself. Nothing in a query string ever becomes an index record.

The owner of a chunk fills through on a miss (coalesced with its own readers),
using only its upstreams when it is not the owner itself, so a request never
hops to a third node. Each reply carries the chunk's xxh3, which the receiver
checks before using a byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .auth import check_bearer
from .blobfile import FileSlice
from .catalog import Catalog
from .config import Config
from .fill import Filler
from .index import BlobRecord, Index
from .layout import COMMIT_RE, RepoSpec, validate_blob_id, validate_repo_id, validate_repo_type
from .metrics import Metrics
from .peers import XXH3_HEADER, Membership, Peers, RateLimit, rank, xxh3_of
from .slicebuf import read_slice
from .store import Store


@dataclass(frozen=True)
class PeerFace:
    """What the peer API needs of the node."""

    cfg: Config
    store: Store
    index: Index
    filler: Filler
    catalog: Catalog
    membership: Membership
    peers: Peers | None
    upstream_chain: Callable[[BlobRecord], list]  # a blob's upstream sources (never a second peer hop)
    metrics: Metrics


def _int(query, key: str, default: int | None = None) -> int:
    raw = query.get(key)
    if raw is None and default is not None:
        return default
    if raw is None or not raw.isdigit() or len(raw) > 18:
        raise ValueError(f"query parameter {key!r} must be a non-negative integer")
    return int(raw)


async def owned_record(node: PeerFace, blob_id: str, query) -> BlobRecord:
    """This node's own record of a blob the asking peer says is in `repo`@`commit`.

    A blob already known is served as recorded here. Otherwise the snapshot is
    resolved through this node's sources (if its policy lets it fetch that
    repo), and the blob must be one of its files.
    """
    rec = node.store.record(blob_id)
    if rec is not None:
        return rec
    repo_type = validate_repo_type(query.get("repo_type", "model"))
    repo_id = validate_repo_id(query.get("repo", ""))
    commit = query.get("commit", "")
    if not COMMIT_RE.fullmatch(commit):
        raise ValueError("query parameter 'commit' must be 40 hex digits")
    if not node.catalog.may_fetch(repo_type, repo_id):
        raise web.HTTPForbidden(reason="not_allowed", text=f"this node does not fetch {repo_type} {repo_id}")
    files = node.index.snapshots.get(repo_type, repo_id, commit)
    if files is None:
        await node.catalog.add_repo(RepoSpec(repo_type, repo_id, commit))  # NotFound -> 404
        files = node.index.snapshots.get(repo_type, repo_id, commit) or []
    rec = node.store.record(blob_id) if any(f.blob_id == blob_id for f in files) else None
    if rec is None:
        raise web.HTTPNotFound(reason="not_found", text=f"blob {blob_id} is not in {repo_id}@{commit}")
    return rec


def add_routes(app: web.Application, node: PeerFace) -> None:
    uploads: list[asyncio.Semaphore] = []  # created on the serving loop
    pacer = RateLimit(node.cfg.peer_upload_bps)

    async def chunk(request: web.Request) -> web.StreamResponse:
        check_bearer(request, node.cfg.cluster_token, "the peer API")
        blob_id = validate_blob_id(request.match_info["id"])
        q = request.query
        k = _int(q, "chunk")
        if _int(q, "chunk_size", node.cfg.chunk_size) != node.cfg.chunk_size:
            raise web.HTTPConflict(reason="chunk_size_mismatch", text="peers must share one chunk_size")
        rec = await owned_record(node, blob_id, q)
        if rec.state == "quarantined":
            raise web.HTTPNotFound(reason="not_found", text=f"blob {blob_id} is quarantined here")
        if k >= rec.n_chunks:
            raise web.HTTPRequestRangeNotSatisfiable(reason="bad_chunk", text=f"chunk {k} >= {rec.n_chunks}")
        me_owner = node.peers is None or rank(node.membership.live(), blob_id, k)[0] == node.cfg.me
        sources = None if me_owner else node.upstream_chain(rec)  # never a second peer hop
        if not uploads:
            uploads.append(asyncio.Semaphore(node.cfg.peer_uploads))
        async with uploads[0]:
            data = await node.filler.read_chunk(
                blob_id,
                k,
                sources=sources,
                local_only=q.get("local_only") == "1",
                background=q.get("background") == "1",
                paged=False,
            )
            if data is None:
                raise web.HTTPNotFound(reason="not_found", text=f"chunk {k} of {blob_id} is not here")
            if isinstance(data, FileSlice):
                try:
                    held = await asyncio.get_running_loop().run_in_executor(None, read_slice, data, node.store.buffers)
                except OSError as e:
                    raise web.HTTPServiceUnavailable(
                        reason="read_failed", text=f"chunk {k} of {blob_id}: {e}"
                    ) from None
            else:
                held = None
        body = data if held is None else held.view
        size = len(body)
        digest = xxh3_of([body])
        await pacer.take(size)
        resp = web.StreamResponse(headers={XXH3_HEADER: digest, "Content-Type": "application/octet-stream"})
        resp.content_length = size
        try:
            await resp.prepare(request)
            await resp.write(body)
            await resp.write_eof()
        except ConnectionError:  # the peer went away: it asks the next source
            return resp
        finally:
            if held is not None:
                held.sent(node.store.buffers, request.transport)
        node.metrics.peer_bytes_sent.inc(size)
        return resp

    app.router.add_get("/v1/blobs/{id}", chunk)
