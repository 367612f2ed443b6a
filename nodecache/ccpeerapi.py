"""The compile caches' peer routes (cluster token): a key's newest sealed manifest (by the key's
hashed name) and blobs by sha256 (one, or a batch of small ones as frames, see ccframes), and
nothing else of the disk.

Blob uploads to peers are capped like chunk uploads: at most `peer_uploads` at a time, paced to
`peer_upload_bps` (these two caps are the compile caches' own, beside those of the chunk route).
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from . import ccframes as cf
from . import ccmanifest as cm
from .api import _body
from .auth import check_bearer
from .ccblobs import BlobDir
from .compilecache import CompileCaches
from .peers import RateLimit


def read_batch(blobs: BlobDir, ids: list[str]) -> list[bytes | None]:
    """The blobs asked for (None: not here), refused whole if they add up to more than one answer holds."""
    paths = [blobs.path(sha) for sha in ids]
    sizes = []
    for path in paths:
        try:
            sizes.append(None if path is None else os.stat(path).st_size)
        except OSError:
            sizes.append(None)
    total = sum(n for n in sizes if n is not None)
    if max((n or 0 for n in sizes), default=0) > cf.SMALL or total > cf.BATCH_BYTES:
        raise web.HTTPRequestEntityTooLarge(
            cf.BATCH_BYTES,
            total,
            reason="too_large",
            text=f"a batch holds blobs of up to {cf.SMALL} bytes, {cf.BATCH_BYTES} in all (these are {total}); "
            "fetch bigger ones one by one",
        )
    out: list[bytes | None] = []
    for path, n in zip(paths, sizes, strict=True):
        data = None
        if n is not None:
            try:
                with open(path, "rb") as f:
                    data = f.read(n + 1)
            except OSError:
                pass
        out.append(data if data is not None and len(data) == n else None)  # gone or changed: not here
    return out


class PeerRoutes:
    def __init__(self, caches: CompileCaches, cluster_token: str | None, uploads: int, upload_bps: int):
        self.caches, self.token = caches, cluster_token
        self.uploads = asyncio.Semaphore(uploads)
        self.pacer = RateLimit(upload_bps)

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v1/compile-caches/peer/{name}/manifest", self.manifest)
        app.router.add_get("/v1/compile-caches/peer/blobs/{sha}", self.blob)
        app.router.add_post("/v1/compile-caches/peer/blobs", self.blobs)

    async def manifest(self, request: web.Request) -> web.Response:
        check_bearer(request, self.token, "the peer API")
        name = request.match_info["name"]
        k = self.caches.keys.get(name) if cm.NAME_RE.fullmatch(name) else None
        if k is None or k.sealed is None:
            raise web.HTTPNotFound(reason="not_found", text="no sealed snapshot of that compile cache here")
        return web.Response(body=k.sealed.dump(), content_type="application/json")

    async def blob(self, request: web.Request) -> web.StreamResponse:
        check_bearer(request, self.token, "the peer API")
        path = self.caches.blobs.path(request.match_info["sha"])
        if path is None:
            raise web.HTTPNotFound(reason="not_found", text="no such compile-cache blob here")
        async with self.uploads:
            try:
                f = open(path, "rb")  # noqa: SIM115  (closed below; the blob may be collected meanwhile)
            except OSError:
                raise web.HTTPNotFound(reason="not_found", text="no such compile-cache blob here") from None
            with f:
                resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
                resp.content_length = os.fstat(f.fileno()).st_size
                await resp.prepare(request)
                while chunk := await asyncio.to_thread(f.read, 1 << 20):
                    await self.pacer.take(len(chunk))
                    await resp.write(chunk)
                await resp.write_eof()
                return resp

    async def blobs(self, request: web.Request) -> web.StreamResponse:
        """A batch of small blobs, as frames in the order asked (see ccframes)."""
        check_bearer(request, self.token, "the peer API")
        ids = cf.check_ids((await _body(request)).get("ids"))
        async with self.uploads:
            blobs = await asyncio.to_thread(read_batch, self.caches.blobs, ids)
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = sum(cf.HEADER.size + len(b or b"") for b in blobs)
            await resp.prepare(request)
            for data in blobs:
                if data is None:
                    await resp.write(cf.header(None))
                    continue
                await self.pacer.take(len(data))
                await resp.write(cf.header(len(data)) + data)
            await resp.write_eof()
            return resp
