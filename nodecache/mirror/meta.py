"""Metadata answers (`/api/...`): relayed from the Hub for callers it clears, else from the index.

Relayed answers lose their Xet fields and headers and have their pagination
links pointed back at the mirror, so clients never leave it; `paths-info`
is always answered from the index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from urllib.parse import quote

from aiohttp import web

from ..fill import FillError
from ..index import Index
from ..layout import FileEntry, InvalidName, tree_listing, validate_relpath, validate_revision
from ..repos import RepoRef
from ..upstream import UpstreamError
from .access import Access
from .errors import HubError
from .paths import Target, parse_api_path, split_revision
from .rules import Grant
from .serve import Fills
from .snapshots import Snapshots

log = logging.getLogger(__name__)

_RELAY_HEADERS = ("Content-Type", "X-Error-Code", "X-Error-Message", "X-Repo-Commit")


def strip_xet(obj):
    """Drop every Xet field (`xetHash`, ...) so clients never leave the mirror for a CAS."""
    if isinstance(obj, dict):
        return {k: strip_xet(v) for k, v in obj.items() if not k.lower().startswith("xet")}
    if isinstance(obj, list):
        return [strip_xet(v) for v in obj]
    return obj


def rewrite_link(link: str, upstream: str, base: str) -> str:
    """Point `Link` pages (rel="next") at the mirror instead of upstream; drop Xet links."""
    kept = []
    for part in link.split(","):
        m = re.fullmatch(r"\s*<([^>]*)>(.*)", part)
        if not m or "xet" in m[2].lower():
            continue
        url = m[1]
        if url.startswith(upstream + "/"):
            url = base + url[len(upstream) :]
        kept.append(f"<{url}>{m[2]}")
    return ", ".join(kept)


def lfs_pointer_oid(sha256: str, size: int) -> str:
    """The git oid the Hub reports for an LFS file: that of its pointer file."""
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()


class Metadata:
    """`GET /api/{type}s/{repo}[/revision/{rev}]`, `.../tree/{rev}[/{path}]`, `POST .../paths-info/{rev}`."""

    def __init__(self, index: Index, filler: Fills, access: Access, snapshots: Snapshots):
        self.index, self.filler, self.access, self.snapshots = index, filler, access, snapshots

    async def handle_api(self, request: web.Request) -> web.StreamResponse:
        try:
            repo_type, repo_id, op, rest = parse_api_path(request.raw_path)
            if request.method == "POST":
                if op != "paths-info":
                    raise HubError(405, "only paths-info accepts POST")
                revision, _ = split_revision(rest)
                return await self._paths_info(request, Target(repo_type, repo_id, validate_revision(revision)))
            if op == "paths-info":
                raise HubError(405, "paths-info needs POST")
            if op == "tree":
                revision, parts = split_revision(rest)
                path = validate_relpath("/".join(parts)) if parts else ""
                return await self._tree(request, Target(repo_type, repo_id, validate_revision(revision)), path)
            revision = "/".join(rest) if op == "revision" else "main"
            t = Target(repo_type, repo_id, validate_revision(revision))
            return await self._info(request, t, explicit=op == "revision")
        except HubError as e:
            return e.response()
        except (InvalidName, UnicodeDecodeError) as e:
            return HubError(400, str(e)).response()

    async def _forward(self, request: web.Request, t: Target, grant: Grant, path: str) -> web.Response | None:
        """Relay an API GET to the repo's Hub, for a caller already cleared; None: answer from the index.

        The caller's query and token go as they came (the answer is the caller's);
        nothing in the answer changes what the mirror believes about the repo.
        """
        hub = self.access.hub_of(t)
        if not grant.relay or hub is None:
            return None
        try:
            status, headers, body = await hub.api("GET", path, authorization=grant.auth, params=request.query)
        except UpstreamError as e:
            log.warning("upstream unreachable for %s: %s", path, e)
            self.access.down.open()
            return None
        if status >= 500 or status == 429:
            self.access.down.open()
            return None
        self.access.down.close()
        out = {k: headers[k] for k in _RELAY_HEADERS if k in headers}
        if "Link" in headers:
            link = rewrite_link(headers["Link"], hub.endpoint, f"{request.scheme}://{request.host}")
            if link:
                out["Link"] = link
        if "json" in headers.get("Content-Type", ""):
            try:
                body = json.dumps(strip_xet(json.loads(body))).encode()
            except ValueError:
                pass
        return web.Response(status=status, body=body, headers=out)

    async def _info(self, request: web.Request, t: Target, explicit: bool) -> web.Response:
        grant = await self.access.open(request, t)
        path = f"{t.api_base}/revision/{quote(t.revision, safe='')}" if explicit else t.api_base
        resp = await self._forward(request, t, grant, path)
        if resp is not None:
            return resp
        ref = grant.ref
        visibility = (self.index.repo_meta.get(t.repo_type, t.repo_id) or {}).get("visibility")
        blobs = request.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for f in self.snapshots.files(ref).values():
            s: dict[str, object] = {"rfilename": f.path}
            if blobs:
                s.update(self._file_fields(f, oid_key="blobId", lfs_key="sha256"))
            siblings.append(s)
        doc: dict[str, object] = {
            "_id": hashlib.sha1(f"{t.repo_type}/{t.repo_id}".encode()).hexdigest()[:24],
            "id": t.repo_id,
            "sha": ref.commit,
            "private": visibility != "public" and visibility != "gated",
            "gated": "auto" if visibility == "gated" else False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }
        if t.repo_type == "model":
            doc["modelId"] = t.repo_id
        return web.json_response(doc)

    def _file_fields(self, f: FileEntry, oid_key: str, lfs_key: str) -> dict[str, object]:
        """size, git oid and lfs info of a file, as the Hub reports them."""
        try:
            kind = self.filler.record(f.blob_id).kind
        except FillError:
            kind = "sha256" if len(f.blob_id) == 64 else "gitsha1"
        if kind != "sha256":
            return {"size": f.size, oid_key: f.blob_id}
        oid = lfs_pointer_oid(f.blob_id, f.size)
        pointer_size = len(f"version https://git-lfs.github.com/spec/v1\noid sha256:{f.blob_id}\nsize {f.size}\n")
        return {"size": f.size, oid_key: oid, "lfs": {lfs_key: f.blob_id, "size": f.size, "pointerSize": pointer_size}}

    def _entries(self, ref: RepoRef, base: str, recursive: bool) -> list[dict[str, object]]:
        """Tree entries under `base` like the Hub lists them (files and directories)."""
        files = self.snapshots.files(ref)
        paths, dirs = tree_listing({p: f.blob_id for p, f in files.items()}, base, recursive)
        entries: dict[str, dict[str, object]] = {
            p: {"type": "file", "path": p, **self._file_fields(files[p], "oid", "oid")} for p in paths
        }
        for d, oid in dirs.items():
            entries[d] = {"type": "directory", "oid": oid, "size": 0, "path": d}
        return [entries[p] for p in sorted(entries)]

    async def _tree(self, request: web.Request, t: Target, path: str) -> web.Response:
        grant = await self.access.open(request, t)
        url = f"{t.api_base}/tree/{quote(t.revision, safe='')}" + (f"/{quote(path, safe='')}" if path else "")
        resp = await self._forward(request, t, grant, url)
        if resp is not None:
            return resp
        ref = grant.ref
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        entries = self._entries(ref, path, recursive)
        if path and not entries:
            raise HubError(404, f"{path!a} not found", "EntryNotFound", {"X-Repo-Commit": ref.commit})
        return web.json_response(entries)

    async def _paths_info(self, request: web.Request, t: Target) -> web.Response:
        ref = (await self.access.open(request, t)).ref
        if (request.content_type or "").endswith("json"):
            try:
                body = await request.json()
                paths = body.get("paths", [])
            except (ValueError, AttributeError):
                raise HubError(400, "paths-info body must be JSON {'paths': [...]} or a form") from None
        else:
            form = await request.post()
            paths = form.getall("paths", [])
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or len(paths) > 10_000:
            raise HubError(400, "paths must be a list of strings")
        paths = [p.strip("/") for p in paths]
        for p in paths:
            if p:
                validate_relpath(p)
        files = self.snapshots.files(ref)
        out, dirs = [], None
        for p in dict.fromkeys(paths):
            if p in files:
                out.append({"type": "file", "path": p, **self._file_fields(files[p], "oid", "oid")})
            elif p:
                if dirs is None:
                    dirs = {e["path"]: e for e in self._entries(ref, "", True) if e["type"] == "directory"}
                if p in dirs:
                    out.append(dirs[p])
        return web.json_response(out)
