"""Range bodies received in threads (upstream/receive.py): exact parts, kept connections,
hostile answers, cancellation, buffers reused only when free, and TLS that is verified."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import ipaddress
import mmap
import os
import re
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from conftest import MiB, full_listener

from nodecache.upstream import UpstreamError
from nodecache.upstream.receive import Buffers, Receiver


def _receiver(**kw) -> Receiver:
    return Receiver(threads=4, keep_buffers=4, **kw)


async def _get(rx: Receiver, url: str, start: int, end: int, piece: int) -> tuple[int, list[bytes]]:
    async with rx.get(url, {"Range": f"bytes={start}-{end - 1}"}, follow=True) as resp:
        return resp.status, [bytes(p[0]) async for p in resp.parts(start, end, piece)]


class Server:
    """A bare HTTP/1.1 server on 127.0.0.1 whose answers a test writes itself: `answer(head,
    reader, writer)` per request; counts connections."""

    def __init__(self, answer):
        self.answer, self.connections = answer, 0

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/blob"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not await self.answer(head, reader, writer):
                    break
        writer.close()


@contextlib.asynccontextmanager
async def serving(answer, **receiver):
    """A Server answering with `answer` and a Receiver to ask it (4 threads, 4 buffers unless
    told otherwise), closed on the way out."""
    async with Server(answer) as srv:
        rx = Receiver(**{"threads": 4, "keep_buffers": 4, **receiver})
        try:
            yield srv, rx
        finally:
            await rx.close()


def _range_of(head: bytes) -> tuple[int, int]:
    line = next(x for x in head.decode().split("\r\n") if x.lower().startswith("range:"))
    a, b = line.split("=", 1)[1].split("-")
    return int(a), int(b) + 1


def _partial(body: bytes, a: int, b: int, content_range: str | None = None) -> bytes:
    cr = content_range or f"bytes {a}-{b - 1}/{len(body)}"
    return f"HTTP/1.1 206 Partial Content\r\nContent-Length: {b - a}\r\nContent-Range: {cr}\r\n\r\n".encode()


def _serves(body: bytes):
    """An answer that sends the range asked of `body`, keeping the connection."""

    async def answer(head, reader, writer) -> bool:
        a, b = _range_of(head)
        writer.write(_partial(body, a, b) + body[a:b])
        await writer.drain()
        return True

    return answer


def test_parts_are_exact_and_the_connection_is_kept():
    want = bytes(range(256)) * (32 * 1024)  # 8 MiB

    answer = _serves(want)

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            status, parts = await _get(rx, srv.url, 3 * MiB, 7 * MiB - 5, MiB)  # the last part is short
            assert status == 206
            assert [len(p) for p in parts] == [MiB, MiB, MiB, MiB - 5]
            assert b"".join(parts) == want[3 * MiB : 7 * MiB - 5]
            assert sum(map(len, rx._idle.values())) == 1, "a body read to its end leaves its connection kept"
            _, again = await _get(rx, srv.url, 0, MiB, MiB)
            assert again == [want[:MiB]]
            assert srv.connections == 1, "the kept connection served the second request"

    asyncio.run(main())


def test_a_server_ignoring_range_is_read_only_up_to_the_end_of_the_range():
    body = bytes(range(256)) * 4096  # 1 MiB

    async def answer(head, reader, writer) -> bool:
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        return True

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            status, parts = await _get(rx, srv.url, 1000, 300_000, 100_000)
            assert status == 200 and b"".join(parts) == body[1000:300_000]
            assert [len(p) for p in parts] == [100_000, 100_000, 99_000]
            assert not any(rx._idle.values()), "a body left half read is never reused"

    asyncio.run(main())


def test_a_wrong_content_range_and_a_truncated_body_are_upstream_errors():
    body = b"x" * 200_000

    async def answer(head, reader, writer) -> bool:
        a, b = _range_of(head)
        if a == 0:  # claims another range than the one asked
            writer.write(_partial(body, a, b, f"bytes 1-{b}/{len(body)}") + body[a:b])
            await writer.drain()
            return True
        writer.write(_partial(body, a, b) + body[a : a + (b - a) // 2])  # half, then the connection closes
        await writer.drain()
        return False

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            with pytest.raises(UpstreamError, match="wrong Content-Range"):
                await _get(rx, srv.url, 0, 100_000, 50_000)
            got: list[bytes] = []
            with pytest.raises(UpstreamError, match="truncated body"):
                async with rx.get(srv.url, {"Range": "bytes=10-100009"}) as resp:
                    async for p in resp.parts(10, 100_010, 25_000):
                        got.append(bytes(p[0]))
            assert got == [body[10:25_010], body[25_010:50_010]], "the parts before the cut are good"
            assert not any(rx._idle.values())

    asyncio.run(main())


def test_a_kept_connection_the_server_closed_is_replaced_once():
    body = b"y" * 10_000

    async def answer(head, reader, writer) -> bool:
        a, b = _range_of(head)
        writer.write(_partial(body, a, b) + body[a:b])
        await writer.drain()
        return False  # closes every connection after one answer, without saying so

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            for _ in range(3):
                assert (await _get(rx, srv.url, 0, 10_000, 10_000))[1] == [body]
                await asyncio.sleep(0.05)  # the server's close reaches the client
            assert srv.connections == 3

    asyncio.run(main())


def test_a_cancelled_read_is_cut_off_and_its_buffer_is_not_handed_out_meanwhile():
    """A part waiting for a stalled server: cancelling it returns at once (the socket is cut, no
    thread waits out the read timeout), the connection is dropped, and the buffer the thread was
    reading into is given to nobody else until that thread is done with it."""

    async def answer(head, reader, writer) -> bool:
        a, b = _range_of(head)
        writer.write(_partial(b"z" * b, a, b) + b"z" * 1000)  # then nothing more
        await writer.drain()
        await asyncio.sleep(30)
        return False

    async def main() -> None:
        async with serving(answer, threads=2, keep_buffers=1, read_timeout=25.0) as (srv, rx):
            task = asyncio.create_task(_get(rx, srv.url, 0, 100_000, 100_000))
            while not any(t.name.startswith("nodecache-receive") and t.is_alive() for t in threading.enumerate()):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the part's read is blocked in its thread
            busy = id(rx.buffers._kept[0])  # an id: a reference of the test's own would keep it busy
            assert id(rx.buffers.take(10)) != busy, "a buffer a thread reads into is not handed out"
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            while rx._busy:  # the thread saw the cut and closed the connection
                assert time.monotonic() - t0 < 5, "the blocked read was not cut off"
                await asyncio.sleep(0.01)
            assert not any(rx._idle.values())
            gc.collect()
            assert id(rx.buffers.take(10)) == busy, "free again once the thread let go of it"

    asyncio.run(main())


def test_buffers_are_reused_only_when_nobody_holds_them():
    """Compared by id: a reference of the test's own would count as a holder."""
    pool = Buffers(keep=2)
    a = pool.take(5000)
    assert len(a) == 8192 and len(pool) == 1
    first = id(a)
    view = memoryview(a)[:100]
    del a
    b = pool.take(100)
    assert id(b) != first, "a live view keeps the buffer its holder's"
    second = id(b)
    del b
    view.release()
    assert id(pool.take(100)) == first
    held = [pool.take(100), pool.take(100)]
    assert {id(x) for x in held} == {first, second}, "both free: both handed out again"
    extra = pool.take(100)
    assert id(extra) not in (first, second) and len(pool) == 2, "past `keep`, a buffer of its own, not kept"
    big = pool.take(9000)
    assert len(big) >= 9000
    del held, extra, big
    pool.close()
    assert len(pool) == 0


