"""The HuggingFace Hub (or anything that speaks its API, like our emulator).

Metadata: `/api/{type}s/{repo}/revision/{rev}` with `expand[]` sha, private and
gated names the commit (one small document); the file list of a commit the index
lacks comes from the paginated tree API (hftree), as huggingface_hub reads it.
Data comes from `/{repo}/resolve/{commit}/{path}` as HTTP range requests, received
in threads (receive.py); LFS
files answer with a redirect to a CDN whose signed URL we reuse for a while,
keyed by blob id (never by URL), and to which we never send our token.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from ..index import BlobRecord
from ..layout import (
    COMMIT_RE,
    REPO_TYPES,
    validate_relpath,
)
from ..metrics import Metrics
from . import NotFound, Resolved, UpstreamError
from .hftree import tree_pages
from .receive import Receiver

_LOCATION_TTL = 300.0  # signed CDN URLs live longer than this on the real Hub


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


class HfUpstream:
    """Client of the Hub's HTTP API over one shared aiohttp session."""

    name = "hf"
    kind = "upstream"

    def __init__(
        self,
        endpoint: str,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        token: str | None = None,
        receiver: Receiver | None = None,
    ):
        self.endpoint = endpoint.rstrip("/")
        self.session = session  # metadata
        # Data: the daemon's receiver, shared by its sources; one of its own if none is given.
        self._own_receiver = receiver is None
        self.receiver = receiver or Receiver(threads=8, keep_buffers=8)
        self.metrics = metrics
        self.token = token
        self._locations: dict[str, tuple[str, float]] = {}

    def _headers(self, url: str) -> dict[str, str]:
        """What every request of ours sends: identity encoding (the session does not decompress:
        a compressed answer would be parsed, or stored, as it came), and the token to the Hub's
        own origin only."""
        if self.token and _origin(url) == _origin(self.endpoint):
            return {"Accept-Encoding": "identity", "Authorization": f"Bearer {self.token}"}
        return {"Accept-Encoding": "identity"}

    async def resolve(self, repo_type: str, repo_id: str, revision: str) -> Resolved:
        url = f"{self.endpoint}/api/{REPO_TYPES[repo_type]}/{repo_id}/revision/{quote(revision, safe='')}"
        expand = [("expand[]", "sha"), ("expand[]", "private"), ("expand[]", "gated")]
        try:
            async with self.session.get(url, params=expand, headers=self._headers(url)) as resp:
                self.metrics.upstream_requests.labels(str(resp.status)).inc()
                if resp.status in (401, 403, 404):
                    code = resp.headers.get("X-Error-Code", "")
                    what = {"RevisionNotFound": f"revision {revision!r} of"}.get(code, "repository")
                    raise NotFound(
                        f"{what} {repo_type} {repo_id!r} not found upstream ({resp.status} {code})".replace("  ", " ")
                    )
                if resp.status != 200:
                    raise UpstreamError(f"{url}: HTTP {resp.status}")
                info = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as e:  # "[[[[…": RecursionError
            raise UpstreamError(f"{url}: {e.__class__.__name__}: {e}") from None
        commit = info.get("sha", "") if isinstance(info, dict) else ""
        if not isinstance(commit, str) or not COMMIT_RE.fullmatch(commit):
            raise UpstreamError(f"upstream gave no commit sha: {commit!r}")
        status = self.metrics.upstream_requests
        pages = functools.partial(
            tree_pages, self.session, self.endpoint, repo_type, repo_id, commit, self._headers,
            lambda code: status.labels(str(code)).inc(),
        )  # fmt: skip
        return Resolved(commit, [], visibility_of(info), pages=pages)

    async def api(
        self, method: str, path: str, *, authorization: str | None, params=None, data=None
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One Hub call on behalf of a mirror client: (status, headers, body).

        `path` starts with `/` and is built from validated, quoted names. Only
        the *caller's* Authorization is sent (never the daemon's token), no
        redirect is followed, and the body is never compressed.
        """
        url = self.endpoint + path
        headers = {"Accept-Encoding": "identity"}
        if authorization:
            headers["Authorization"] = authorization
        try:
            async with self.session.request(
                method, url, params=params, data=data, headers=headers, allow_redirects=False
            ) as resp:
                self.metrics.upstream_requests.labels(str(resp.status)).inc()
                return resp.status, resp.headers.copy(), await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UpstreamError(f"{method} {path}: {e.__class__.__name__}: {e}") from None

    async def fetch(self, rec: BlobRecord, start: int, end: int, background: bool = False) -> list:
        """Bytes [start, end) of the blob (one buffer of the receiver); follows (and remembers)
        the CDN redirect. A reader's (not `background`) never waits for another body's end."""
        async with aclosing(self.stream(rec, start, end, end - start, follow=background)) as parts:
            async for pieces in parts:
                return pieces
        return []  # an empty range

    async def stream(
        self,
        rec: BlobRecord,
        start: int,
        end: int,
        piece: int,
        ending: Callable[[], None] | None = None,
        follow: bool = True,
    ) -> AsyncIterator[list]:
        """Bytes [start, end) of one ranged GET, as consecutive `piece`-sized parts (see `parts`).

        A background fill asks for several chunks at once: one request per
        chunk would leave the connection idle between them. Parts already
        yielded are good even if the stream fails later. `follow`: its requests
        may be follow-ups (receive.py; not those a reader waits for).
        """
        url, cached = self._location(rec)
        for _hop in range(5):
            headers = {"Range": f"bytes={start}-{end - 1}", **self._headers(url)}
            async with self.receiver.get(url, headers, follow=follow) as resp:
                self.metrics.upstream_requests.labels(str(resp.status)).inc()
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    url = urljoin(url, resp.headers["Location"])
                    self._locations[rec.blob_id] = (url, time.monotonic() + _LOCATION_TTL)
                    continue
                if resp.status in (401, 403, 404, 410) and cached:
                    # An expired signed URL: ask the Hub for a fresh one.
                    self._locations.pop(rec.blob_id, None)
                    url, cached = self._location(rec)
                    continue
                if resp.status in (401, 403, 404):
                    raise NotFound(f"{rec.repo_id}/{rec.path}: HTTP {resp.status}")
                try:
                    async for pieces in resp.parts(start, end, piece, ending):
                        self.metrics.upstream_bytes.labels(self.name).inc(sum(map(len, pieces)))
                        yield pieces
                except UpstreamError as e:
                    raise UpstreamError(f"{rec.repo_id}/{rec.path} [{start}-{end}): {e}") from None
                return
        raise UpstreamError(f"{rec.repo_id}/{rec.path}: too many redirects")

    async def locate(self, rec: BlobRecord) -> None:
        """Learn where the blob's bytes are served (an LFS file's redirect to the CDN) with one
        HEAD, before a whole-blob fill's workers start: else each of them takes the hop itself,
        at the moment the loop is busiest (32 requests going out: the redirects came back
        20-25 ms later, the CDN's first byte ~15 ms later than without the hop). A failure
        is no error: the fill's requests then take the hop as before."""
        url, cached = self._location(rec)
        if cached:
            return
        try:
            async with self.session.head(url, headers=self._headers(url), allow_redirects=False) as resp:
                self.metrics.upstream_requests.labels(str(resp.status)).inc()
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    where = urljoin(url, resp.headers["Location"])
                    self._locations[rec.blob_id] = (where, time.monotonic() + _LOCATION_TTL)
        except (aiohttp.ClientError, TimeoutError):
            pass

    def _location(self, rec: BlobRecord) -> tuple[str, bool]:
        hit = self._locations.get(rec.blob_id)
        if hit and hit[1] > time.monotonic():
            return hit[0], True
        prefix = "" if rec.repo_type == "model" else REPO_TYPES[rec.repo_type] + "/"
        path = quote(validate_relpath(rec.path))
        return f"{self.endpoint}/{prefix}{rec.repo_id}/resolve/{rec.commit}/{path}", False

    async def close(self) -> None:
        """The aiohttp session is the daemon's; the receiver too, unless this source made it."""
        if self._own_receiver:
            await self.receiver.close()


def visibility_of(info: dict) -> str:
    """Public only when the Hub's own repo document says not private and not gated."""
    if "private" not in info or "gated" not in info:
        return "unknown"
    if info["private"] is not False:
        return "private"
    return "public" if info["gated"] in (False, None) else "gated"
