"""A local HuggingFace Hub emulator: the Hub API, `/resolve` and a separate CDN origin.

It exists so nodecache can be tested and benchmarked offline against something that
behaves like the real Hub where it matters to a cache: LFS files redirect to signed URLs
on another origin (so auth must be dropped), ids are real git/LFS hashes, trees paginate,
and data responses can be throttled or broken on demand (`HubEmulator.faults`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fnmatch
import functools
import hashlib
import json
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from pathlib import Path
from typing import Literal, Self
from urllib.parse import unquote, urlencode

from aiohttp import web

from ..layout import tree_listing

CHUNK = 1024 * 1024
SENDFILE_PIECE = 8 * CHUNK  # an unpaced response from a file is sent (and counted) this much at a time
_SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)  # Linux: bytes/s per socket
_UNPACED = (1 << 64) - 1
DEFAULT_LFS_PATTERNS = tuple("*.safetensors *.bin *.pt *.pth *.onnx *.h5 *.msgpack *.gguf".split())
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
SIGNED_URL_TTL = 3600
# huggingface_hub compares X-Error-Message against this exact text.
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


FaultKind = Literal["500", "reset", "truncate", "slow", "corrupt", "flip", "wrong_range", "other_file", "whole", "hold"]


@dataclass
class Fault:
    """One injected failure, consumed FIFO by the next data response (resolve 200 GET or CDN GET).

    Broken transfers: "500", "reset" and "truncate" (half the body, then RST or FIN),
    "slow" (`seconds` before the first byte). Wrong bytes that look right: "corrupt"
    (the body's first byte inverted), "flip" (one byte of the body inverted, the
    middle one unless `at` names an offset in the file), "wrong_range" (another range of the file, labelled so in Content-Range),
    "other_file" (the same range of another file of the emulator, at least as long),
    "whole" (200 with the whole file: a server that ignores Range). `whole=True` makes
    any kind answer that way. "hold": the response waits before its first byte until
    the test sets `release`, and sets `reached` when it gets there (so a test can act
    while a request is known to be in flight). `after`: let that many data responses
    through unharmed first (the fault stays at the head of the queue meanwhile).
    """

    kind: FaultKind
    seconds: float = 0.0  # delay before the first byte, for "slow"
    at: int | None = None  # file offset of the byte "flip" inverts
    whole: bool = False
    after: int = 0
    reached: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)
    release: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in FaultKind.__args__:
            raise ValueError(f"unknown fault kind {self.kind!r}")


class HubStats:
    """Counters updated on the server loop and read from the test thread."""

    KINDS = tuple("api tree resolve_head resolve_get cdn_get cdn_head down".split())

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: dict[str, int] = dict.fromkeys(self.KINDS, 0)
        self.data_bytes = 0  # body bytes handed to the socket by data responses (resolve 200 + CDN)
        self.ranges: list[tuple[str, int, int]] = []  # (blob id, start, end exclusive)
        self.sending: dict[str, int] = {}  # blob id -> data responses of it being sent now
        self.peak: dict[str, int] = {}  # blob id -> most data responses of it sent at once (connections)
        self.auth_on_cdn = 0
        self.tokens: set[str] = set()  # every Authorization the Hub origin was sent


class _HubError(Exception):
    """An error answered like the Hub does: JSON body plus the X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str = "", **headers: str):
        super().__init__(message)
        self.status, self.message = status, message
        extra = {k.replace("_", "-"): v for k, v in headers.items()}  # X_Repo_Commit=...
        self.headers = {"X-Error-Message": message, **extra}
        if code:
            self.headers["X-Error-Code"] = code

    def response(self) -> web.Response:
        body = {"error": self.message}
        return web.json_response(body, status=self.status, headers=self.headers)


@dataclass(frozen=True)
class _File:
    size: int
    git_oid: str  # git blob sha1; of the LFS pointer for LFS files, like the real Hub
    sha256: str | None  # set only for LFS files
    source: Path | bytes

    @property
    def blob_id(self) -> str:
        return self.sha256 or self.git_oid

    def lfs_info(self, oid_key: str) -> dict[str, object]:
        assert self.sha256 is not None
        pointer_size = len(_lfs_pointer(self.sha256, self.size))
        return {oid_key: self.sha256, "size": self.size, "pointerSize": pointer_size}


