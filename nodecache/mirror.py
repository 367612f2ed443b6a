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
  forwarded with the caller's `Authorization`; Xet fields and headers are
  stripped and pagination links point back at the mirror. Upstream
  unreachable: answered from the index when the revision is cached.
- `POST /api/{type}s/{repo}/paths-info/{rev}`: answered from the index.

Access: every request for cached bytes of a repo first proves that upstream
lets the caller (by its own `Authorization`) see that repo; public repos and
positive checks are remembered for `ACCESS_TTL`. A caller without access gets
the Hub's own answer (status, `X-Error-Code`, message). When upstream cannot
be reached, cached content of a repo known to be public is still served;
everything else is 502/504, never a made-up 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from aiohttp import web

from .fill import FillError
from .layout import (
    COMMIT_RE,
    REPO_TYPES,
    FileEntry,
    InvalidName,
    tree_listing,
    validate_relpath,
    validate_repo_id,
    validate_revision,
)
from .upstream import NotFound, UpstreamError

if TYPE_CHECKING:
    from .daemon import Daemon
    from .repos import RepoRef

log = logging.getLogger(__name__)

ACCESS_TTL = 60.0  # a positive access check (or "this repo is public") is trusted this long
REF_TTL = 30.0  # a branch/tag -> commit answer is reused this long (commits: forever)
DOWN_WINDOW = 10.0  # after upstream failed us, uncached reads fail fast (504) for this long
MIN_STEP, MAX_STEP = 1 << 20, 8 << 20  # bytes per Filler.read while streaming
_TYPE_OF = {v: k for k, v in REPO_TYPES.items()}  # "models" -> "model"
_REF_KINDS = ("pr", "convert", "heads", "tags")  # unencoded refs/<kind>/<name> revisions
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")
_API_OPS = ("revision", "tree", "paths-info")
_RELAY_HEADERS = ("Content-Type", "X-Error-Code", "X-Error-Message", "X-Repo-Commit")


class HubError(Exception):
    """An answer in the Hub's own error shape: JSON `{"error": ...}` plus X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str = "", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        headers = {**self.headers, "X-Error-Message": _header_safe(self.message)}
        if self.code:
            headers["X-Error-Code"] = self.code
        return web.json_response({"error": self.message}, status=self.status, headers=headers)


def _header_safe(text: str) -> str:
    """Printable ASCII only: names from the request must not break (or inject) headers."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:500]


def _relayed_error(status: int, headers, body: bytes) -> HubError:
    """Upstream's own 4xx, passed on as it came (message, code, X-Repo-Commit)."""
    message = headers.get("X-Error-Message", "")
    if not message:
        try:
            message = str(json.loads(body).get("error", ""))
        except (ValueError, AttributeError):
            message = ""
    extra = {"X-Repo-Commit": headers["X-Repo-Commit"]} if "X-Repo-Commit" in headers else {}
    return HubError(status, message or f"upstream answered {status}", headers.get("X-Error-Code", ""), extra)


