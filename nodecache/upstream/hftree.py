"""A Hub snapshot's file list from the paginated tree API, page by page.

`GET /api/{type}s/{repo}/tree/{commit}?recursive=true` answers up to 1,000
entries and a `Link: <...>; rel="next"` header with a cursor, as the Hub does
(huggingface_hub's `list_repo_tree` follows the same links). One revision
document of 10^5-10^6 `siblings` is one huge JSON body, and the Hub may cut
such a list short; pages are bounded, and at most one is asked ahead of the one
being parsed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import quote, urlsplit

import aiohttp

from ..layout import MAX_FILES, REPO_TYPES, FileEntry
from . import RemoteFile, UpstreamError

_MAX_PAGES = MAX_FILES  # a page holds at least one entry (refused if not): a cursor that never ends is an error
_MAX_PAGE_BYTES = 64 << 20  # the Hub's pages of 1,000 entries are ~0.3 MB


def parse_page(entries: object) -> list[RemoteFile]:
    """One page of tree entries -> its files (folders are implied by paths); ValueError if malformed.
    Names, sizes and ids are checked once, by repos.check_snapshot, the one door into the index."""
    if not isinstance(entries, list):
        raise ValueError(f"a tree page is a list, got {type(entries).__name__}")
    files = []
    for e in entries:
        if not isinstance(e, dict) or e.get("type") not in ("file", "directory"):
            raise ValueError(f"tree entry {str(e)[:80]!r}")
        if e["type"] == "directory":
            continue
        lfs = e.get("lfs")
        if lfs:
            blob_id, kind, size = lfs["oid"], "sha256", lfs.get("size", e.get("size"))
        else:
            blob_id, kind, size = e["oid"], "gitsha1", e.get("size")
        if not (isinstance(e["path"], str) and isinstance(blob_id, str) and type(size) is int):
            raise ValueError(f"tree entry {str(e)[:80]!r}")
        files.append(RemoteFile(FileEntry(e["path"], size, blob_id), kind))
    return files


async def tree_pages(
    session: aiohttp.ClientSession,
    endpoint: str,
    repo_type: str,
    repo_id: str,
    commit: str,
    headers: Callable[[str], Mapping[str, str]],
    on_status: Callable[[int], None] = lambda status: None,
) -> AsyncIterator[list[RemoteFile]]:
    """Every file of the snapshot, one page at a time; a link off the endpoint's origin, a
    malformed page or a failed request is an UpstreamError (what came before stays unrecorded).

    The next page is asked for as soon as this one's link is read (its origin checked), and
    arrives while this one is parsed: the Hub makes a page while we parse one, instead of
    each side waiting for the other. At most two pages are held. `headers(url)`: what the
    upstream sends with each request (identity encoding, its token on its own origin)."""
    origin = urlsplit(endpoint)[:2]

    async def get(url: str, params: dict | None) -> tuple[bytearray, str | None]:
        try:
            async with session.get(url, params=params, headers=headers(url), allow_redirects=False) as resp:
                on_status(resp.status)
                if resp.status != 200:
                    raise UpstreamError(f"{url}: HTTP {resp.status}")
                link = resp.links.get("next")
                body = bytearray()
                async for piece in resp.content.iter_any():
                    body += piece
                    if len(body) > _MAX_PAGE_BYTES:
                        raise UpstreamError(f"{url}: a tree page of more than {_MAX_PAGE_BYTES} bytes")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UpstreamError(f"{url}: {e.__class__.__name__}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UpstreamError(f"{url}: invalid tree page: {e.__class__.__name__}: {e}") from None
        nxt = str(link["url"]) if link else None
        if nxt is not None and urlsplit(nxt)[:2] != origin:
            raise UpstreamError(f"tree of {repo_id}: next page {nxt[:100]!r} is not on {endpoint}")
        return body, nxt

    url = f"{endpoint}/api/{REPO_TYPES[repo_type]}/{repo_id}/tree/{quote(commit, safe='')}"
    pending = asyncio.ensure_future(get(url, {"recursive": "true"}))
    try:
        for _ in range(_MAX_PAGES):
            body, nxt = await pending
            pending = None
            if nxt is not None:  # on its way while this page is parsed
                pending = asyncio.ensure_future(get(nxt, None))
            try:
                entries = json.loads(body)
                page = parse_page(entries)
            # InvalidName is a ValueError; json.loads of "[[[[…" raises RecursionError
            except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
                raise UpstreamError(f"{url}: invalid tree page: {e.__class__.__name__}: {e}") from None
            if not entries and nxt is not None:  # else a cursor of empty pages is _MAX_PAGES requests
                raise UpstreamError(f"{url}: an empty tree page with a next page")
            url = nxt or url
            yield page
            if pending is None:
                return
        raise UpstreamError(f"tree of {repo_id}: more than {_MAX_PAGES} pages")
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
