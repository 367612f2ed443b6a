"""A directory (hostPath, NFS, Lustre) presented as a repo.

Its files are listed into a snapshot like any other source (a manifest, an
HF cache copy or an `hf download --local-dir` copy keep their real ids; a
plain directory gets ids from (path, size, mtime)). Reads still go through
the fill path into the local tier, so a slow NFS is read once per node.
Every read checks that the file still has the size and mtime it had when
listed: a file replaced in place is never mixed into a cached blob.
"""

from __future__ import annotations

import asyncio
import os

from ..metrics import Metrics
from . import NotFound, UpstreamError
from .listing import ListingUpstream
from .manifest import Reader, SourceFile, SourceObject


class LocalUpstream(ListingUpstream):
    name = "local"

    def __init__(self, root: str, metrics: Metrics):
        super().__init__(root)
        self.root = os.path.realpath(root)
        self.metrics = metrics

    def _path(self, key: str) -> str:
        path = os.path.realpath(os.path.join(self.root, key))
        if os.path.commonpath([path, self.root]) != self.root:  # a symlink out of the root
            raise NotFound(f"{self.url}/{key}: points outside the source directory")
        return path

    def _list_sync(self) -> list[SourceObject]:
        if not os.path.isdir(self.root):
            raise NotFound(f"{self.url}: no such directory")
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                out.append(SourceObject(rel, st.st_size, f"{st.st_size}-{st.st_mtime_ns}"))
        return out

    async def _list(self, read: Reader) -> list[SourceObject]:
        return await asyncio.to_thread(self._list_sync)

    async def _read_small(self, key: str) -> bytes:
        def read() -> bytes:
            with open(self._path(key), "rb") as f:
                return f.read()

        try:
            return await asyncio.to_thread(read)
        except OSError as e:
            raise UpstreamError(f"{self.url}/{key}: {e.strerror}") from None

    async def _read_range(self, f: SourceFile, start: int, end: int) -> bytes:
        def read() -> bytes:
            path = self._path(f.key)
            fd = os.open(path, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                if f.version and f"{st.st_size}-{st.st_mtime_ns}" != f.version:
                    raise NotFound(f"{self.url}/{f.key}: the file changed since it was listed")
                return os.pread(fd, end - start, start)
            finally:
                os.close(fd)

        try:
            data = await asyncio.to_thread(read)
        except FileNotFoundError:
            raise NotFound(f"{self.url}/{f.key}: no such file") from None
        except OSError as e:
            raise UpstreamError(f"{self.url}/{f.key}: {e.strerror}") from None
        self.metrics.upstream_bytes.labels(self.name).inc(len(data))
        return data
