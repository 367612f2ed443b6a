"""Run a real `nodecache serve` in a subprocess, for tests, benchmarks and the demo.

The daemon must never run in the process that reads its mount: a process
touching its own FUSE mount from the serving loop deadlocks.

The harness never does the product's work: `start` leaves a dead mount of a
killed daemon for `serve` to detach, and `stop` sends SIGTERM and lets `serve`
unmount. Only afterwards does it clean up (by PID, then the mount), and it
raises `LeftBehind` when it had to clean what `serve` should have: a mount
that outlived a daemon that was not killed with -9, a stale mount that a new
`serve` did not detach, a daemon that ignored SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .. import mounts
from ..fusesession import FSTYPE


class LeftBehind(AssertionError):
    """The daemon did not clean up after itself; the harness had to."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM, up to `grace` seconds to exit, then SIGKILL: how every helper process a test started ends."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def ours(path: Path) -> list[mounts.MountEntry]:
    """The nodecache mounts (live or dead) stacked at `path`; a bind under them (the mount dir of a
    container, bound from the host) is not one of them."""
    return [e for e in mounts.at(os.path.abspath(path)) if e.fstype == FSTYPE]


def detach_dead(path: Path) -> int:
    """Lazily detach dead FUSE mounts (their daemon is gone: ENOTCONN) from the top of
    path's stack; a live mount (another daemon's) stops it. Returns how many went.

    Decided by probing, not by device number: the kernel reuses a freed minor at once.
    """
    target, n = os.path.abspath(path), 0
    while n < 8 and (top := mounts.top(target)) is not None and top.is_fuse:
        if mounts.probe(target, 5.0) not in mounts.STALE_ERRNOS:
            break
        mounts.unmount(target)
        n += 1
    return n


class KeeperProcess:
    """`nodecache keeper` as a child process. Stopping it ends the connections it holds that no
    daemon serves (their mounts go dead, and are detached here)."""

    def __init__(self, workdir: Path):
        self.socket = workdir / "keeper" / "keeper.sock"
        self.log_path = workdir / "keeper.log"
        self.proc: subprocess.Popen | None = None
        self.mounts: list[Path] = []  # mounts to detach once the connections die with us

    def start(self, timeout: float = 30.0) -> KeeperProcess:
        with open(self.log_path, "ab") as log:
            cmd = [sys.executable, "-m", "nodecache", "keeper", "--socket", str(self.socket)]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"keeper did not start:\n{self.log()}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, 20)
        for mount in self.mounts:
            detach_dead(mount)

    def __enter__(self) -> KeeperProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DaemonProcess:
    """`nodecache serve` as a child process with its own mount, cache and port.

    With a `keeper`, its mount outlives it: `stop` and `kill9` leave the connection
    to the keeper (alive, unserved: readers wait) and the next `start` takes it over.
    """

    def __init__(
        self,
        workdir: Path,
        hub_url: str,
        repos: list[str],
        env: dict[str, str] | None = None,
        cache_dir: Path | None = None,
        extra_args: list[str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        prefix: list[str] | None = None,
        keeper: KeeperProcess | None = None,
    ):
        self.mount = workdir / "mnt"
        self.cache_dir = cache_dir or workdir / "cache"
        self.port = port or free_port()
        self.address = f"{host}:{self.port}"
        self.url = f"http://{self.address}"
        self.log_path = workdir / f"daemon-{self.port}.log"
        self.args = [*(prefix or []), sys.executable, "-m", "nodecache", "serve", "--mount", str(self.mount)]
        self.args += ["--cache-dir", str(self.cache_dir), "--hub-url", hub_url, "--listen", self.address]
        for r in repos:
            self.args += ["--repo", r]
        self.args += extra_args or []
        self.keeper = keeper
        if keeper is not None:
            self.args += ["--keeper-socket", str(keeper.socket)]
            keeper.mounts.append(self.mount)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.killed = False  # by kill9: a dead mount is then expected, and the next `serve` detaches it

    @property
    def hub(self) -> Path:
        return self.mount / "hub"

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        """Start `serve` and wait for /readyz. A dead mount left by kill -9 stays for `serve` to detach."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"already running (pid {self.proc.pid})")
        stale = len(ours(self.mount))
        # a mount the keeper holds is alive but unserved: a probe would wait for us to serve it
        if stale and self.keeper is None and mounts.probe(os.path.abspath(self.mount), 5.0) not in mounts.STALE_ERRNOS:
            raise RuntimeError(f"a live mount is at {self.mount} already: another daemon serves there")
        self.killed = False
        if not stale:  # with a dead mount here, mkdir would fail with ENOTCONN: serve makes it
            self.mount.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()  # raises LeftBehind if it died with its mount up
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log()}")
        if stale and len(ours(self.mount)) > 1:  # ours on top of the dead one(s)
            self.stop()
            detach_dead(self.mount)
            raise LeftBehind(f"serve did not detach the stale mount at {self.mount}:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            return r.read().decode()

    def status(self) -> dict:
        with urllib.request.urlopen(self.url + "/v1/status", timeout=5) as r:
            return json.loads(r.read())

    def kill9(self) -> None:
        """Crash it: the mount stays behind, dead (ENOTCONN), as after a real crash."""
        if self.proc and self.proc.poll() is None:
            self.killed = True
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait, as kubelet does; `serve` unmounts on its own. Then clean up
        whatever it left (by PID, then its dead mount) and raise LeftBehind if that was needed."""
        if self.proc is None:
            return None
        problems = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"did not exit within {timeout:.0f}s of SIGTERM")
                self.proc.kill()
                self.proc.wait(10)
        if self.keeper is None and detach_dead(self.mount) and not self.killed:
            problems.append(f"left its mount at {self.mount} (exit code {self.proc.returncode})")
        if problems:
            raise LeftBehind(f"nodecache serve {'; '.join(problems)}:\n{self.log()[-3000:]}")
        return self.proc.returncode

    def __enter__(self) -> DaemonProcess:
        running = self.proc is not None and self.proc.poll() is None
        return self if running else self.start()  # `with d.start():` starts it once

    def __exit__(self, *exc: object) -> None:
        self.stop()
