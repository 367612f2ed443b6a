"""HTTP(S) range bodies received in threads, straight into reused page-aligned buffers.

A fill's bytes are most of what the daemon handles. Received on the event loop
(aiohttp), every socket read costs the loop a wake-up, the parser a copy into
a new bytes object and the interpreter its bookkeeping; the loop then holds
the GIL most of the time a fill runs (py-spy, issue 16). Here a thread asks
for the range with `http.client` and reads each chunk-sized part with one
`readinto` (the loop of socket reads runs in C, without the GIL) into a
buffer a previous part used, whose pages are already touched (a fresh page
costs this VM more than the copy into it). The loop wakes once per part.

Only data requests come here: the chunk ranges of an HTTP upstream (the Hub's
CDN, an http(s) source) and a peer's chunks; metadata stays on the shared
aiohttp session. Like that session: no proxies from the environment, TLS
verified with the system's defaults, no redirect followed unasked (the
caller decides where a redirect may go and what it sends there), a URL's
`user:password@` sent as Basic auth and shown in no message.

A connection goes on to its next request as soon as its body is read to its
end, from the thread that read it (as curl does): at a per-connection cap
every loop hop between one range's end and the next range's request is a
connection's bandwidth lost (20-45 ms per 8 MiB range, issue 16). A caller
that streams a range may pass `ending` to `parts`: it is called on the loop
when the range's last bytes are being read, and a request of the same origin
asked then is sent on that connection the moment it is free (a follow-up),
never beside it on a new one. Whatever goes wrong first (the body fails, bytes
are left on the connection, the follow-up's caller leaves, the connection is
not free within FOLLOW_WAIT while few reads are given up on so) makes it an
ordinary request. A request a reader waits for (`follow=False`) is never a
follow-up: it would wait for a fill's body.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import mmap
import re
import select
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from urllib.parse import unquote, urlsplit

from ..directio import anonymous
from . import UpstreamError
from .sourcespec import shown_url

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_SMALL_BODY = 64 * 1024  # a redirect's or an error's body is read (to reuse the connection) up to this
LOWAT = 256 * 1024  # bytes a paced stream gathers per socket read
ENDING = 2 * 1024 * 1024  # `ending` is called when the read of a range's last quarter, at most this, starts
# A follow-up whose connection is not free by then goes out on its own: the body before it is that slow
# (2 MiB at 2 MB/s) or stalled, and would otherwise keep it waiting up to that body's read timeout. The
# stalled read keeps its thread: while a quarter of the threads wait on such reads, a follow-up waits on
# (it holds its caller's fetch slot meanwhile, as the stalled request did before it gave it back early).
FOLLOW_WAIT = 1.0
_IDLE = 10.0  # seconds without a part before the kept buffers and connections are let go
# Errors of a request, whatever the layer: socket, TLS, HTTP framing, a URL http.client refuses.
_FAILURES = (OSError, http.client.HTTPException, ValueError)


class Buffers:
    """Page-aligned buffers, each reused once nothing but this pool refers to it any more.

    A part's buffer is held by whoever holds the part: the chunk write, the
    in-order hash that keeps chunks ahead of it, a cancelled read's thread.
    Rather than make each of them give it back, the pool asks CPython's
    reference count (which counts every memoryview of the buffer too) whether
    anyone still does. Used from the event loop only. At most `keep` are kept;
    past that a part gets a buffer of its own, freed with it.

    `trim` (once a fill is over) gives the idle buffers' pages back lazily
    (MADV_FREE): the kernel takes them when it needs memory, and they do not
    count in a pod's working set meanwhile; until then the next fill reuses
    them without a page fault (first touches cost this VM 0.45 CPU-s per GiB:
    a cold start after an idle hour would pay ~0.25 CPU-s for them again).
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._kept: list[mmap.mmap] = []

    def take(self, size: int) -> mmap.mmap:
        for buf in self._kept:
            if sys.getrefcount(buf) == _IDLE_REFS and len(buf) >= size:
                return buf
        buf = anonymous(size)
        if len(self._kept) < self.keep:
            self._kept.append(buf)
        return buf

    def trim(self) -> None:
        idle = []
        for buf in self._kept:
            if sys.getrefcount(buf) == _IDLE_REFS and _FREE is not None:
                buf.madvise(_FREE)
                idle.append(buf)
        self._kept = idle  # a busy one is unmapped with its last user

    def close(self) -> None:
        self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)


