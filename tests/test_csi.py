"""The CSI node plugin for real: `nodecache csi` in a subprocess, gRPC over its unix socket,
real read-only bind mounts of a real nodecache FUSE mount, real huggingface_hub reading them."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import machine
import pytest
from conftest import BIG, SMALL, MiB, _need_fuse, sha256_file, wait_until

from nodecache import __version__, mounts
from nodecache.csi.driver import parse_endpoint
from nodecache.csi.policy import PolicyError, parse_policy, repo_matches
from nodecache.csi.proto import load
from nodecache.testing.daemon import DaemonProcess
from nodecache.testing.hub import Fault, HubEmulator

pb, pb_grpc = load()
Mode = pb.VolumeCapability.AccessMode.Mode


def cap(mode=Mode.SINGLE_NODE_WRITER, block=False, **kw) -> pb.VolumeCapability:
    c = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=mode))
    if block:
        c.block.SetInParent()
    else:
        c.mount.SetInParent()
    return c


class Csi:
    """`nodecache csi` as a child process plus a gRPC client on its socket."""

    def __init__(self, workdir: Path, daemon, extra: list[str] | None = None, env: dict | None = None):
        self.sock = workdir / "plugin" / "csi.sock"
        self.kubelet = workdir / "kubelet"
        self.log_path = workdir / f"csi-{time.monotonic_ns()}.log"
        self.daemon = daemon
        self.args = [sys.executable, "-m", "nodecache", "csi", "--endpoint", f"unix://{self.sock}"]
        self.args += ["--node-id", "gpu-node-1", "--mount", str(daemon.mount), "--daemon-url", daemon.url]
        self.args += ["--kubelet-dir", str(self.kubelet), *(extra or [])]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None

    def start(self, timeout: float = 30.0) -> Csi:
        self.sock.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"unix://{self.sock}")
        self.identity = pb_grpc.IdentityStub(self.channel)
        self.node = pb_grpc.NodeStub(self.channel)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise RuntimeError(f"CSI plugin not serving after {timeout}s:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def target(self, name: str = "vol", pod: str = "pod-1") -> Path:
        """Where kubelet would publish: it creates the parent, the plugin creates `mount`."""
        parent = self.kubelet / "pods" / pod / "volumes" / "kubernetes.io~csi" / name
        parent.mkdir(parents=True, exist_ok=True)
        return parent / "mount"

    def publish(self, target: Path, context: dict | None = None, volume_id="vol-1", capability=None, **kw):
        req = pb.NodePublishVolumeRequest(
            volume_id=volume_id,
            target_path=str(target),
            volume_capability=capability if capability is not None else cap(),
            volume_context=context or {},
            **kw,
        )
        return self.node.NodePublishVolume(req, timeout=60)

    def unpublish(self, target: Path, volume_id="vol-1"):
        return self.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)), timeout=30
        )


@pytest.fixture
def csi(tmp_path, daemons):
    """Factory: a CSI plugin for a daemon. Every plugin is stopped, every mount under tmp_path removed."""
    started: list[Csi] = []

    def make(daemon, extra=None, start=True, env=None) -> Csi:
        c = Csi(tmp_path, daemon, extra, env)
        started.append(c)
        return c.start() if start else c

    yield make
    for c in started:
        c.stop()
    # binds the test left behind (the daemon's own mount is the `daemons` fixture's)
    for e in reversed(mounts.mountinfo()):
        if e.mountpoint.startswith(str(tmp_path / "kubelet")):
            with contextlib.suppress(OSError):
                mounts.unmount_all(e.mountpoint)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    return ei.value.code()


def dev_of(path: Path) -> str:
    return mounts.top(str(path)).dev


def readable(path: Path) -> bool:
    return mounts.probe(str(path), 2.0) == 0 and bool(os.listdir(path))


# ---------------------------------------------------------------------------


def test_identity_and_node_rpcs(daemons, csi):
    c = csi(daemons())
    info = c.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "nodecache.csi.k8s.io"
    assert len(info.name) <= 63 and re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", info.name)
    assert info.vendor_version == __version__ != ""
    caps = c.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    assert not any(x.service.type == x.service.CONTROLLER_SERVICE for x in caps.capabilities)
    assert c.identity.Probe(pb.ProbeRequest()).ready.value is True
    assert list(c.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities) == []  # no staging
    assert c.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id == "gpu-node-1"
    for call, req in [
        (c.node.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id="v")),
        (c.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id="v")),
        (c.node.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id="v")),
        (c.node.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_id="v")),
    ]:
        assert code_of(lambda call=call, req=req: call(req)) == grpc.StatusCode.UNIMPLEMENTED


def test_publish_model_inline_readonly_idempotent(hub, daemons, csi, small_repo):
    d = daemons()
    c = csi(d)
    t = c.target()
    inline = {
        "model": SMALL,
        "csi.storage.k8s.io/ephemeral": "true",
        "csi.storage.k8s.io/pod.name": "vllm-0",
        "csi.storage.k8s.io/pod.namespace": "default",
        "csi.storage.k8s.io/pod.uid": "pod-1",
        "csi.storage.k8s.io/serviceAccount.name": "default",
    }
    # kubelet sends SINGLE_NODE_WRITER for inline volumes: accepted, mounted read-only anyway
    c.publish(t, inline, capability=cap(Mode.SINGLE_NODE_WRITER))
    [m] = mounts.at(str(t))
    assert m.root == "/hub/models--org--small", "the whole repo dir: snapshot symlinks point to ../../blobs"
    assert m.dev == dev_of(d.mount)
    assert {"ro", "nosuid", "nodev"} <= m.options
    commit = hub.commits[SMALL]
    assert (t / "refs" / "main").read_text() == commit
    snap = t / "snapshots" / commit
    assert sha256_file(snap / "model.safetensors") == sha256_file(small_repo / "model.safetensors")
    assert (snap / "tokenizer" / "vocab.txt").read_bytes() == (small_repo / "tokenizer" / "vocab.txt").read_bytes()
    # the kernel says no to writes
    for attempt in (
        lambda: open(t / "new-file", "w"),
        lambda: os.mkdir(t / "new-dir"),
        lambda: open(snap / "config.json", "r+b"),
    ):
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EROFS
    # the same request again: OK, still exactly one mount
    c.publish(t, inline, capability=cap(Mode.SINGLE_NODE_WRITER))
    assert len(mounts.at(str(t))) == 1
    # the same target with another model: ALREADY_EXISTS, nothing changes
    assert code_of(lambda: c.publish(t, {"model": BIG})) == grpc.StatusCode.ALREADY_EXISTS
    assert [e.root for e in mounts.at(str(t))] == ["/hub/models--org--small"]
    c.unpublish(t)
    assert mounts.at(str(t)) == [] and not t.exists()
    c.unpublish(t)  # again: OK
    c.unpublish(c.target("never-published"))  # never published: OK, dir gone
    assert not c.target("never-published").exists()


def test_publish_whole_hub_static_pv_hf_offline(hub, daemons, csi, small_repo):
    d = daemons()
    c = csi(d, extra=["--allow-whole-cache"])
    t = c.target("pv-models")
    # a static PV: volumeHandle + volumeAttributes, ReadOnlyMany, readOnly: true
    c.publish(t, {}, volume_id="nodecache-hub", capability=cap(Mode.MULTI_NODE_READER_ONLY), readonly=True)
    [m] = mounts.at(str(t))
    assert m.root == "/hub" and m.readonly
    script = f"""