def strip_xet(obj):
    """Drop every Xet field (`xetHash`, ...) so clients never leave the mirror for a CAS."""
    if isinstance(obj, dict):
        return {k: strip_xet(v) for k, v in obj.items() if not k.lower().startswith("xet")}
    if isinstance(obj, list):
        return [strip_xet(v) for v in obj]
    return obj


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of one byte range; None: whole file; anything else is 416."""
    if header is None:
        return None
    m = _RANGE.fullmatch(header.strip())
    if not m or not (m[1] or m[2]):
        raise _unsatisfiable(size, f"unsupported Range {header[:100]!a}: expected one 'bytes=a-b'")
    if not m[1]:  # suffix: the last n bytes
        start, end = max(0, size - int(m[2])), size
    else:
        start = int(m[1])
        end = min(int(m[2]) + 1, size) if m[2] else size
        if m[2] and int(m[2]) < start:
            raise _unsatisfiable(size, f"bad Range {header[:100]!a}: last byte before first")
    if start >= end:
        raise _unsatisfiable(size, f"Range {header[:100]!a} not satisfiable for {size} bytes")
    return start, end


def _unsatisfiable(size: int, message: str) -> HubError:
    return HubError(416, message, headers={"Content-Range": f"bytes */{size}"})


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


def _lfs_pointer_oid(sha256: str, size: int) -> str:
    """The git oid the Hub reports for an LFS file: that of its pointer file."""
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()


def _split_revision(parts: list[str]) -> tuple[str, list[str]]:
    """First decoded segment(s) name the revision; `refs/pr/1` may come unencoded."""
    if not parts:
        raise HubError(400, "missing revision")
    if parts[0] == "refs" and len(parts) >= 3 and parts[1] in _REF_KINDS:
        return "/".join(parts[:3]), parts[3:]
    return parts[0], parts[1:]


def _segments(raw_path: str) -> list[str]:
    return [unquote(s, errors="strict") for s in raw_path.split("?", 1)[0].split("/")[1:]]


@dataclass(frozen=True)
class Target:
    repo_type: str
    repo_id: str
    revision: str

    @property
    def api_base(self) -> str:
        return f"/api/{REPO_TYPES[self.repo_type]}/{self.repo_id}"

    @property
    def spec(self) -> str:
        prefix = "" if self.repo_type == "model" else REPO_TYPES[self.repo_type] + "/"
        return f"{prefix}{self.repo_id}@{self.revision}"

    @property
    def resolve_base(self) -> str:
        prefix = "" if self.repo_type == "model" else REPO_TYPES[self.repo_type] + "/"
        return f"/{prefix}{self.repo_id}/resolve/{quote(self.revision, safe='')}"


def parse_resolve_path(raw_path: str) -> tuple[Target, str]:
    """`[datasets/|spaces/]org/name/resolve/{rev}/{path}` -> (target, path), all validated."""
    segs = _segments(raw_path)
    repo_type = "model"
    if segs and segs[0] in ("datasets", "spaces"):
        repo_type, segs = _TYPE_OF[segs[0]], segs[1:]
    for i in (1, 2):
        if len(segs) > i + 2 and segs[i] == "resolve":
            break
    else:
        raise HubError(400, "expected /{repo}/resolve/{revision}/{path}")
    repo_id = validate_repo_id("/".join(segs[:i]))
    revision, rest = _split_revision(segs[i + 1 :])
    return Target(repo_type, repo_id, validate_revision(revision)), validate_relpath("/".join(rest))


def parse_api_path(raw_path: str) -> tuple[str, str, str, list[str]]:
    """`/api/{type}s/{repo}[/{op}/...]` -> (repo_type, repo_id, op, rest); op "" is repo info."""
    segs = _segments(raw_path)[2:]
    repo_type = _TYPE_OF[_segments(raw_path)[1]]
    if len(segs) >= 3 and segs[2] in _API_OPS:
        n = 2
    elif len(segs) >= 2 and segs[1] in _API_OPS:
        n = 1
    elif len(segs) <= 2:
        n = len(segs)
    else:
        raise HubError(404, "unsupported API route")
    repo_id = validate_repo_id("/".join(segs[:n]))
    rest = segs[n:]
    return repo_type, repo_id, (rest[0] if rest else ""), rest[1:]


class Mirror:
    """The mirror's state: access and ref caches, and the repos' known visibility."""

    def __init__(self, daemon: Daemon):
        self.d = daemon
        self._access: dict[tuple[str, str, str], float] = {}  # (type, repo, auth hash) -> valid until
        self._public: dict[tuple[str, str], tuple[bool, float]] = {}  # last known visibility, when
        self._refs: dict[tuple[str, str, str], tuple[RepoRef, float]] = {}
        self._resolving: dict[tuple[str, str, str], asyncio.Task] = {}
        self._files: dict[tuple[str, str, str], dict[str, FileEntry]] = {}
        self._down_until = 0.0  # upstream failed a mirror call recently

    def _upstream_failed(self) -> None:
        self._down_until = time.monotonic() + DOWN_WINDOW

    @property
    def upstream_down(self) -> bool:
        return time.monotonic() < self._down_until

    @property
    def up(self):
        return self.d.upstream

    # ---- access -----------------------------------------------------------------

    async def authorize(self, t: Target, auth: str | None, path: str | None = None, force: bool = False) -> bool:
        """Raise the Hub's error unless upstream lets `auth` read the repo; True if upstream answered.

        False means upstream was unreachable and the repo is known to be public,
        so cached content may still be served.
        """
        now = time.monotonic()
        key = (t.repo_type, t.repo_id)
        public = self._public.get(key)
        if public and public[0] and public[1] + ACCESS_TTL > now and not force:
            return True
        akey = (*key, hashlib.sha256(auth.encode()).hexdigest() if auth else "")
        if self._access.get(akey, 0.0) > now and not force:
            return True
        try:
            status, headers, body = await self.up.api(
                "GET", f"{t.api_base}/revision/{quote(t.revision, safe='')}", authorization=auth
            )
        except UpstreamError as e:
            self._upstream_failed()
            return self._offline(t, str(e))
        if status in (401, 403, 404):
            raise _relayed_error(status, headers, body)
        if status != 200:
            self._upstream_failed()
            return self._offline(t, f"upstream answered {status}")
        self._down_until = 0.0
        try:
            doc = json.loads(body)
            private, gated = bool(doc.get("private")), doc.get("gated") not in (None, False)
        except (ValueError, AttributeError):
            raise HubError(502, "upstream sent an unreadable repo document") from None
        if gated and path is not None:  # gated metadata is public; the files are not
            await self._check_gated(t, path, auth)
        self._public[key] = (not private and not gated, now)
        if private or gated:
            self._access[akey] = now + ACCESS_TTL
            if len(self._access) > 10_000:
                self._access = {k: v for k, v in self._access.items() if v > now}
        return True

    async def _check_gated(self, t: Target, path: str, auth: str | None) -> None:
        try:
            status, headers, body = await self.up.api("HEAD", f"{t.resolve_base}/{quote(path)}", authorization=auth)
        except UpstreamError as e:
            raise HubError(504, f"upstream unreachable, cannot check access to gated repo: {e}") from None
        if status in (401, 403, 404):
            raise _relayed_error(status, headers, body)
        if status >= 500:
            raise HubError(502, f"upstream answered {status} to an access check")

    def _offline(self, t: Target, why: str) -> bool:
        """Upstream is unreachable: may cached bytes of this repo still be served?"""
        public = self._public.get((t.repo_type, t.repo_id))
        # A daemon without a token can only have cached repos that were public.
        if (public and public[0]) or (public is None and not self.d.cfg.hub_token):
            log.warning("upstream unreachable (%s); serving %s from the cache", why, t.repo_id)
            return False
        raise HubError(504, f"upstream unreachable, cannot check access to {t.repo_id}: {why}")

    # ---- revisions --------------------------------------------------------------

    async def resolve(self, t: Target) -> RepoRef:
        """Revision -> commit through daemon.add_repo (index + FUSE tree), one call per key at a time."""
        key = (t.repo_type, t.repo_id, t.revision)
        hit = self._refs.get(key)
        if hit and hit[1] > time.monotonic():
            return hit[0]
        task = self._resolving.get(key)
        if task is None:
            task = self._resolving[key] = asyncio.get_running_loop().create_task(self._add_repo(t))
            task.add_done_callback(lambda _: self._resolving.pop(key, None))
        try:
            return await asyncio.shield(task)
        except NotFound as e:
            code = "RevisionNotFound" if "revision" in str(e) else "RepoNotFound"
            raise HubError(404, str(e), code) from None
        except UpstreamError as e:
            raise HubError(504, f"upstream unreachable and {t.spec} not cached: {e}") from None

    async def _add_repo(self, t: Target) -> RepoRef:
        ref, _, _ = await self.d.add_repo(t.spec)
        ttl = float("inf") if COMMIT_RE.fullmatch(t.revision) else min(REF_TTL, self.d.cfg.ref_ttl)
        self._refs[(t.repo_type, t.repo_id, t.revision)] = (ref, time.monotonic() + ttl)
        return ref

    def files(self, ref: RepoRef) -> dict[str, FileEntry]:
        key = (ref.repo_type, ref.repo_id, ref.commit)
        files = self._files.get(key)
        if files is None:
            listed = self.d.index.get_snapshot(ref.repo_type, ref.repo_id, ref.commit)
            if listed is None:
                raise HubError(504, f"snapshot {ref.commit} of {ref.repo_id} is not in the index")
            if len(self._files) > 256:
                self._files.clear()
            files = self._files[key] = {f.path: f for f in listed}
        return files

    def _cached_offline(self, t: Target) -> RepoRef | None:
        """What the index alone knows of a revision (for answers while upstream is down)."""
        from .repos import RepoRef

        commit = t.revision if COMMIT_RE.fullmatch(t.revision) else None
        commit = commit or self.d.index.get_ref(t.repo_type, t.repo_id, t.revision)
        if commit and self.d.index.get_snapshot(t.repo_type, t.repo_id, commit) is not None:
            return RepoRef(t.repo_type, t.repo_id, t.revision, commit)
        return None

    # ---- /resolve -----------------------------------------------------------------

    async def handle_resolve(self, request: web.Request) -> web.StreamResponse:
        try:
            t, path = parse_resolve_path(request.raw_path)
            online = await self.authorize(t, request.headers.get("Authorization"), path)
            ref = await self.resolve(t)
            entry = self.files(ref).get(path)
            if entry is None:
                raise HubError(
                    404,
                    f"{path!a} not found in {t.repo_id}@{ref.commit}",
                    "EntryNotFound",
                    {"X-Repo-Commit": ref.commit},
                )
            return await self._serve(request, t, ref, entry, online)
        except HubError as e:
            return e.response()
        except (InvalidName, UnicodeDecodeError) as e:
            return HubError(400, str(e)).response()

    async def _serve(
        self, request: web.Request, t: Target, ref: RepoRef, entry: FileEntry, online: bool
    ) -> web.StreamResponse:
        filler = self.d.filler
        try:
            rec = filler.record(entry.blob_id)
        except FillError as e:
            raise HubError(502, str(e)) from None
        headers = {
            "X-Repo-Commit": ref.commit,
            "ETag": f'"{entry.blob_id}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if rec.kind == "sha256":
            headers.update({"X-Linked-Etag": f'"{entry.blob_id}"', "X-Linked-Size": str(entry.size)})
        if request.method == "HEAD":
            resp = web.StreamResponse(status=200, headers=headers)
            resp.content_length = entry.size
            await resp.prepare(request)
            return resp
        rng = parse_range(request.headers.get("Range"), entry.size)
        start, end = rng or (0, entry.size)
        if rng:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        if end > start and not self._present(entry.blob_id, start):
            if online and self.upstream_down:  # access came from the cache: is upstream back?
                online = await self.authorize(t, request.headers.get("Authorization"), entry.path, force=True)
            if not online:
                raise HubError(504, f"upstream unreachable and {entry.path!a} of {ref.repo_id} is not cached")
        hold = getattr(filler, "hold", None)
        if hold:
            hold(entry.blob_id)  # an open download: not to be evicted under it
        try:
            return await self._stream(request, entry, start, end, rng is not None, headers)
        finally:
            release = getattr(filler, "release", None)
            if hold and release:
                release(entry.blob_id)

    def _present(self, blob_id: str, offset: int) -> bool:
        try:
            st = self.d.filler.state(blob_id)
        except FillError:
            return False
        return st.has(offset // st.rec.chunk_size)

    async def _stream(
        self, request: web.Request, entry: FileEntry, start: int, end: int, partial: bool, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send [start, end) as the chunks arrive, one read ahead of the socket."""
        filler = self.d.filler
        rec = filler.record(entry.blob_id)
        if self.d.cfg.fill_on_open and end > start:
            filler.fill_in_background(entry.blob_id)
        step = max(MIN_STEP, min(MAX_STEP, rec.chunk_size))
        loop = asyncio.get_running_loop()

        def read_from(pos: int) -> asyncio.Task:
            stop = min(end, (pos // step + 1) * step)  # aligned: a read waits for whole chunks only
            return loop.create_task(filler.read(entry.blob_id, pos, stop - pos))

        pending = read_from(start) if end > start else None
        try:
            first = await pending if pending else b""
        except FillError as e:
            timed_out = "timed out" in str(e)
            raise HubError(504 if timed_out else 502, f"could not fetch {entry.path!a}: {e}") from None
        resp = web.StreamResponse(status=206 if partial else 200, headers=headers)
        resp.content_length = end - start
        await resp.prepare(request)
        pos, data, pending = start, first, None
        try:
            while True:
                pos += len(data)
                pending = read_from(pos) if pos < end else None
                if data:
                    await resp.write(data)
                if pending is None:
                    break
                data = await pending
                if not data:  # the blob shrank under us: never send a short body as complete
                    raise FillError(f"empty read at {pos} of {entry.blob_id}")
            await resp.write_eof()
        except (FillError, ConnectionError) as e:
            # Headers are gone: the only honest signal left is a cut connection
            # (the client sees a short body and resumes with Range).
            if isinstance(e, FillError):
                log.warning("mirror stream of %s cut at %d: %s", entry.path, pos, e)
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            if request.transport is not None:
                request.transport.abort()
        return resp

    # ---- /api ---------------------------------------------------------------------

    async def handle_api(self, request: web.Request) -> web.StreamResponse:
        try:
            repo_type, repo_id, op, rest = parse_api_path(request.raw_path)
            if request.method == "POST":
                if op != "paths-info":
                    raise HubError(405, "only paths-info accepts POST")
                revision, _ = _split_revision(rest)
                return await self._paths_info(request, Target(repo_type, repo_id, validate_revision(revision)))
            if op == "paths-info":
                raise HubError(405, "paths-info needs POST")
            if op == "tree":
                revision, parts = _split_revision(rest)
                path = validate_relpath("/".join(parts)) if parts else ""
                return await self._tree(request, Target(repo_type, repo_id, validate_revision(revision)), path)
            revision = "/".join(rest) if op == "revision" else "main"
            t = Target(repo_type, repo_id, validate_revision(revision))
            return await self._info(request, t, explicit=op == "revision")
        except HubError as e:
            return e.response()
        except (InvalidName, UnicodeDecodeError) as e:
            return HubError(400, str(e)).response()

    async def _forward(self, request: web.Request, path: str) -> web.Response | None:
        """Relay an API GET upstream; None when upstream is unreachable (or 5xx/429)."""
        try:
            status, headers, body = await self.up.api(
                "GET", path, authorization=request.headers.get("Authorization"), params=request.query
            )
        except UpstreamError as e:
            log.warning("upstream unreachable for %s: %s", path, e)
            self._upstream_failed()
            return None
        if status >= 500 or status == 429:
            self._upstream_failed()
            return None
        self._down_until = 0.0
        out = {k: headers[k] for k in _RELAY_HEADERS if k in headers}
        if "Link" in headers:
            link = rewrite_link(headers["Link"], self.up.endpoint, f"{request.scheme}://{request.host}")
            if link:
                out["Link"] = link
        if "json" in headers.get("Content-Type", ""):
            try:
                body = json.dumps(strip_xet(json.loads(body))).encode()
            except ValueError:
                pass
        return web.Response(status=status, body=body, headers=out)

    async def _info(self, request: web.Request, t: Target, explicit: bool) -> web.Response:
        path = f"{t.api_base}/revision/{quote(t.revision, safe='')}" if explicit else t.api_base
        resp = await self._forward(request, path)
        if resp is not None:
            if resp.status == 200:
                self._learn_visibility(t, resp.body)
            return resp
        ref = self._offline_ref(t, request)
        blobs = request.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for f in self.files(ref).values():
            s: dict[str, object] = {"rfilename": f.path}
            if blobs:
                s.update(self._file_fields(f, oid_key="blobId", lfs_key="sha256"))
            siblings.append(s)
        doc: dict[str, object] = {
            "_id": hashlib.sha1(f"{t.repo_type}/{t.repo_id}".encode()).hexdigest()[:24],
            "id": t.repo_id,
            "sha": ref.commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }
        if t.repo_type == "model":
            doc["modelId"] = t.repo_id
        return web.json_response(doc)

    def _learn_visibility(self, t: Target, body) -> None:
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            doc = json.loads(body)
            public = not doc.get("private") and doc.get("gated") in (None, False)
            self._public[(t.repo_type, t.repo_id)] = (public, time.monotonic())

    def _offline_ref(self, t: Target, request: web.Request) -> RepoRef:
        auth = request.headers.get("Authorization")
        akey = (t.repo_type, t.repo_id, hashlib.sha256(auth.encode()).hexdigest() if auth else "")
        if self._access.get(akey, 0.0) <= time.monotonic():  # no fresh positive check for this caller
            self._offline(t, "upstream unreachable")  # raises unless the repo may be served
        ref = self._cached_offline(t)
        if ref is None:
            raise HubError(504, f"upstream unreachable and {t.spec} is not cached")
        return ref

    def _file_fields(self, f: FileEntry, oid_key: str, lfs_key: str) -> dict[str, object]:
        """size, git oid and lfs info of a file, as the Hub reports them."""
        try:
            kind = self.d.filler.record(f.blob_id).kind
        except FillError:
            kind = "sha256" if len(f.blob_id) == 64 else "gitsha1"
        if kind != "sha256":
            return {"size": f.size, oid_key: f.blob_id}
        oid = _lfs_pointer_oid(f.blob_id, f.size)
        pointer_size = len(f"version https://git-lfs.github.com/spec/v1\noid sha256:{f.blob_id}\nsize {f.size}\n")
        return {"size": f.size, oid_key: oid, "lfs": {lfs_key: f.blob_id, "size": f.size, "pointerSize": pointer_size}}

    def _entries(self, ref: RepoRef, base: str, recursive: bool) -> list[dict[str, object]]:
        """Tree entries under `base` like the Hub lists them (files and directories)."""
        files = self.files(ref)
        paths, dirs = tree_listing({p: f.blob_id for p, f in files.items()}, base, recursive)
        entries: dict[str, dict[str, object]] = {
            p: {"type": "file", "path": p, **self._file_fields(files[p], "oid", "oid")} for p in paths
        }
        for d, oid in dirs.items():
            entries[d] = {"type": "directory", "oid": oid, "size": 0, "path": d}
        return [entries[p] for p in sorted(entries)]

    async def _tree(self, request: web.Request, t: Target, path: str) -> web.Response:
        url = f"{t.api_base}/tree/{quote(t.revision, safe='')}" + (f"/{quote(path, safe='')}" if path else "")
        resp = await self._forward(request, url)
        if resp is not None:
            return resp
        ref = self._offline_ref(t, request)
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        entries = self._entries(ref, path, recursive)
        if path and not entries:
            raise HubError(404, f"{path!a} not found", "EntryNotFound", {"X-Repo-Commit": ref.commit})
        return web.json_response(entries)

    async def _paths_info(self, request: web.Request, t: Target) -> web.Response:
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
        await self.authorize(t, request.headers.get("Authorization"))
        ref = await self.resolve(t)
        files = self.files(ref)
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


def add_routes(app: web.Application, daemon: Daemon) -> Mirror:
    """Register the mirror. Its patterns never match `/healthz`, `/readyz`, `/metrics` or `/v1/...`
    (aiohttp also tries exact paths before these catch-alls)."""
    mirror = Mirror(daemon)
    api = r"/api/{kind:(models|datasets|spaces)}/{tail:.+}"
    app.router.add_get(api, mirror.handle_api)
    app.router.add_post(api, mirror.handle_api)
    app.router.add_get(r"/{tail:(?!v1/|api/).+/resolve/.+}", mirror.handle_resolve)
    return mirror
