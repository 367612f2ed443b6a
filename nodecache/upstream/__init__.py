"""Where bytes come from when no node has them: one protocol, one module per kind."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from ..index import BlobRecord
from ..layout import FileEntry


class UpstreamError(Exception):
    """A failure worth retrying (5xx, reset, truncated body, timeout)."""


class NotFound(UpstreamError):
    """The repo, revision or file does not exist or is not ours to read: never retried."""


@dataclass(frozen=True)
class RemoteFile:
    """A file of a resolved snapshot, with the hash kind that proves its blob id."""

    entry: FileEntry
    kind: str  # "sha256" | "gitsha1"


VISIBILITIES = ("public", "gated", "private", "unknown")


@dataclass(frozen=True)
class Resolved:
    commit: str
    files: list[RemoteFile]
    # Who may see the repo, as the source itself says: only the Hub can say
    # "public"; a bucket, a URL or a directory is the operator's own ("private").
    visibility: str = "private"
    # Where the file list is read page by page instead (`files` is then empty): only
    # asked when the index lacks this commit, so a re-resolution costs one request.
    pages: Callable[[], AsyncIterator[list[RemoteFile]]] | None = None


class Resolver(Protocol):
    """What turns a revision into a snapshot: one source, or a repo's chain of them (Sources)."""

    async def resolve(self, repo_type: str, repo_id: str, revision: str) -> Resolved: ...


class Source(Protocol):
    """Where a chunk's bytes may come from: every source declares all of this; nothing is probed."""

    name: str  # for logs and the per-attempt record of who served a blob
    kind: str  # "upstream" | "peer": what a failed proof is blamed on

    async def fetch(self, rec: BlobRecord, start: int, end: int, background: bool = False) -> bytes | list:
        """Exactly bytes [start, end) of the blob (or the buffers that make them up, in order),
        or raise UpstreamError.

        `background`: no reader waits for these bytes (a source that schedules, a peer, may let others first)."""

    def stream(
        self, rec: BlobRecord, start: int, end: int, piece: int, ending: Callable[[], None] | None = None
    ) -> AsyncIterator[list]:
        """Bytes [start, end) as consecutive `piece`-sized parts (lists of buffers); parts
        already yielded are good even if the stream fails later. `ending()`, if the source can
        tell: the last bytes are on their way, and a request asked now may go out on the same
        connection the moment they are in (receive.py); else it is not called."""

    async def locate(self, rec: BlobRecord) -> None:
        """Learn where the blob's bytes are served before many requests for it start (the Hub:
        its CDN redirect); nothing to learn for most sources. Never raises."""

    async def close(self) -> None:
        """Release what the source holds (threads, clients); the shared HTTP session is not its own."""


class Upstream(Source, Protocol):
    """A source that can also say what a revision holds."""

    async def resolve(self, repo_type: str, repo_id: str, revision: str) -> Resolved:
        """Revision -> commit and the full file list (sizes and blob ids)."""


class PiecewiseSource:
    """A source that serves one request per piece (object stores, peers): its `stream` is
    consecutive `fetch`es, so a whole-blob fill asks it chunk by chunk, never for runs."""

    async def fetch(self, rec: BlobRecord, start: int, end: int, background: bool = False) -> bytes | list:
        raise NotImplementedError

    async def stream(
        self, rec: BlobRecord, start: int, end: int, piece: int, ending: Callable[[], None] | None = None
    ) -> AsyncIterator[list]:
        for a in range(start, end, piece):
            data = await self.fetch(rec, a, min(a + piece, end), background=True)
            yield data if isinstance(data, list) else [data]

    async def locate(self, rec: BlobRecord) -> None:
        """Each piece is its own request: nothing to learn ahead."""
