"""Run a real `nodecache serve` in a subprocess, for tests, benchmarks and the demo.

The daemon must never run in the process that reads its mount: a process
touching its own FUSE mount from the serving loop deadlocks. Cleanup is by
PID, then by detaching the mount if the daemon left it behind.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_mounted(path: Path) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


class DaemonProcess:
    """`nodecache serve` as a child process with its own mount, cache and port."""

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
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def hub(self) -> Path:
        return self.mount / "hub"

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        if is_mounted(self.mount):  # a dead mount left by kill -9: stat on it fails with ENOTCONN
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False, capture_output=True)
        self.mount.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log()}")

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
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; then make sure nothing is left mounted."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            rc = self.proc.returncode
        if is_mounted(self.mount):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False, capture_output=True)
        return rc

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
