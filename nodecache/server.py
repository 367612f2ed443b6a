"""The HTTP faces on one port: health, metrics, /v1, the peer API, compile caches, the mirror.

Every error leaves as JSON `{error, detail}` with a 4xx/5xx status; no
traceback ever reaches a client.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import api, ccapi, mirror, peer_api
from .catalog import Catalog
from .compilecache import CompileCaches
from .config import Config
from .fill import Filler, FillError
from .index import Index
from .layout import InvalidName
from .metrics import Metrics
from .ops import Operations
from .peers import Membership, Peers
from .status import Serving, Status
from .store import Store
from .upstream import NotFound, UpstreamError
from .upstream.sources import Sources


@dataclass(frozen=True)
class Faces:
    """What the HTTP faces are built from; each face is given only the part it uses."""

    cfg: Config
    metrics: Metrics
    serving: Serving
    status: Status
    ops: Operations
    catalog: Catalog
    index: Index
    store: Store
    filler: Filler
    sources: Sources
    membership: Membership
    peers: Peers | None
    compile_caches: CompileCaches


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


def make_app(f: Faces) -> web.Application:
    app = web.Application(middlewares=[_json_errors])

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        if f.serving.ready:  # a configured repo that does not resolve is named, not fatal
            return web.json_response({"ready": True, "repos_failing": sorted(f.serving.failing)})
        return _error(503, "not_ready", "mount or index not up yet")

    async def metrics(_: web.Request) -> web.Response:
        f.status.update_gauges()
        return web.Response(body=f.metrics.render(), content_type="text/plain", charset="utf-8")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    api.add_routes(app, f.cfg.admin_token, f.ops, f.status)
    peer_api.add_routes(
        app,
        peer_api.PeerFace(
            f.cfg, f.store, f.index, f.filler, f.catalog, f.membership, f.peers, f.sources.chain, f.metrics
        ),
    )
    ccapi.add_routes(app, f.cfg, f.compile_caches, f.metrics)  # compile caches (issue 19)
    mirror.add_routes(
        app, mirror.Mirror(f.cfg, f.catalog, f.index, f.filler, f.sources, f.metrics, f.store.path, f.store.buffers)
    )  # issue 8
    return app
