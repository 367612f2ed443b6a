"""SIGTERM with HTTP requests in flight: the daemon stops taking requests, lets the running ones
finish within its HTTP grace, and only then closes what they use (index, store, HTTP session).

Requests are held in flight by a stand-in Hub that answers the daemon only when the test says
so; the test says so once the daemon has stopped listening (a refused connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from aiohttp import web
from conftest import _need_fuse, wait_until

from nodecache.daemon import HTTP_STOP_GRACE
from nodecache.testing.daemon import DaemonProcess, KeeperProcess

KNOWN, NEW = "org/known", "org/new"
COMMITS = {KNOWN: "a" * 40, NEW: "b" * 40}
FILES = {KNOWN: "a.txt", NEW: "b.txt"}
INFO = {"id": KNOWN, "sha": COMMITS[KNOWN], "relayed": "from the stand-in Hub"}


class StandInHub:
    """Two tiny public repos. Held until `release`: the info of KNOWN (the mirror relays it to
    callers the Hub clears) and the first resolution of NEW (a repo the node does not know yet);
    `held` counts the requests waiting."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.held = 0
        self.url = ""
        self._lock = threading.Lock()
        self._resolved_new = False

    async def _hold(self) -> None:
        with self._lock:
            self.held += 1
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 60)

    async def revision(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo not in COMMITS:
            return web.json_response({"error": "Repository not found"}, status=404)
        if repo == NEW and not self._resolved_new:
            self._resolved_new = True
            await self._hold()
        doc = {"_id": repo, "id": repo, "sha": COMMITS[repo], "private": False, "gated": False}
        return web.json_response(doc)

    async def tree(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if COMMITS.get(repo) != request.match_info["commit"]:
            return web.json_response({"error": "Revision not found"}, status=404)
        return web.json_response([{"type": "file", "oid": "c" * 40, "size": 5, "path": FILES[repo]}])

    async def info(self, request: web.Request) -> web.Response:
        await self._hold()
        return web.json_response(INFO)

    @contextmanager
    def running(self) -> Iterator[StandInHub]:
        ready, stop = threading.Event(), {}

        async def main() -> None:
            app = web.Application()
            app.router.add_get("/api/models/{org}/{name}/revision/main", self.revision)
            app.router.add_get("/api/models/{org}/{name}/tree/{commit}", self.tree)
            app.router.add_get(f"/api/models/{KNOWN}", self.info)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
            stop["event"], stop["loop"] = asyncio.Event(), asyncio.get_running_loop()
            ready.set()
            await stop["event"].wait()
            await runner.cleanup()

        thread = threading.Thread(target=asyncio.run, args=(main(),))
        thread.start()
        try:
            assert ready.wait(30), "the stand-in Hub did not start"
            yield self
        finally:
            self.release.set()
            if "loop" in stop:
                stop["loop"].call_soon_threadsafe(stop["event"].set)
            thread.join(30)


class InFlight:
    """A GET sent on its own connection; `answer` reads what came back."""

    def __init__(self, daemon: DaemonProcess, path: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
        self.conn.request("GET", path)

    def answer(self) -> tuple[int, bytes]:
        """(status, body); (0, b"") if the connection was cut before an answer."""
        try:
            resp = self.conn.getresponse()
            return resp.status, resp.read()
        except (http.client.RemoteDisconnected, ConnectionError):
            return 0, b""
        finally:
            self.conn.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def stop_with_requests_in_flight(tmp_path, keeper: KeeperProcess | None, answer: bool) -> dict:
    """Start a daemon (with a keeper: the second one, which took the connection over), send it
    two mirror requests that wait on the Hub, SIGTERM it, and once it stops listening let the
    Hub answer them (`answer`) or not; then start the next daemon. What happened, for asserts."""
    env = {"NODECACHE_FSYNC": "false", "NODECACHE_VERIFY_BEFORE_SERVE": "", "NODECACHE_ON_DEMAND": "org/*"}
    with StandInHub().running() as hub:
        if keeper is not None:  # its inode table now starts empty and reads LMDB on a miss
            with DaemonProcess(tmp_path, hub.url, [KNOWN], env=env, keeper=keeper).start() as first:
                assert first.hub.is_dir()
        d = DaemonProcess(tmp_path, hub.url, [KNOWN], env=env, keeper=keeper)
        after = DaemonProcess(tmp_path, hub.url, [KNOWN], env=env, keeper=keeper)
        try:
            d.start()
            assert keeper is None or "took over the connection" in d.log()
            relayed = InFlight(d, f"/api/models/{KNOWN}")
            resolved = InFlight(d, f"/api/models/{NEW}/revision/main")
            wait_until(lambda: hub.held == 2, "both requests waiting on the Hub")
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: refused(d.port), "the daemon to stop listening", every=0.005)
            if answer:
                hub.release.set()
            got = {"relayed": relayed.answer(), "resolved": resolved.answer()}
            try:
                code = d.proc.wait(30)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - t0
            hub.release.set()
            d.stop()
            after.start()
            shown = sorted(n for n in os.listdir(after.hub) if n.startswith("models--"))
        finally:
            hub.release.set()
            d.stop()
            after.stop()
    return {"got": got, "code": code, "took": took, "log": d.log(), "shown": shown}


@pytest.mark.parametrize("keeper", [False, True], ids=["mount", "keeper"])
def test_sigterm_lets_requests_in_flight_finish_before_closing_what_they_use(tmp_path, keeper):
    """Two mirror requests wait on the Hub at SIGTERM: a relayed repo info (answered from the
    index if the Hub fails) and the first resolution of a repo new to the node (recorded in the
    index, and shown in the tree, when the Hub answers). The daemon stops listening first; the
    Hub answers then, and both requests finish with the right answers before the index closes;
    the daemon exits 0 with no traceback, well within kubelet's 30 s, and the next daemon shows
    the new repo. Closing first made the relay fail and its fallback read the closed index (a
    500 and an lmdb traceback); after a takeover, the FUSE face released first must not number
    the new repo's folder in its closed inode table."""
    _need_fuse()
    with contextlib.ExitStack() as stack:
        k = stack.enter_context(KeeperProcess(tmp_path)) if keeper else None
        r = stop_with_requests_in_flight(tmp_path, k, answer=True)
    got, log = r["got"], r["log"]
    assert got["relayed"][0] == 200 and got["resolved"][0] == 200, f"{got}\n--- daemon log ---\n{log[-4000:]}"
    assert json.loads(got["relayed"][1]) == INFO
    doc = json.loads(got["resolved"][1])
    assert (doc["id"], doc["sha"]) == (NEW, COMMITS[NEW])
    assert r["code"] == 0, f"exit {r['code']}:\n{log[-4000:]}"
    assert r["took"] < 10, f"{r['took']:.1f} s from SIGTERM to exit (kubelet's grace is 30 s)"
    assert "Traceback" not in log and "lmdb" not in log.lower(), log[-4000:]
    assert r["shown"] == ["models--org--known", "models--org--new"]


def test_sigterm_cuts_requests_still_running_after_the_grace(tmp_path):
    """A Hub that never answers: the requests waiting on it are cut (the connection closes, no
    answer) after twice HTTP_STOP_GRACE (aiohttp waits that long for them to finish, then as
    long again once it cancels their request's body), and the daemon exits 0, with no traceback."""
    _need_fuse()
    r = stop_with_requests_in_flight(tmp_path, None, answer=False)
    log = r["log"]
    assert r["got"] == {"relayed": (0, b""), "resolved": (0, b"")}, f"{r['got']}\n{log[-4000:]}"
    assert r["code"] == 0, f"exit {r['code']}:\n{log[-4000:]}"
    assert 2 * HTTP_STOP_GRACE <= r["took"] < 2 * HTTP_STOP_GRACE + 5, f"{r['took']:.1f} s from SIGTERM to exit"
    assert "Traceback" not in log and "lmdb" not in log.lower(), log[-4000:]
    assert r["shown"] == ["models--org--known"]