def _lazy_free_kb(buf: mmap.mmap) -> int:
    """LazyFree of the mapping that holds `buf`, from /proc/self/smaps."""
    import ctypes

    at = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= at < hi
        elif inside and head == "LazyFree:":
            return int(line.split()[1])
    raise AssertionError("buffer not mapped")


def test_trim_gives_idle_buffers_back_lazily_and_keeps_them():
    """After a fill, idle buffers stay in the pool with their pages given back lazily (MADV_FREE:
    the kernel takes them under pressure, the next fill reuses them without a fault if not);
    a buffer still held is dropped from the pool, unmapped with its last holder."""
    pool = Buffers(keep=2)
    idle = pool.take(MiB)
    idle[:] = b"x" * len(idle)  # touched: resident
    busy = pool.take(MiB)
    first = id(idle)
    view = memoryview(busy)
    del idle
    pool.trim()
    assert len(pool) == 1, "the idle buffer is kept, the busy one is not"
    again = pool.take(MiB)
    assert id(again) == first
    assert _lazy_free_kb(again) > MiB // 1024 // 2, "its pages were given back lazily"
    view.release()
    pool.close()
    assert len(pool) == 0


def test_trim_never_takes_the_pages_of_a_buffer_someone_holds(monkeypatch):
    """The worst reclaim at every trim (MADV_DONTNEED: the pages read as zeros at once), run after
    each part while other streams' threads read into their buffers and held parts wait for their
    writes: every part keeps its bytes, and a reused buffer is written before it is read."""
    from nodecache.upstream import receive

    monkeypatch.setattr(receive, "_FREE", mmap.MADV_DONTNEED)
    want = os.urandom(12 * MiB)

    async def stream(rx: Receiver, url: str, a: int, held: list) -> None:
        async with rx.get(url, {"Range": f"bytes={a}-{a + 8 * MiB - 1}"}) as resp:
            async for parts in resp.parts(a, a + 8 * MiB, MiB):
                rx.buffers.trim()
                held.append((a, parts))
                a += MiB
                await asyncio.sleep(0)
                if len(held) > 6:  # a write ends: its part is let go
                    at, gone = held.pop(0)
                    assert bytes(gone[0]) == want[at : at + MiB], f"the part at {at} changed while held"

    async def main() -> None:
        async with serving(_serves(want), threads=8, keep_buffers=6) as (srv, rx):
            for round_ in range(10):
                held: list = []
                await asyncio.gather(*(stream(rx, srv.url, (round_ + i) % 4 * MiB, held) for i in range(4)))
                assert all(bytes(parts[0]) == want[at : at + MiB] for at, parts in held)

    asyncio.run(main())


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_is_verified_and_served(tmp_path):
    """An https upstream with a certificate nobody vouches for is refused; trusted, its bytes
    arrive over TLS in parts like any other."""
    cert, key = _self_signed(tmp_path)
    body = bytes(range(256)) * 1024

    answer = _serves(body)

    async def main() -> None:
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(cert, key)
        srv = Server(answer)
        srv.server = await asyncio.start_server(srv._serve, "127.0.0.1", 0, ssl=server_tls)
        url = f"https://127.0.0.1:{srv.server.sockets[0].getsockname()[1]}/blob"
        try:
            rx = _receiver()
            try:
                with pytest.raises(UpstreamError, match="CERTIFICATE_VERIFY_FAILED"):
                    await _get(rx, url, 0, 1000, 1000)
            finally:
                await rx.close()
            trusting = ssl.create_default_context(cafile=str(cert))
            rx = _receiver(tls=trusting)
            try:
                status, parts = await _get(rx, url, 100, len(body), 64 * 1024)
                assert status == 206 and b"".join(parts) == body[100:]
                made = srv.connections
                assert (await _get(rx, url, 0, 1000, 1000))[1] == [body[:1000]]
                assert srv.connections == made, "the kept TLS connection served the next request"
            finally:
                await rx.close()
        finally:
            srv.server.close()

    asyncio.run(main())