@dataclass
class _Repo:
    private: bool
    gated: bool = False  # metadata is public; files need a token that was granted access
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, _File]] = field(default_factory=dict)
    modified: dict[str, str] = field(default_factory=dict)  # commit -> ISO date

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def _lfs_pointer(sha256: str, size: int) -> bytes:
    spec = "version https://git-lfs.github.com/spec/v1"
    return f"{spec}\noid sha256:{sha256}\nsize {size}\n".encode()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.lru_cache(maxsize=4096)
def _hash_file(path: Path, size: int, mtime_ns: int, lfs: bool) -> str:
    """Stream-hash a file; cached per (size, mtime) as benches re-add multi-GiB dirs."""
    h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _make_file(path: str, source: Path | bytes, patterns: Iterable[str], lfs_min: int) -> _File:
    """LFS files are identified by sha256, others by git sha1 (one hash pass either way)."""
    if isinstance(source, bytes):
        size = len(source)
    else:
        st = source.stat()
        size = st.st_size
    name = path.rsplit("/", 1)[-1]
    lfs = size >= lfs_min or any(fnmatch.fnmatch(name, p) for p in patterns)
    if isinstance(source, bytes):
        h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)
        h.update(source)
        digest = h.hexdigest()
    else:
        digest = _hash_file(source, size, st.st_mtime_ns, lfs)
    if lfs:
        return _File(size, _git_sha1(_lfs_pointer(digest, size)), digest, source)
    return _File(size, digest, None, source)


def _scan_dir(root: Path) -> dict[str, Path]:
    """Regular files under root, skipping hidden directories such as .git."""
    if not root.is_dir():
        raise NotADirectoryError(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(d.startswith(".") for d in rel.split("/")[:-1]):
            out[rel] = p
    return out


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single byte range; None means send the whole body."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not m or not any(m.groups()):
        return None  # absent, malformed or multi-range: ignoring it is allowed
    first, last = m.groups()
    if not first:  # suffix range: the last n bytes
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), min(int(last) + 1, size) if last else size
        if last and int(last) < start:
            return None
    if start >= end:
        raise _HubError(416, "Range not satisfiable", Content_Range=f"bytes */{size}")
    return start, end