import json, hashlib
from huggingface_hub import snapshot_download, hf_hub_download
snap = snapshot_download({SMALL!r}, local_files_only=True)
cfg = hf_hub_download({SMALL!r}, "config.json", local_files_only=True)
st = hf_hub_download({SMALL!r}, "model.safetensors", local_files_only=True)
print(json.dumps({{"snap": snap, "cfg": open(cfg).read(), "st": hashlib.sha256(open(st, "rb").read()).hexdigest()}}))
"""
    env = {**os.environ, "HF_HUB_CACHE": str(t), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["snap"] == str(t / "models--org--small" / "snapshots" / hub.commits[SMALL])
    assert out["cfg"] == (small_repo / "config.json").read_text()
    assert out["st"] == sha256_file(small_repo / "model.safetensors")
    c.unpublish(t, volume_id="nodecache-hub")
    assert mounts.at(str(t)) == [] and not t.exists()


def test_invalid_arguments(daemons, csi):
    c = csi(daemons())
    t = c.target()
    bad = {
        "no volume_id": dict(volume_id=""),
        "no target_path": dict(target=""),
        "relative target_path": dict(target="relative/mount"),
        "no volume_capability": dict(capability=pb.VolumeCapability()),
        "block": dict(capability=cap(block=True)),
        "no access type": dict(capability=pb.VolumeCapability(access_mode={"mode": Mode.MULTI_NODE_READER_ONLY})),
        "no access mode": dict(capability=pb.VolumeCapability(mount={})),
        "bad model": dict(context={"model": "../../etc"}),
        "bad revision": dict(context={"model": SMALL, "revision": "../x"}),
        "unknown attribute": dict(context={"Model": SMALL}),
        "bad waitForCache": dict(context={"model": SMALL, "waitForCache": "sure"}),
        "waitForCache without model": dict(context={"waitForCache": "true"}),
    }
    for why, kw in bad.items():
        target = kw.pop("target", t)
        if why == "no volume_capability":
            req = pb.NodePublishVolumeRequest(volume_id="v", target_path=str(target))
            code = code_of(lambda req=req: c.node.NodePublishVolume(req))
        else:
            code = code_of(lambda kw=kw, target=target: c.publish(target, **kw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, why
    for req in (
        pb.NodeUnpublishVolumeRequest(target_path=str(t)),
        pb.NodeUnpublishVolumeRequest(volume_id="v"),
    ):
        assert code_of(lambda req=req: c.node.NodeUnpublishVolume(req)) == grpc.StatusCode.INVALID_ARGUMENT
    assert mounts.at(str(t)) == [] and not t.exists()


def test_unknown_model_not_found_and_target_removed(daemons, csi, tmp_path):
    d = daemons()
    policy = tmp_path / "csi-policy.yaml"
    policy.write_text("rules: [{namespace: team-a, privateRepos: ['org/*']}]")
    c = csi(d, extra=["--policy", str(policy)])
    t = c.target()
    t.mkdir()  # as if an earlier attempt had created it
    ctx = {"model": "org/does-not-exist", "csi.storage.k8s.io/pod.namespace": "team-a"}
    assert code_of(lambda: c.publish(t, ctx)) == grpc.StatusCode.NOT_FOUND
    assert mounts.at(str(t)) == [] and not t.exists()
    # a pod granted public repos only cannot tell a missing repo from a private one: both are refused alike
    assert c.stop() == 0
    c = csi(d)
    t.mkdir()
    message = refused(lambda: c.publish(t, {"model": "org/does-not-exist"}))
    assert "org/does-not-exist" in message and "not one or does not exist" in message
    assert mounts.at(str(t)) == [] and not t.exists()


def test_wait_for_cache_fills_before_returning(hub, daemons, csi, big_repo):
    # BIG is not known to the daemon yet: publish resolves it, through the admin-only /v1/prefetch
    d = daemons(repos=(SMALL,), env={"NODECACHE_ADMIN_TOKEN": "s3cret"})
    no_token = csi(d)
    t = no_token.target()
    assert code_of(lambda: no_token.publish(t, {"model": BIG})) == grpc.StatusCode.UNAVAILABLE
    assert "admin token" in no_token.log() and mounts.at(str(t)) == []
    assert no_token.stop() == 0
    token = t.parents[5] / "admin-token"
    token.write_text("s3cret\n")
    c = csi(d, extra=["--admin-token-file", str(token)])
    c.publish(t, {"model": BIG, "revision": "main", "waitForCache": "true"})
    weights = t / "snapshots" / hub.commits[BIG] / "weights.bin"
    assert float(os.getxattr(weights, "user.nodecache.cached")) == 1.0, "cached before publish returned"
    before = hub.stats.data_bytes
    assert sha256_file(weights) == sha256_file(big_repo / "weights.bin")
    assert hub.stats.data_bytes == before, "reading the published model fetched nothing more"
    c.unpublish(t)


def test_a_model_larger_than_the_cache_is_published_for_lazy_reads_not_waited_for(hub, daemons, csi, big_repo):
    """/v1/prefetch refuses it (507: it can never be whole here); the pod still gets the model,
    read lazily, and a pod that asked to wait for every byte hears why it never could."""
    d = daemons(repos=(SMALL,), env={"NODECACHE_DISK_MAX": str(32 * MiB), "NODECACHE_MIN_FREE": "0"})
    c = csi(d)
    waits = c.target("waits")
    assert code_of(lambda: c.publish(waits, {"model": BIG, "waitForCache": "true"})) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert "bytes do not fit this node's cache" in c.log() and mounts.at(str(waits)) == []
    t = c.target()
    c.publish(t, {"model": BIG})
    with open(t / "snapshots" / hub.commits[BIG] / "weights.bin", "rb") as f:
        assert f.read(MiB) == (big_repo / "weights.bin").read_bytes()[:MiB]
    c.unpublish(t)


def test_wait_for_cache_is_bounded_and_concurrent_calls_abort(hub, daemons, csi):
    held = Fault("hold")  # the fill's first response waits for the test: the model cannot be complete
    hub.faults.append(held)
    d = daemons(repos=(SMALL, BIG))
    c = csi(d, extra=["--wait-timeout", "2"])
    t = c.target()
    first: list = []

    def slow_publish():
        try:
            c.publish(t, {"model": BIG, "waitForCache": "true"})
            first.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            first.append(e.code())

    th = threading.Thread(target=slow_publish)
    start = time.monotonic()
    th.start()
    try:
        assert held.reached.wait(30), "the publish never started a fill"  # so it is in flight now
        assert code_of(lambda: c.publish(t, {"model": BIG, "waitForCache": "true"})) == grpc.StatusCode.ABORTED
        th.join(30)
        assert first == [grpc.StatusCode.UNAVAILABLE], "kubelet retries UNAVAILABLE"
        assert time.monotonic() - start < 20, "bounded by --wait-timeout (2 s), not by the fill"
        assert mounts.at(str(t)) == []
    finally:
        held.release.set()


def test_unpublish_of_a_dead_bind(hub, daemons, csi):
    d = daemons()
    c = csi(d)
    t = c.target()
    c.publish(t, {"model": SMALL})
    d.kill9()
    assert mounts.probe(str(t)) == errno.ENOTCONN
    c.unpublish(t)
    assert mounts.at(str(t)) == [] and not t.exists()


@contextlib.contextmanager
def container_with(volume: Path, where: Path):
    """A process in its own mount namespace that mounts `volume` at `where` the way a container
    runtime does for `mountPropagation: HostToContainer` (rslave)."""
    where.mkdir(parents=True, exist_ok=True)
    sh = f"mount --make-rslave / && mount --rbind {volume} {where} && mount --make-rslave {where} && exec sleep 120"
    p = subprocess.Popen(["unshare", "--mount", "--propagation", "unchanged", "sh", "-c", sh])
    try:
        wait_until(lambda: Path(f"/proc/{p.pid}/cmdline").read_bytes().startswith(b"sleep"), what="container")

        def run(cmd: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                # --root: a mount namespace's own root is not the container's when the tests run chrooted
                ["nsenter", f"--mount=/proc/{p.pid}/ns/mnt", f"--root=/proc/{p.pid}/root", "sh", "-c", cmd],
                capture_output=True,
                text=True,
            )

        yield run
    finally:
        p.kill()
        p.wait(10)


@contextlib.contextmanager
def shared_pods_dir(c: Csi):
    """kubelet's pods dir lives on a shared mount on a real node; make ours one too."""
    pods = c.kubelet / "pods"
    pods.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(pods), str(pods)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(pods)], check=True)
        yield pods
    finally:
        for e in reversed(mounts.mountinfo()):
            if e.mountpoint.startswith(str(pods) + "/"):
                with contextlib.suppress(OSError):
                    mounts.unmount_all(e.mountpoint)
        mounts.unmount_all(str(pods))


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_daemon_restart_reconciles_published_targets(hub, daemons, csi, tmp_path, how):
    d = daemons()
    c = csi(d, extra=["--allow-whole-cache"])
    commit = hub.commits[SMALL]
    with shared_pods_dir(c):
        t_model, t_hub = c.target("model"), c.target("hub", pod="pod-2")
        c.publish(t_model, {"model": SMALL})
        c.publish(t_hub, {}, volume_id="hub")
        old_dev = dev_of(d.mount)
        with container_with(t_model, tmp_path / "ctr" / "models") as ctr:
            assert ctr(f"cat {tmp_path}/ctr/models/refs/main").stdout == commit
            if how == "kill9":
                d.kill9()  # the mount is left dead; the plugin detaches it (so does `serve` at start)
                wait_until(lambda: mounts.at(str(d.mount)) == [], what="stale mount detached")
            else:
                d.stop()
            r = ctr(f"ls {tmp_path}/ctr/models/refs")
            assert r.returncode != 0 and "not connected" in r.stderr, "the old connection is dead"
            d.start()
            new_dev = dev_of(d.mount)
            assert new_dev != old_dev
            wait_until(lambda: readable(t_model) and readable(t_hub), what="reconciler re-bind")
            assert (t_model / "refs" / "main").read_text() == commit
            assert (t_hub / "models--org--small" / "refs" / "main").read_text() == commit
            for t in (t_model, t_hub):
                top = mounts.top(str(t))
                assert top.dev == new_dev and top.readonly
            # the container (HostToContainer) sees the new bind without a restart
            assert ctr(f"cat {tmp_path}/ctr/models/refs/main").stdout == commit
        assert "re-bound" in c.log()
        # publish again (kubelet does after its own restart): OK, nothing more stacked
        n = len(mounts.at(str(t_model)))
        c.publish(t_model, {"model": SMALL})
        assert len(mounts.at(str(t_model))) == n
        for t, vid in ((t_model, "vol-1"), (t_hub, "hub")):
            c.unpublish(t, volume_id=vid)
            assert mounts.at(str(t)) == [] and not t.exists()