def test_only_http_urls_are_fetched():
    async def main() -> None:
        rx = _receiver()
        try:
            for url in ("file:///etc/passwd", "ftp://127.0.0.1/x", "http:///nohost", "http://127.0.0.1:99999/x"):
                with pytest.raises(UpstreamError):
                    await _get(rx, url, 0, 10, 10)
            # Refused, the URL is named without its user and password.
            for url in (
                "ftp://user:s3cret@127.0.0.1/x",
                "http://user:s3cret@127.0.0.1:99999/x",
                "http://user:s3cret@/x",
            ):
                with pytest.raises(UpstreamError) as e:
                    await _get(rx, url, 0, 10, 10)
                assert "://***@" in str(e.value) and "s3cret" not in str(e.value), str(e.value)
        finally:
            await rx.close()

    asyncio.run(main())


def test_close_cuts_reads_in_progress():
    async def answer(head, reader, writer) -> bool:
        a, b = _range_of(head)
        writer.write(_partial(b"q" * b, a, b))
        await writer.drain()
        await asyncio.sleep(30)
        return False

    async def main() -> None:
        async with Server(answer) as srv:
            rx = Receiver(threads=2, keep_buffers=1, read_timeout=25.0)
            task = asyncio.create_task(_get(rx, srv.url, 0, 1000, 1000))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            await rx.close()
            with pytest.raises(UpstreamError):
                await task
            assert time.monotonic() - t0 < 5

    asyncio.run(main())


def test_a_buffer_is_page_aligned_for_direct_writes():
    from nodecache import directio

    pool = Buffers(keep=1)
    buf = pool.take(3 * 4096 + 1)
    assert isinstance(buf, mmap.mmap) and directio.aligned(memoryview(buf)[: 3 * 4096 + 1])


def test_a_paced_body_is_read_once_per_lowat_and_its_end_is_never_waited_for():
    """A throttled stream delivers a few KiB per packet; the thread reads the socket once per
    LOWAT bytes instead (SO_RCVLOWAT), gets exactly its bytes, and the kept connection is back
    at a mark of 1 for the next response (which would otherwise wait for bytes that never come)."""
    import socket

    from nodecache.upstream.receive import LOWAT

    body = os.urandom(8 * MiB + 12345)
    segment = 4096

    async def answer(head, reader, writer) -> bool:
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a, b = _range_of(head)
        writer.write(_partial(body, a, b))
        for i in range(a, b, segment):  # one small segment per loop turn, as a paced sender
            writer.write(body[i : min(b, i + segment)])
            await writer.drain()
            await asyncio.sleep(0)
        return True

    reads = 0
    original = socket.SocketIO.readinto

    def counting(self, b):
        nonlocal reads
        reads += 1
        return original(self, b)

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            _, parts = await _get(rx, srv.url, 0, len(body), 3 * MiB)
            assert b"".join(parts) == body
            (conn,) = rx._idle[("http", "127.0.0.1", int(srv.url.split(":")[2].split("/")[0]))]
            assert conn.http.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
            _, again = await asyncio.wait_for(_get(rx, srv.url, 100, 200_000, 50_000), 10)
            assert b"".join(again) == body[100:200_000]
            assert srv.connections == 1

    socket.SocketIO.readinto = counting
    try:
        asyncio.run(main())
    finally:
        socket.SocketIO.readinto = original
    # ~2,050 segments for the first body; batched: ~32 reads of LOWAT, the last 2 x LOWAT as they
    # come (<= 128 segments), plus the second body's (<= 49 segments) and the status lines.
    assert reads < len(body) // LOWAT + 2 * LOWAT // segment + 200_000 // segment + 40, reads


