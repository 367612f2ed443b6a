"""File bytes through the mirror (`/resolve`): headers as the Hub sends them, bytes as they land.

Bytes come from the same store and fill path as the FUSE view (coalesced,
verified), so one cold file fetched by many clients is fetched upstream once,
and a file already read through the mount is served without touching upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from typing import Protocol

from aiohttp import web

from ..catalog import Catalog
from ..config import Config
from ..fill import FillError
from ..index import BlobRecord
from ..layout import FileEntry, InvalidName
from ..repos import RepoRef
from ..store import BlobState
from ..upstream import UpstreamError
from .access import Access
from .errors import HubError
from .paths import Target, parse_range, parse_resolve_path
from .rules import Grant
from .snapshots import Snapshots

log = logging.getLogger(__name__)

MIN_STEP, MAX_STEP = 1 << 20, 8 << 20  # bytes per Fills.read while streaming


class Fills(Protocol):
    """What the mirror asks of the fill path (`fill.Filler`), and nothing more."""

    def record(self, blob_id: str) -> BlobRecord: ...
    def state(self, blob_id: str) -> BlobState: ...
    def generation(self, blob_id: str) -> int: ...
    def hold(self, blob_id: str) -> None: ...
    def release(self, blob_id: str) -> None: ...
    def fill_in_background(self, blob_id: str) -> asyncio.Task | None: ...
    async def read(self, blob_id: str, offset: int, size: int, since: int | None = None) -> bytes: ...


class FileServer:
    """`HEAD|GET /{repo}/resolve/{rev}/{path}`: answered here, never redirected."""

    def __init__(self, cfg: Config, catalog: Catalog, filler: Fills, access: Access, snapshots: Snapshots):
        self.cfg, self.catalog, self.filler, self.access, self.snapshots = cfg, catalog, filler, access, snapshots

    async def handle_resolve(self, request: web.Request) -> web.StreamResponse:
        try:
            t, path = parse_resolve_path(request.raw_path)
            grant = await self.access.open(request, t, path)
            ref = grant.ref
            entry = self.snapshots.files(ref).get(path)
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
        if end > start and self.access.down and not self._present(entry.blob_id, start):
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
            await self.access.sources.resolve(ref.repo_type, ref.repo_id, ref.commit)
        except UpstreamError as e:
            raise HubError(
                504, f"upstream unreachable and {entry.path!a} of {ref.repo_id} is not cached: {e}"
            ) from None
        self.access.down.close()

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
