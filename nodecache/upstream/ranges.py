"""Reading a byte range of an HTTP response: what every HTTP source (the Hub, http(s)://) checks.

A 206 must carry the Content-Range asked for; a 200 (a server that ignores
Range) is read only up to the end of the range, never whole.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp

from . import UpstreamError

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


async def range_parts(resp: aiohttp.ClientResponse, start: int, end: int, piece: int) -> AsyncIterator[list]:
    """Exactly the range asked for, as `piece`-sized parts (the last may be shorter).

    A part is the list of buffers the socket delivered, cut at part
    boundaries but never joined: joining 8 MiB means a copy into fresh
    pages, which cost the event loop more than receiving them (perf: half
    its CPU in a fill). Streamed, so memory stays at one part; a server
    that ignores Range (200) is read only up to `end`, never whole.
    """
    if resp.status == 206:
        m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
        if not m or int(m[1]) != start or int(m[2]) != end - 1:
            raise UpstreamError(f"wrong Content-Range {resp.headers.get('Content-Range')!r} for [{start}-{end})")
    elif resp.status != 200:
        raise UpstreamError(f"HTTP {resp.status}")
    skip = start if resp.status == 200 else 0
    pos = start
    pieces: list = []
    have = 0
    async for data in resp.content.iter_any():
        if skip:
            if len(data) <= skip:
                skip -= len(data)
                continue
            data, skip = memoryview(data)[skip:], 0
        while data:
            want = min(piece, end - pos)
            if len(data) > want - have:
                view = memoryview(data)
                pieces.append(view[: want - have])
                data = view[want - have :]
            else:
                pieces.append(data)
                data = b""
            have += len(pieces[-1])
            if have == want:
                yield pieces
                pos += have
                pieces, have = [], 0
                if pos == end:
                    return
    raise UpstreamError(f"truncated body: {pos - start + have} of {end - start} bytes")


async def range_body(resp: aiohttp.ClientResponse, start: int, end: int) -> bytes:
    """The whole range [start, end) as one bytes object."""
    async for pieces in range_parts(resp, start, end, end - start):
        return joined(pieces)
    return b""


def joined(pieces: list) -> bytes:
    """One bytes object of a part's buffers (a copy unless it is one already)."""
    if len(pieces) == 1 and isinstance(pieces[0], bytes):
        return pieces[0]
    return b"".join(pieces)
