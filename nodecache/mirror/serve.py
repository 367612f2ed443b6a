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
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from aiohttp import web

from .. import directio
from ..blobfile import FileSlice
from ..catalog import Catalog
from ..config import Config
from ..fill import FillError
from ..index import BlobRecord
from ..layout import FileEntry, InvalidName
from ..metrics import Metrics
from ..presence import BlobState
from ..repos import RepoRef
from ..slicebuf import Held, read_slice
from ..upstream import UpstreamError
from .access import Access
from .errors import HubError
from .paths import Target, parse_range, parse_resolve_path
from .rules import Grant
from .snapshots import Snapshots

log = logging.getLogger(__name__)

MIN_STEP, MAX_STEP = 1 << 20, 8 << 20  # bytes per Fills.read while streaming
PROBE_STRIDE = 128 << 10  # in_page_cache looks at one byte this far apart


def in_page_cache(file: BinaryIO, start: int, stop: int) -> bool:
    """Are the bytes [start, stop) of the file in the page cache? A byte every PROBE_STRIDE and
    the last, each read with RWF_NOWAIT (no disk I/O); a file system that cannot say: no."""
    one = bytearray(1)
    for off in [*range(start, stop, PROBE_STRIDE), stop - 1]:
        try:
            if os.preadv(file.fileno(), [one], off, os.RWF_NOWAIT) != 1:
                return False
        except OSError:  # EAGAIN: not cached; EOPNOTSUPP: cannot tell
            return False
    return True


class Fills(Protocol):
    """What the mirror asks of the fill path (`fill.Filler`), and nothing more."""

    def record(self, blob_id: str) -> BlobRecord: ...
    def state(self, blob_id: str) -> BlobState: ...
    def generation(self, blob_id: str) -> int: ...
    def hold(self, blob_id: str, paged: bool = True) -> None: ...
    def release(self, blob_id: str, paged: bool = True) -> None: ...
    def fill_in_background(self, blob_id: str) -> asyncio.Task | None: ...
    def opened_in_repo(self, repo_type: str, repo_id: str, blob_id: str, commit: str | None) -> asyncio.Task | None: ...
    @property
    def verify_first(self) -> set[str]: ...  # blob ids whose reads wait for the whole-blob proof
    async def read(
        self,
        blob_id: str,
        offset: int,
        size: int,
        since: int | None = None,
        ahead: bool = True,
        as_slice: bool = False,
        paged: bool = True,
    ) -> bytes | FileSlice: ...


class FileServer:
    """`HEAD|GET /{repo}/resolve/{rev}/{path}`: answered here, never redirected."""

    def __init__(
        self,
        cfg: Config,
        catalog: Catalog,
        filler: Fills,
        access: Access,
        snapshots: Snapshots,
        metrics: Metrics,
        blob_file: Callable[[str], Path],
        buffers: directio.BufferPool,
    ):
        self.cfg, self.catalog, self.filler, self.access, self.snapshots = cfg, catalog, filler, access, snapshots
        self.metrics = metrics  # sendfile'd bytes are counted as reads are
        self.blob_file = blob_file  # where a blob's bytes are (Store.path)
        self.buffers = buffers  # aligned buffers for the steps read around the page cache (the store's)

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
        if whole:  # the snapshot's other files the client reads next start too (fill_snapshot_on_open)
            filler.opened_in_repo(ref.repo_type, ref.repo_id, entry.blob_id, ref.commit, reads_here=False)
        # Not evicted under an open download. paged=False: its chunks are written (and read
        # back) around the page cache; the client keeps its own copy in its page cache.
        filler.hold(entry.blob_id, paged=False)
        try:
            return await self._stream(request, entry, start, end, rng is not None, headers, whole)
        finally:
            filler.release(entry.blob_id, paged=False)

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
        """Send [start, end) as the chunks arrive, one step ahead of the socket."""
        filler = self.filler
        rec = filler.record(entry.blob_id)
        fill = None
        if self.cfg.fill_on_open and whole and end > start:
            fill = filler.fill_in_background(entry.blob_id)
        steps = _Steps(filler, self.metrics, self.blob_file, entry.blob_id, end, rec.chunk_size, self.buffers, fill)
        try:
            pending = steps.plan(start) if end > start else None
            try:
                data = await pending if pending else None
            except FillError as e:
                timed_out = "timed out" in str(e)
                status = 507 if e.errno == errno.ENOSPC else 504 if timed_out else 502
                raise HubError(status, f"could not fetch {entry.path!a}: {e}") from None
            resp = web.StreamResponse(status=206 if partial else 200, headers=headers)
            resp.content_length = end - start
            await resp.prepare(request)
            pos = start
            try:
                while pos < end:
                    if pending is not None and not data:  # the blob shrank under us: never send a short body
                        raise FillError(f"empty read at {pos} of {entry.blob_id}")
                    n = len(data) if pending is not None else steps.stop(pos) - pos
                    sending, pending = pending, (steps.plan(pos + n) if pos + n < end else None)
                    if isinstance(data, Held):
                        await resp.write(data.view)
                        data.sent(self.buffers, request.transport)
                    elif sending is not None:
                        await resp.write(data)
                    else:
                        await steps.sendfile(request, pos, n)
                    pos += n
                    data = await pending if pending is not None else None
                await resp.write_eof()
            except (FillError, OSError) as e:
                # Headers are gone: the only honest signal left is a cut connection
                # (the client sees a short body and resumes with Range).
                if not isinstance(e, ConnectionError):  # a fill that failed, or the blob file (sendfile)
                    log.warning("mirror stream of %s cut at %d: %s", entry.path, pos, e)
                if pending is not None:
                    pending.cancel()
                    with contextlib.suppress(BaseException):
                        await pending
                if request.transport is not None:
                    request.transport.abort()
            return resp
        finally:
            steps.close()


