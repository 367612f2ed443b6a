"""A plain HTTP(S) server as an upstream: a base URL plus a manifest.

`<base>/.nodecache-manifest.json` is a JSON list of `{path, size, sha256}` (or
`{"commit": ..., "files": [...]}`); file `p` is fetched from `<base>/<p>` with
range requests (received in threads, receive.py). An optional auth header (a file holding `Bearer xyz` or
`Header-Name: value`) is sent only to the base URL's origin, never logged; nor is a `user:password@` of the
base URL (sent as Basic auth): messages name the source `self.shown`.
"""

from __future__ import annotations

from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from ..metrics import Metrics
from . import NotFound, UpstreamError
from .listing import ListingUpstream
from .manifest import MANIFEST, Reader, SourceFile, SourceObject, parse_manifest
from .receive import Receiver
from .sourcespec import hide_userinfo


class HttpUpstream(ListingUpstream):
    name = "http"

    def __init__(
        self,
        base: str,
        session: aiohttp.ClientSession,
        receiver: Receiver,
        metrics: Metrics,
        auth_header: str | None = None,
    ):
        super().__init__(base.rstrip("/"))
        self.session, self.receiver = session, receiver  # the manifest; the chunks
        self.metrics = metrics
        self._auth: dict[str, str] = {}
        if auth_header:
            name, sep, value = auth_header.partition(":")
            if sep and " " not in name.strip():
                self._auth = {name.strip(): value.strip()}
            else:
                self._auth = {"Authorization": auth_header.strip()}
        self._origin = urlsplit(self.url)[:2]

    def _headers(self, url: str) -> dict[str, str]:
        return dict(self._auth) if urlsplit(url)[:2] == self._origin else {}

    def _file_url(self, key: str) -> str:
        return f"{self.url}/{quote(key)}"

    async def _get(self, key: str, headers: dict[str, str] | None = None):
        url = self._file_url(key)
        return self.session.get(url, headers={**(headers or {}), **self._headers(url)}, allow_redirects=True)

    async def _list(self, read: Reader) -> list[SourceObject]:
        raw = await read(MANIFEST)
        _, files = parse_manifest(raw, self.shown)
        # The manifest is the listing; sizes are checked against Content-Range on every read.
        return [SourceObject(MANIFEST, len(raw)), *(SourceObject(f.key, f.size) for f in files)]

    async def _read_small(self, key: str) -> bytes:
        try:
            async with await self._get(key) as resp:
                self.metrics.upstream_requests.labels(str(resp.status)).inc()
                self._check(resp.status, key)
                return await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UpstreamError(f"{self.shown}/{key}: {e.__class__.__name__}: {hide_userinfo(str(e))}") from None

    def _check(self, status: int, key: str) -> None:
        """Only a 2xx answer's body is the object. 401/403/404/410: not there or not ours (never
        retried); any other (a 5xx, a 429): a failure worth retrying, its body never read."""
        if status in (401, 403):
            raise NotFound(f"{self.shown}/{key}: HTTP {status} (check the auth header file)")
        if status in (404, 410):
            raise NotFound(f"{self.shown}/{key}: HTTP {status}")
        if not 200 <= status < 300:
            raise UpstreamError(f"{self.shown}/{key}: HTTP {status}")

    async def _read_range(self, f: SourceFile, start: int, end: int) -> memoryview:
        """One chunk, received in a thread (receive.py); redirects are followed here, so that the
        auth header goes only to the base URL's origin."""
        url = self._file_url(f.key)
        for _hop in range(5):
            headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity", **self._headers(url)}
            async with self.receiver.get(url, headers) as resp:
                self.metrics.upstream_requests.labels(str(resp.status)).inc()
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    url = urljoin(url, resp.headers["Location"])
                    continue
                self._check(resp.status, f.key)
                try:
                    parts = [data async for (data,) in resp.parts(start, end, end - start)]  # one part
                except UpstreamError as e:
                    raise UpstreamError(f"{self.shown}/{f.key} [{start}-{end}): {e}") from None
                self.metrics.upstream_bytes.labels(self.name).inc(end - start)
                return parts[0] if parts else memoryview(b"")
        raise UpstreamError(f"{self.shown}/{f.key}: too many redirects")
