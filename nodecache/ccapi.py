"""HTTP faces of compile caches: `/v1/compile-caches` (admin token) and the peer routes (cluster token).

Thin: every call is one CompileCaches method. The peer routes serve a key's
newest sealed manifest (by the key's hashed name) and blobs by sha256 (one, or
a batch of small ones as frames, see ccframes), and nothing else of the disk.
Blob uploads to peers are capped like chunk uploads: at most `peer_uploads`
at a time, paced to `peer_upload_bps` (these two caps are the compile caches'
own, beside those of the chunk route).
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from . import ccframes as cf
from . import ccmanifest as cm
from .api import _body
from .auth import admin_only, check_bearer
from .compilecache import CompileCaches, InUse
from .config import Config
from .metrics import Metrics
from .peers import RateLimit


def _read_batch(caches: CompileCaches, ids: list[str]) -> list[bytes | None]:
    """The blobs asked for (None: not here), refused whole if they add up to more than one answer holds."""
    paths = [caches.blobs.path(sha) for sha in ids]
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


def _key(body: dict) -> str:
    try:
        return cm.check_key(body.get("key"))
    except cm.BadKey as e:
        raise ValueError(f"field 'key': {e}") from None


def add_routes(app: web.Application, cfg: Config, compile_caches: CompileCaches, metrics: Metrics) -> None:
    def caches():
        return compile_caches

    admin = admin_only(cfg.admin_token)
    uploads = asyncio.Semaphore(cfg.peer_uploads)
    pacer = RateLimit(cfg.peer_upload_bps)

    async def listing(_: web.Request) -> web.Response:
        c = caches()
        return web.json_response({"compile_caches": c.listing(), "used_bytes": c.used(), "max_bytes": c.max_bytes})

    async def acquire(request: web.Request) -> web.Response:
        body = await _body(request)
        target = body.get("target")
        if not isinstance(target, str):
            raise ValueError("field 'target' (the absolute path the volume is published at) is required")
        path, how = await caches().acquire(_key(body), target)
        metrics.compile_cache_publishes.labels(how).inc()
        return web.json_response({"path": str(path), "name": path.parent.name, "filled": how})

    async def users(_: web.Request) -> web.Response:
        return web.json_response({"users": caches().users()})

    async def adopt(request: web.Request) -> web.Response:
        body = await _body(request)
        name, target = body.get("name"), body.get("target")
        if not isinstance(name, str) or not isinstance(target, str):
            raise ValueError("fields 'name' (a key's directory name) and 'target' (an absolute path) are required")
        try:
            return web.json_response({"key": caches().adopt(name, target)})
        except KeyError as e:
            raise web.HTTPNotFound(reason="not_found", text=str(e.args[0])) from None

    async def release(request: web.Request) -> web.Response:
        target = (await _body(request)).get("target")
        if not isinstance(target, str):
            raise ValueError("field 'target' is required")
        return web.json_response({"released": caches().release(target)})

    async def seal(request: web.Request) -> web.Response:
        key = _key(await _body(request))
        try:
            m = await caches().seal(key)
        except KeyError as e:
            raise web.HTTPNotFound(reason="not_found", text=str(e.args[0])) from None
        except cm.BadManifest as e:
            raise web.HTTPUnprocessableEntity(reason="unsealable", text=str(e)) from None
        return web.json_response({"key": key, "id": m.id, "sealed_at": m.sealed_at, "files": m.files, "bytes": m.bytes})

    async def evict(request: web.Request) -> web.Response:
        key = _key(await _body(request))
        try:
            freed = caches().evict(key)
        except KeyError as e:
            raise web.HTTPNotFound(reason="not_found", text=str(e.args[0])) from None
        except InUse as e:
            raise web.HTTPConflict(reason="in_use", text=str(e)) from None
        return web.json_response({"evicted": key, "freed_bytes": freed})

    async def peer_manifest(request: web.Request) -> web.Response:
        check_bearer(request, cfg.cluster_token, "the peer API")
        name = request.match_info["name"]
        k = caches().keys.get(name) if cm.NAME_RE.fullmatch(name) else None
        if k is None or k.sealed is None:
            raise web.HTTPNotFound(reason="not_found", text="no sealed snapshot of that compile cache here")
        return web.Response(body=k.sealed.dump(), content_type="application/json")

    async def peer_blob(request: web.Request) -> web.StreamResponse:
        check_bearer(request, cfg.cluster_token, "the peer API")
        path = caches().blobs.path(request.match_info["sha"])
        if path is None:
            raise web.HTTPNotFound(reason="not_found", text="no such compile-cache blob here")
        async with uploads:
            try:
                f = open(path, "rb")  # noqa: SIM115  (closed below; the blob may be collected meanwhile)
            except OSError:
                raise web.HTTPNotFound(reason="not_found", text="no such compile-cache blob here") from None
            with f:
                resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
                resp.content_length = os.fstat(f.fileno()).st_size
                await resp.prepare(request)
                while chunk := await asyncio.to_thread(f.read, 1 << 20):
                    await pacer.take(len(chunk))
                    await resp.write(chunk)
                await resp.write_eof()
                return resp

    async def peer_blobs(request: web.Request) -> web.StreamResponse:
        """A batch of small blobs, as frames in the order asked (see ccframes)."""
        check_bearer(request, cfg.cluster_token, "the peer API")
        ids = cf.check_ids((await _body(request)).get("ids"))
        async with uploads:
            blobs = await asyncio.to_thread(_read_batch, caches(), ids)
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = sum(cf.HEADER.size + len(b or b"") for b in blobs)
            await resp.prepare(request)
            for data in blobs:
                if data is None:
                    await resp.write(cf.header(None))
                    continue
                await pacer.take(len(data))
                await resp.write(cf.header(len(data)) + data)
            await resp.write_eof()
            return resp

    app.router.add_get("/v1/compile-caches", admin(listing))
    app.router.add_post("/v1/compile-caches/acquire", admin(acquire))
    app.router.add_post("/v1/compile-caches/release", admin(release))
    app.router.add_get("/v1/compile-caches/users", admin(users))
    app.router.add_post("/v1/compile-caches/adopt", admin(adopt))
    app.router.add_post("/v1/compile-caches/seal", admin(seal))
    app.router.add_post("/v1/compile-caches/evict", admin(evict))
    app.router.add_get("/v1/compile-caches/peer/{name}/manifest", peer_manifest)
    app.router.add_get("/v1/compile-caches/peer/blobs/{sha}", peer_blob)
    app.router.add_post("/v1/compile-caches/peer/blobs", peer_blobs)
