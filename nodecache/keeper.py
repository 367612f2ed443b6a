"""The keeper: holds a dup of each mount's /dev/fuse fd, so the FUSE connection outlives the daemon.

The kernel side of a FUSE mount lives as long as any process holds its fd.
`nodecache keeper` is that process: small, with no state but what daemons give
it, rarely changed, and run apart from the daemon (its own DaemonSet), so a
daemon rollout, crash or `kill -9` leaves the connection up and the pods'
binds, open fds and mmaps of it valid. The next daemon takes the fd (and the
connection's state, see `connstate`) back over a unix socket with SCM_RIGHTS.

A daemon's socket connection to the keeper is its lease: the keeper gives a
mount's fd to one connection at a time, and a second `take` waits until the
first connection is gone (the old daemon exited, however it died). So the new
daemon knows that nobody else answers requests when it asks the kernel to
resend the unanswered ones.

Messages are JSON on a SOCK_SEQPACKET socket (one message per datagram), the
fd alongside. Only root or the keeper's own user may connect: whoever holds
the fd decides what every pod reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024
PROTOCOL = 1
_UCRED = struct.Struct("iII")  # pid uid gid


class KeeperError(OSError):
    """The keeper is not there, refused, or said something we cannot use."""


class KeeperBusy(KeeperError):
    """Another daemon serves the mount (holds its lease) and did not let go in time."""


@dataclass
class _Held:
    fd: int
    state: str
    holder: socket.socket | None  # the daemon serving it now, if any


def _connection_alive(fd: int) -> bool:
    """A FUSE connection that was unmounted (aborted) polls as an error."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return not any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in p.poll(0))


class Keeper:
    """The server: one thread per daemon connection; the held fds under one lock."""

    def __init__(self, path: Path, take_timeout: float = 600.0):
        self.path = path
        self.take_timeout = take_timeout
        self._held: dict[str, _Held] = {}
        self._cond = threading.Condition()
        self._uid = os.getuid()

    def serve(self, stop: threading.Event) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket file left by a keeper that died: nobody listens on it
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)
        try:
            srv.bind(str(self.path))
        finally:
            os.umask(old)
        srv.listen(16)
        srv.settimeout(0.5)
        log.info("keeper listening on %s", self.path)
        try:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    self._sweep()
                    continue
                threading.Thread(target=self._client, args=(conn,), daemon=True).start()
        finally:
            srv.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            with self._cond:
                for held in self._held.values():
                    os.close(held.fd)  # the connections end here unless a daemon still serves them
                self._held.clear()

    def held(self) -> dict[str, bool]:
        """mount -> whether a daemon holds its lease (for tests and logs)."""
        with self._cond:
            return {m: h.holder is not None for m, h in self._held.items()}

    def _sweep(self) -> None:
        """Close the fds of connections that ended (unmounted) while no daemon served them."""
        with self._cond:
            for mount, held in list(self._held.items()):
                if held.holder is None and not _connection_alive(held.fd):
                    log.info("the connection of %s ended; closing it", mount)
                    os.close(held.fd)
                    del self._held[mount]

    def _client(self, conn: socket.socket) -> None:
        try:
            pid, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            if uid not in (0, self._uid):
                log.warning("refused a connection from pid %d (uid %d)", pid, uid)
                return
            while True:
                try:
                    msg, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 1, socket.MSG_CMSG_CLOEXEC)
                except OSError:
                    return
                if not msg:
                    return  # the daemon is gone: its lease ends
                try:
                    reply, fd = self._request(conn, msg, fds)
                except (ValueError, KeyError, TypeError) as e:
                    for fd in fds:
                        os.close(fd)
                    reply, fd = {"error": f"bad request: {e}"}, None
                try:
                    socket.send_fds(conn, [json.dumps(reply).encode()], [fd] if fd is not None else [])
                except OSError:
                    return
        finally:
            with self._cond:
                for held in self._held.values():
                    if held.holder is conn:
                        held.holder = None
                self._cond.notify_all()
            conn.close()

    def _request(self, conn: socket.socket, msg: bytes, fds: list[int]) -> tuple[dict, int | None]:
        req = json.loads(msg)
        op, mount = req["op"], req["mount"]
        if not isinstance(mount, str) or not mount.startswith("/"):
            raise ValueError("mount must be an absolute path")
        if op == "take":
            return self._take(conn, mount, float(req.get("timeout", self.take_timeout)))
        if op == "deposit":
            if len(fds) != 1 or not isinstance(req["state"], str):
                raise ValueError("deposit needs one fd and a state")
            with self._cond:
                old = self._held.get(mount)
                if old is not None and old.holder not in (None, conn):
                    os.close(fds[0])
                    return {"error": f"{mount} is served by another daemon"}, None
                if old is not None:
                    os.close(old.fd)
                self._held[mount] = _Held(fds[0], req["state"], conn)
            log.info("holding the connection of %s", mount)
            return {"ok": True}, None
        if op == "drop":
            with self._cond:
                held = self._held.get(mount)
                if held is not None and held.holder in (None, conn):
                    os.close(held.fd)
                    del self._held[mount]
                    log.info("let go of the connection of %s", mount)
            return {"ok": True}, None
        raise ValueError(f"unknown op {op!r}")

    def _take(self, conn: socket.socket, mount: str, timeout: float) -> tuple[dict, int | None]:
        with self._cond:
            busy = lambda: mount in self._held and self._held[mount].holder not in (None, conn)  # noqa: E731
            if not self._cond.wait_for(lambda: not busy(), timeout=min(timeout, self.take_timeout)):
                return {"error": f"{mount} is still served by another daemon", "busy": True}, None
            held = self._held.get(mount)
            if held is None:
                return {"state": None, "protocol": PROTOCOL}, None
            if not _connection_alive(held.fd):
                os.close(held.fd)
                del self._held[mount]
                return {"state": None, "protocol": PROTOCOL}, None
            held.holder = conn
            return {"state": held.state, "protocol": PROTOCOL}, held.fd  # sent as a new fd in the daemon