def test_the_http_upstream_follows_redirects_and_sends_its_auth_only_to_its_origin():
    import aiohttp

    from nodecache.metrics import Metrics
    from nodecache.upstream.http import HttpUpstream
    from nodecache.upstream.manifest import SourceFile

    body = os.urandom(300_000)
    heads: dict[str, list[bytes]] = {"origin": [], "cdn": []}

    async def cdn(head, reader, writer) -> bool:
        heads["cdn"].append(head)
        a, b = _range_of(head)
        writer.write(_partial(body, a, b) + body[a:b])
        await writer.drain()
        return True

    async def main() -> None:
        async with Server(cdn) as far:

            async def origin(head, reader, writer) -> bool:
                heads["origin"].append(head)
                writer.write(f"HTTP/1.1 302 Found\r\nLocation: {far.url}?sig=1\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
                return True

            async with Server(origin) as near, aiohttp.ClientSession() as session:
                rx = _receiver()
                up = HttpUpstream(near.url.rsplit("/", 1)[0], session, rx, Metrics(), auth_header="Bearer s3cret")
                try:
                    f = SourceFile("w.bin", "w.bin", len(body), "0" * 64, "sha256")
                    got = await up._read_range(f, 1000, 201_000)
                    assert bytes(got) == body[1000:201_000]
                finally:
                    await rx.close()

    asyncio.run(main())
    assert heads["origin"] and b"authorization: bearer s3cret" in heads["origin"][0].lower()
    assert heads["cdn"] and b"authorization" not in heads["cdn"][0].lower(), "the token never leaves its origin"
    assert b"GET /blob?sig=1 " in heads["cdn"][0]


@pytest.mark.parametrize("status_line", ["HTTP/1.1 206 Partial Content\r\nConnection: close", "HTTP/1.0 206 Partial"])
def test_a_read_on_a_connection_the_server_will_close_is_cut_too(status_line):
    """http.client hands a response that ends its connection (`Connection: close`, HTTP/1.0) the
    socket and forgets it: the cut must still reach that socket, at a cancel and at close,
    or the thread waits out the read timeout (and a daemon's exit waits for the thread)."""

    async def answer(head, reader, writer) -> bool:
        a, b = _range_of(head)
        writer.write(
            f"{status_line}\r\nContent-Length: {b - a}\r\nContent-Range: bytes {a}-{b - 1}/{b}\r\n\r\n".encode()
        )
        writer.write(b"c" * 1000)  # then nothing more
        await writer.drain()
        await asyncio.sleep(30)
        return False

    async def main() -> None:
        async with serving(answer, threads=2, keep_buffers=1, read_timeout=25.0) as (srv, rx):
            for stop in ("cancel", "close"):
                task = asyncio.create_task(_get(rx, srv.url, 0, 100_000, 100_000))
                while not rx._busy:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)  # the part's read is blocked in its thread
                t0 = time.monotonic()
                if stop == "cancel":
                    task.cancel()
                else:
                    await rx.close()
                with pytest.raises((asyncio.CancelledError, UpstreamError)):
                    await task
                while rx._busy:  # the thread saw the cut and closed the connection
                    assert time.monotonic() - t0 < 5, f"the blocked read was not cut off at {stop}"
                    await asyncio.sleep(0.01)

    asyncio.run(main())


def test_bytes_left_on_a_kept_connection_never_answer_the_next_request():
    """A server that sends more than the body it announced (a bug, a proxy's stray bytes, an
    early 1xx with the real answer behind it): whatever waits on the connection once a response
    is read is not the answer to the next request sent on it. Such a connection is not reused."""
    body = bytes(range(256)) * 1024
    read, stray = asyncio.Event(), asyncio.Event()

    async def answer(head, reader, writer) -> bool:
        a, b = _range_of(head)
        writer.write(_partial(body, a, b) + body[a:b])
        await writer.drain()
        if a == 0:  # a whole forged answer to the range asked next, after the body
            await read.wait()  # once the client has read the first answer: left on its socket
            writer.write(_partial(body, 1000, 2000) + b"F" * 1000)
            await writer.drain()
            stray.set()
        return True

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            assert (await _get(rx, srv.url, 0, 1000, 1000))[1] == [body[:1000]]
            read.set()
            await stray.wait()  # written to the loopback: in the client's socket now
            _, parts = await _get(rx, srv.url, 1000, 2000, 1000)
            assert parts == [body[1000:2000]], "the forged answer was taken for the next request's"
            assert srv.connections == 2

    asyncio.run(main())


def test_a_body_announced_longer_than_its_range_is_read_without_waiting_for_more():
    """A 206 whose Content-Range is right but whose Content-Length claims more: the range's bytes
    are all there, so they are read at once (SO_RCVLOWAT counts on the bytes still wanted, not on
    the length announced) and the connection, whose body is not done, is dropped."""
    body = bytes(range(256)) * 8192  # 2 MiB

    async def answer(head, reader, writer) -> bool:
        a, b = _range_of(head)
        cr = f"bytes {a}-{b - 1}/{len(body)}"
        writer.write(
            f"HTTP/1.1 206 Partial\r\nContent-Length: {b - a + 64 * MiB}\r\nContent-Range: {cr}\r\n\r\n".encode()
        )
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for at in range(a, b, 4096):  # paced, in small segments as a CDN sends; no more than the range
            writer.write(body[at : min(at + 4096, b)])
            await writer.drain()
            await asyncio.sleep(0)
        await asyncio.sleep(30)
        return False

    async def main() -> None:
        async with serving(answer, threads=2, keep_buffers=2, read_timeout=25.0) as (srv, rx):
            t0 = time.monotonic()
            status, parts = await _get(rx, srv.url, 0, len(body), MiB)
            assert b"".join(parts) == body
            assert time.monotonic() - t0 < 5, "waited for bytes the range does not need"
            assert not any(rx._idle.values())

    asyncio.run(main())


async def _cancelled_and_cut(task: asyncio.Task, rx: Receiver, what: str) -> None:
    """Cancel the request's task; its thread must be let go (its socket cut) within 5 s."""
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    while rx._busy:
        assert time.monotonic() - t0 < 5, what
        await asyncio.sleep(0.01)


