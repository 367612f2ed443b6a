"""HTTP faces of compile caches: `/v1/compile-caches` (admin token) here, and the peer routes
(cluster token, ccpeerapi).

Thin: every call is one CompileCaches method.
"""

from __future__ import annotations

from aiohttp import web

from . import ccmanifest as cm
from .api import _body, not_found
from .auth import admin_only
from .ccpeerapi import PeerRoutes
from .compilecache import CompileCaches, InUse
from .config import Config
from .metrics import Metrics


def add_routes(app: web.Application, cfg: Config, caches: CompileCaches, metrics: Metrics) -> None:
    AdminRoutes(caches, metrics).add_to(app, admin_only(cfg.admin_token))
    PeerRoutes(caches, cfg.cluster_token, cfg.peer_uploads, cfg.peer_upload_bps).add_to(app)


def _key(body: dict) -> str:
    try:
        return cm.check_key(body.get("key"))
    except cm.BadKey as e:
        raise ValueError(f"field 'key': {e}") from None


def _field(body: dict, name: str, what: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ValueError(f"field '{name}' {what}is required")
    return value


class AdminRoutes:
    def __init__(self, caches: CompileCaches, metrics: Metrics):
        self.caches, self.metrics = caches, metrics

    def add_to(self, app: web.Application, admin) -> None:
        app.router.add_get("/v1/compile-caches", admin(self.listing))
        app.router.add_post("/v1/compile-caches/acquire", admin(self.acquire))
        app.router.add_post("/v1/compile-caches/release", admin(self.release))
        app.router.add_get("/v1/compile-caches/users", admin(self.users))
        app.router.add_post("/v1/compile-caches/adopt", admin(self.adopt))
        app.router.add_post("/v1/compile-caches/seal", admin(self.seal))
        app.router.add_post("/v1/compile-caches/evict", admin(self.evict))

    async def listing(self, _: web.Request) -> web.Response:
        c = self.caches
        return web.json_response({"compile_caches": c.listing(), "used_bytes": c.used(), "max_bytes": c.max_bytes})

    async def acquire(self, request: web.Request) -> web.Response:
        body = await _body(request)
        target = _field(body, "target", "(the absolute path the volume is published at) ")
        path, how = await self.caches.acquire(_key(body), target)
        self.metrics.compile_cache_publishes.labels(how).inc()
        return web.json_response({"path": str(path), "name": path.parent.name, "filled": how})

    async def users(self, _: web.Request) -> web.Response:
        return web.json_response({"users": self.caches.users()})

    async def adopt(self, request: web.Request) -> web.Response:
        body = await _body(request)
        name, target = body.get("name"), body.get("target")
        if not isinstance(name, str) or not isinstance(target, str):
            raise ValueError("fields 'name' (a key's directory name) and 'target' (an absolute path) are required")
        try:
            return web.json_response({"key": self.caches.adopt(name, target)})
        except KeyError as e:
            raise not_found(e) from None

    async def release(self, request: web.Request) -> web.Response:
        target = _field(await _body(request), "target", "")
        return web.json_response({"released": self.caches.release(target)})

    async def seal(self, request: web.Request) -> web.Response:
        key = _key(await _body(request))
        try:
            m = await self.caches.seal(key)
        except KeyError as e:
            raise not_found(e) from None
        except cm.BadManifest as e:
            raise web.HTTPUnprocessableEntity(reason="unsealable", text=str(e)) from None
        return web.json_response({"key": key, "id": m.id, "sealed_at": m.sealed_at, "files": m.files, "bytes": m.bytes})

    async def evict(self, request: web.Request) -> web.Response:
        key = _key(await _body(request))
        try:
            freed = self.caches.evict(key)
        except KeyError as e:
            raise not_found(e) from None
        except InUse as e:
            raise web.HTTPConflict(reason="in_use", text=str(e)) from None
        return web.json_response({"evicted": key, "freed_bytes": freed})