class KeeperClient:
    """A daemon's side: blocking calls (the daemon runs them off its loop); the open socket is the lease."""

    def __init__(self, path: Path, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout + 5)
        try:
            sock.connect(str(self.path))
        except OSError as e:
            sock.close()
            raise KeeperError(e.errno, f"keeper at {self.path}: {e.strerror}") from None
        self.sock = sock

    def _call(self, req: dict, fd: int | None = None) -> tuple[dict, int | None]:
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        try:
            socket.send_fds(self.sock, [json.dumps(req).encode()], [fd] if fd is not None else [])
            msg, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 1, socket.MSG_CMSG_CLOEXEC)
        except OSError as e:
            self.close()
            raise KeeperError(e.errno, f"keeper at {self.path}: {e.strerror or e}") from None
        if not msg:
            self.close()
            raise KeeperError(0, f"keeper at {self.path} hung up")
        try:
            reply = json.loads(msg)
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or "error" in reply:
            for got in fds:
                os.close(got)
            if isinstance(reply, dict) and reply.get("busy") is True:
                raise KeeperBusy(0, f"keeper at {self.path}: {reply['error']}")
            raise KeeperError(0, f"keeper at {self.path}: {reply.get('error') if isinstance(reply, dict) else msg!r}")
        return reply, fds[0] if fds else None

    def take(self, mount: str) -> tuple[int, bytes] | None:
        """The connection held for `mount` (fd, state) and its lease, or None: mount one and deposit it."""
        reply, fd = self._call({"op": "take", "mount": mount, "timeout": self.timeout})
        state = reply.get("state")
        if state is None or fd is None:
            if fd is not None:
                os.close(fd)
            return None
        return fd, state.encode()

    def deposit(self, mount: str, fd: int, state: bytes) -> None:
        self._call({"op": "deposit", "mount": mount, "state": state.decode()}, fd)

    def drop(self, mount: str) -> None:
        self._call({"op": "drop", "mount": mount})

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def run(path: Path) -> None:
    """`nodecache keeper`: serve until SIGTERM/SIGINT."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Keeper(path).serve(stop)
