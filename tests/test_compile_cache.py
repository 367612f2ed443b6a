"""Compile caches for real: `kind: compile-cache` CSI volumes over the plugin's unix socket (real rw binds of
the daemon's per-key directory), quota and LRU, sealing, hostile state on disk, and a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from conftest import SMALL, wait_until
from test_csi import code_of, csi  # noqa: F401  (csi is a fixture)

from nodecache import ccmanifest as cm
from nodecache import mounts

POD = {
    "csi.storage.k8s.io/ephemeral": "true",
    "csi.storage.k8s.io/pod.namespace": "team-a",
    "csi.storage.k8s.io/serviceAccount.name": "default",
}
KEY = "qwen2.5-7b@abc123/h100/vllm-0.11"


def cc(key=KEY, **more) -> dict:
    return {**POD, "kind": "compile-cache", "key": key, **more}


def api(daemon, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(daemon.url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def listing(daemon) -> dict[str, dict]:
    return {k["key"]: k for k in api(daemon, "GET", "/v1/compile-caches")[1]["compile_caches"]}


def cli(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nodecache", *args, "--endpoint", daemon.url], capture_output=True, text=True, timeout=60
    )


def test_publish_rw_shared_by_two_pods_idempotent_and_model_stays_ro(daemons, csi):  # noqa: F811
    d = daemons()
    c = csi(d)
    t1, t2 = c.target("cc", "pod-1"), c.target("cc", "pod-2")
    c.publish(t1, cc(), volume_id="cc-1")
    c.publish(t1, cc(), volume_id="cc-1")  # idempotent
    c.publish(t2, cc(), volume_id="cc-2")
    [m1], [m2] = mounts.at(str(t1)), mounts.at(str(t2))
    assert not m1.is_fuse and "rw" in m1.options and {"nosuid", "nodev"} <= m1.options
    assert m1.root == m2.root and m1.dev == m2.dev, "one directory per key, shared by both pods"
    (t1 / "triton" / "abc").mkdir(parents=True)
    (t1 / "triton" / "abc" / "kernel.cubin").write_bytes(b"\x7fELF" + os.urandom(1000))
    assert (t2 / "triton" / "abc" / "kernel.cubin").read_bytes() == (
        t1 / "triton" / "abc" / "kernel.cubin"
    ).read_bytes()
    # the directory is on local disk under the cache dir, named by the key's hash (and the pod's namespace)
    name = cm.key_name("team-a/" + KEY)
    assert (d.cache_dir / "compile-caches" / "keys" / name / "tree" / "triton" / "abc" / "kernel.cubin").is_file()
    assert listing(d)["team-a/" + KEY]["in_use"] == 2
    # another namespace with the same key text gets its own directory
    t3 = c.target("cc", "pod-3")
    c.publish(t3, {**cc(), "csi.storage.k8s.io/pod.namespace": "team-b"}, volume_id="cc-3")
    assert not (t3 / "triton").exists()
    # a model volume of the same pod is still read-only
    tm = c.target("model", "pod-1")
    c.publish(tm, {**POD, "model": SMALL}, volume_id="m-1")
    assert "ro" in mounts.at(str(tm))[0].options
    # unpublish is idempotent; the key's files stay for the next pod
    c.unpublish(t1, "cc-1")
    c.unpublish(t1, "cc-1")
    assert not t1.exists() and (t2 / "triton" / "abc" / "kernel.cubin").is_file()
    assert listing(d)["team-a/" + KEY]["in_use"] == 1
    c.unpublish(t2, "cc-2")
    assert listing(d)["team-a/" + KEY]["in_use"] == 0
    c.publish(t1, cc(), volume_id="cc-1")
    assert (t1 / "triton" / "abc" / "kernel.cubin").is_file(), "a new pod finds what the last one compiled"


def test_attribute_validation(daemons, csi):  # noqa: F811
    d = daemons()
    c = csi(d)
    t = c.target("cc")
    bad = [
        ({**POD, "kind": "compile-cache"}, grpc.StatusCode.INVALID_ARGUMENT),  # no key
        (cc(key="a\nb"), grpc.StatusCode.INVALID_ARGUMENT),
        (cc(key="x" * 600), grpc.StatusCode.INVALID_ARGUMENT),
        (cc(key="   "), grpc.StatusCode.INVALID_ARGUMENT),
        (cc(model=SMALL), grpc.StatusCode.INVALID_ARGUMENT),  # model is not an attribute of this kind
        ({**POD, "kind": "scratch", "key": "k"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"kind": "compile-cache", "key": "k"}, grpc.StatusCode.PERMISSION_DENIED),  # no pod namespace
        ({**POD, "model": SMALL, "key": "k"}, grpc.StatusCode.INVALID_ARGUMENT),  # key on a model volume
    ]
    for context, code in bad:
        assert code_of(lambda context=context: c.publish(t, context)) == code, context
    assert not mounts.at(str(t)) and listing(d) == {}
    # a key that is a path gets a hashed directory, never that path
    c.publish(t, cc(key="../../../../etc"), volume_id="v")
    [m] = mounts.at(str(t))
    assert m.root.endswith("/tree") and "etc" not in m.root
    c.unpublish(t, "v")
    # the daemon's own API refuses bad input with a JSON 400
    status, body = api(d, "POST", "/v1/compile-caches/acquire", {"key": "k", "target": "relative"})
    assert status == 400 and body["error"] == "bad_request"
    status, body = api(d, "POST", "/v1/compile-caches/evict", {"key": 5})
    assert status == 400


def test_survives_daemon_restart_and_eviction_respects_use(daemons, csi):  # noqa: F811
    d = daemons()
    c = csi(d)
    t = c.target("cc")
    c.publish(t, cc(), volume_id="v")
    (t / "inductor.bin").write_bytes(b"x" * 5000)
    d.stop()
    d.start()
    assert (t / "inductor.bin").read_bytes() == b"x" * 5000, "a local-disk bind does not die with the daemon"
    (t / "after-restart").write_text("ok")
    key = "team-a/" + KEY
    assert listing(d)[key]["in_use"] == 1, "who uses a key survives a restart"
    status, body = api(d, "POST", "/v1/compile-caches/evict", {"key": key})
    assert status == 409 and body["error"] == "in_use"
    r = cli(d, "evict", "--compile-cache", key)
    assert r.returncode == 1 and "409" in r.stderr and "published to 1 volume" in r.stderr, r.stderr
    c.unpublish(t, "v")
    r = cli(d, "ls", "--compile-caches")
    assert r.returncode == 0 and key in r.stdout, r.stderr
    r = cli(d, "evict", "--compile-cache", key)
    assert r.returncode == 0, r.stderr
    assert listing(d) == {}
    assert not (d.cache_dir / "compile-caches" / "keys" / cm.key_name(key)).exists()
    assert cli(d, "evict", "--compile-cache", key).returncode == 1


def test_quota_evicts_lru_idle_keys_never_used_ones(daemons, csi):  # noqa: F811
    d = daemons(env={"NODECACHE_COMPILE_CACHE_MAX": "300Ki", "NODECACHE_COMPILE_CACHE_SEAL_AFTER": "3600"})
    c = csi(d)
    ts = []
    for i in range(3):
        t = c.target("cc", f"pod-{i}")
        c.publish(t, cc(key=f"k{i}"), volume_id=f"v{i}")
        (t / "blob").write_bytes(os.urandom(120 * 1024))
        ts.append(t)
        time.sleep(0.01)
    c.unpublish(ts[1], "v1")  # idle, less recently used than k2
    c.unpublish(ts[2], "v2")
    # 360 KiB > 300 KiB: the least recently used idle key goes (k1); k0 is in use though older
    wait_until(lambda: "team-a/k1" not in listing(d), what="LRU eviction")
    keys = listing(d)
    assert "team-a/k0" in keys and "team-a/k2" in keys
    assert (ts[0] / "blob").is_file()
    assert 'nodecache_compile_cache_events_total{event="eviction"} 1.0' in d.metrics()
    assert 'nodecache_compile_caches{state="in_use"} 1.0' in d.metrics()


def test_seal_manifest_and_quiet_period(daemons, csi):  # noqa: F811
    d = daemons(env={"NODECACHE_COMPILE_CACHE_SEAL_AFTER": "0.5"})
    c = csi(d)
    t = c.target("cc")
    c.publish(t, cc(), volume_id="v")
    (t / "a" / "b").mkdir(parents=True)
    (t / "a" / "b" / "f.py").write_text("x = 1\n")
    os.chmod(t / "a" / "b" / "f.py", 0o640)
    (t / "same1").write_bytes(b"dup" * 1000)
    (t / "same2").write_bytes(b"dup" * 1000)
    os.symlink("a/b/f.py", t / "inside")
    os.symlink("/etc/passwd", t / "outside")
    os.symlink("../../../../etc", t / "a" / "up")
    os.mkfifo(t / "fifo")
    key = "team-a/" + KEY
    wait_until(lambda: (listing(d)[key]["sealed"] or {}).get("files") == 3, what="a seal after the quiet period")
    sealed = cm.parse((d.cache_dir / "compile-caches" / "keys" / cm.key_name(key) / "sealed.json").read_bytes(), key)
    by_path = {e.path: e for e in sealed.entries}
    assert set(by_path) == {"a", "a/b", "a/b/f.py", "same1", "same2", "inside"}, "links out, fifos: never sealed"
    assert by_path["a/b/f.py"].mode == 0o640 and by_path["inside"].target == "a/b/f.py"
    blobs = list((d.cache_dir / "compile-caches" / "blobs").iterdir())
    assert len(blobs) == 2, "identical files are one blob"
    assert not listing(d)[key]["dirty"]
    (t / "new").write_text("more")
    wait_until(lambda: listing(d)[key]["dirty"], what="dirty after a write")
    r = cli(d, "compile-cache", "seal", key)
    assert r.returncode == 0 and "4 files" in r.stdout, r.stdout + r.stderr
    assert not listing(d)[key]["dirty"]


def test_hostile_state_on_disk_never_stops_a_start(daemons, tmp_path):
    d = daemons(start=False)
    root = d.cache_dir / "compile-caches" / "keys"
    good, bad_meta, bad_manifest = (cm.key_name(k) for k in ("team-a/good", "team-a/bad", "team-a/evil"))
    for name, key in ((good, "team-a/good"), (bad_manifest, "team-a/evil")):
        (root / name / "tree").mkdir(parents=True)
        (root / name / "meta.json").write_text(json.dumps({"key": key, "created": 1, "last_used": 1, "users": []}))
    (root / bad_meta / "tree").mkdir(parents=True)
    (root / bad_meta / "meta.json").write_text("{not json")
    (root / "not-a-key").mkdir()
    evil = {
        "version": 1,
        "key": "team-a/evil",
        "sealed_at": 1.0,
        "node": "x",
        "entries": [{"path": "../../../etc/cron.d/x", "type": "file", "mode": 420, "size": 1, "sha256": "0" * 64}],
    }
    (root / bad_manifest / "sealed.json").write_text(json.dumps(evil))
    d.start()
    assert set(listing(d)) == {"team-a/good", "team-a/evil"}
    assert listing(d)["team-a/evil"]["sealed"] is None
    assert 'index_invalid_entries_total{db="compile_cache_manifest"} 1.0' in d.metrics()
    assert "bad sealed.json" in d.log() and "bad meta.json" in d.log()


def test_manifest_parse_refuses_hostile_documents():
    ok = {"version": 1, "key": "k", "sealed_at": 5.0, "node": "n", "entries": []}

    def doc(**kw) -> bytes:
        return json.dumps({**ok, **kw}).encode()

    f = {"type": "file", "mode": 0o644, "size": 1, "sha256": "a" * 64}
    refused = [
        b"[" * 100_000,
        b"not json",
        doc(version=2),
        doc(key="other"),
        doc(sealed_at="yesterday"),
        doc(entries=[{"path": "/etc/passwd", **f}]),
        doc(entries=[{"path": "a/../../x", **f}]),
        doc(entries=[{"path": "a/./x", **f}]),
        doc(entries=[{"path": "x", **f}, {"path": "x", **f}]),
        doc(entries=[{"path": "a/x", **f}]),  # parent not listed
        doc(entries=[{"path": "a", **f}, {"path": "a/x", **f}]),  # parent is a file
        doc(entries=[{"path": "l", "type": "symlink", "target": "/etc"}, {"path": "l/x", **f}]),
        doc(
            entries=[{"path": "d", "type": "dir", "mode": 0o755}, {"path": "d/l", "type": "symlink", "target": "../.."}]
        ),
        doc(entries=[{"path": "x", **{**f, "size": -1}}]),
        doc(entries=[{"path": "x", **{**f, "size": cm.MAX_FILE + 1}}]),
        doc(entries=[{"path": "x", **{**f, "sha256": "A" * 64}}]),
        doc(entries=[{"path": "x", **{**f, "mode": 0o4755}}]),  # setuid
        doc(entries=[{"path": "x", "type": "fifo", "mode": 0o644}]),
        doc(entries=[{"path": "x\u0000y", **f}]),
        doc(entries=[{"path": f"f{i}", **f} for i in range(cm.MAX_ENTRIES + 1)]),
    ]
    for data in refused:
        try:
            cm.parse(data, "k")
        except cm.BadManifest:
            continue
        raise AssertionError(f"accepted {data[:120]!r}")
    m = cm.parse(
        doc(
            entries=[
                {"path": "d", "type": "dir", "mode": 0o755},
                {"path": "d/x", **f},
                {"path": "d/l", "type": "symlink", "target": "x"},
            ]
        ),
        "k",
    )
    assert m.files == 1 and cm.parse(m.dump(), "k").id == m.id
    assert cm.key_name("k") == cm.key_name("k") != cm.key_name("k ")
    assert Path(cm.key_name("../x")).name == cm.key_name("../x") and cm.NAME_RE.fullmatch(cm.key_name("../x"))


def test_the_plugin_keeps_the_daemons_key_users_true_to_the_mount_table(daemons, csi):  # noqa: F811
    d = daemons(env={"NODECACHE_COMPILE_CACHE_SEAL_AFTER": "3600"})
    c = csi(d)
    t = c.target("cc")
    c.publish(t, cc(), volume_id="v")
    (t / "kernel.cubin").write_bytes(b"k" * 4096)
    key = "team-a/" + KEY
    meta = d.cache_dir / "compile-caches" / "keys" / cm.key_name(key) / "meta.json"
    # the daemon's state of who uses the key is lost (restored from an old copy, a crash before its save)
    d.stop()
    doc = json.loads(meta.read_text())
    assert doc["users"] == [str(t)]
    meta.write_text(json.dumps({**doc, "users": []}))
    d.start()
    wait_until(lambda: listing(d)[key]["in_use"] == 1, what="the plugin telling the daemon the bind is in use")
    status, body = api(d, "POST", "/v1/compile-caches/evict", {"key": key})
    assert status == 409 and body["error"] == "in_use", "a key bound to a pod is not evicted after the restart"
    assert api(d, "GET", "/v1/compile-caches/users")[1]["users"] == {str(t): cm.key_name(key)}
    # an unpublish the daemon never heard of: a target under kubelet's pods dir it counts but nothing binds
    ghost = c.target("cc", "pod-gone")
    assert api(d, "POST", "/v1/compile-caches/acquire", {"key": key, "target": str(ghost)})[0] == 200
    outside = "/not/kubelets/target"  # not the plugin's to judge: left as it is
    assert api(d, "POST", "/v1/compile-caches/acquire", {"key": key, "target": outside})[0] == 200
    wait_until(lambda: str(ghost) not in api(d, "GET", "/v1/compile-caches/users")[1]["users"], what="ghost released")
    assert set(api(d, "GET", "/v1/compile-caches/users")[1]["users"]) == {str(t), outside}
    # the adopt call refuses what it cannot use
    for body in ({"name": "../x", "target": "/a"}, {"name": "0" * 32, "target": "/a"}):
        assert api(d, "POST", "/v1/compile-caches/adopt", body)[0] == 404
    assert api(d, "POST", "/v1/compile-caches/adopt", {"name": cm.key_name(key), "target": "rel"})[0] == 400
    assert api(d, "POST", "/v1/compile-caches/adopt", {"name": 5})[0] == 400
    c.unpublish(t, "v")
    api(d, "POST", "/v1/compile-caches/release", {"target": outside})
    assert listing(d)[key]["in_use"] == 0
