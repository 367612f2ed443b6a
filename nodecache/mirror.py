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

Access: every route makes one decision (`Mirror.open`) before it reveals
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
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote

from aiohttp import web

from .auth import bearer_matches
from .catalog import Catalog
from .config import Config
from .expiring import Window
from .fill import Filler, FillError
from .index import Index
from .layout import (
    COMMIT_RE,
    REPO_TYPES,
    FileEntry,
    InvalidName,
    RepoSpec,
    tree_listing,
    validate_relpath,
    validate_repo_id,
    validate_revision,
)
from .repos import RepoRef
from .upstream import VISIBILITIES, NotFound, UpstreamError
from .upstream.hf import HfUpstream
from .upstream.sources import Sources

log = logging.getLogger(__name__)

ACCESS_TTL = 60.0  # a caller's access, proven upstream, is trusted this long
ACCESS_MAX = 10_000  # remembered (repo, caller) grants; beyond, expired ones are dropped
REF_TTL = 30.0  # a branch/tag -> commit answer is reused this long (commits: forever)
REFS_MAX = 4096  # remembered revision -> commit answers
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
    def spec(self) -> RepoSpec:
        return RepoSpec(self.repo_type, self.repo_id, self.revision)

    @property
    def resolve_base(self) -> str:
        return f"/{self.spec.name}/resolve/{quote(self.revision, safe='')}"


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


# ---- who may see what (pure) ------------------------------------------------------


def repo_name(repo_type: str, repo_id: str) -> str:
    """`org/name`, `datasets/org/name`: what `mirror_allow` and `mirror_public` globs match."""
    return RepoSpec(repo_type, repo_id).name


def matches(globs, repo_type: str, repo_id: str) -> bool:
    name = repo_name(repo_type, repo_id)
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def named_by(globs, repo_type: str, repo_id: str) -> bool:
    """Listed by its exact name (a glob without wildcards): private repos need this."""
    name = repo_name(repo_type, repo_id)
    return any(g == name for g in globs if not any(c in g for c in "*?["))


def proof_needed(visibility: str, files: bool) -> str | None:
    """What a caller must prove to the Hub: None (nothing), "meta" (it sees the repo) or "files".

    Gated repos' metadata is public and their files are not; a repo not known
    to be public or gated is treated as private.
    """
    if visibility == "public" or (visibility == "gated" and not files):
        return None
    return "files" if files else "meta"


def anonymous_refusal(t: Target, visibility: str, files: bool) -> HubError:
    """The Hub's own answer to a caller without a token (huggingface_hub maps the codes to its errors)."""
    kind = t.repo_type
    if visibility == "gated" and files:
        return HubError(401, f"Access to {kind} {t.repo_id} is restricted. You must be authenticated.", "GatedRepo")
    return HubError(401, f"Repository {t.repo_id} not found, or it needs a token with access", "RepoNotFound")


@dataclass(frozen=True)
class Grant:
    """One request's access: the revision it reads, why it may, and what may be relayed upstream."""

    ref: RepoRef
    why: str  # "public" | "caller" (proven upstream) | "admin" | "mirror_public"
    relay: bool  # API answers may come from the Hub (the repo's chain starts there)
    auth: str | None  # the Authorization to relay: the caller's own, never the admin token