def test_a_request_cancelled_before_its_answer_is_cut_off():
    """A server that takes the request and never answers: the caller going away (a cancelled
    fill) cuts the connection at once, so the thread does not wait out the read timeout (with
    the pool's few threads all waiting so, every other fill would queue behind them)."""

    async def answer(head, reader, writer) -> bool:
        await asyncio.sleep(30)
        return False

    async def main() -> None:
        async with serving(answer, threads=2, keep_buffers=1, read_timeout=25.0) as (srv, rx):
            task = asyncio.create_task(_get(rx, srv.url, 0, 1000, 1000))
            while srv.connections == 0 or not rx._busy:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the thread waits for the status line
            await _cancelled_and_cut(task, rx, "the request waiting for its answer was not cut off")

    asyncio.run(main())


def test_a_request_cancelled_in_its_connect_is_cut_off():
    """An address that drops SYNs (a node gone; here a listener whose accept queue is full): the
    caller going away cuts the connect at once, so the thread does not wait out the connect
    timeout."""

    async def main(port: int) -> None:
        rx = Receiver(threads=2, keep_buffers=1, connect_timeout=20.0, read_timeout=25.0)
        try:
            task = asyncio.create_task(_get(rx, f"http://127.0.0.1:{port}/blob", 0, 1000, 1000))
            while not rx._busy:  # the thread is in its connect
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            await _cancelled_and_cut(task, rx, "the connect was not cut off")
        finally:
            await rx.close()

    with full_listener() as (_, port):
        asyncio.run(main(port))


def test_a_read_after_close_is_an_upstream_error():
    """The daemon closes its receiver at stop; a request or a part asked for after that (a fill
    that outlived the stop) gets an UpstreamError, never the executor's RuntimeError."""
    body = b"r" * 3000

    answer = _serves(body)

    async def main() -> None:
        async with Server(answer) as srv:
            rx = _receiver()
            async with rx.get(srv.url, {"Range": "bytes=0-2999"}) as resp:
                parts = resp.parts(0, 3000, 1000)
                assert bytes((await anext(parts))[0]) == body[:1000]
                await rx.close()
                with pytest.raises(UpstreamError):
                    await anext(parts)
            with pytest.raises(UpstreamError):
                await _get(rx, srv.url, 0, 1000, 1000)

    asyncio.run(main())


def test_a_connection_made_after_close_is_not_used():
    """A connect under way when the receiver closes ends the request (cut, or at the latest once it
    is made), rather than send it and wait out the read timeout for an answer. The connect is
    held by a listener whose accept queue is full."""

    async def main(listener: socket.socket, port: int) -> None:
        rx = Receiver(threads=2, keep_buffers=1, connect_timeout=20.0, read_timeout=25.0)
        task = asyncio.create_task(_get(rx, f"http://127.0.0.1:{port}/blob", 0, 1000, 1000))
        while not rx._busy:  # the thread is in its connect
            await asyncio.sleep(0.01)
        await rx.close()
        t0 = time.monotonic()
        accepted: list[socket.socket] = []

        def accept() -> None:  # room in the queue: the connect's next SYN is answered
            listener.settimeout(0.2)
            while not task.done():
                with contextlib.suppress(TimeoutError):
                    accepted.append(listener.accept()[0])

        acceptor = threading.Thread(target=accept)
        acceptor.start()
        try:
            with pytest.raises(UpstreamError):
                await asyncio.wait_for(task, 30)
            assert time.monotonic() - t0 < 8, "the request was sent on a connection made after close"
        finally:
            await asyncio.to_thread(acceptor.join)
            for s in accepted:
                s.close()

    with full_listener() as (listener, port):
        asyncio.run(main(listener, port))


def test_credentials_in_the_url_are_sent_as_basic_auth():
    """An http source given as `http://user:pass@host/base`: aiohttp (which reads its manifest)
    sends the URL's credentials as Basic auth, so its chunks must carry them too."""
    body = b"s" * 4000
    seen = []

    async def answer(head, reader, writer) -> bool:
        a, b = _range_of(head)
        auth = [x for x in head.decode().split("\r\n") if x.lower().startswith("authorization:")]
        seen.append(auth)
        if auth != ["Authorization: Basic dXNlcjpwQHNz"]:  # user:p@ss
            writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        else:
            writer.write(_partial(body, a, b) + body[a:b])
        await writer.drain()
        return True

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            url = srv.url.replace("http://", "http://user:p%40ss@")
            assert await _get(rx, url, 0, 1000, 1000) == (206, [body[:1000]])
            async with rx.get(url, {"Range": "bytes=0-9", "Authorization": "Bearer x"}):
                pass  # an Authorization header of the caller's own wins
            assert seen[-1] == ["Authorization: Bearer x"]

    asyncio.run(main())


def test_kept_connections_are_closed_with_the_buffers_once_idle(monkeypatch):
    """A kept connection nobody asks anything of (the fill is over, the server has most likely
    timed it out and closed its end) is closed when the idle buffers are trimmed, not kept open
    in CLOSE_WAIT until the next request to that origin, which may never come."""
    from nodecache.upstream import receive

    monkeypatch.setattr(receive, "_IDLE", 0.2)
    body = b"i" * 1000
    closed = asyncio.Event()

    async def answer(head, reader, writer) -> bool:
        writer.write(_partial(body, 0, 1000) + body)
        await writer.drain()
        if not await reader.read(1):  # the client closed its end
            closed.set()
        return False

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            assert (await _get(rx, srv.url, 0, 1000, 1000))[1] == [body]
            assert any(rx._idle.values())
            await asyncio.wait_for(closed.wait(), 10)
            assert not any(rx._idle.values())

    asyncio.run(main())