def test_stale_mount_cleaned_at_start_and_probe(hub, daemons, csi):
    d = daemons()
    d.kill9()
    assert mounts.at(str(d.mount)), "a dead mount is left behind"
    assert mounts.probe(str(d.mount)) == errno.ENOTCONN
    c = csi(d)
    assert mounts.at(str(d.mount)) == [], "the plugin detached the stale mount at start"
    assert c.identity.Probe(pb.ProbeRequest()).ready.value is False
    assert code_of(lambda: c.publish(c.target(), {"model": SMALL})) == grpc.StatusCode.UNAVAILABLE
    d.start()
    assert c.identity.Probe(pb.ProbeRequest()).ready.value is True
    t = c.target()
    c.publish(t, {"model": SMALL})
    assert readable(t)
    c.unpublish(t)


def test_endpoint_forms_and_stale_socket(daemons, csi, tmp_path):
    assert parse_endpoint("unix:///csi/csi.sock") == "/csi/csi.sock"
    assert parse_endpoint("unix:/csi/csi.sock") == "/csi/csi.sock"
    assert parse_endpoint("/csi/csi.sock") == "/csi/csi.sock"
    with pytest.raises(ValueError):
        parse_endpoint("tcp://127.0.0.1:1234")
    d = daemons()
    c = csi(d, start=False)
    c.sock.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(c.sock))  # a socket file nobody listens on, as after a crash
    s.close()
    c.args[c.args.index("--endpoint") + 1] = f"unix:{c.sock}"
    c.start()
    assert c.identity.Probe(pb.ProbeRequest()).ready.value is True
    assert c.stop() == 0
    assert not c.sock.exists(), "the socket is removed on a clean stop"
    # a live socket is not stale: a second plugin on it refuses to start
    first, second = csi(d), csi(d, start=False)
    with open(second.log_path, "ab") as log:
        rc = subprocess.run(second.args, stdout=log, stderr=subprocess.STDOUT, timeout=30).returncode
    assert rc == 1 and "in use" in second.log()
    assert first.identity.Probe(pb.ProbeRequest()).ready.value is True


