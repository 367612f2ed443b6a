"""A Hub snapshot's file list from the paginated tree API, page by page.

`GET /api/{type}s/{repo}/tree/{commit}?recursive=true` answers up to 1,000
entries and a `Link: <...>; rel="next"` header with a cursor, as the Hub does
(huggingface_hub's `list_repo_tree` follows the same links). One revision
document of 10^5-10^6 `siblings` is one huge JSON body, and the Hub may cut
such a list short; pages are bounded, and the next one is only asked once the
last one is parsed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import quote, urlsplit

import aiohttp

from ..layout import MAX_FILES, REPO_TYPES, FileEntry
from . import RemoteFile, UpstreamError

_MAX_PAGES = MAX_FILES  # a page holds at least one entry: a cursor that never ends is an error


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
    malformed page or a failed request is an UpstreamError (what came before stays unrecorded)."""
    url: str | None = f"{endpoint}/api/{REPO_TYPES[repo_type]}/{repo_id}/tree/{quote(commit, safe='')}"
    params: dict | None = {"recursive": "true"}
    origin = urlsplit(endpoint)[:2]
    for _ in range(_MAX_PAGES):
        if url is None:
            return
        try:
            async with session.get(url, params=params, headers=headers(url), allow_redirects=False) as resp:
                on_status(resp.status)
                if resp.status != 200:
                    raise UpstreamError(f"{url}: HTTP {resp.status}")
                page = parse_page(await resp.json(content_type=None))
                link = resp.links.get("next")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UpstreamError(f"{url}: {e.__class__.__name__}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # InvalidName is a ValueError
            raise UpstreamError(f"{url}: invalid tree page: {e.__class__.__name__}: {e}") from None
        yield page
        url, params = (str(link["url"]), None) if link else (None, None)
        if url is not None and urlsplit(url)[:2] != origin:
            raise UpstreamError(f"tree of {repo_id}: next page {url[:100]!r} is not on {endpoint}")
    raise UpstreamError(f"tree of {repo_id}: more than {_MAX_PAGES} pages")