class HubEmulator:
    """In-process Hub + CDN servers running on a background asyncio loop."""

    def __init__(
        self,
        rate_limit_bps: int | None = None,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        cdn_port: int = 0,
    ) -> None:
        self.rate_limit_bps = rate_limit_bps
        self.token = token
        self.host, self._port, self._cdn_port = host, port, cdn_port
        self.url = self.cdn_url = ""
        self.stats = HubStats()
        self.faults: list[Fault] = []
        # Tokens of other users: valid, but granted no gated repo (the Hub answers 403 GatedRepo).
        self.other_tokens: set[str] = set()
        self.down = False
        self.down_status = 503  # what a down Hub answers: 503, or 429 (rate limited)
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lfs: dict[str, _File] = {}  # sha256 -> file: what the CDN serves
        self._listings: dict[tuple[int, str, str, bool], list[bytes]] = {}  # tree pages' source
        self._signatures: dict[str, tuple[str, int]] = {}  # sig -> (sha256, expiry)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._startup_error: BaseException | None = None

    # ---- repository content ------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        source: Path | str | dict[str, bytes],
        repo_type: str = "model",
        revision: str = "main",
        private: bool = False,
        gated: bool = False,
        lfs_patterns: Iterable[str] = DEFAULT_LFS_PATTERNS,
        lfs_min_size: int = 10 * 1024 * 1024,
    ) -> str:
        """Publish `source` as a commit, point `revision` at it, return the commit sha."""
        if repo_type not in REPO_TYPES.values():
            raise ValueError(f"bad repo_type {repo_type!r}")
        if isinstance(source, dict):
            sources: dict[str, Path | bytes] = dict(source)
        else:
            sources = dict(_scan_dir(Path(source)))
        patterns = tuple(lfs_patterns)
        files = {p: _make_file(p, s, patterns, lfs_min_size) for p, s in sorted(sources.items())}
        h = hashlib.sha1(repo_id.encode() + b"\0")
        for path, f in files.items():
            h.update(f"{path}\0{f.blob_id}\n".encode())
        commit = h.hexdigest()
        repo = self._repos.setdefault((repo_type, repo_id), _Repo(private))
        repo.private, repo.gated = private, gated
        if commit not in repo.commits:
            repo.modified[commit] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            repo.commits[commit] = files
        self._lfs.update({f.sha256: f for f in files.values() if f.sha256})
        repo.refs[revision] = commit
        return commit

    def set_ref(self, repo_id: str, ref: str, commit: str, repo_type: str = "model") -> None:
        """Point a branch/ref name (e.g. "refs/pr/1") at an existing commit."""
        repo = self._repos[(repo_type, repo_id)]
        if commit not in repo.commits:
            raise ValueError(f"unknown commit {commit} in {repo_id}")
        repo.refs[ref] = commit

    def _files(self) -> Iterable[_File]:
        for repo in self._repos.values():
            for files in repo.commits.values():
                yield from files.values()

    # ---- lifecycle ---------------------------------------------------------------

    def start(self) -> Self:
        """Bind both ports, then serve from a daemon thread until stop()."""
        if self._thread:
            return self
        hub_sock, cdn_sock = self._bind(self._port), self._bind(self._cdn_port)
        self.url = f"http://{self.host}:{hub_sock.getsockname()[1]}"
        self.cdn_url = f"http://{self.host}:{cdn_sock.getsockname()[1]}"
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        args = (hub_sock, cdn_sock, ready)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True)
        self._thread.start()
        ready.wait()
        if self._startup_error:
            self._thread.join()
            self._thread = None
            raise RuntimeError("hub emulator failed to start") from self._startup_error
        return self

    def stop(self) -> None:
        if self._thread and self._loop:
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        return sock

    def _run(self, hub: socket.socket, cdn: socket.socket, ready: threading.Event) -> None:
        assert self._loop is not None
        loop = self._loop
        asyncio.set_event_loop(loop)
        runners = []
        try:
            for handler, sock in ((self._hub, hub), (self._cdn, cdn)):
                app = web.Application()
                app.router.add_route("*", "/{tail:.*}", handler)
                runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
                runners.append(runner)
                loop.run_until_complete(runner.setup())
                loop.run_until_complete(web.SockSite(runner, sock).start())
        except BaseException as e:
            self._startup_error = e
        ready.set()
        if not self._startup_error:
            loop.run_forever()
        for runner in runners:
            loop.run_until_complete(runner.cleanup())
        loop.close()

    # ---- hub origin --------------------------------------------------------------

    async def _hub(self, request: web.Request) -> web.StreamResponse:
        try:
            if "Authorization" in request.headers:
                self.stats.tokens.add(request.headers["Authorization"])
            if self.down:
                self.stats.requests["down"] += 1
                raise _HubError(self.down_status, "Service unavailable: upstream down")
            path = request.raw_path.split("?", 1)[0]
            if path == "/_emulator/stats":  # for tests that run the emulator in another process
                st = self.stats
                return web.json_response(
                    {"data_bytes": st.data_bytes, "requests": st.requests, "ranges": st.ranges, "peak": st.peak}
                )
            segs = [unquote(s) for s in path.split("/")[1:]]
            if segs[0] == "api" and len(segs) > 2 and segs[1] in REPO_TYPES:
                return self._api(request, REPO_TYPES[segs[1]], segs[2:])
            repo_type = "model"
            if segs[0] in ("datasets", "spaces"):
                repo_type, segs = REPO_TYPES[segs[0]], segs[1:]
            for i in (1, 2):
                if len(segs) > i + 2 and segs[i] == "resolve":
                    return await self._resolve(request, repo_type, segs[:i], segs[i + 1 :])
            raise _HubError(404, "Not found")
        except _HubError as e:
            return e.response()

    def _find_repo(self, request: web.Request, repo_type: str, segs: list[str]) -> tuple[str, _Repo, list[str]]:
        """Split `org/name/rest...` (or `name/rest...`) and check access like the Hub."""
        repo_id, rest = "/".join(segs[:2]), segs[2:]
        if (repo_type, repo_id) not in self._repos:
            repo_id, rest = segs[0], segs[1:]
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository {'/'.join(segs[:2])!a} not found", "RepoNotFound")
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if self.token is not None and token is not None and token != self.token and token not in self.other_tokens:
            raise _HubError(401, INVALID_CREDENTIALS)
        if repo.private and self.token is not None and token != self.token:
            raise _HubError(401, f"Repository {repo_id!a} not found", "RepoNotFound")
        return repo_id, repo, rest

    @staticmethod
    def _split_revision(repo: _Repo, segs: list[str]) -> tuple[str, list[str]]:
        """Shortest `a/b/...` prefix naming a ref or commit: accepts unencoded refs/pr/1."""
        for k in range(1, len(segs) + 1):
            if commit := repo.resolve("/".join(segs[:k])):
                return commit, segs[k:]
        raise _HubError(404, f"Invalid rev id: {segs[:1]!a}", "RevisionNotFound")

    def _api(self, request: web.Request, repo_type: str, segs: list[str]) -> web.Response:
        repo_id, repo, rest = self._find_repo(request, repo_type, segs)
        if rest[:1] == ["tree"]:
            self.stats.requests["tree"] += 1
            commit, parts = self._split_revision(repo, rest[1:])
            return self._tree(request, repo.commits[commit], commit, "/".join(parts))
        self.stats.requests["api"] += 1
        if rest and rest[0] != "revision":
            raise _HubError(404, "Not found")
        commit, _ = self._split_revision(repo, ["/".join(rest[1:]) or "main"])
        blobs = request.query.get("blobs", "").lower() in ("1", "true")
        expand = request.query.getall("expand[]", [])
        siblings: list[dict[str, object]] = []
        for path, f in repo.commits[commit].items() if not expand or "siblings" in expand else ():
            sibling: dict[str, object] = {"rfilename": path}
            if blobs:
                sibling.update(size=f.size, blobId=f.git_oid)
                if f.sha256:
                    sibling["lfs"] = f.lfs_info("sha256")
            siblings.append(sibling)
        info: dict[str, object] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": commit,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "lastModified": repo.modified[commit],
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if expand:  # like the Hub: only _id, id and the fields asked for
            if unknown := [k for k in expand if k not in info or k in ("_id", "id")]:
                raise _HubError(400, f"Invalid expand: {unknown[0]!a}")
            info = {"_id": info["_id"], "id": repo_id, **{k: info[k] for k in expand}}
        return web.json_response(info)

    def _tree(self, request: web.Request, files: dict[str, _File], commit: str, base: str) -> web.Response:
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        key = (id(files), commit, base, recursive)  # files: one repo's commit, never changed
        ordered = self._listings.get(key)
        if ordered is None:  # a commit never changes: list it once, not once per page
            ordered = self._listing(files, commit, base, recursive)
            if len(self._listings) >= 64:
                self._listings.pop(next(iter(self._listings)))
            self._listings[key] = ordered
        try:
            limit = max(1, int(request.query.get("limit", 1000)))
            cursor = request.query.get("cursor")
            start = int(base64.urlsafe_b64decode(cursor)) if cursor else 0
        except ValueError:
            raise _HubError(400, "Invalid limit or cursor") from None
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if start + limit < len(ordered):
            next_cursor = base64.urlsafe_b64encode(str(start + limit).encode()).decode()
            query = urlencode(dict(request.query, cursor=next_cursor))
            url = f"{request.scheme}://{request.host}{request.raw_path.split('?', 1)[0]}"
            headers["Link"] = f'<{url}?{query}>; rel="next"'
        return web.Response(body=b"[" + b", ".join(ordered[start : start + limit]) + b"]", headers=headers)

    @staticmethod
    def _listing(files: dict[str, _File], commit: str, base: str, recursive: bool) -> list[bytes]:
        """The tree's entries in order, each as its JSON (encoded once: the pages of a
        10^6-file tree are then joins, not 10^6 dicts dumped again on each listing)."""
        paths, dirs = tree_listing({p: f.git_oid for p, f in files.items()}, base, recursive)
        quote = encode_basestring_ascii  # what json.dumps writes for a str
        entries: dict[str, str] = {}
        for path in paths:  # as json.dumps of {"type", "oid", "size", "path"[, "lfs"]}, written directly
            f = files[path]
            head = f'{{"type": "file", "oid": {quote(f.git_oid)}, "size": {f.size:d}, "path": {quote(path)}'
            entries[path] = head + (f', "lfs": {json.dumps(f.lfs_info("oid"))}}}' if f.sha256 else "}")
        if base and not entries and not dirs:
            raise _HubError(404, f"{base!a} not found", "EntryNotFound", X_Repo_Commit=commit)
        for d, oid in dirs.items():
            entries[d] = json.dumps({"type": "directory", "oid": oid, "size": 0, "path": d})
        return [entries[p].encode() for p in sorted(entries)]

    async def _resolve(
        self, request: web.Request, repo_type: str, repo_segs: list[str], rest: list[str]
    ) -> web.StreamResponse:
        head = request.method == "HEAD"
        self.stats.requests["resolve_head" if head else "resolve_get"] += 1
        repo_id, repo, _ = self._find_repo(request, repo_type, repo_segs)
        if repo.gated:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                raise _HubError(
                    401, f"Access to model {repo_id} is restricted. You must be authenticated.", "GatedRepo"
                )
            if self.token is None or auth[7:] != self.token:
                raise _HubError(
                    403, f"Access to model {repo_id} is restricted and you are not in the authorized list.", "GatedRepo"
                )
        commit, parts = self._split_revision(repo, rest)
        path = "/".join(parts)
        if not parts or any(p in ("", ".", "..") or "\\" in p for p in path.split("/")):
            raise _HubError(400, f"Invalid path {path!a}")
        f = repo.commits[commit].get(path)
        if f is None:
            raise _HubError(404, f"{path!a} not found", "EntryNotFound", X_Repo_Commit=commit)
        if f.sha256 is None:
            headers = {"X-Repo-Commit": commit, "ETag": f'"{f.git_oid}"'}
            return await self._send(request, f, headers)
        sig, exp = secrets.token_hex(16), int(time.time()) + SIGNED_URL_TTL
        if len(self._signatures) > 100_000:  # bound memory in long benchmarks
            for old in list(self._signatures)[:50_000]:
                del self._signatures[old]
        self._signatures[sig] = (f.sha256, exp)
        headers = {
            "Location": f"{self.cdn_url}/blobs/{f.sha256}?sig={sig}&exp={exp}",
            "X-Repo-Commit": commit,
            "X-Linked-Etag": f'"{f.sha256}"',
            "X-Linked-Size": str(f.size),
            "ETag": f'"{f.sha256}"',
            "Content-Length": "0",
        }
        return web.Response(status=302, headers=headers)

    # ---- CDN origin --------------------------------------------------------------

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests["cdn_head" if request.method == "HEAD" else "cdn_get"] += 1
        if "Authorization" in request.headers:
            self.stats.auth_on_cdn += 1
        try:
            if self.down:
                self.stats.requests["down"] += 1
                raise _HubError(self.down_status, "Service unavailable: upstream down")
            sha256 = request.path.removeprefix("/blobs/")
            signed = self._signatures.get(request.query.get("sig", ""))
            query = (request.query.get("exp"), sha256)
            if signed is None or (str(signed[1]), signed[0]) != query:
                raise _HubError(403, "Access denied: missing or invalid signature")
            if signed[1] < time.time():
                raise _HubError(403, "Access denied: signature expired")
            return await self._send(request, self._lfs[sha256], {"ETag": f'"{sha256}"'})
        except _HubError as e:
            return e.response()

    # ---- data responses ----------------------------------------------------------

    async def _send(self, request: web.Request, f: _File, headers: dict[str, str]) -> web.StreamResponse:
        """Serve (a range of) a file in bounded chunks, applying throttle and faults."""
        fault = self.faults[0] if self.faults and request.method != "HEAD" else None
        if fault and fault.after > 0:
            fault.after -= 1
            fault = None
        kind = fault.kind if fault else None
        rng = _parse_range(request.headers.get("Range"), f.size)
        if fault and (fault.whole or kind == "whole"):
            rng = None
        start, end = rng or (0, f.size)
        if rng and kind == "wrong_range":  # the neighbouring range, honestly labelled
            n = end - start
            start, end = (start + n, end + n) if end + n <= f.size else (max(0, start - n), max(n, start))
        resp = web.StreamResponse(status=206 if rng else 200, headers=headers)
        resp.headers.update({"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        if rng:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        resp.content_length = end - start
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        if fault:
            self.faults.pop(0)
        source = f.source
        if kind == "other_file":
            other = next((o for o in self._files() if o.blob_id != f.blob_id and o.size >= end), None)
            if other is None:
                raise _HubError(500, f"fault other_file: no other file of {end} bytes or more")
            source = other.source
        if fault and kind == "500":
            raise _HubError(500, "Internal Error (injected fault)")
        if fault and kind == "slow":
            await asyncio.sleep(fault.seconds)
        if fault and kind == "hold":
            fault.reached.set()
            while not fault.release.is_set():
                await asyncio.sleep(0.01)
        flip = None
        if fault and kind == "flip":
            flip = fault.at if fault.at is not None else (start + end) // 2
        elif kind == "corrupt":
            flip = start
        stop_at = start + (end - start) // 2 if kind in ("reset", "truncate") else end
        self.stats.ranges.append((f.blob_id, start, end))
        await resp.prepare(request)
        rate = self.rate_limit_bps
        chunk = max(16384, min(CHUNK, rate // 16)) if rate else CHUNK
        if (sock := request.transport and request.transport.get_extra_info("socket")) is not None:
            # The kernel paces the segments too, as a throttling CDN's TCP does: the client
            # then receives a steady stream of small reads, not bursts of `chunk` bytes.
            # (Set on every response: a kept-alive connection may have been throttled before.)
            pacing = struct.pack("=Q", rate or _UNPACED)
            sock.setsockopt(socket.SOL_SOCKET, _SO_MAX_PACING_RATE, pacing)
        loop = asyncio.get_running_loop()
        t0, sent = loop.time(), 0
        sending = self.stats.sending
        sending[f.blob_id] = sending.get(f.blob_id, 0) + 1
        self.stats.peak[f.blob_id] = max(self.stats.peak.get(f.blob_id, 0), sending[f.blob_id])
        try:
            if fault is None and isinstance(source, Path):
                await self._sendfile(request, source, start, end, rate, chunk if rate else SENDFILE_PIECE)
            else:
                async for data in _read(source, start, stop_at, chunk):
                    if flip is not None and start + sent <= flip < start + sent + len(data):
                        i = flip - start - sent
                        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                    # Counted before the write: a client that already has the bytes must see them counted.
                    self.stats.data_bytes += len(data)
                    await resp.write(data)
                    sent += len(data)
                    if rate and (delay := t0 + sent / rate - loop.time()) > 0:
                        await asyncio.sleep(delay)
        except ConnectionError:
            return resp  # the client went away
        finally:
            sending[f.blob_id] -= 1
        transport = request.transport
        if kind == "reset" and transport:  # SO_LINGER 0: close() sends RST, not FIN
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        elif kind == "truncate" and transport:
            transport.close()  # flushes the half body, then FIN: a short read
        else:
            await resp.write_eof()
        return resp

    async def _sendfile(
        self, request: web.Request, path: Path, start: int, end: int, rate: int | None, piece: int
    ) -> None:
        """An unharmed response from a file leaves it by sendfile, `piece` bytes at a time,
        each counted before it is sent and paced as `_send` paces: a CDN's CPU is not the
        node's, and here the emulator shares the machine with the client and the daemon it
        serves (bench/mirror.py's rows, the uncapped ceiling among them). The kernel reads the
        file on the loop's thread, which is fine for the small, hot files of tests and benches."""
        loop = asyncio.get_running_loop()
        t0, sent = loop.time(), 0
        with path.open("rb") as fh:
            for pos in range(start, end, piece):
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("the client went away")
                n = min(piece, end - pos)
                self.stats.data_bytes += n
                await loop.sendfile(transport, fh, pos, n)
                sent += n
                if rate and (delay := t0 + sent / rate - loop.time()) > 0:
                    await asyncio.sleep(delay)


async def _read(source: Path | bytes, start: int, end: int, chunk: int) -> AsyncIterator[bytes]:
    """Yield source[start:end] in chunks; disk reads run in a thread, off the loop."""
    if isinstance(source, bytes):
        for pos in range(start, end, chunk):
            yield source[pos : min(pos + chunk, end)]
        return
    loop = asyncio.get_running_loop()
    with source.open("rb") as fh:
        fh.seek(start)
        pos = start
        while pos < end:
            data = await loop.run_in_executor(None, fh.read, min(chunk, end - pos))
            if not data:
                break
            pos += len(data)
            yield data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nodecache.testing.hub", description=__doc__)
    parser.add_argument("--repo", action="append", default=[], metavar="[TYPE/]ORG/NAME=DIR")
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    parser.add_argument("--cdn-port", type=int, default=0)
    parser.add_argument("--rate-limit-mbps", type=float, help="per-response cap, megabit/s")
    parser.add_argument("--token", help="bearer token that private repos require")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    rate = int(args.rate_limit_mbps * 1e6 / 8) if args.rate_limit_mbps else None
    hub = HubEmulator(rate, args.token, host or "127.0.0.1", int(port), args.cdn_port)
    for spec in args.repo:
        repo_id, sep, directory = spec.partition("=")
        if not sep:
            parser.error(f"--repo expects ORG/NAME=DIR, got {spec!r}")
        prefix, _, rest = repo_id.partition("/")
        if prefix in REPO_TYPES and "/" in rest:  # e.g. datasets/org/name
            hub.add_repo(rest, Path(directory), repo_type=REPO_TYPES[prefix])
        else:
            hub.add_repo(repo_id, Path(directory))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with hub:
        print(f"hub listening on {hub.url} (cdn {hub.cdn_url})", flush=True)
        while not stop.wait(0.5):
            pass
    sys.exit(0)


if __name__ == "__main__":
    main()