def test_mountinfo_parsing_and_probe_of_a_hung_path(monkeypatch):
    line = (
        "46 45 0:41 /hub/models--org--small /tmp/k\\040pods/t1 ro,nosuid,nodev,relatime shared:7 master:2 - "
        "fuse nodecache ro,user_id=0,group_id=0,default_permissions,allow_other"
    )
    [e] = mounts.parse_mountinfo(line)
    assert (e.dev, e.root, e.mountpoint, e.source, e.fstype) == (
        "0:41",
        "/hub/models--org--small",
        "/tmp/k pods/t1",
        "nodecache",
        "fuse",
    )
    assert e.readonly and e.is_fuse
    # a hung daemon: the caller gets ETIMEDOUT, and never more than one stuck thread per path
    release = threading.Event()
    real = os.statvfs

    def hang(path):
        if path == "/hung":
            release.wait(60)
            raise OSError(errno.ENOTCONN, "gone")
        return real(path)

    monkeypatch.setattr(os, "statvfs", hang)
    before = threading.active_count()
    t0 = time.monotonic()
    assert [mounts.probe("/hung", 0.2) for _ in range(5)] == [errno.ETIMEDOUT] * 5
    # each gave up after its own 0.2 s: waiting for the hung call would have taken 60 s
    assert time.monotonic() - t0 < 30 and threading.active_count() <= before + 1
    release.set()
    wait_until(lambda: mounts.probe("/hung", 0.5) == errno.ENOTCONN, timeout=5, what="probe after release")