def _holds_the_end(
    body: bytes,
    release: asyncio.Event,
    after: bytes = b"",
    end: bool = False,
    holds=lambda head, n: n == 1,
):
    """An answer that sends a range `holds(head, n)` picks (n: the how-manyth request; by default
    the first) all but its last 100 bytes, then waits for `release` and sends them (followed by
    `after`; `end`: closes the connection instead); other ranges whole. Logs each range asked."""
    asked: list[tuple[int, int]] = []

    async def answer(head, reader, writer) -> bool:
        a, b = _range_of(head)
        asked.append((a, b))
        if not holds(head, len(asked)):
            writer.write(_partial(body, a, b) + body[a:b])
            await writer.drain()
            return True
        writer.write(_partial(body, a, b) + body[a : b - 100])
        await writer.drain()
        await release.wait()
        if end:
            return False
        writer.write(body[b - 100 : b] + after)
        await writer.drain()
        return True

    answer.asked = asked
    return answer


_BODY = os.urandom(2 * MiB)  # what the follow-up tests' server serves


def _held_end(**kw):
    """(body, release, answer): `_holds_the_end` of _BODY with a release of its own."""
    release = asyncio.Event()
    return _BODY, release, _holds_the_end(_BODY, release, **kw)


async def _cancelled(task: asyncio.Future) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _registered(resp) -> None:
    """Until a follow-up is registered on `resp` (at the follow-up's first step), within 10 s."""
    t0 = time.monotonic()
    while resp.follow_up is None:
        assert time.monotonic() - t0 < 10, "the request was not made the response's follow-up"
        await asyncio.sleep(0.001)


@contextlib.asynccontextmanager
async def _ending_first(rx: Receiver, srv: Server):
    """Read [0, 1 MiB) as one part until its end is on its way (`ending`). Yields (the response,
    its part's task), which the caller awaits or cancels."""
    ending = asyncio.Event()
    async with rx.get(srv.url, {"Range": f"bytes=0-{MiB - 1}"}) as resp:
        parts = resp.parts(0, MiB, MiB, ending.set)
        first = asyncio.ensure_future(anext(parts))
        await asyncio.wait_for(ending.wait(), 10)
        try:
            yield resp, first
        finally:
            await parts.aclose()


@contextlib.asynccontextmanager
async def _follow_up_waiting(rx: Receiver, srv: Server):
    """`_ending_first`, then [1 MiB, 2 MiB) asked and waited for until it is that response's
    follow-up. Yields (the first part's task, the follow-up's task)."""
    async with _ending_first(rx, srv) as (resp, first):
        follow = asyncio.ensure_future(_get(rx, srv.url, MiB, 2 * MiB, MiB))
        await _registered(resp)
        yield first, follow


async def _first_then_follow_up(rx: Receiver, srv: Server, body: bytes, release: asyncio.Event):
    """A follow-up waiting, then the first body's end released. Returns (the first's part or its
    error, the follow-up's task)."""
    async with _follow_up_waiting(rx, srv) as (first, follow):
        release.set()
        try:
            got = bytes((await first)[0])
        except UpstreamError as e:
            got = e
    return got, follow


def test_a_request_asked_while_a_body_ends_goes_out_on_its_connection():
    """The follow-up is sent on the connection the moment the body before it is read (no new
    connection, no wait for the loop to give it back), and both answers are exact."""
    body, release, answer = _held_end()
    chained = []

    async def main() -> None:
        async with serving(answer, chained=lambda: chained.append(1)) as (srv, rx):
            got, follow = await _first_then_follow_up(rx, srv, body, release)
            assert got == body[:MiB]
            assert (await follow) == (206, [body[MiB:]])
            assert answer.asked == [(0, MiB), (MiB, 2 * MiB)]
            assert srv.connections == 1 and chained == [1], "the follow-up went out on the same connection"
            assert sum(map(len, rx._idle.values())) == 1, "then the connection went back to the pool"

    asyncio.run(main())


def test_a_follow_up_whose_connection_fails_is_asked_on_another():
    """The body before it breaks (the server closes the connection short of its end): the
    first read fails, the follow-up is asked as an ordinary request, on a new connection."""
    body, release, answer = _held_end(end=True)
    chained = []

    async def main() -> None:
        async with serving(answer, chained=lambda: chained.append(1)) as (srv, rx):
            got, follow = await _first_then_follow_up(rx, srv, body, release)
            assert isinstance(got, UpstreamError)
            assert (await follow) == (206, [body[MiB:]])
            assert srv.connections == 2 and chained == []

    asyncio.run(main())


def test_a_follow_up_is_not_sent_where_bytes_are_left_after_the_body():
    """Stray bytes behind the body (a forged answer to the range asked next, longer than any
    read-ahead buffer): the connection is not the follow-up's; it goes out on a new one and
    its answer is the server's, not the stray one."""
    forged = _partial(_BODY, MiB, 2 * MiB) + b"F" * MiB
    body, release, answer = _held_end(after=forged)
    chained = []

    async def main() -> None:
        async with serving(answer, chained=lambda: chained.append(1)) as (srv, rx):
            got, follow = await _first_then_follow_up(rx, srv, body, release)
            assert got == body[:MiB]
            assert (await follow) == (206, [body[MiB:]]), "the stray bytes were taken for the answer"
            assert srv.connections == 2 and chained == []

    asyncio.run(main())


