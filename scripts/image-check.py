"""The image's runtime stage checks itself inside its own build (the Dockerfile's `check` stage).

Where images are built, a container run is not always possible (a rootless VM, a build farm), so the
proof that the runtime stage works runs as a build step: with only what the image carries (no pytest,
no test extras), on loopback, with no privileges and no /dev/fuse. Usage:
`python3 image-check.py DIR`, DIR holding the DaemonSet's configmap.yaml and daemonset.yaml.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import yaml

from nodecache import __version__
from nodecache import config as config_mod
from nodecache.cli import build_parser
from nodecache.csi.driver import DRIVER_NAME
from nodecache.csi.policy import parse_policy
from nodecache.csi.proto import load

REPO = "image-check/tiny"


def check(ok: bool, what: str, detail: str = "") -> None:
    if not ok:
        raise SystemExit(f"image check failed: {what}\n{detail}".rstrip())
    print(f"ok: {what}", flush=True)


def cli() -> None:
    r = subprocess.run(["nodecache", "--help"], capture_output=True, text=True, timeout=60)
    check(r.returncode == 0 and "serve" in r.stdout and "csi" in r.stdout, "`nodecache --help` from PATH", r.stderr)


def shipped_config(manifests: Path, tmp: Path) -> None:
    """The ConfigMaps are a config file `serve` accepts and a policy `csi` accepts; the DaemonSet's args parse."""
    [ds] = [d for d in yaml.safe_load_all((manifests / "daemonset.yaml").read_text()) if d and d["kind"] == "DaemonSet"]
    containers = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
    serve = build_parser().parse_args(containers["nodecache"]["args"])
    csi = build_parser().parse_args(containers["csi-plugin"]["args"])
    check((serve.cmd, csi.cmd) == ("serve", "csi"), "the DaemonSet's serve and csi args parse")
    [cm] = [d for d in yaml.safe_load_all((manifests / "configmap.yaml").read_text()) if d]
    local = tmp / "config.yaml"
    local.write_text(cm["data"][Path(serve.config).name])
    # the container's environment on top, as in the pod: its values, and something for each Secret key
    env = {e["name"]: e.get("value", "from-the-secret") for e in containers["nodecache"]["env"]}
    env = {k: v.replace("$(POD_IP)", "10.1.2.3") for k, v in env.items()}
    cfg = config_mod.load(environ=env, file=local)
    check(str(cfg.mount) == csi.mount and cfg.listen_port == 8470, "the shipped ConfigMap loads as a config file")
    [policy_cm] = [d for d in yaml.safe_load_all((manifests / "csi-policy.yaml").read_text()) if d]
    policy = tmp / "csi-policy.yaml"
    policy.write_text(policy_cm["data"][Path(csi.policy).name])
    parse_policy(policy.read_text(), str(policy))
    print("ok: the shipped CSI policy ConfigMap parses", flush=True)
    bad = tmp / "bad.yaml"
    bad.write_text("disk_maxx: 1Gi\n")
    r = subprocess.run(
        ["nodecache", "serve", "--config", str(bad), "--mount", str(tmp / "m")], capture_output=True, text=True
    )
    check(
        r.returncode == 1 and "disk_maxx: unknown setting" in r.stderr,
        "a bad config stops serve with a message",
        r.stderr,
    )


class Hub:
    """The Hub emulator the package ships, in its own process on loopback."""

    def __init__(self, repo_dir: Path):
        cmd = [sys.executable, "-m", "nodecache.testing.hub", "--repo", f"{REPO}={repo_dir}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # "hub listening on URL (cdn URL)"
        if not line.startswith("hub listening on "):
            self.close()
            raise SystemExit(f"image check failed: the Hub emulator did not start: {line!r}")
        self.url = line.split()[3]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def prefetch(hub: Hub, repo_dir: Path, tmp: Path) -> None:
    """The daemon's fill path without FUSE: upstream, chunk store, LMDB index, hash verification."""
    cache = tmp / "cache"
    cmd = ["nodecache", "prefetch", REPO, "--cache-dir", str(cache), "--hub-url", hub.url]
    env = {**os.environ, "NODECACHE_CHUNK_SIZE": "1Mi"}  # a blob of four chunks
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, "`nodecache prefetch` from the Hub emulator", r.stderr[-2000:])
    want = hashlib.sha256((repo_dir / "weights.bin").read_bytes()).hexdigest()
    blob = cache / "blobs" / want[:2] / want
    check(blob.is_file() and hashlib.sha256(blob.read_bytes()).hexdigest() == want, "the prefetched blob is verified")


def csi_plugin(hub: Hub, tmp: Path) -> None:
    """`nodecache csi` answers over its unix socket: identity, node info, a refused bad volume."""
    pb, pb_grpc = load()
    sock = tmp / "plugin" / "csi.sock"
    args = ["nodecache", "csi", "--endpoint", f"unix://{sock}", "--node-id", "image-check"]
    args += ["--mount", str(tmp / "mnt"), "--daemon-url", hub.url, "--kubelet-dir", str(tmp / "kubelet")]
    args += ["--policy", str(tmp / "csi-policy.yaml")]  # the shipped one (shipped_config wrote it)
    proc = subprocess.Popen(args)
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        grpc.channel_ready_future(channel).result(timeout=60)
        info = pb_grpc.IdentityStub(channel).GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
        check((info.name, info.vendor_version) == (DRIVER_NAME, __version__), "CSI GetPluginInfo over the socket")
        node = pb_grpc.NodeStub(channel)
        check(node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=10).node_id == "image-check", "CSI NodeGetInfo")
        target = tmp / "kubelet" / "pods" / "p" / "volumes" / "kubernetes.io~csi" / "v" / "mount"
        cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=1))
        cap.mount.SetInParent()
        req = pb.NodePublishVolumeRequest(
            volume_id="v", target_path=str(target), volume_capability=cap, volume_context={"modle": "org/x"}
        )
        try:
            node.NodePublishVolume(req, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        check(code == grpc.StatusCode.INVALID_ARGUMENT, "CSI refuses an unknown volume attribute")
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    check(rc == 0 and not sock.exists(), "the CSI plugin stops on SIGTERM and removes its socket")


def main() -> None:
    manifests = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        repo_dir = tmp / "repo"
        repo_dir.mkdir()
        (repo_dir / "config.json").write_text('{"model_type": "image-check"}\n')
        (repo_dir / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 12345))
        cli()
        shipped_config(manifests, tmp)
        hub = Hub(repo_dir)
        try:
            prefetch(hub, repo_dir, tmp)
            csi_plugin(hub, tmp)
        finally:
            hub.close()
    print("image checks passed", flush=True)


if __name__ == "__main__":
    main()