# --- multi-tenancy: who may mount what ---------------------------------------------------------

TOKEN = "hf_node_token_for_every_tenant"
PUBLIC, GATED, PRIVATE = "team-a/public", "team-a/gated", "team-a/private"
PRIVATE_DS = "datasets/team-a/private"
SECRET = b"team A's private weights\n"

POLICY = """
rules:
  - namespace: team-a                 # its own org, private repos and datasets included
    repos: ["team-a/*"]
    privateRepos: ["team-a/private", "datasets/team-a/*"]
  - namespace: "team-b*"              # team-a's public repos only
    repos: ["team-a/*"]
  - namespace: team-b
    serviceAccount: trainer           # ... and, for this service account, the gated one (licence accepted)
    privateRepos: ["team-a/gated"]
  - namespace: ops
    wholeCache: true
"""


@pytest.fixture
def tenant_hub(small_repo):
    """A Hub with a public, a gated and a private model and a private dataset; the node's token sees all."""
    with HubEmulator(token=TOKEN) as h:
        h.commits = {
            PUBLIC: h.add_repo(PUBLIC, small_repo),
            GATED: h.add_repo(GATED, small_repo, gated=True),
            PRIVATE: h.add_repo(PRIVATE, {"secret.txt": SECRET}, private=True),
            PRIVATE_DS: h.add_repo(PRIVATE, {"rows.csv": b"a,b\n1,2\n"}, repo_type="dataset", private=True),
        }
        yield h


