"""HTTP faces of compile caches: `/v1/compile-caches` (admin token) and the peer routes (cluster token).

Thin: every call is one CompileCaches method. The peer routes serve a key's
newest sealed manifest (by the key's hashed name) and blobs by sha256, and
nothing else of the disk.
"""

from __future__ import annotations

from aiohttp import web

from . import ccmanifest as cm
from .api import _body
from .auth import admin_only, check_bearer
from .compilecache import CompileCaches, InUse
from .config import Config
from .metrics import Metrics


def _key(body: dict) -> str:
    try:
        return cm.check_key(body.get("key"))
    except cm.BadKey as e:
        raise ValueError(f"field 'key': {e}") from None


def add_routes(app: web.Application, cfg: Config, compile_caches: CompileCaches, metrics: Metrics) -> None:
    def caches():
        return compile_caches

    admin = admin_only(cfg.admin_token)

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
        path = caches().blob(request.match_info["sha"])
        if path is None:
            raise web.HTTPNotFound(reason="not_found", text="no such compile-cache blob here")
        if cfg.peer_fault == "flip":  # testing: a peer with bad memory or disk
            data = bytearray(path.read_bytes())
            if data:
                data[0] ^= 0x01
            return web.Response(body=bytes(data), content_type="application/octet-stream")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    app.router.add_get("/v1/compile-caches", admin(listing))
    app.router.add_post("/v1/compile-caches/acquire", admin(acquire))
    app.router.add_post("/v1/compile-caches/release", admin(release))
    app.router.add_post("/v1/compile-caches/seal", admin(seal))
    app.router.add_post("/v1/compile-caches/evict", admin(evict))
    app.router.add_get("/v1/compile-caches/peer/{name}/manifest", peer_manifest)
    app.router.add_get("/v1/compile-caches/peer/blobs/{sha}", peer_blob)
