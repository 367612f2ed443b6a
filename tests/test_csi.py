"""The CSI node plugin for real: `nodecache csi` in a subprocess, gRPC over its unix socket,
real read-only bind mounts of a real nodecache FUSE mount, real huggingface_hub reading them."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import BIG, SMALL, sha256_file

from nodecache import mounts
from nodecache.csi.driver import parse_endpoint
from nodecache.csi.proto import load
from nodecache.testing.hub import Fault

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


def wait_until(pred, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def readable(path: Path) -> bool:
    return mounts.probe(str(path), 2.0) == 0 and bool(os.listdir(path))


# ---------------------------------------------------------------------------


def test_identity_and_node_rpcs(daemons, csi):
    c = csi(daemons())
    info = c.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "nodecache.csi.k8s.io"
    assert len(info.name) <= 63 and re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", info.name)
    assert info.vendor_version
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
    c = csi(d)
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


def test_unknown_model_not_found_and_target_removed(daemons, csi):
    c = csi(daemons())
    t = c.target()
    t.mkdir()  # as if an earlier attempt had created it
    assert code_of(lambda: c.publish(t, {"model": "org/does-not-exist"})) == grpc.StatusCode.NOT_FOUND
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


def test_wait_for_cache_is_bounded_and_concurrent_calls_abort(hub, daemons, csi):
    hub.faults.extend(Fault("slow", seconds=1.0) for _ in range(200))
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
    time.sleep(0.5)
    assert code_of(lambda: c.publish(t, {"model": BIG, "waitForCache": "true"})) == grpc.StatusCode.ABORTED
    th.join(30)
    assert first == [grpc.StatusCode.UNAVAILABLE], "kubelet retries UNAVAILABLE"
    assert time.monotonic() - start < 10
    assert mounts.at(str(t)) == []
    hub.faults.clear()


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
                ["nsenter", f"--mount=/proc/{p.pid}/ns/mnt", "sh", "-c", cmd], capture_output=True, text=True
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
    c = csi(d)
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
            release.wait(10)
            raise OSError(errno.ENOTCONN, "gone")
        return real(path)

    monkeypatch.setattr(os, "statvfs", hang)
    before = threading.active_count()
    t0 = time.monotonic()
    assert [mounts.probe("/hung", 0.2) for _ in range(5)] == [errno.ETIMEDOUT] * 5
    assert time.monotonic() - t0 < 1.5 and threading.active_count() <= before + 1
    release.set()
    wait_until(lambda: mounts.probe("/hung", 0.5) == errno.ENOTCONN, timeout=5, what="probe after release")