class Mirror:
    """The mirror's state: proven grants, ref and file caches, and whether upstream answers."""

    def __init__(self, cfg: Config, catalog: Catalog, index: Index, filler: Filler, sources: Sources):
        self.cfg, self.catalog, self.index, self.filler, self.sources = cfg, catalog, index, filler, sources
        self._grants: dict[tuple[str, str, str, str], float] = {}  # (type, repo, auth hash, proof) -> until
        self._checking: dict[tuple[str, ...], asyncio.Task] = {}  # one upstream check per question at a time
        self._refs: dict[tuple[str, str, str], tuple[RepoRef, float]] = {}
        self._resolving: dict[tuple[str, str, str, bool], asyncio.Task] = {}
        self._files: dict[tuple[str, str, str], dict[str, FileEntry]] = {}
        self._down = Window(DOWN_WINDOW)  # open while upstream failed a mirror call recently

    def _upstream_failed(self) -> None:
        self._down.open()

    @property
    def upstream_down(self) -> bool:
        return bool(self._down)

    def hub_of(self, t: Target) -> HfUpstream | None:
        """The Hub the repo's bytes come from, if its chain starts there (else None: the operator's own)."""
        first = self.sources.for_repo(t.repo_type, t.repo_id)[0]
        return first if isinstance(first, HfUpstream) else None

    # ---- access -----------------------------------------------------------------

    def allowed(self, t: Target) -> bool:
        """May a mirror request make the node resolve and fetch this repo? `mirror_allow`, or by
        default the node's own rule (`RepoPolicy`: the configured repos, `on_demand`, the index)."""
        allow = self.cfg.mirror_allow
        if allow is None:
            return self.catalog.may_fetch(t.repo_type, t.repo_id)
        return matches(allow, t.repo_type, t.repo_id)

    def named(self, t: Target) -> bool:
        """Named by the operator, not only matched by a wildcard."""
        allow = self.cfg.mirror_allow
        return self.catalog.policy.names(t.repo_type, t.repo_id) or named_by(allow or (), t.repo_type, t.repo_id)

    def _is_admin(self, auth: str | None) -> bool:
        token = self.cfg.admin_token
        return bool(token and auth) and bearer_matches(auth, token)

    async def open(self, request: web.Request, t: Target, path: str | None = None) -> Grant:
        """The one access decision of every route: a Grant, or the Hub-style refusal raised.

        `path` is the file a resolve route serves (its bytes need more than its
        metadata). The caller is cleared before any answer says whether a
        revision or a file exists.
        """
        auth = request.headers.get("Authorization") or None
        if auth is not None and not (auth.isascii() and auth.isprintable()):
            raise HubError(400, "the Authorization header must be printable ASCII")
        admin = self._is_admin(auth)
        if not admin and not self.allowed(t):
            raise HubError(404, f"Repository {t.repo_id} is not mirrored by this node (mirror_allow)", "RepoNotFound")
        # A repo matched only by a wildcard resolves only if the Hub calls it public (as a
        # lookup through the mount does): a private one would enter the index and the tree.
        public_only = not (admin or self.named(t) or self.index.has_repo(t.repo_type, t.repo_id))
        try:
            ref, failed = await self.resolve(t, public_only), None
        except HubError as e:
            ref, failed = None, e
        meta = self.index.get_repo_meta(t.repo_type, t.repo_id)
        if failed is not None and meta is None:  # never recorded: nothing to protect, nothing to tell
            if failed.status == 404:  # not which of repo, revision or visibility refused it
                raise HubError(404, f"Repository {t.repo_id} not found, or not public and not named", "RepoNotFound")
            raise failed
        visibility = (meta or {}).get("visibility", "unknown")
        hub = self.hub_of(t)
        if admin:
            why = "admin"
        elif matches(self.cfg.mirror_public, t.repo_type, t.repo_id):
            why = "mirror_public"
        elif hub is None:
            raise HubError(
                401,
                f"Repository {t.repo_id} is this node's own (not the Hub's): not public (mirror_public)",
                "RepoNotFound",
            )
        else:
            why = await self._check_caller(
                hub,
                t,
                auth,
                visibility if visibility in VISIBILITIES else "unknown",
                ref.commit if ref else t.revision,
                path,
            )
        if failed is not None:
            raise failed
        assert ref is not None
        relay = hub is not None and why in ("public", "caller")
        return Grant(ref, why, relay, auth if relay else None)

    async def _check_caller(
        self, hub: HfUpstream, t: Target, auth: str | None, visibility: str, revision: str, path: str | None
    ) -> str:
        """Why this caller may read the repo ("public", or "caller" once its Hub says so), or the refusal."""
        proof = proof_needed(visibility, path is not None)
        if proof is None:
            return "public"
        if auth is None:
            raise anonymous_refusal(t, visibility, path is not None)
        now = time.monotonic()
        key = (t.repo_type, t.repo_id, hashlib.sha256(auth.encode()).hexdigest())
        if self._grants.get((*key, "files"), 0.0) > now or self._grants.get((*key, proof), 0.0) > now:
            return "caller"
        if proof == "files":  # the Hub's gate is on the file route: ask for (the head of) the file itself
            method, url = "HEAD", f"/{t.spec.name}/resolve/{quote(revision, safe='')}/{quote(path or '')}"
        else:
            method, url = "GET", f"{t.api_base}/revision/{quote(revision, safe='')}"
        ask = (*key, method, url)
        task = self._checking.get(ask)
        if task is None:
            task = self._checking[ask] = asyncio.get_running_loop().create_task(
                hub.api(method, url, authorization=auth)
            )
            task.add_done_callback(lambda _: self._checking.pop(ask, None))
        try:
            status, headers, body = await asyncio.shield(task)
        except UpstreamError as e:
            self._upstream_failed()
            raise HubError(503, f"cannot check access to {t.repo_id} now: {e}", headers={"Retry-After": "10"}) from None
        if status in (401, 403, 404):
            raise _relayed_error(status, headers, body)
        if not 200 <= status < 400:
            self._upstream_failed()
            raise HubError(
                503,
                f"cannot check access to {t.repo_id} now: upstream answered {status}",
                headers={"Retry-After": "10"},
            )
        self._down.close()
        if len(self._grants) >= ACCESS_MAX:
            self._grants = {k: v for k, v in self._grants.items() if v > now}
            if len(self._grants) >= ACCESS_MAX:
                self._grants.clear()
        self._grants[(*key, proof)] = now + ACCESS_TTL
        return "caller"

    # ---- revisions --------------------------------------------------------------

    async def resolve(self, t: Target, public_only: bool = False) -> RepoRef:
        """Revision -> commit through Catalog.add_repo (index + FUSE tree), one call per key at a time."""
        hit = self._refs.get((t.repo_type, t.repo_id, t.revision))
        if hit and hit[1] > time.monotonic():
            return hit[0]
        key = (t.repo_type, t.repo_id, t.revision, public_only)
        task = self._resolving.get(key)
        if task is None:
            task = self._resolving[key] = asyncio.get_running_loop().create_task(self._add_repo(t, public_only))
            task.add_done_callback(lambda _: self._resolving.pop(key, None))
        try:
            return await asyncio.shield(task)
        except NotFound as e:
            code = "RevisionNotFound" if "revision" in str(e) else "RepoNotFound"
            raise HubError(404, str(e), code) from None
        except UpstreamError as e:
            raise HubError(504, f"upstream unreachable and {t.spec} not cached: {e}") from None

    async def _add_repo(self, t: Target, public_only: bool) -> RepoRef:
        ref, _, _ = await self.catalog.add_repo(t.spec, public_only=public_only)
        ttl = float("inf") if COMMIT_RE.fullmatch(t.revision) else min(REF_TTL, self.cfg.ref_ttl)
        if len(self._refs) >= REFS_MAX:
            self._refs.clear()
        self._refs[(t.repo_type, t.repo_id, t.revision)] = (ref, time.monotonic() + ttl)
        return ref

    def files(self, ref: RepoRef) -> dict[str, FileEntry]:
        key = (ref.repo_type, ref.repo_id, ref.commit)
        files = self._files.get(key)
        if files is None:
            listed = self.index.get_snapshot(ref.repo_type, ref.repo_id, ref.commit)
            if listed is None:
                raise HubError(504, f"snapshot {ref.commit} of {ref.repo_id} is not in the index")
            if len(self._files) > 256:
                self._files.clear()
            files = self._files[key] = {f.path: f for f in listed}
        return files

    # ---- /resolve -----------------------------------------------------------------

    async def handle_resolve(self, request: web.Request) -> web.StreamResponse:
        try:
            t, path = parse_resolve_path(request.raw_path)
            grant = await self.open(request, t, path)
            ref = grant.ref
            entry = self.files(ref).get(path)
            if entry is None:
                raise HubError(
                    404,
                    f"{path!a} not found in {t.repo_id}@{ref.commit}",
                    "EntryNotFound",
                    {"X-Repo-Commit": ref.commit},
                )
            return await self._serve(request, t, grant, entry)
        except HubError as e:
            return e.response()
        except (InvalidName, UnicodeDecodeError) as e:
            return HubError(400, str(e)).response()

    async def _serve(self, request: web.Request, t: Target, grant: Grant, entry: FileEntry) -> web.StreamResponse:
        filler = self.filler
        ref = grant.ref
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
        if end > start and self.upstream_down and not self._present(entry.blob_id, start):
            await self._probe(ref, entry)
        # A whole blob is filled in the background for a GET of the whole file; a Range
        # (any caller can ask for one byte of a huge file) fills only what it reads,
        # unless the repo is one the operator configured or the caller is the admin.
        whole = rng is None or grant.why == "admin" or self.catalog.policy.names(t.repo_type, t.repo_id)
        filler.hold(entry.blob_id)  # an open download: not to be evicted under it
        try:
            return await self._stream(request, entry, start, end, rng is not None, headers, whole)
        finally:
            filler.release(entry.blob_id)

    async def _probe(self, ref: RepoRef, entry: FileEntry) -> None:
        """Upstream failed us lately and these bytes are not here: fail fast (504) unless the
        repo's sources answer again (one metadata request through its chain)."""
        try:
            await self.sources.resolve(ref.repo_type, ref.repo_id, ref.commit)
        except UpstreamError as e:
            raise HubError(
                504, f"upstream unreachable and {entry.path!a} of {ref.repo_id} is not cached: {e}"
            ) from None
        self._down.close()

    def _present(self, blob_id: str, offset: int) -> bool:
        try:
            st = self.filler.state(blob_id)
        except FillError:
            return False
        return st.has(offset // st.rec.chunk_size)

    async def _stream(
        self,
        request: web.Request,
        entry: FileEntry,
        start: int,
        end: int,
        partial: bool,
        headers: dict[str, str],
        whole: bool,
    ) -> web.StreamResponse:
        """Send [start, end) as the chunks arrive, one read ahead of the socket."""
        filler = self.filler
        rec = filler.record(entry.blob_id)
        if self.cfg.fill_on_open and whole and end > start:
            filler.fill_in_background(entry.blob_id)
        step = max(MIN_STEP, min(MAX_STEP, rec.chunk_size))
        loop = asyncio.get_running_loop()
        since = filler.generation(entry.blob_id)  # a proof failing mid-download cuts it

        def read_from(pos: int) -> asyncio.Task:
            stop = min(end, (pos // step + 1) * step)  # aligned: a read waits for whole chunks only
            return loop.create_task(filler.read(entry.blob_id, pos, stop - pos, since=since))

        pending = read_from(start) if end > start else None
        try:
            first = await pending if pending else b""
        except FillError as e:
            timed_out = "timed out" in str(e)
            status = 507 if e.errno == errno.ENOSPC else 504 if timed_out else 502
            raise HubError(status, f"could not fetch {entry.path!a}: {e}") from None
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

    async def _forward(self, request: web.Request, t: Target, grant: Grant, path: str) -> web.Response | None:
        """Relay an API GET to the repo's Hub, for a caller already cleared; None: answer from the index.

        The caller's query and token go as they came (the answer is the caller's);
        nothing in the answer changes what the mirror believes about the repo.
        """
        hub = self.hub_of(t)
        if not grant.relay or hub is None:
            return None
        try:
            status, headers, body = await hub.api("GET", path, authorization=grant.auth, params=request.query)
        except UpstreamError as e:
            log.warning("upstream unreachable for %s: %s", path, e)
            self._upstream_failed()
            return None
        if status >= 500 or status == 429:
            self._upstream_failed()
            return None
        self._down.close()
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
        grant = await self.open(request, t)
        path = f"{t.api_base}/revision/{quote(t.revision, safe='')}" if explicit else t.api_base
        resp = await self._forward(request, t, grant, path)
        if resp is not None:
            return resp
        ref = grant.ref
        visibility = (self.index.get_repo_meta(t.repo_type, t.repo_id) or {}).get("visibility")
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
        grant = await self.open(request, t)
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
        ref = (await self.open(request, t)).ref
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


def add_routes(app: web.Application, mirror: Mirror) -> Mirror:
    """Register the mirror. Its patterns never match `/healthz`, `/readyz`, `/metrics` or `/v1/...`
    (aiohttp also tries exact paths before these catch-alls)."""
    api = r"/api/{kind:(models|datasets|spaces)}/{tail:.+}"
    app.router.add_get(api, mirror.handle_api)
    app.router.add_post(api, mirror.handle_api)
    app.router.add_get(r"/{tail:(?!v1/|api/).+/resolve/.+}", mirror.handle_resolve)
    return mirror