@pytest.fixture
def node(tmp_path, tenant_hub):
    """A daemon holding the node's HF token (as the DaemonSet does); PUBLIC and PRIVATE resolved at start,
    GATED and the dataset only when a publish asks for them."""
    _need_fuse()
    work = tmp_path / "node"
    work.mkdir()
    env = {"NODECACHE_CHUNK_SIZE": str(MiB), "NODECACHE_READ_TIMEOUT": "20", "NODECACHE_FSYNC": "false"}
    d = DaemonProcess(work, tenant_hub.url, [PUBLIC, PRIVATE], env={**env, "HF_TOKEN": TOKEN})
    d.start()
    yield d
    d.stop()


def pod(namespace: str, account: str = "default", **attrs) -> dict:
    """Volume context as kubelet sends it with podInfoOnMount: the volume's attributes plus the pod's."""
    return {
        **attrs,
        "csi.storage.k8s.io/pod.name": f"{namespace}-pod",
        "csi.storage.k8s.io/pod.namespace": namespace,
        "csi.storage.k8s.io/pod.uid": f"uid-{namespace}-{account}",
        "csi.storage.k8s.io/serviceAccount.name": account,
        "csi.storage.k8s.io/ephemeral": "true",
    }


def refused(call) -> str:
    """The call fails with PERMISSION_DENIED; its message."""
    with pytest.raises(grpc.RpcError) as ei:
        call()
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED, ei.value.details()
    return ei.value.details()


