"""Sources that are a listing of objects under a root (s3, http, local): the shared base."""

from __future__ import annotations

import asyncio
import logging

from ..expiring import Window
from ..index import BlobRecord
from ..layout import COMMIT_RE
from . import NotFound, PiecewiseSource, Resolved, UpstreamError
from .manifest import SOURCE_KIND, Reader, Snapshot, SourceFile, SourceObject, build_snapshot
from .sourcespec import shown_url

log = logging.getLogger(__name__)

_RESCAN_EVERY = 30.0  # a source that does not know a blob lists itself again at most this often


class ListingUpstream(PiecewiseSource):
    """A source that lists objects under a root and reads byte ranges of one.

    Subclasses implement `_list`, `_read_small` and `_read_range`. The last
    snapshot built is remembered by blob id (and path), so chunk fetches know
    each blob's key and version; a blob this source has not seen (a repo
    resolved from the Hub, falling back here) triggers one fresh listing.
    """

    name = "source"
    kind = "upstream"

    def __init__(self, url: str):
        self.url = url  # what is asked; messages name `shown` (no user or password)
        self.shown = shown_url(url)
        self._by_id: dict[str, SourceFile] = {}
        self._by_path: dict[str, SourceFile] = {}
        self._scan_lock = asyncio.Lock()
        self._scanned = Window(_RESCAN_EVERY)  # open for a while after each listing

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} {self.shown}>"

    async def _list(self, read: Reader) -> list[SourceObject]:
        """The source's objects; `read` reads a small one (once per snapshot: see `snapshot`)."""
        raise NotImplementedError

    async def _read_small(self, key: str) -> bytes:
        raise NotImplementedError

    async def _read_range(self, f: SourceFile, start: int, end: int) -> bytes | bytearray:
        raise NotImplementedError

    async def snapshot(self, revision: str = "main") -> Snapshot:
        # One read of each small file per snapshot: an http source's manifest is its listing and
        # its snapshot both, and two reads could be two different answers (a manifest updated between).
        read = _ReadOnce(self._read_small)
        snap = await build_snapshot(await self._list(read), read, self.url, revision)
        self._scanned.open()
        for f in snap.files:
            self._by_id[f.blob_id] = f
            self._by_path[f.path] = f
        return snap

    async def resolve(self, repo_type: str, repo_id: str, revision: str) -> Resolved:
        snap = await self.snapshot(revision)
        if COMMIT_RE.fullmatch(revision) and snap.commit != revision:
            raise NotFound(f"{self.shown}: holds {snap.commit[:12]}, not revision {revision[:12]} of {repo_id}")
        log.info("%s: %s layout, %d files, commit %s", self.shown, snap.layout, len(snap.files), snap.commit[:12])
        return snap.resolved()

    async def _locate(self, rec: BlobRecord) -> SourceFile:
        f = self._by_id.get(rec.blob_id)
        if f is None:
            async with self._scan_lock:
                f = self._by_id.get(rec.blob_id)
                if f is None and not self._scanned:
                    self._scanned.open()
                    await self.snapshot()
                    f = self._by_id.get(rec.blob_id)
        if f is None:  # the same content under the same path, stated by another source's id
            same = self._by_path.get(rec.path)
            if same is not None and same.size == rec.size and rec.kind != SOURCE_KIND:
                f = same
        if f is None:
            raise NotFound(f"{self.shown}: does not hold {rec.path!r} (blob {rec.blob_id[:12]})")
        return f

    async def fetch(self, rec: BlobRecord, start: int, end: int, background: bool = False) -> bytes | bytearray:
        f = await self._locate(rec)
        data = await self._read_range(f, start, end)
        if len(data) != end - start:
            raise UpstreamError(f"{self.shown}/{f.key}: got {len(data)} bytes of [{start}-{end})")
        return data

    async def close(self) -> None:
        pass


class _ReadOnce:
    """A reader that reads each key once and answers it again from memory (small files, one snapshot)."""

    def __init__(self, read: Reader):
        self.read = read
        self._got: dict[str, bytes] = {}

    async def __call__(self, key: str) -> bytes:
        if key not in self._got:
            self._got[key] = await self.read(key)
        return self._got[key]