def test_a_follow_up_whose_caller_left_is_never_sent():
    """The follow-up's caller is cancelled before the body ends: nothing is sent for it, and the
    connection, read to its end, goes back to the pool and serves the next request."""
    body, release, answer = _held_end()

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            async with _follow_up_waiting(rx, srv) as (first, follow):
                await _cancelled(follow)
                release.set()
                assert bytes((await first)[0]) == body[:MiB]
            assert answer.asked == [(0, MiB)], "a request was sent for a caller that had left"
            assert sum(map(len, rx._idle.values())) == 1
            assert (await _get(rx, srv.url, MiB, 2 * MiB, MiB)) == (206, [body[MiB:]])
            assert srv.connections == 1

    asyncio.run(main())


def test_a_follow_up_of_a_response_closed_early_is_asked_on_another_connection():
    """The caller of the first response leaves while its end is being read (a cancelled fill):
    that connection is cut and closed as before; its follow-up is asked as an ordinary request."""
    body, release, answer = _held_end()

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            async with _follow_up_waiting(rx, srv) as (first, follow):
                await _cancelled(first)
            assert (await asyncio.wait_for(follow, 10)) == (206, [body[MiB:]])
            assert srv.connections == 2
            release.set()

    asyncio.run(main())


def test_a_follow_up_waiting_at_close_ends_with_an_error():
    """The receiver closes (the daemon stops) while a follow-up waits for its connection: the
    body before it is cut, and the follow-up's caller gets an UpstreamError at once, rather
    than wait for an answer nobody will ask for."""
    body, release, answer = _held_end()

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            async with _follow_up_waiting(rx, srv) as (first, follow):
                await rx.close()
                with pytest.raises(UpstreamError):
                    await asyncio.wait_for(first, 10)
                with pytest.raises(UpstreamError):
                    await asyncio.wait_for(follow, 10)
            release.set()
            assert answer.asked == [(0, MiB)]

    asyncio.run(main())


def test_a_read_a_reader_waits_for_never_waits_for_a_fill_s_body_to_end():
    """A reader's chunk (a demand fetch of the Hub upstream) asked while a whole-blob fill's run
    has its last bytes on their way at the same origin goes out at once on a connection of its
    own: a reader never waits for a background fill to give a connection back (README,
    parallel_total), here for a body whose end the server holds back."""
    import aiohttp

    from nodecache.index.records import BlobRecord
    from nodecache.metrics import Metrics
    from nodecache.upstream.hf import HfUpstream

    body, release, answer = _held_end()
    rec = BlobRecord("a" * 64, len(body), "sha256", MiB, repo_id="org/r", commit="c" * 40, path="w.bin")

    async def main() -> None:
        async with serving(answer, read_timeout=20.0) as (srv, rx), aiohttp.ClientSession() as session:
            hf = HfUpstream(srv.url.removesuffix("/blob"), session, Metrics(), receiver=rx)
            ending = asyncio.Event()
            fill = hf.stream(rec, 0, MiB, MiB, ending.set)
            first = asyncio.ensure_future(anext(fill))
            await asyncio.wait_for(ending.wait(), 10)
            read = asyncio.ensure_future(hf.fetch(rec, MiB, 2 * MiB, background=False))
            done, _ = await asyncio.wait({read}, timeout=5)
            release.set()
            assert done, "the reader waited for the fill's body to end"
            assert bytes((await read)[0]) == body[MiB:]
            assert srv.connections == 2, "on a connection of its own"
            assert bytes((await first)[0]) == body[:MiB]
            await fill.aclose()

    asyncio.run(main())


def test_a_follow_up_whose_body_before_it_stalls_is_asked_on_another_connection():
    """The server holds the end of the body before a follow-up back (a stalled connection): the
    follow-up does not wait out that read's timeout (a reader may join the chunk it fetches), it
    is asked as an ordinary request soon, on a connection of its own; the stalled body still ends."""
    body, release, answer = _held_end()
    chained = []

    async def main() -> None:
        async with serving(answer, read_timeout=20.0, chained=lambda: chained.append(1)) as (srv, rx):
            async with _follow_up_waiting(rx, srv) as (first, follow):
                done, _ = await asyncio.wait({follow}, timeout=5)
                release.set()
                assert done, "the follow-up waited for the stalled body's end"
                assert (await follow) == (206, [body[MiB:]])
                assert srv.connections == 2 and chained == []
                assert bytes((await first)[0]) == body[:MiB]
            assert sum(map(len, rx._idle.values())) == 2, "both connections kept"

    asyncio.run(main())


