"""A real multi-node cluster on one machine: network namespaces, a bridge, tc limits.

One namespace runs the Hub emulator ("upstream"), one namespace per node runs
a daemon (entered with `nsenter --net` only, so its FUSE mount is visible to
the test). The root namespace gets the bridge's .1 address to talk to all of
them. Everything created is removed in `stop()`, even after a failed start.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from nodecache.testing.daemon import DaemonProcess, LeftBehind, stop_process

HUB_PORT, CDN_PORT, NODE_PORT = 8080, 8081, 8470


class ClusterUnavailable(RuntimeError):
    """The kernel or permissions do not allow namespaces here."""


class JobFailed(AssertionError):
    """A node's prefetch job ended in error while the test waited for the repo."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Cluster:
    def __init__(
        self,
        workdir: Path,
        repos: dict[str, Path],
        nodes: int = 3,
        upstream_mbit: int | None = None,
        node_mbit: int | None = None,
        env: dict[str, str] | None = None,
        token: str = "cluster-secret",
        node_env: dict[int, dict[str, str]] | None = None,
        dns_name: str | None = None,
        tampered: dict[int, bool] | None = None,
    ):
        self.workdir = workdir
        self.repos = repos
        self.n = nodes
        self.upstream_mbit, self.node_mbit = upstream_mbit, node_mbit
        self.env = env or {}
        self.node_env = node_env or {}
        self.dns_name = dns_name  # discover peers by DNS: /etc/netns/<ns>/hosts lists every node under it
        self.token = token
        self.tampered = tampered or {}  # node -> tampering at start: the node sits behind testkit.tamper
        self.proxies: list[subprocess.Popen] = []
        self.id = secrets.token_hex(2)
        self.net = f"10.{secrets.randbelow(50) + 200}.{secrets.randbelow(250) + 1}"
        self.bridge = f"ncbr{self.id}"
        self.namespaces: list[str] = []
        self.hub_proc: subprocess.Popen | None = None
        self.nodes: list[DaemonProcess] = []
        self.hub_url = f"http://{self.net}.2:{HUB_PORT}"

    # network -----------------------------------------------------------------------

    def _add_host(self, name: str, addr: str, mbit: int | None) -> str:
        ns = f"nc{self.id}{name}"
        host_end, ns_end = f"nc{self.id}{name}h", f"nc{self.id}{name}n"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        _ip("link", "set", ns_end, "netns", ns)
        _ip("link", "set", host_end, "master", self.bridge)
        _ip("link", "set", host_end, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns_end)
        _ip("-n", ns, "link", "set", ns_end, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        if mbit:  # both directions of this host's link
            tbf = ["root", "tbf", "rate", f"{mbit}mbit", "burst", "1mb", "latency", "50ms"]
            subprocess.run(["tc", "qdisc", "add", "dev", host_end, *tbf], check=True, capture_output=True)
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ns_end, *tbf], check=True, capture_output=True
            )
        return ns

    def start(self, timeout: float = 60) -> Cluster:
        probe = f"nc{self.id}probe"
        if _ip("netns", "add", probe, check=False).returncode != 0:
            raise ClusterUnavailable("cannot create network namespaces here (needs root and CAP_SYS_ADMIN)")
        _ip("netns", "del", probe, check=False)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.net}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            hub_ns = self._add_host("hub", f"{self.net}.2", self.upstream_mbit)
            args = [
                sys.executable,
                "-m",
                "nodecache.testing.hub",
                "--listen",
                f"{self.net}.2:{HUB_PORT}",
                "--cdn-port",
                str(CDN_PORT),
            ]
            for repo, path in self.repos.items():
                args += ["--repo", f"{repo}={path}"]
            self.hub_proc = subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{hub_ns}", *args], stdout=subprocess.PIPE, text=True
            )
            if "listening" not in (self.hub_proc.stdout.readline() if self.hub_proc.stdout else ""):
                raise RuntimeError("hub emulator did not start in its namespace")
            addrs = [f"{self.net}.{10 + i}" for i in range(self.n)]
            token_file = self.workdir / "cluster-token"
            token_file.write_text(self.token)
            peers = ",".join(f"{a}:{NODE_PORT}" for a in addrs)
            for i, addr in enumerate(addrs):
                ns = self._add_host(f"n{i}", addr, self.node_mbit)
                if i in self.tampered:
                    self._proxy(ns, addr, self.tampered[i])
                node = self.node(i, ns, addr, peers, token_file)
                self.nodes.append(node)
            for node in self.nodes:
                node.start(timeout)
            return self
        except BaseException:
            self.stop()
            raise

    def _proxy(self, ns: str, addr: str, on: bool) -> None:
        args = [sys.executable, str(Path(__file__).with_name("tamper.py")), "--listen", f"{addr}:{NODE_PORT}"]
        args += ["--to", f"{addr}:{NODE_PORT + 1}"] + (["--on"] if on else [])
        proc = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{ns}", *args], stdout=subprocess.PIPE, text=True)
        self.proxies.append(proc)
        if "listening" not in (proc.stdout.readline() if proc.stdout else ""):
            raise RuntimeError("tampering proxy did not start in its namespace")

    def set_tamper(self, i: int, on: bool) -> None:
        """Turn node i's lying on or off (it must have been started behind the proxy)."""
        if i not in self.tampered:
            raise ValueError(f"node {i} is not behind a tampering proxy")
        addr = f"{self.net}.{10 + i}:{NODE_PORT}"
        req = urllib.request.Request(f"http://{addr}/_tamper", data=json.dumps({"on": on}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.load(r) == {"on": on}

    def node(self, i: int, ns: str, addr: str, peers: str, token_file: Path) -> DaemonProcess:
        workdir = self.workdir / f"node{i}"
        workdir.mkdir(parents=True, exist_ok=True)
        env = {"NODECACHE_PEERS": peers, "NODECACHE_CLUSTER_TOKEN": self.token, "NODECACHE_FSYNC": "false", **self.env}
        env.update(self.node_env.get(i, {}))
        port = NODE_PORT
        if i in self.tampered:  # peers reach it through the proxy at the advertised address only
            port, env["NODECACHE_ADVERTISE"] = NODE_PORT + 1, f"{addr}:{NODE_PORT}"
        prefix = ["nsenter", f"--net=/var/run/netns/{ns}"]
        if self.dns_name:
            # `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts for the daemon
            # alone, so the system resolver (getaddrinfo) really resolves the name. The daemon's
            # mount then lives in its own mount namespace: read it through HTTP, not the mount.
            hosts = Path("/etc/netns") / ns
            hosts.mkdir(parents=True, exist_ok=True)
            lines = ["127.0.0.1 localhost", *(f"{p.rpartition(':')[0]} {self.dns_name}" for p in peers.split(","))]
            (hosts / "hosts").write_text("\n".join(lines) + "\n")
            del env["NODECACHE_PEERS"]
            env["NODECACHE_PEERS_DNS"] = f"{self.dns_name}:{NODE_PORT}"
            prefix = ["ip", "netns", "exec", ns]
        return DaemonProcess(workdir, self.hub_url, list(self.repos), env=env, host=addr, port=port, prefix=prefix)

    def hub_stats(self) -> dict:
        with urllib.request.urlopen(self.hub_url + "/_emulator/stats", timeout=10) as r:
            return json.load(r)

    def stop(self) -> None:
        """Remove everything; then raise the first LeftBehind a node reported (cleaned up already)."""
        left: list[LeftBehind] = []
        for node in self.nodes:
            try:
                node.stop()
            except LeftBehind as e:
                left.append(e)
        for proc in (self.hub_proc, *self.proxies):
            stop_process(proc, 10)
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)  # takes its veth pair with it
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self.namespaces.clear()
        _ip("link", "del", self.bridge, check=False)
        if left:
            raise left[0]

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def prefetch(self, repo: str) -> list[str]:
        """Every node starts filling the repo (POST /v1/prefetch); returns each node's job id."""
        jobs = []
        for node in self.nodes:
            body = json.dumps({"repo": repo}).encode()
            req = urllib.request.Request(node.url + "/v1/prefetch", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                jobs.append(json.load(r)["id"])
        return jobs

    def wait_all_ready(self, repo: str, timeout: float = 300, jobs: list[str] | None = None) -> float:
        """Seconds until every node reports the repo's snapshot complete. `jobs` (prefetch()'s
        answer): a node whose job failed raises at once, with the job's error: nothing else
        will complete the repo there (a full disk ended such a job in a second, and the wait
        went on for its whole timeout)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if all(_complete(n, repo) for n in self.nodes):
                return time.monotonic() - t0
            for i, job_id in enumerate(jobs or ()):
                job = _job(self.nodes[i], job_id)
                if job["state"] == "error":
                    raise JobFailed(f"node {i}: prefetch job {job_id} of {repo} failed: {job['error']}")
            time.sleep(0.2)
        raise TimeoutError(f"{repo} not complete on every node after {timeout}s")


def _job(node: DaemonProcess, job_id: str) -> dict:
    with urllib.request.urlopen(f"{node.url}/v1/jobs/{job_id}", timeout=10) as r:
        return json.load(r)


def _complete(node: DaemonProcess, repo: str) -> bool:
    with urllib.request.urlopen(f"{node.url}/v1/repos", timeout=10) as r:
        repos = json.load(r)["repos"]
    return any(r["repo"] == repo and r["snapshots"] and all(s["complete"] for s in r["snapshots"]) for r in repos)
