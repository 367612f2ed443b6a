"""Reading a byte range of an HTTP response: what every HTTP source (the Hub, http(s)://) checks.

A 206 must carry the Content-Range asked for; a 200 (a server that ignores
Range) is read only up to the end of the range, never whole.
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator

import aiohttp

from . import UpstreamError

LOWAT = 256 * 1024  # bytes a body's socket gathers per wake-up (asyncio reads at most 256 KiB at a time)
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
    with FewerWakeups(resp) as wakeups:
        async for data in resp.content.iter_any():
            wakeups.update()
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


async def whole_body(resp: aiohttp.ClientResponse) -> bytes:
    """The response's body, read with FewerWakeups (a peer's chunk)."""
    parts = []
    with FewerWakeups(resp) as wakeups:
        async for data in resp.content.iter_any():
            wakeups.update()
            parts.append(data)
    return joined(parts)


class FewerWakeups:
    """While a large body arrives, wake the event loop once per `LOWAT` bytes, not once per packet.

    A rate-limited stream delivers a few KiB per socket read; each read costs
    the loop a wake-up, the transport, aiohttp's parser and our iteration, in
    Python. SO_RCVLOWAT makes the kernel report the socket readable only once
    LOWAT bytes are queued. It is raised only while more than LOWAT bytes of
    the body are still to come and is 1 again for its tail, so the end of a
    body (and the next response on a kept-alive connection) is never waited
    for. Anything without a socket or a length is left as it is.
    """

    def __init__(self, resp: aiohttp.ClientResponse):
        conn = resp.connection
        transport = conn.transport if conn is not None else None
        self.sock = transport.get_extra_info("socket") if transport is not None else None
        self.content, self.length = resp.content, resp.content_length
        self.raised = False

    def __enter__(self) -> FewerWakeups:
        self.update()
        return self

    def update(self) -> None:
        """After each read: batch while more than LOWAT bytes are still on the wire."""
        if self.sock is None or self.length is None:
            return
        want = self.length - self.content.total_bytes > LOWAT
        if want != self.raised:
            self._set(LOWAT if want else 1)
            self.raised = want

    def _set(self, value: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
        except OSError:
            self.sock = None  # not a TCP socket after all: leave it

    def __exit__(self, *exc: object) -> None:
        if self.raised and self.sock is not None:
            self._set(1)
            self.raised = False


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