@pytest.mark.parametrize("status_line", ["HTTP/1.1 206 Partial Content\r\nConnection: close", "HTTP/1.0 206 Partial"])
def test_a_body_whose_connection_will_close_takes_no_follow_up(status_line, monkeypatch):
    """A response that ends its connection (`Connection: close`, HTTP/1.0) can never pass it on:
    a request asked while its last bytes are read goes out at once on another connection,
    rather than wait for that body's end (up to FOLLOW_WAIT) to be asked there anyway."""
    from nodecache.upstream import receive

    monkeypatch.setattr(receive, "FOLLOW_WAIT", 60.0)  # a wait would show as one
    body = os.urandom(2 * MiB)
    release = asyncio.Event()
    asked = []

    async def answer(head, reader, writer) -> bool:
        a, b = _range_of(head)
        asked.append(a)
        if len(asked) > 1:
            writer.write(_partial(body, a, b) + body[a:b])
            await writer.drain()
            return True
        head = f"{status_line}\r\nContent-Length: {b - a}\r\nContent-Range: bytes {a}-{b - 1}/{len(body)}\r\n\r\n"
        writer.write(head.encode() + body[a : b - 100])
        await writer.drain()
        await release.wait()
        writer.write(body[b - 100 : b])
        await writer.drain()
        return False

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            ending = asyncio.Event()
            async with rx.get(srv.url, {"Range": f"bytes=0-{MiB - 1}"}) as resp:
                parts = resp.parts(0, MiB, MiB, ending.set)
                first = asyncio.ensure_future(anext(parts))
                await asyncio.wait_for(ending.wait(), 10)
                follow = asyncio.ensure_future(_get(rx, srv.url, MiB, 2 * MiB, MiB))
                done, _ = await asyncio.wait({follow}, timeout=10)
                release.set()
                assert done, "the request waited for a body whose connection closes after it"
                assert (await follow) == (206, [body[MiB:]])
                assert bytes((await first)[0]) == body[:MiB]
                await parts.aclose()
            assert srv.connections == 2

    asyncio.run(main())


def test_follow_ups_given_up_on_never_take_every_thread(monkeypatch):
    """Fills that give their slot back as their last bytes come (blobfill) from a server that
    stalls those bytes: each follow-up given up on goes out on a connection of its own while the
    stalled read keeps its thread. They must not pile up until every thread waits on a stalled
    read: a reader's request (a slot of the readers' reserve) would wait for a thread until one
    times out, where it used to go out at once."""
    from nodecache.upstream import receive

    monkeypatch.setattr(receive, "FOLLOW_WAIT", 0.05)
    body = os.urandom(2 * MiB)
    stalled = asyncio.Event()  # set at the end: the held bodies end
    answer = _holds_the_end(body, stalled, end=True, holds=lambda head, n: b"x-reader" not in head.lower())

    async def main() -> None:
        async with serving(answer, threads=8, read_timeout=20.0) as (srv, rx):
            slots = asyncio.Semaphore(3)  # 4 fetch slots, one the readers' reserve

            async def run(give_back) -> None:
                with contextlib.suppress(UpstreamError):
                    async with rx.get(srv.url, {"Range": f"bytes=0-{MiB - 1}"}, follow=True) as resp:
                        async for _ in resp.parts(0, MiB, MiB, give_back):
                            pass

            async def fill() -> None:
                while True:  # as a blobfill worker: the next run once this one's end is on its way
                    await slots.acquire()
                    ending, held = asyncio.Event(), [1]

                    def give_back(ending=ending, held=held) -> None:
                        if held:
                            held.pop()
                            slots.release()
                        ending.set()

                    asyncio.ensure_future(run(give_back)).add_done_callback(lambda _, g=give_back: g())
                    await ending.wait()

            fills = [asyncio.ensure_future(fill()) for _ in range(3)]
            try:
                await asyncio.sleep(40 * receive.FOLLOW_WAIT)  # follow-ups given up on, again and again
                read = asyncio.ensure_future(_get_reader(rx, srv.url))
                done, _ = await asyncio.wait({read}, timeout=5)
                assert done, f"the reader's request waited for a thread ({len(rx._busy)} connections busy)"
                assert (await read) == body[:MiB]
            finally:
                for f in fills:
                    f.cancel()
                await rx.close()
                stalled.set()

    asyncio.run(main())


async def _get_reader(rx: Receiver, url: str) -> bytes:
    async with rx.get(url, {"Range": f"bytes=0-{MiB - 1}", "X-Reader": "1"}, follow=False) as resp:
        return b"".join([bytes(p[0]) async for p in resp.parts(0, MiB, MiB)])


def test_a_request_is_no_follow_up_unless_its_caller_says_so():
    """Only a caller that may wait for another body's end (a fill's next run, a background chunk)
    asks with follow=True; any other request (a peer's, an http source's) goes out at once, on a
    connection of its own, while a body of the same origin is ending."""
    body, release, answer = _held_end()

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            async with _ending_first(rx, srv) as (resp, first):
                async with rx.get(srv.url, {"Range": f"bytes={MiB}-{2 * MiB - 1}"}) as other:
                    assert resp.follow_up is None and rx._given_up == 0, "it was made a follow-up"
                    assert [bytes(p[0]) async for p in other.parts(MiB, 2 * MiB, MiB)] == [body[MiB:]]
                release.set()
                assert bytes((await first)[0]) == body[:MiB]
            assert srv.connections == 2

    asyncio.run(main())


def test_a_response_closed_while_it_ends_takes_no_follow_up_and_is_forgotten():
    """A response whose last bytes were being read, closed by its caller before anyone asked a
    follow-up: nothing is chained to it later, and the receiver keeps nothing of it."""
    body, release, answer = _held_end()

    async def main() -> None:
        async with serving(answer) as (srv, rx):
            async with _ending_first(rx, srv) as (_, first):
                await _cancelled(first)
            assert not rx._ending, "a closed response is kept as one that may take a follow-up"
            assert (await _get(rx, srv.url, MiB, 2 * MiB, MiB)) == (206, [body[MiB:]])
            release.set()

    asyncio.run(main())