class _Steps:
    """One download's steps: a step already in the store leaves its file by sendfile (no copy
    through Python); a missing one is read through the fill path, started a step ahead.

    While the blob's whole fill (`fill`) runs, a missing step asks for its own chunks only:
    the fill's workers fetch the chunks after it in order, and a read-ahead beside them
    would fetch those as separate requests, joined and written on their own.

    A step read through the fill path is written to the store and read back around the
    page cache (O_DIRECT), into an aligned buffer of `buffers`: the client's kernel keeps its
    own copy of every byte in its page cache, and fresh page-cache pages are dear (a second
    GiB of them cost the cold row ~1 CPU-s per GiB in the client: 3.4 -> 2.3 without).
    Bytes already in the page cache (read through the mount) still leave by sendfile.
    """

    def __init__(self, filler: Fills, metrics: Metrics, blob_file: Callable[[str], Path], blob_id: str, end: int,
                 chunk_size: int, buffers: directio.BufferPool, fill: asyncio.Task | None = None):  # fmt: skip
        self.filler, self.metrics, self.blob_file, self.blob_id, self.end = filler, metrics, blob_file, blob_id, end
        self.fill, self.buffers = fill, buffers
        self.size = max(MIN_STEP, min(MAX_STEP, chunk_size))
        self.since = filler.generation(blob_id)  # a proof failing mid-download cuts it
        self.file: BinaryIO | None = None

    def stop(self, pos: int) -> int:
        return min(self.end, (pos // self.size + 1) * self.size)  # aligned: a read waits for whole chunks only

    def plan(self, pos: int) -> asyncio.Task | None:
        """None: [pos, stop) goes from the blob file; else the task reading its bytes.

        sendfile reads the file on the loop's thread, so only bytes in the page
        cache go that way; the rest are read through the fill path (a thread).
        """
        stop = self.stop(pos)
        file = self._open() if self._stored(pos, stop) else None
        if file is not None and in_page_cache(file, pos, stop):
            return None
        ahead = self.fill is None or self.fill.done()
        return asyncio.get_running_loop().create_task(self._read(pos, stop, ahead))

    async def _read(self, pos: int, stop: int, ahead: bool) -> Held | bytes:
        sl = await self.filler.read(
            self.blob_id, pos, stop - pos, since=self.since, ahead=ahead, as_slice=True, paged=False
        )
        if not isinstance(sl, FileSlice):
            return sl  # b"": the blob shrank under us
        try:
            return await asyncio.get_running_loop().run_in_executor(None, read_slice, sl, self.buffers)
        except OSError as e:
            raise FillError(f"reading blob {self.blob_id} at {pos}: {e}") from None

    def _stored(self, pos: int, stop: int) -> bool:
        """In the store as a read would return it (a verify-first blob: only once proven)."""
        try:
            st = self.filler.state(self.blob_id)
        except FillError:
            return False
        if st.rec.state != "complete" and self.blob_id in self.filler.verify_first:
            return False
        size = st.rec.chunk_size
        return all(st.has(k) for k in range(pos // size, (stop - 1) // size + 1))

    def _open(self) -> BinaryIO | None:
        if self.file is None:
            with contextlib.suppress(OSError):
                self.file = open(self.blob_file(self.blob_id), "rb", buffering=0)  # closed by close()
        return self.file

    async def sendfile(self, request: web.Request, pos: int, n: int) -> None:
        """[pos, pos+n) of the blob file straight to the socket, counted as a read is."""
        if self.filler.generation(self.blob_id) != self.since:
            raise FillError(f"blob {self.blob_id} failed verification after it was opened; open it again")
        transport = request.transport
        if transport is None or self.file is None:
            raise ConnectionResetError("the client went away")
        await asyncio.get_running_loop().sendfile(transport, self.file, pos, n)
        self.metrics.read_bytes.labels("local").inc(n)
        self.filler.record(self.blob_id).last_access = time.time()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
