"""The HTTP face: health, metrics and the control API, thin over the daemon.

Every error leaves as JSON `{error, detail}` with a 4xx/5xx status; no
traceback ever reaches a client.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import api, ccapi, mirror, peer_api
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
    except RecursionError:  # json.loads of "[[[[…": any parser of a request body can raise it
        return _error(400, "bad_request", "input nested too deeply")
    except NotFound as e:
        return _error(404, "not_found", str(e))
    except FillError as e:
        if e.errno == errno.ENOSPC:
            return _error(507, "insufficient_storage", str(e))
        return _error(502, "upstream_error", str(e))
    except UpstreamError as e:
        return _error(502, "upstream_error", str(e))
    except Exception as e:  # the one place that may see anything
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal", e.__class__.__name__)


class OneLineBadRequests(logging.LoggerAdapter):
    """aiohttp logs each request its parser refuses (it answers 400 itself) with a whole
    traceback at ERROR: anyone on the network could fill the log. One warning line instead."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("nodecache.http"), {})

    def exception(self, msg, *args, exc_info=True, **kw) -> None:
        if isinstance(exc_info, HttpProcessingError):
            first = (exc_info.message or "").strip().splitlines()[:1]
            self.logger.warning("refused a malformed HTTP request (400): %s", (first or ["?"])[0][:200])
            return
        self.logger.error(msg, *args, exc_info=exc_info, **kw)


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[_json_errors])

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        if daemon.ready:  # a configured repo that does not resolve is named, not fatal
            return web.json_response({"ready": True, "repos_failing": sorted(daemon.failing)})
        return _error(503, "not_ready", "mount or index not up yet")

    async def metrics(_: web.Request) -> web.Response:
        daemon.update_gauges()
        return web.Response(body=daemon.metrics.render(), content_type="text/plain", charset="utf-8")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    api.add_routes(app, daemon)
    peer_api.add_routes(app, daemon)
    ccapi.add_routes(app, daemon)  # compile caches (issue 19)
    mirror.add_routes(app, daemon)  # HF_ENDPOINT-compatible mirror (issue 8)
    return app