def write_configmap(directory: Path, name: str, text: str) -> Path:
    """Update a file the way kubelet updates a ConfigMap volume: a new timestamped dir, `..data` swapped to it by
    rename(2), `name` a symlink through `..data`, the old dir removed."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    fresh = directory / f"..{time.monotonic_ns()}"
    fresh.mkdir()
    (fresh / name).write_text(text)
    (directory / "..data_tmp").symlink_to(fresh.name)
    os.rename(directory / "..data_tmp", data)
    if not (directory / name).is_symlink():
        (directory / name).symlink_to(f"..data/{name}")
    if old is not None:
        shutil.rmtree(directory / old)
    return directory / name


def test_policy_documents_and_globs():
    p = parse_policy(POLICY, "policy.yaml")
    assert p.grant("team-a", "default", "model", PRIVATE) == "any"
    assert p.grant("team-a", "default", "model", PUBLIC) == "public"
    assert p.grant("team-a", "default", "dataset", "team-a/private") == "any"
    assert p.grant("team-b", "default", "model", GATED) == "public"
    assert p.grant("team-b", "trainer", "model", GATED) == "any"
    assert p.grant("team-b-dev", "trainer", "model", GATED) == "public"  # the trainer rule names team-b only
    assert p.grant("team-c", "default", "model", PUBLIC) is None
    assert p.grant("team-b", "default", "model", "team-a2/x") is None
    assert p.whole_cache("ops", "any") and not p.whole_cache("team-a", "default")
    # one pattern per path segment: `*/*` is every org's models, never a dataset or a deeper path
    assert repo_matches("*/*", "model", "org/x") and not repo_matches("*/*", "dataset", "org/x")
    assert repo_matches("datasets/org/*", "dataset", "org/x") and not repo_matches("org/*", "dataset", "org/x")
    assert repo_matches("*", "model", "gpt2") and not repo_matches("*", "model", "org/x")
    assert parse_policy("rules: [{namespace: a, repos: [models/org/*]}]", "p").grant("a", "", "model", "org/x")
    for bad, where in [
        ("", "empty"),
        ("rules: {}", "rules"),
        ("rules: [{repos: ['org/*']}]", "namespace"),
        ("rules: [{namespace: a, repo: ['org/*']}]", "unknown key"),
        ("rules: [{namespace: a, repos: 'org/*'}]", "list"),
        ("rules: [{namespace: a, repos: ['dataset/org/*']}]", "dataset"),
        ("rules: [{namespace: a, repos: ['org /*']}]", "org /*"),
        ("rules: [{namespace: a, wholeCache: 'yes'}]", "wholeCache"),
        ("rules: [{namespace: 'a b'}]", "namespace"),
        ("rules:\n  - namespace: [", "YAML"),
        ("[" * 50_000, "deeply"),
    ]:
        with pytest.raises(PolicyError, match=re.escape(where)):
            parse_policy(bad, "policy.yaml")


def test_whole_cache_needs_the_flag(hub, daemons, csi):
    d = daemons()
    off = csi(d)
    t = off.target("hub")
    message = refused(lambda: off.publish(t, {}, volume_id="hub"))
    assert "whole hub/" in message and "--allow-whole-cache" in message
    message = refused(lambda: off.publish(t, pod("team-a"), volume_id="hub"))
    assert "'team-a'" in message and "whole hub/" in message
    assert mounts.at(str(t)) == [] and not t.exists()
    assert off.stop() == 0
    on = csi(d, extra=["--allow-whole-cache"])
    on.publish(t, pod("team-a"), volume_id="hub")
    assert (t / "models--org--small" / "refs" / "main").read_text() == hub.commits[SMALL]
    on.unpublish(t, volume_id="hub")


def test_without_a_policy_only_public_repos(tenant_hub, node, csi):
    c = csi(node)
    t = c.target()
    c.publish(t, pod("anyone", model=PUBLIC))  # public: every pod, with or without pod info
    assert (t / "refs" / "main").read_text() == tenant_hub.commits[PUBLIC]
    c.unpublish(t)
    messages = {}
    for repo, visibility in ((PRIVATE, "private"), (GATED, "gated"), (PRIVATE_DS, "private"), ("team-a/nope", "")):
        before, jobs = tenant_hub.stats.data_bytes, node.status()["jobs"]
        message = refused(lambda repo=repo: c.publish(t, pod("anyone", model=repo)))
        # resolved to learn its visibility, never filled: no byte of it fetched, no job
        assert tenant_hub.stats.data_bytes == before and node.status()["jobs"] == jobs, repo
        assert repo in message and "'anyone'" in message and "--policy" in message, message
        messages[repo] = message.replace(repo, "REPO")
        assert mounts.at(str(t)) == [] and not t.exists()
        if visibility:  # the node's admins see why in the plugin's log
            assert f"asked for {repo}, which is {visibility}: refused" in c.log()
    # the pod cannot tell a private or gated repo from one that does not exist
    assert len(set(messages.values())) == 1, messages


def test_policy_by_namespace_service_account_and_visibility(tenant_hub, node, csi, tmp_path):
    policy = write_configmap(tmp_path / "csi-policy", "csi-policy.yaml", POLICY)
    c = csi(node, extra=["--policy", str(policy), "--allow-whole-cache"])
    t = c.target()
    # team-a: its public model, its private model and its private dataset
    c.publish(t, pod("team-a", model=PRIVATE))
    assert (t / "snapshots" / tenant_hub.commits[PRIVATE] / "secret.txt").read_bytes() == SECRET
    c.unpublish(t)
    for repo in (PUBLIC, PRIVATE_DS):
        c.publish(t, pod("team-a", model=repo))
        assert (t / "refs" / "main").read_text() == tenant_hub.commits[repo]
        c.unpublish(t)
    # team-b: team-a's globs, public only; a private repo the node already knows is refused before any fetch
    c.publish(t, pod("team-b", model=PUBLIC))
    c.unpublish(t)
    before, jobs = tenant_hub.stats.data_bytes, node.status()["jobs"]
    message = refused(lambda: c.publish(t, pod("team-b", model=PRIVATE)))
    assert PRIVATE in message and "'team-b'" in message and "only if it is a public repo" in message, message
    assert "privateRepos" in message and str(policy) in message
    assert f"asked for {PRIVATE}, which is private" in c.log()
    assert tenant_hub.stats.data_bytes == before and node.status()["jobs"] == jobs
    # a gated repo the node has not resolved: resolved through the daemon, then refused for its visibility
    message = refused(lambda: c.publish(t, pod("team-b", model=GATED, waitForCache="true")))
    assert GATED in message and "'team-b'" in message and "only if it is a public repo" in message, message
    assert f"asked for {GATED}, which is gated" in c.log()
    assert mounts.at(str(t)) == [] and not t.exists()
    # ... and allowed to the one service account the policy names for it
    c.publish(t, pod("team-b", "trainer", model=GATED, waitForCache="true"))
    weights = t / "snapshots" / tenant_hub.commits[GATED] / "model.safetensors"
    assert float(os.getxattr(weights, "user.nodecache.cached")) == 1.0
    c.unpublish(t)
    # namespaces and repos no rule names
    for ctx, repo in (
        (pod("team-c", model=PUBLIC), PUBLIC),
        (pod("team-b", "trainer", model="team-z/public"), "team-z/public"),
        (pod("team-b", model="datasets/team-a/private"), "datasets/team-a/private"),
    ):
        ns = ctx["csi.storage.k8s.io/pod.namespace"]
        message = refused(lambda ctx=ctx: c.publish(t, ctx))
        assert repo in message and f"'{ns}'" in message and "no rule" in message, message
    # no pod info (a CSIDriver without podInfoOnMount): the policy cannot decide, so it refuses
    message = refused(lambda: c.publish(t, {"model": PUBLIC}))
    assert PUBLIC in message and "podInfoOnMount: true" in message
    # the whole hub/: the flag, and a rule with wholeCache for the namespace
    message = refused(lambda: c.publish(t, pod("team-a"), volume_id="hub"))
    assert "whole hub/" in message and "'team-a'" in message and "wholeCache" in message
    c.publish(t, pod("ops"), volume_id="hub")
    assert (t / f"models--{PRIVATE.replace('/', '--')}" / "refs" / "main").exists()
    c.unpublish(t, volume_id="hub")
    assert mounts.at(str(t)) == [] and not t.exists()


def test_policy_reloads_and_a_bad_version_keeps_the_last_good(tenant_hub, node, csi, tmp_path):
    cm = tmp_path / "csi-policy"
    policy = write_configmap(cm, "csi-policy.yaml", POLICY)
    c = csi(node, extra=["--policy", str(policy)])
    t = c.target()
    c.publish(t, pod("team-a", model=PRIVATE))
    c.unpublish(t)
    # a broken update: the last good policy stays in force, reported once however often it is asked
    write_configmap(cm, "csi-policy.yaml", POLICY.replace("privateRepos:", "privateRepos: [", 1))
    for _ in range(3):
        c.publish(t, pod("team-a", model=PRIVATE))
        c.unpublish(t)
        assert "team-b" in refused(lambda: c.publish(t, pod("team-b", model=PRIVATE)))
    bad = [line for line in c.log().splitlines() if "keeping the policy loaded before" in line]
    assert len(bad) == 1 and str(policy) in bad[0] and "not valid YAML" in bad[0], c.log()
    # a good update takes effect at the next publish, without a restart
    write_configmap(cm, "csi-policy.yaml", "rules:\n  - namespace: team-b\n    privateRepos: ['team-a/*']\n")
    message = refused(lambda: c.publish(t, pod("team-a", model=PRIVATE)))
    assert PRIVATE in message and "'team-a'" in message and "no rule" in message
    c.publish(t, pod("team-b", model=PRIVATE))
    c.unpublish(t)
    assert c.proc.poll() is None


def test_a_policy_that_never_loaded_refuses_everything(tenant_hub, node, csi, tmp_path):
    cm = tmp_path / "csi-policy"
    missing = cm / "csi-policy.yaml"
    c = csi(node, extra=["--policy", str(missing), "--allow-whole-cache"])  # a plugin that starts: no crash loop
    t = c.target()
    message = refused(lambda: c.publish(t, pod("team-a", model=PUBLIC)))
    assert PUBLIC in message and "'team-a'" in message and "never loaded" in message
    write_configmap(cm, "csi-policy.yaml", "rules: [{namespace: team-a, repo: ['team-a/*']}]")  # a typo'd key
    message = refused(lambda: c.publish(t, pod("team-a"), volume_id="hub"))
    assert "whole hub/" in message and "never loaded" in message and "unknown key" in message
    write_configmap(cm, "csi-policy.yaml", POLICY)
    c.publish(t, pod("team-a", model=PUBLIC))
    c.unpublish(t)
    lines = [line for line in c.log().splitlines() if " nodecache.csi.policy: " in line]
    assert [("refusing every volume" in x, "loaded" in x) for x in lines] == [
        (True, False),
        (True, False),
        (False, True),
    ]
    assert c.proc.poll() is None


PROPAGATION = """
import os, sys
from nodecache import mounts
work = sys.argv[1]
src, shared, peer = (os.path.join(work, n) for n in ("src", "shared", "peer"))
for d in (src, shared, peer):
    os.makedirs(d)
mounts.mount("tmpfs", src, "tmpfs", 0, "size=1m")  # a writable source, like the FUSE mount now is
mounts.mount("tmpfs", shared, "tmpfs", 0, "size=1m")
mounts.mount("none", shared, "", 1 << 20, "")  # MS_SHARED
mounts.mount(shared, peer, "", mounts.MS_BIND, "")  # peer: the same peer group, as under a shared /
os.makedirs(os.path.join(shared, "t"))
mounts.bind_readonly(src, os.path.join(shared, "t"))
for where in ("shared", "peer"):
    [top] = mounts.at(os.path.join(work, where, "t"))[-1:]
    print(where, top.readonly)
"""


def test_a_read_only_bind_is_read_only_in_every_propagated_copy(tmp_path):
    """Under a shared parent (systemd's /, every Kubernetes node) the kernel copies a new bind to
    each peer as it is made; a read-only remount afterwards leaves those copies writable."""
    if reason := machine.mount_tmpfs():
        pytest.skip(reason)
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", PROPAGATION, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["shared", "True", "peer", "True"], out.stdout