def _idle_refs() -> int:
    """The reference count `take` sees for a buffer only the pool holds (the list, the loop
    variable and getrefcount's argument): measured the same way, not assumed."""
    kept = [anonymous(1)]
    for buf in kept:
        return sys.getrefcount(buf)
    raise AssertionError


_IDLE_REFS = _idle_refs()
_FREE = getattr(mmap, "MADV_FREE", None)  # Linux >= 4.5; else trim unmaps


class Response:
    """One response of a `Receiver` request: status and headers now, the body part by part."""

    def __init__(self, receiver: Receiver, conn: _Conn, resp: http.client.HTTPResponse):
        self._receiver, self._conn, self._resp = receiver, conn, resp
        self._origin = conn.origin
        self.status: int = resp.status
        self.headers: Mapping[str, str] = resp.headers
        self._reading: Future | None = None  # a part being read in a thread
        self._whole = False  # the body was read to its end: the connection can serve another request
        self._gone = False  # the connection went on from the reading thread (a follow-up, the pool)
        self._closing = False  # closed on the loop: its connection goes nowhere else (Receiver._lock)
        self.follow_up: _FollowUp | None = None  # asked while the last bytes are read (Receiver._lock)
        self._given_up = False  # its follow-up went out on its own while it was read (Receiver._lock)

    async def parts(
        self, start: int, end: int, piece: int, ending: Callable[[], None] | None = None
    ) -> AsyncIterator[list[memoryview]]:
        """Exactly bytes [start, end) of the body as `piece`-sized parts (the last may be shorter),
        each a one-buffer list. A 206 must carry the Content-Range asked for; a 200 (a server
        that ignores Range) is read only up to `end`, never whole. `ending()` is called on the
        loop when the last bytes of a body that ends with the range are being read: a request
        to the same origin asked from then on is sent on this connection as soon as it is free."""
        if self.status == 206:
            m = _CONTENT_RANGE.fullmatch(self.headers.get("Content-Range", ""))
            if not m or int(m[1]) != start or int(m[2]) != end - 1:
                raise UpstreamError(f"wrong Content-Range {self.headers.get('Content-Range')!r} for [{start}-{end})")
            skip = 0
        elif self.status == 200:
            skip = start
        else:
            raise UpstreamError(f"HTTP {self.status}")
        pool = self._receiver.buffers
        near = None
        if ending is not None:
            loop = asyncio.get_running_loop()
            conn = self._conn
            near = _Near(lambda: self._receiver.ending(self, conn, loop, ending), min(ENDING, (end - start) // 4))
        pos = start
        while pos < end:
            size = min(piece, end - pos)
            buf = pool.take(size)
            self._receiver.used()
            more = end - pos - size  # bytes of the range after this part
            last = self._receiver.last_part if not more else None
            self._reading = self._receiver.submit(
                _read_into, self._conn, self._resp, buf, size, skip, more, near if last else None, last, self
            )
            try:
                got = await asyncio.wrap_future(self._reading)
            except BaseException as e:
                buf = None  # a traceback keeps this frame: it must not keep the buffer from the pool
                if isinstance(e, _FAILURES):
                    raise UpstreamError(f"{self._conn.host}: {e.__class__.__name__}: {e}") from None
                raise
            skip = 0
            if got < size:
                raise UpstreamError(f"truncated body: {pos - start + got} of {end - start} bytes")
            pos += size
            self._whole = pos == end and self._resp.isclosed()
            yield [memoryview(buf)[:size]]

    async def drain(self) -> None:
        """Read a small body (a redirect's, an error's) to its end, so its connection can be kept."""
        if self._resp.length is not None and self._resp.length <= _SMALL_BODY:
            self._reading = self._receiver.submit(self._resp.read)
            with suppress(*_FAILURES):
                await asyncio.wrap_future(self._reading)
                self._whole = self._resp.isclosed()

    def close(self) -> None:
        """The connection goes back to the pool if its body was read to the end, else it is closed;
        a part still being read is cut off (its thread's read returns, then the connection closes)."""
        conn, self._conn = self._conn, None
        if conn is None or not self._receiver.closing(self):
            return
        reading = self._reading
        if reading is not None and not reading.done():
            conn.cut()
            reading.add_done_callback(lambda _: self._receiver.discard(conn))
        elif self._whole and not self._resp.will_close:
            self._receiver.put_back(conn)
        else:
            self._receiver.discard(conn)


def _read_into(
    conn: _Conn,
    resp: http.client.HTTPResponse,
    buf: mmap.mmap,
    size: int,
    skip: int,
    more: int,
    near: _Near | None = None,
    last: Callable[[Response, _Conn, bool], None] | None = None,
    response: Response | None = None,
) -> int:
    """In a thread: skip `skip` bytes, then read `size` into buf (`more` are wanted after them);
    fewer only at the body's end. `near`: called once when the body's last bytes are being read;
    `last(response, conn, whole)`: called when the range's last part is read (or failed), before the
    part is handed over, so the connection goes on from here."""
    whole = False
    try:
        with memoryview(buf) as mem:
            while skip:
                n = min(skip, len(mem))
                n = _read_batched(conn, resp, mem[:n], skip - n + size + more)
                if not n:
                    return 0
                skip -= n
            with mem[:size] as view:
                got = _read_batched(conn, resp, view, more, near)
        whole = resp.isclosed() and resp.length == 0 and not resp.will_close  # (0: not cut short)
        return got
    except BaseException:
        buf = None  # the traceback the future keeps must not keep the buffer from the pool
        raise
    finally:
        if last is not None and response is not None:
            last(response, conn, whole)


def _read_batched(
    conn: _Conn, resp: http.client.HTTPResponse, view: memoryview, more: int, near: _Near | None = None
) -> int:
    """Fill `view` (fewer bytes only at the body's end) with few readinto calls, each looping over
    the socket in C without the GIL. While the body has well over LOWAT bytes to come, the socket
    reports itself readable only once LOWAT bytes are queued (SO_RCVLOWAT): a paced stream
    delivers a few KiB per packet, and each socket read costs a trip through Python and the GIL.
    The body's last bytes are read with a mark of 1, so its end is never waited for; so are the
    last bytes wanted (`more` after the view), whatever length the server announced."""
    got = 0
    while got < len(view):
        rest = resp.length  # bytes of the body not yet read; None: chunked or until close
        if rest is not None:
            rest = min(rest, len(view) - got + more)
        batch = len(view) - got
        if rest is not None and rest - 2 * LOWAT > 0:
            batch = min(batch, rest - 2 * LOWAT)  # what is buffered above the socket is < LOWAT
            conn.mark(LOWAT)
        else:
            conn.mark(1)
        if near is not None and rest is not None and rest == resp.length:  # the body ends with the view
            if rest <= near.lead:
                near.call()
                near = None
            else:
                batch = min(batch, rest - near.lead)
        n = resp.readinto(view[got : got + batch])
        if not n:
            break
        got += n
    return got


class _Near:
    """What to call once a body has `lead` bytes or fewer left to read."""

    def __init__(self, call: Callable[[], None], lead: int):
        self.call, self.lead = call, lead


class _Conn:
    """A kept-alive connection to one origin (scheme, host, port)."""

    def __init__(self, origin: tuple[str, str, int], http_conn: http.client.HTTPConnection):
        self.origin, self.http = origin, http_conn
        self.host = origin[1]
        self.lowat = 1  # the socket's SO_RCVLOWAT; 1 whenever no body is being read
        # Its socket, from before its connect (which a cut ends too). Not `http.sock`: http.client
        # forgets that as soon as a response says it ends the connection (Connection: close,
        # HTTP/1.0), whose body is then read from the very same socket, which must still be cut.
        self.sock: socket.socket | None = None

    def mark(self, lowat: int) -> None:
        if lowat != self.lowat and self.sock is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            self.lowat = lowat

    def cut(self) -> None:
        """From any thread: make a read blocked on the socket return now."""
        sock = self.sock
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def quiet(self) -> bool:
        """Nothing waits on the kept connection: no bytes beyond the last response (which the next
        request would take for its own answer) and no close from the server."""
        sock = self.sock
        if sock is None or sock.fileno() < 0 or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return False
        poll = select.poll()
        poll.register(sock, select.POLLIN)
        return not poll.poll(0)


class _Caller:
    """Whether the caller of a request still waits for its answer, and the connection it is
    asked on: a caller that leaves (a cancelled fill) cuts it, rather than let a thread wait
    out the read timeout for an answer nobody will read."""

    def __init__(self):
        self._lock = threading.Lock()
        self._conn: _Conn | None = None
        self._left = False

    def uses(self, conn: _Conn) -> None:
        """In the request's thread, before sending on `conn`; raises if the caller has left."""
        with self._lock:
            self._conn = conn
            if self._left:
                raise OSError("the request's caller has left")

    @property
    def left(self) -> bool:
        with self._lock:
            return self._left

    def leave(self) -> None:
        with self._lock:
            self._left = True
            if self._conn is not None:
                self._conn.cut()


class _FollowUp:
    """A request waiting for a connection whose body is being read to its end."""

    def __init__(self, target: str, headers: dict[str, str], caller: _Caller, timeout: float | None):
        self.target, self.headers, self.caller, self.timeout = target, headers, caller, timeout
        self.answer: Future = Future()  # (connection, response), as an ordinary request's
        self.after: Response | None = None  # the response whose connection it waits for (on the loop)


class Receiver:
    """Data requests of the upstreams and the peers: kept-alive connections per origin, threads to read them."""

    def __init__(
        self,
        threads: int,
        keep_buffers: int,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
        chained: Callable[[], None] = lambda: None,
    ):
        """`chained()` is called (in a thread) for each request sent as a follow-up."""
        self.threads = ThreadPoolExecutor(threads, thread_name_prefix="nodecache-receive")
        self.buffers = Buffers(keep_buffers)
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._lock = threading.Lock()  # the two below: taken in threads, given back on the loop
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._busy: set[_Conn] = set()  # cut at close, so no thread waits out its read timeout
        self._ending: dict[tuple[str, str, int], list[Response]] = {}  # last bytes being read, no follow-up yet
        self._tls = tls  # None: the system's trust store, made on first use
        self._chained = chained
        self._trim: asyncio.TimerHandle | None = None
        self._closed = False
        self._given_up = 0  # reads whose follow-up went out on its own (FOLLOW_WAIT), each a thread
        self._given_up_most = max(1, threads // 4)

    @asynccontextmanager
    async def get(
        self, url: str, headers: Mapping[str, str], timeout: float | None = None, follow: bool = False
    ) -> AsyncIterator[Response]:
        """A GET of `url` (no redirect followed); its connection is given back or closed on exit.
        `timeout`: its connect's and its reads' socket timeout instead of the receiver's (a peer's
        `peer_timeout`, which also bounds its whole fetch: an owner filling through may be silent
        longer than an upstream ever is). `follow`: it may be a follow-up (a fill's next run, a
        background chunk); never a request a reader waits for, which goes out at once rather than
        wait for another body's end (nor, by default, anything else: a peer's, an http source's)."""
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise UpstreamError(f"bad URL {shown_url(url)[:200]!r}: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"not an http(s) URL: {shown_url(url)[:200]!r}")
        origin = (parts.scheme, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if parts.username is not None and not any(k.lower() == "authorization" for k in headers):
            # As aiohttp does (it reads an http source's manifest): the URL's credentials as Basic auth.
            login = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            headers = {**headers, "Authorization": f"Basic {base64.b64encode(login).decode()}"}
        self.used()
        caller = _Caller()
        request = _FollowUp(target, dict(headers), caller, timeout)
        asked = self._follow(origin, request) if follow else None
        try:
            if asked is not None and not await self._sent_in_time(request):
                asked = None
            if asked is None:
                asked = self.submit(self._request, origin, target, request.headers, caller, timeout)
            conn, resp = await asyncio.wrap_future(asked)
        except asyncio.CancelledError:
            caller.leave()  # a follow-up not yet sent is then never sent (last_part)
            if asked is not None:
                asked.add_done_callback(self._orphaned)
            raise
        except _FAILURES as e:
            raise UpstreamError(f"{parts.hostname}: {e.__class__.__name__}: {e}") from None
        response = Response(self, conn, resp)
        try:
            if response.status not in (200, 206):
                await response.drain()
            yield response
        finally:
            response.close()

    def submit(self, fn, *args) -> Future:
        """`fn(*args)` in a thread; an UpstreamError once the receiver is closed (at stop)."""
        try:
            return self.threads.submit(fn, *args)
        except RuntimeError:  # the executor is shut down
            raise UpstreamError("the receiver is closed") from None

    def _follow(self, origin: tuple[str, str, int], request: _FollowUp) -> Future | None:
        """Make `request` the follow-up of a response of `origin` whose last bytes are being read;
        None if there is none (it is then asked as an ordinary request)."""
        with self._lock:
            ending = self._ending.get(origin)
            if not ending:
                return None
            response = ending.pop(0)
            if not ending:
                del self._ending[origin]
            response.follow_up, request.after = request, response
        return request.answer

    async def _sent_in_time(self, request: _FollowUp) -> bool:
        """Whether a follow-up's connection freed within FOLLOW_WAIT (it is then sent, or settled);
        else it is withdrawn, to be asked as an ordinary request."""
        answer = asyncio.wrap_future(request.answer)
        answer.add_done_callback(lambda f: f.cancelled() or f.exception())  # get() awaits its own: seen there
        try:
            done, _ = await asyncio.wait({answer}, timeout=FOLLOW_WAIT)  # (a timeout cancels nothing)
            if done:
                return True
            with self._lock:
                after = request.after
                if after is None or after.follow_up is not request:
                    return True  # its connection freed meanwhile: it is being sent
                if self._given_up >= self._given_up_most:
                    return True  # waits on: a connection of its own would need yet another thread
                after.follow_up, after._given_up = None, True
                self._given_up += 1
            request.answer.cancel()
            return False
        finally:
            request.after = None  # its response is not kept while the follow-up's own body streams

    def ending(
        self, response: Response, conn: _Conn, loop: asyncio.AbstractEventLoop, ending: Callable[[], None]
    ) -> None:
        """In the reading thread: the body's last bytes are being read on `conn`. The response can
        take a follow-up from now on, unless its connection ends with it; `ending` is called on the loop."""
        with self._lock:
            if self._closed or response._closing:
                return
            if not response._resp.will_close:  # (Connection: close, HTTP/1.0: nothing can follow it)
                self._ending.setdefault(conn.origin, []).append(response)
        with suppress(RuntimeError):  # the loop is closed: nobody asks any more
            loop.call_soon_threadsafe(ending)

    def last_part(self, response: Response, conn: _Conn, whole: bool) -> None:
        """In the reading thread, once the range's last part is read (`whole`: to the body's end on a
        connection that stays open) or failed: the connection goes on from here, to the follow-up
        asked meanwhile or back to the pool; a follow-up it cannot take is asked as usual."""
        with self._lock:
            whole = whole and not response._closing  # closed meanwhile: the loop cuts and closes it
            self._not_ending(response)
            follow, response.follow_up = response.follow_up, None
            response._gone = whole  # the close on the loop leaves the connection alone
            if response._given_up:
                response._given_up = False
                self._given_up -= 1
        if whole and not conn.quiet():
            self.discard(conn)  # bytes the next request would take for its answer, or a close
            whole = False
        if follow is None:
            if whole:
                self.put_back(conn)
            return
        if follow.answer.cancelled() or follow.caller.left:
            follow.answer.cancel()
            if whole:
                self.put_back(conn)
            return
        given = conn if whole else None
        try:
            job = self.submit(self._answer, conn.origin, follow, given)
        except UpstreamError:
            self._unsent(follow, given)
        else:  # cancelled unstarted by the close: its caller must not wait for it forever
            job.add_done_callback(lambda job: job.cancelled() and self._unsent(follow, given))

    def _unsent(self, follow: _FollowUp, conn: _Conn | None) -> None:
        """A follow-up the closed receiver will not send: its caller gets an error."""
        if conn is not None:
            self.discard(conn)
        if follow.answer.set_running_or_notify_cancel():
            follow.answer.set_exception(OSError("the receiver is closed"))

    def closing(self, response: Response) -> bool:
        """On the loop, as a response closes: whether its connection is still its own (not gone on
        from its reading thread); from now on it goes nowhere else."""
        with self._lock:
            response._closing = True
            self._not_ending(response)
            return not response._gone

    def _not_ending(self, response: Response) -> None:
        """(Under the lock.) The response takes no follow-up any more."""
        ending = self._ending.get(response._origin, [])
        if response in ending:
            ending.remove(response)
            if not ending:
                del self._ending[response._origin]

    def _answer(self, origin: tuple[str, str, int], follow: _FollowUp, conn: _Conn | None) -> None:
        """In a thread: a follow-up sent on `conn` (None: as an ordinary request), its answer set."""
        if not follow.answer.set_running_or_notify_cancel():  # its caller left before it was sent
            if conn is not None:
                self.put_back(conn)
            return
        if conn is not None:
            self._chained()
        try:
            follow.answer.set_result(
                self._request(origin, follow.target, follow.headers, follow.caller, follow.timeout, conn)
            )
        except BaseException as e:
            follow.answer.set_exception(e)

    def _orphaned(self, asked: Future) -> None:
        """A request whose caller was cancelled: close its connection once it is answered."""
        if not asked.cancelled() and asked.exception() is None:
            self.discard(asked.result()[0])

    def _request(
        self,
        origin: tuple[str, str, int],
        target: str,
        headers: dict[str, str],
        caller: _Caller,
        timeout: float | None,
        conn: _Conn | None = None,
    ):
        """In a thread: send the request on `conn` or a kept connection (once more on a new one if
        the server had closed it meanwhile) and read the status and headers, unless the caller left."""
        if conn is None:
            conn = self._take(origin)
        fresh = conn is None
        while True:
            if conn is None:
                conn = self._connect(origin, caller, timeout or self.connect_timeout)
            try:
                caller.uses(conn)
                if conn.sock is not None:
                    conn.sock.settimeout(timeout or self.read_timeout)  # for this request's answer
                conn.http.request("GET", target, headers=headers)
                return conn, conn.http.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.discard(conn)
                if fresh:
                    raise
                conn, fresh = None, True  # the kept connection had been closed by the server
            except BaseException:
                self.discard(conn)
                raise

    def _connect(self, origin: tuple[str, str, int], caller: _Caller, timeout: float) -> _Conn:
        scheme, host, port = origin
        if scheme == "https":
            with self._lock:
                if self._tls is None:
                    self._tls = ssl.create_default_context()
            raw = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls)
        else:
            raw = http.client.HTTPConnection(host, port, timeout=timeout)
        conn = _Conn(origin, raw)
        raw._create_connection = lambda address, timeout, _source: self._open(conn, caller, address, timeout)
        with self._lock:
            if self._closed:
                raise OSError("the receiver is closed")
            self._busy.add(conn)
        try:
            raw.connect()  # its TLS handshake is not cut (the socket is wrapped): looked at once made
            with self._lock:
                conn.sock = raw.sock
                if self._closed:
                    raise OSError("the receiver is closed")
        except BaseException:
            self.discard(conn)
            raise
        return conn

    def _open(self, conn: _Conn, caller: _Caller, address: tuple[str, int], timeout: float) -> socket.socket:
        """http.client's `socket.create_connection`, but each socket is known to `conn` before it
        connects, so a caller that leaves (a peer's `peer_timeout`, a cancelled fill) or the close
        cuts the connect too (a shutdown ends it at once), rather than let a thread wait out the
        connect timeout of an address that drops its SYNs (a node gone)."""
        host, port = address
        error: OSError = OSError(f"no address for {host}")
        for family, kind, proto, _, addr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            try:
                with self._lock:
                    conn.sock = sock
                    if self._closed:
                        raise OSError("the receiver is closed")
                caller.uses(conn)
                sock.settimeout(timeout)
                sock.connect(addr)
                caller.uses(conn)  # a cut just before the connect began did not end it
                return sock
            except OSError as e:
                sock.close()
                error = e
                if caller.left or self._closed:
                    break
            except BaseException:
                sock.close()
                raise
        raise error

    def _take(self, origin: tuple[str, str, int]) -> _Conn | None:
        """A kept connection to `origin` with nothing waiting on it; the others are closed."""
        stale, conn = [], None
        with self._lock:
            idle = self._idle.get(origin, [])
            while idle and conn is None:
                conn = idle.pop()
                if not conn.quiet():
                    stale.append(conn)
                    conn = None
            if conn is not None:
                self._busy.add(conn)
        for old in stale:
            old.http.close()
        return conn

    def put_back(self, conn: _Conn) -> None:
        with self._lock:
            self._busy.discard(conn)
            if not self._closed:
                self._idle.setdefault(conn.origin, []).append(conn)
                return
        conn.http.close()

    def discard(self, conn: _Conn) -> None:
        with self._lock:
            self._busy.discard(conn)
        conn.http.close()

    def used(self) -> None:
        """A request or part is on its way: keep the buffers until the receiver has been idle a while."""
        if self._trim is not None:
            self._trim.cancel()
        self._trim = asyncio.get_running_loop().call_later(_IDLE, self._idle_out)

    def _idle_out(self) -> None:
        """Nothing asked for a while: trim the buffers, and close the kept connections (their servers
        time them out; kept, each would stay an fd in CLOSE_WAIT until its origin is asked again)."""
        self.buffers.trim()
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.http.close()

    async def close(self) -> None:
        """Cut every read in progress and close every connection: no thread waits out a timeout."""
        if self._trim is not None:
            self._trim.cancel()
        self.buffers.close()
        with self._lock:
            self._closed = True
            self._ending.clear()
            idle, self._idle = self._idle, {}
            busy = list(self._busy)
        for conn in busy:
            conn.cut()
        for conns in idle.values():
            for conn in conns:
                conn.http.close()
        self.threads.shutdown(wait=False, cancel_futures=True)
