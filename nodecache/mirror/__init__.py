"""An HF_ENDPOINT-compatible pull-through mirror on the daemon's HTTP server.

`HF_ENDPOINT=http://<node>:<port>` makes `huggingface_hub` (and anything built
on it) download through this node: file bytes come from the same store and the
same fill path as the FUSE view (`Filler.read`, coalesced, verified), so one
cold file fetched by many clients is fetched from upstream once, and a file
already read through the mount is served without touching upstream.

Routes (models, and the same under `datasets/` and `spaces/`):

- `HEAD|GET /{repo}/resolve/{rev}/{path}`: answered here, never redirected;
  `X-Repo-Commit`, `ETag` (+ `X-Linked-Etag`/`X-Linked-Size` for LFS files),
  `Content-Length`, `Accept-Ranges`, single ranges as 206 + `Content-Range`.
  Bytes stream as chunks arrive: a partially cached blob starts at once.
- `GET /api/{type}s/{repo}[/revision/{rev}]` and `/api/{type}s/{repo}/tree/{rev}[/{path}]`:
  relayed to the Hub (Xet fields and headers stripped, pagination links
  pointed back at the mirror) when the repo is the Hub's and the caller may
  see it; otherwise, or with the Hub unreachable, answered from the index.
- `POST /api/{type}s/{repo}/paths-info/{rev}`: answered from the index.

Access: every route makes one decision (`Access.open`) before it reveals
anything. The repo must be one a mirror request may make the node fetch
(`mirror_allow`, by default the node's `RepoPolicy`; else 404, and nothing is
asked upstream or written to the index). It is resolved through its own source
chain, which records its visibility in the index. Public repos are open to
everyone; gated repos' metadata too. Anything else needs the caller to prove
access with its own token, by a request this module shapes (a revision
document for metadata, a HEAD of the file for bytes) sent to the Hub the
repo's chain starts with; positive answers are remembered for `ACCESS_TTL`.
A repo whose chain does not start at the Hub (S3, HTTP, a directory) is open
only to the admin token or through `mirror_public`. When the Hub cannot be
asked, an anonymous caller of a non-public repo gets 401 and anyone else 503;
nothing is ever learnt from a caller-shaped answer. A fill that finds the disk
full with nothing evictable is 507.

Modules, one idea each: `paths` (what a request names), `errors` (the Hub's
error shape), `rules` (who may see what, pure), `snapshots` (revision ->
commit, file listings), `access` (the decision), `serve` (file bytes),
`meta` (API answers). The faces depend on `serve.Fills`, not on the Filler.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from ..catalog import Catalog
from ..config import Config
from ..directio import BufferPool
from ..index import Index
from ..metrics import Metrics
from ..upstream.sources import Sources
from .access import Access
from .meta import Metadata
from .serve import FileServer, Fills
from .snapshots import Snapshots


class Mirror:
    """The mirror's parts, wired from the node's catalog, index, fill path and sources."""

    def __init__(
        self,
        cfg: Config,
        catalog: Catalog,
        index: Index,
        filler: Fills,
        sources: Sources,
        metrics: Metrics,
        blob_file: Callable[[str], Path],
        buffers: BufferPool,
    ):
        self.snapshots = Snapshots(cfg, catalog, index)
        self.access = Access(cfg, catalog, index, sources, self.snapshots)
        self.files = FileServer(cfg, catalog, filler, self.access, self.snapshots, metrics, blob_file, buffers)
        self.meta = Metadata(index, filler, self.access, self.snapshots)


def add_routes(app: web.Application, mirror: Mirror) -> Mirror:
    """Register the mirror. Its patterns never match `/healthz`, `/readyz`, `/metrics` or `/v1/...`
    (aiohttp also tries exact paths before these catch-alls)."""
    api = r"/api/{kind:(models|datasets|spaces)}/{tail:.+}"
    app.router.add_get(api, mirror.meta.handle_api)
    app.router.add_post(api, mirror.meta.handle_api)
    app.router.add_get(r"/{tail:(?!v1/|api/).+/resolve/.+}", mirror.files.handle_resolve)
    return mirror
