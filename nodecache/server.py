"""The HTTP face: health, metrics and the control API, thin over the daemon.

Every error leaves as JSON `{error, detail}` with a 4xx/5xx status; no
traceback ever reaches a client.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from .fill import FillError
from .layout import InvalidName
from .upstream import NotFound, UpstreamError

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)


def _error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason, e.text or e.reason)
    except (InvalidName, ValueError) as e:
        return _error(400, "bad_request", str(e))
    except NotFound as e:
        return _error(404, "not_found", str(e))
    except (UpstreamError, FillError) as e:
        return _error(502, "upstream_error", str(e))
    except Exception as e:  # the one place that may see anything
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal", e.__class__.__name__)


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[_json_errors])

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        if daemon.ready:
            return web.json_response({"ready": True})
        return _error(503, "not_ready", "mount or index not up yet")

    async def metrics(_: web.Request) -> web.Response:
        daemon.update_gauges()
        return web.Response(body=daemon.metrics.render(), content_type="text/plain", charset="utf-8")

    async def prefetch(request: web.Request) -> web.StreamResponse:
        """Resolve and fill a repo; streams NDJSON progress lines, the last one says done or error."""
        try:
            body = await request.json()
        except json.JSONDecodeError:
            raise ValueError('body must be JSON: {"repo": "org/name", "revision": "main"}') from None
        if not isinstance(body, dict) or not isinstance(body.get("repo"), str):
            raise ValueError("body needs a string field 'repo'")
        spec = body["repo"] + ("@" + str(body["revision"]) if body.get("revision") else "")
        ref, total, blobs = await daemon.add_repo(spec)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)

        async def send(obj: dict) -> None:
            await resp.write((json.dumps(obj) + "\n").encode())

        await send({"repo": ref.repo_id, "revision": ref.revision, "commit": ref.commit, "total": total, "done": 0})
        last = [0]

        def progress(done: int) -> None:
            last[0] = done

        fill = daemon.filler.fill_blobs(blobs, progress)
        try:
            task = daemon.spawn(fill)
            while not task.done():
                await send({"done": last[0], "total": total})
                await daemon.wait(task, 0.5)
            task.result()
            await send({"done": total, "total": total, "state": "ready"})
        except (FillError, UpstreamError) as e:
            await send({"done": last[0], "total": total, "state": "error", "error": str(e)})
        await resp.write_eof()
        return resp

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/prefetch", prefetch)
    return app
