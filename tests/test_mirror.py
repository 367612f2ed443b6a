"""The HF_ENDPOINT mirror (issue 8), driven by the real huggingface_hub client.

The daemon runs in a subprocess (`daemons`), huggingface_hub runs in another
one with `HF_ENDPOINT` pointed at the daemon; only plain HTTP calls run in
this process (the Hub emulator is a thread of it).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import BIG, SMALL, MiB, _need_fuse, sha256_file, wait_until

from nodecache.testing.daemon import DaemonProcess
from nodecache.testing.hub import HubEmulator

CLIENT_PRELUDE = """
import hashlib, json, os, sys
def sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()
def tree_hashes(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = sha(p)
    return out
"""


ALLOW_ORG = {"NODECACHE_MIRROR_ALLOW": "org/* datasets/org/*"}  # the repos mirror callers may make the node fetch


def run_client(daemon: DaemonProcess, tmp: Path, code: str, token: str | None = None, timeout: float = 60) -> dict:
    """Run huggingface_hub code in a subprocess against the mirror; it prints one JSON line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NODECACHE_"))}
    env.update(HF_ENDPOINT=daemon.url, HF_HOME=str(tmp / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="30", HF_HUB_DOWNLOAD_TIMEOUT="30")
    if token:
        env["HF_TOKEN"] = token
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT_PRELUDE + code], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stderr[-3000:]}\n--- daemon log ---\n{daemon.log()[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def source_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def raw(daemon: DaemonProcess, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """(status, headers, body) of one raw request: the path goes out exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.headers), resp.read()
    finally:
        conn.close()


def local_read_bytes(daemon: DaemonProcess) -> float:
    m = re.search(r'^nodecache_read_bytes_total\{source="local"\} (\S+)$', daemon.metrics(), re.M)
    return float(m[1]) if m else 0.0


def wait_settled(daemon: DaemonProcess) -> None:
    """Background fills (started by GETs) are over, as the daemon says: no blob filling or
    being proven, no chunk in flight."""

    def quiet() -> bool:
        st = daemon.status()
        return st["blobs_filling"] == 0 and st["fills_inflight"] == 0

    wait_until(quiet, "background fills to end")


def test_hf_client_through_mirror(daemons, hub, small_repo, big_repo, tmp_path):
    """Every client call the issue names, against a cold daemon; then again with zero upstream bytes."""
    d = daemons(repos=(), env=ALLOW_ORG)  # nothing resolved at start: the mirror adds repos on demand
    hub.add_repo("org/ds", {"data/train.csv": b"a,b\n1,2\n", "README.md": b"# ds"}, repo_type="dataset")
    pr_commit = hub.add_repo(SMALL, {"config.json": b'{"pr": 1}'}, revision="refs/pr/1")
    code = f"""
from huggingface_hub import HfFileSystem, hf_hub_download, list_repo_files, model_info, snapshot_download
out = {{}}
snap = snapshot_download({SMALL!r}, cache_dir={str(tmp_path / "c1")!r})
out["snap"] = tree_hashes(snap)
part = snapshot_download({SMALL!r}, cache_dir={str(tmp_path / "c2")!r}, allow_patterns=["*.json", "tokenizer/*"])
out["part"] = tree_hashes(part)
big = hf_hub_download({BIG!r}, "weights.bin", cache_dir={str(tmp_path / "c3")!r})
out["big"] = sha(big)
out["big_is_blob_of"] = os.path.basename(os.path.realpath(big))
out["files"] = sorted(list_repo_files({SMALL!r}))
info = model_info({SMALL!r}, files_metadata=True)
out["sha"] = info.sha
out["siblings"] = {{s.rfilename: [s.size, s.lfs.sha256 if s.lfs else None] for s in info.siblings}}
fs = HfFileSystem()
out["ls"] = sorted(fs.ls({SMALL!r}, detail=False))
with fs.open({SMALL!r} + "/model.safetensors", "rb") as f:
    f.seek(100)
    out["fs_range"] = f.read(1000).hex()
out["fs_cat"] = fs.cat({SMALL!r} + "/config.json").decode()
out["fs_info_size"] = fs.info({SMALL!r} + "/tokenizer/vocab.txt")["size"]
ds = hf_hub_download("org/ds", "data/train.csv", repo_type="dataset", cache_dir={str(tmp_path / "c6")!r})
out["ds"] = open(ds).read()
out["ds_files"] = sorted(list_repo_files("org/ds", repo_type="dataset"))
pr = hf_hub_download({SMALL!r}, "config.json", revision="refs/pr/1", cache_dir={str(tmp_path / "c7")!r})
out["pr"] = [open(pr).read(), pr.split("/snapshots/")[1].split("/")[0]]
print(json.dumps(out))
"""
    out = run_client(d, tmp_path, code)
    want = source_hashes(small_repo)
    assert out["snap"] == want
    assert out["part"] == {k: v for k, v in want.items() if k.endswith(".json") or k.startswith("tokenizer/")}
    assert out["big"] == out["big_is_blob_of"] == sha256_file(big_repo / "weights.bin")
    assert out["files"] == sorted(want)
    assert out["sha"] == hub.commits[SMALL]
    st = small_repo / "model.safetensors"
    assert out["siblings"]["model.safetensors"] == [st.stat().st_size, sha256_file(st)]
    assert out["ls"] == sorted(f"{SMALL}/{n}" for n in ("README.md", "config.json", "model.safetensors", "tokenizer"))
    assert bytes.fromhex(out["fs_range"]) == st.read_bytes()[100:1100]
    assert out["fs_cat"] == (small_repo / "config.json").read_text()
    assert out["fs_info_size"] == (small_repo / "tokenizer" / "vocab.txt").stat().st_size
    assert out["ds"] == "a,b\n1,2\n" and out["ds_files"] == ["README.md", "data/train.csv"]
    assert out["pr"] == ['{"pr": 1}', pr_commit]
    # One upstream fetch per byte, however many clients and calls wanted it.
    wait_settled(d)
    total = sum(p.stat().st_size for r in (small_repo, big_repo) for p in r.rglob("*") if p.is_file()) + 100
    assert hub.stats.data_bytes <= total
    # The repos the mirror resolved are in the FUSE view too.
    assert (d.hub / "models--org--big" / "snapshots" / hub.commits[BIG] / "weights.bin").stat().st_size == 72 * MiB

    before, api_before = hub.stats.data_bytes, hub.stats.requests["api"]
    code2 = f"""
from huggingface_hub import hf_hub_download, snapshot_download
out = {{"snap": tree_hashes(snapshot_download({SMALL!r}, cache_dir={str(tmp_path / "c4")!r}))}}
out["big"] = sha(hf_hub_download({BIG!r}, "weights.bin", cache_dir={str(tmp_path / "c5")!r}))
print(json.dumps(out))
"""
    out2 = run_client(d, tmp_path, code2)
    assert out2["snap"] == want and out2["big"] == out["big"]
    assert hub.stats.data_bytes == before, "a warm download must not fetch file bytes upstream"
    assert hub.stats.requests["api"] > api_before  # metadata is still asked upstream (refs can move)


def test_concurrent_cold_clients_share_one_fetch_and_stream_early(daemons, hub, big_repo):
    """4 clients on one cold 72 MiB file: one upstream fetch; the first bytes leave before the fill ends."""
    # The blob's own fill (parallel_per_blob workers), not the snapshot fill's, which gives a weight
    # file being read every background connection: the bytes fetched before the first leave grow with it.
    d = daemons(repos=(BIG,), env={"NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false"})
    hub.rate_limit_bps = 24 * MiB  # per upstream response: the fill takes a while
    url = f"{d.url}/{BIG}/resolve/main/weights.bin"
    results: dict[int, tuple[str, int, int]] = {}

    def client(i: int) -> None:
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as r:
            first = r.read(64 * 1024)
            at_first = hub.stats.data_bytes
            h.update(first)
            while buf := r.read(MiB):
                h.update(buf)
            results[i] = (h.hexdigest(), at_first, int(r.headers["Content-Length"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    want = sha256_file(big_repo / "weights.bin")
    assert len(results) == 4 and {r[0] for r in results.values()} == {want}
    assert all(r[2] == 72 * MiB for r in results.values())
    assert min(r[1] for r in results.values()) < 72 * MiB // 2, "first bytes waited for the whole fill"
    wait_settled(d)
    blob = sha256_file(big_repo / "weights.bin")
    assert sum(e - s for b, s, e in hub.stats.ranges if b == blob) == 72 * MiB, "one upstream fetch for all clients"


def test_a_cold_sharded_snapshot_is_fetched_in_parallel_ranges_per_file(daemons, hub, tmp_path):
    """snapshot_download of a sharded model through a cold mirror, behind a per-connection cap:
    each shard comes from upstream over several connections at once (ranges of the one fill
    path), every byte once, and the client gets the right bytes."""
    shards = {f"model-{i:05d}-of-00004.safetensors": os.urandom(24 * MiB) for i in range(1, 5)}
    hub.add_repo("org/sharded", {**shards, "config.json": b"{}"})
    hub.rate_limit_bps = 16_000_000  # per response, like a CDN connection: one response lasts >= 0.5 s
    d = daemons(repos=(), env=ALLOW_ORG)
    code = f"""
from huggingface_hub import snapshot_download
print(json.dumps(tree_hashes(snapshot_download("org/sharded", cache_dir={str(tmp_path / "c")!r}))))
"""
    got = run_client(d, tmp_path, code, timeout=120)
    want = {name: hashlib.sha256(data).hexdigest() for name, data in shards.items()}
    assert got == {**want, "config.json": hashlib.sha256(b"{}").hexdigest()}
    wait_settled(d)
    for name, blob in want.items():
        ranges = sorted((s, e) for b, s, e in hub.stats.ranges if b == blob)
        assert hub.stats.peak[blob] > 1, f"{name} came over one connection at a time: {ranges}"
        assert sum(e - s for s, e in ranges) == len(shards[name]), f"{name}: bytes fetched twice or not at all"
    # Warm, a shard leaves the store by sendfile: the same bytes, counted as reads are, none upstream.
    name, data = next(iter(shards.items()))
    before, up = local_read_bytes(d), hub.stats.data_bytes
    status, _, body = raw(d, "GET", f"/org/sharded/resolve/main/{name}")
    assert status == 200 and body == data
    assert local_read_bytes(d) - before == len(data) and hub.stats.data_bytes == up


def test_a_whole_file_get_adds_one_request_beside_its_fill_workers(daemons, hub):
    """A GET of a whole cold file starts the blob's fill (`parallel_per_blob` workers, in
    order); the client's own reads ask only for the chunk it waits for, never a read-ahead
    beside the workers, which would fetch the chunks after it as separate requests."""
    data = os.urandom(16 * MiB)  # 16 chunks of 1 MiB
    hub.add_repo("org/one", {"model.safetensors": data})
    hub.rate_limit_bps = 8 * MiB  # per response: a chunk takes 1/8 s, so requests overlap
    env = {"NODECACHE_PARALLEL_PER_BLOB": "2", "NODECACHE_READ_AHEAD_CHUNKS": "8"}
    # A weight file: the snapshot fill would give it every background connection (tested there).
    d = daemons(repos=(), env={**ALLOW_ORG, **env, "NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false"})
    status, _, body = raw(d, "GET", "/org/one/resolve/main/model.safetensors")
    assert status == 200 and body == data
    wait_settled(d)
    blob = hashlib.sha256(data).hexdigest()
    ranges = sorted((s, e) for b, s, e in hub.stats.ranges if b == blob)
    assert sum(e - s for s, e in ranges) == len(data), f"bytes fetched twice or not at all: {ranges}"
    assert 1 < hub.stats.peak[blob] <= 2 + 1, f"{hub.stats.peak[blob]} requests of the file at once: {ranges}"


def test_downloads_leave_the_blob_file_out_of_the_page_cache(daemons, hub):
    """A cold download's chunks are written and read back with O_DIRECT, and so is a warm one's
    (not cached): the client's kernel keeps its own copy, and a second GiB of fresh page-cache
    pages cost the cold row ~1 CPU-s per GiB in the client. Every byte is still right."""
    from conftest import in_page_cache, need_direct_io

    data = os.urandom(16 * MiB)  # 16 chunks of 1 MiB
    hub.add_repo("org/one", {"model.safetensors": data})
    hub.rate_limit_bps = 16 * MiB  # per response: the fill's workers and the client's reads overlap
    d = daemons(repos=(), env=ALLOW_ORG)
    need_direct_io(d.cache_dir)
    blob = d.cache_dir / "blobs" / hashlib.sha256(data).hexdigest()[:2] / hashlib.sha256(data).hexdigest()
    for attempt in ("cold", "warm"):
        status, _, body = raw(d, "GET", "/org/one/resolve/main/model.safetensors")
        assert status == 200 and body == data, attempt
        wait_settled(d)
        cached = [k for k in range(16) if in_page_cache(blob, k * MiB, MiB)]
        assert len(cached) <= 1, f"{attempt}: chunks in the blob file's page cache: {cached}"
    status, _, body = raw(d, "GET", "/org/one/resolve/main/model.safetensors", {"Range": "bytes=1000-3000999"})
    assert status == 206 and body == data[1000:3001000]
    assert hub.stats.data_bytes == len(data)


def test_only_bytes_in_the_page_cache_go_by_sendfile(tmp_path):
    """sendfile reads on the daemon's loop: the mirror asks first whether the bytes are cached."""
    from nodecache import mounts
    from nodecache.mirror.serve import in_page_cache

    p = tmp_path / "blob"
    p.write_bytes(os.urandom(4 * MiB))
    where = next(m for d in (p, *p.parents) if (m := mounts.top(str(d))) is not None)
    with open(p, "rb", buffering=0) as f:
        assert in_page_cache(f, 0, 4 * MiB)
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert in_page_cache(f, 0, 4 * MiB) == (where.fstype in ("tmpfs", "ramfs")), where  # memory is its disk
        assert f.read() == p.read_bytes()
        assert in_page_cache(f, 0, 4 * MiB)


def test_one_shard_through_the_mirror_starts_its_siblings(daemons, hub):
    """A client that asks the mirror for one shard of a cold snapshot (as a loader or a
    one-file-at-a-time client does) makes the node fill the snapshot's other shards too."""
    shards = {f"model-{i:05d}-of-00003.safetensors": os.urandom(3 * MiB) for i in range(1, 4)}
    hub.add_repo("org/three", {**shards, "config.json": b"{}"})
    d = daemons(repos=(), env=ALLOW_ORG)
    first = next(iter(shards))
    status, _, body = raw(d, "GET", f"/org/three/resolve/main/{first}")
    assert status == 200 and body == shards[first]
    wait_settled(d)
    for name, data in shards.items():
        blob = hashlib.sha256(data).hexdigest()
        assert sum(e - s for b, s, e in hub.stats.ranges if b == blob) == len(data), f"{name} was not filled"


def test_ranges_and_client_resume(daemons, hub, big_repo, tmp_path):
    d = daemons(repos=(), env=ALLOW_ORG)
    data = (big_repo / "weights.bin").read_bytes()
    path = f"/{BIG}/resolve/main/weights.bin"
    for rng, (start, end) in {
        "bytes=5000000-5999999": (5000000, 6000000),
        "bytes=70000000-": (70000000, len(data)),
        "bytes=-1000": (len(data) - 1000, len(data)),
        "bytes=0-0": (0, 1),
        "bytes=75000000-80000000": (75000000, len(data)),  # clipped to the end
    }.items():
        status, headers, body = raw(d, "GET", path, {"Range": rng})
        assert status == 206, (rng, status, body[:200])
        assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
        assert int(headers["Content-Length"]) == end - start and body == data[start:end]
    # HEAD: exact metadata, no redirect, no body.
    status, headers, body = raw(d, "HEAD", path)
    assert status == 200 and body == b""
    assert headers["X-Linked-Size"] == headers["Content-Length"] == str(len(data))
    assert headers["X-Linked-Etag"] == headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert headers["X-Repo-Commit"] == hub.commits[BIG] and headers["Accept-Ranges"] == "bytes"
    # An interrupted download: the client drops the connection, then resumes with Range.
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    conn.request("GET", path)
    head = conn.getresponse().read(10 * MiB + 123)
    conn.close()
    status, headers, tail = raw(d, "GET", path, {"Range": f"bytes={len(head)}-"})
    assert status == 206 and head + tail == data
    # huggingface_hub's own resume path (http_get with resume_size, as its retry loop calls it).
    part = tmp_path / "part.incomplete"
    part.write_bytes(data[: 30 * MiB])
    code = f"""
from huggingface_hub.file_download import http_get
with open({str(part)!r}, "ab") as f:
    http_get({d.url + path!r}, f, resume_size={30 * MiB}, expected_size={len(data)})
print(json.dumps({{"sha": sha({str(part)!r})}}))
"""
    assert run_client(d, tmp_path, code)["sha"] == hashlib.sha256(data).hexdigest()


def test_tree_pages_stay_on_the_mirror(daemons, hub, small_repo):
    d = daemons(repos=(), env=ALLOW_ORG)
    url, seen = f"{d.url}/api/models/{SMALL}/tree/main?recursive=true&limit=2", []
    while url:
        with urllib.request.urlopen(url, timeout=10) as r:
            seen += [e["path"] for e in json.loads(r.read())]
            link = r.headers.get("Link", "")
        url = link[1 : link.index(">")] if link else ""
        assert not url or url.startswith(d.url + "/api/models/"), link
    assert sorted(seen) == sorted([*source_hashes(small_repo), "tokenizer"])


def test_xet_fields_and_links_are_stripped():
    from nodecache.mirror.meta import rewrite_link, strip_xet

    doc = {"siblings": [{"rfilename": "a", "xetHash": "x"}], "xetEnabled": True, "sha": "s"}
    assert strip_xet(doc) == {"siblings": [{"rfilename": "a"}], "sha": "s"}
    assert strip_xet([{"type": "file", "xetHash": "h", "lfs": {"oid": "o"}}]) == [{"type": "file", "lfs": {"oid": "o"}}]
    link = '<https://hub/api/models/a/b/tree/main?cursor=x>; rel="next", <https://cas/auth>; rel="xet-auth"'
    assert rewrite_link(link, "https://hub", "http://node:8470") == (
        '<http://node:8470/api/models/a/b/tree/main?cursor=x>; rel="next"'
    )


@pytest.fixture
def private_hub(small_repo):
    with HubEmulator(token="hf_good") as h:
        h.commits = {"org/secret": h.add_repo("org/secret", small_repo, private=True)}
        yield h


def test_private_repo_needs_a_token_upstream_accepts(private_hub, small_repo, tmp_path):
    _need_fuse()
    (tmp_path / "token").write_text("hf_good")
    env = {"NODECACHE_CHUNK_SIZE": str(MiB), "NODECACHE_FSYNC": "false", "NODECACHE_READ_TIMEOUT": "20"}
    env["NODECACHE_MIRROR_ALLOW"] = "org/secret"
    d = DaemonProcess(tmp_path, private_hub.url, [], env=env, extra_args=["--token-file", str(tmp_path / "token")])
    with d:  # starts it (`with d.start()` started a second daemon and leaked the first)
        path = "/org/secret/resolve/main/config.json"
        want = (small_repo / "config.json").read_bytes()
        status, headers, _ = raw(d, "GET", path)
        assert status == 401 and headers["X-Error-Code"] == "RepoNotFound"
        status, _, body = raw(d, "GET", path, {"Authorization": "Bearer hf_good"})
        assert status == 200 and body == want
        # Cached now; a token upstream refuses still gets nothing, on every route.
        for method, p in [
            ("GET", path),
            ("HEAD", path),
            ("GET", "/api/models/org/secret"),
            ("GET", "/api/models/org/secret/tree/main"),
        ]:
            for auth in ({}, {"Authorization": "Bearer hf_other"}):
                status, headers, body = raw(d, method, p, auth)
                assert status == 401, (method, p, auth, status)
                assert want not in body
        status, _, body = raw(
            d,
            "POST",
            "/api/models/org/secret/paths-info/main",
            {"Content-Type": "application/x-www-form-urlencoded"},
            b"paths=config.json",
        )
        assert status == 401
        code = f"""
from huggingface_hub import hf_hub_download, snapshot_download
snap = snapshot_download("org/secret", cache_dir={str(tmp_path / "c")!r})
print(json.dumps({{"snap": tree_hashes(snap)}}))
"""
        assert run_client(d, tmp_path, code, token="hf_good")["snap"] == source_hashes(small_repo)
        code = """
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError
try:
    hf_hub_download("org/secret", "config.json", cache_dir=os.environ["HF_HOME"] + "/x")
    print(json.dumps({"error": None}))
except RepositoryNotFoundError as e:
    print(json.dumps({"error": type(e).__name__}))
"""
        assert run_client(d, tmp_path, code)["error"] == "RepositoryNotFoundError"


def test_upstream_down_serves_cached_and_refuses_the_rest(daemons, hub, small_repo, tmp_path):
    d = daemons(repos=(SMALL, BIG), env=ALLOW_ORG)  # both resolved, no bytes yet
    code = f"""
from huggingface_hub import snapshot_download
print(json.dumps({{"snap": tree_hashes(snapshot_download({SMALL!r}, cache_dir={str(tmp_path / "c1")!r}))}}))
"""
    want = source_hashes(small_repo)
    assert run_client(d, tmp_path, code)["snap"] == want
    wait_settled(d)
    assert raw(d, "HEAD", f"/{BIG}/resolve/main/weights.bin")[0] == 200  # BIG known public, no bytes
    hub.down = True
    status, headers, body = raw(d, "GET", f"/{SMALL}/resolve/main/config.json")
    assert status == 200 and body == (small_repo / "config.json").read_bytes()
    assert headers["X-Repo-Commit"] == hub.commits[SMALL]
    # A fresh client cache: the repo info, tree and files all come from the node.
    code = f"""
from huggingface_hub import snapshot_download
print(json.dumps({{"snap": tree_hashes(snapshot_download({SMALL!r}, cache_dir={str(tmp_path / "c2")!r}))}}))
"""
    assert run_client(d, tmp_path, code)["snap"] == want
    # Not cached: a gateway error, quickly, never a fake 404.
    t0 = time.monotonic()
    for path in (f"/{BIG}/resolve/main/weights.bin", "/org/unknown/resolve/main/x.bin", "/api/models/org/unknown"):
        status, _, body = raw(d, "GET", path)
        assert status in (502, 504), (path, status, body)
        assert "error" in json.loads(body)
    assert time.monotonic() - t0 < 10
    hub.down = False
    status, _, body = raw(d, "GET", f"/{BIG}/resolve/main/config.json")
    assert status == 200 and body == b"{}"


BAD_INPUTS = [
    # (method, raw path, extra headers, body)
    ("GET", "/org/small/resolve/main/../../../etc/passwd", {}, None),
    ("GET", "/org/small/resolve/main/%2e%2e/%2e%2e/etc/passwd", {}, None),
    ("GET", "/org/small/resolve/main/tokenizer%2F..%2F..%2Fx", {}, None),
    ("GET", "/org/small/resolve/main/a%00b", {}, None),
    ("GET", "/org/small/resolve/main/a%5C..%5Cb", {}, None),
    ("GET", "/org/small/resolve/main/%ff%fe", {}, None),
    ("GET", "/org/small/resolve/main//config.json", {}, None),
    ("GET", "/org/small/resolve/main/" + "a/" * 2100 + "x", {}, None),
    ("GET", "/org/small/resolve/%2e%2e/config.json", {}, None),
    ("GET", "/org/small/resolve/..%2F..%2Fx/config.json", {}, None),
    ("GET", "/org/small/resolve/main%00/config.json", {}, None),
    ("GET", "/org/small/resolve/refs%2F..%2Fmain/config.json", {}, None),
    ("GET", "/org/small/resolve/" + "r" * 300 + "/config.json", {}, None),
    ("HEAD", "/org/small/resolve/ma%20in/config.json", {}, None),
    ("GET", "/..%2Fetc/small/resolve/main/config.json", {}, None),
    ("GET", "/org/sm--all/resolve/main/config.json", {}, None),
    ("GET", "/org%00/small/resolve/main/config.json", {}, None),
    ("GET", "/a/b/c/resolve/main/config.json", {}, None),
    ("GET", "/datasets/../resolve/main/x", {}, None),
    ("GET", "/org/small/resolve/main/config.json", {"Range": "bytes=abc"}, None),
    ("GET", "/org/small/resolve/main/config.json", {"Range": "bytes=5-1"}, None),
    ("GET", "/org/small/resolve/main/config.json", {"Range": "bytes=999999999-"}, None),
    ("GET", "/org/small/resolve/main/config.json", {"Range": "bytes=0-1,4-5"}, None),
    ("GET", "/org/small/resolve/main/config.json", {"Range": "items=0-1"}, None),
    ("GET", "/org/small/resolve/main/config.json", {"Range": "bytes=-0"}, None),
    ("GET", "/org/small/resolve/main/config.json", {"Range": "bytes=" + "9" * 40 + "-"}, None),
    ("GET", "/org/small/resolve/main/config.json", {"X-Big": "x" * 20000}, None),
    ("GET", "/org/small/resolve/main/config.json", {"Authorization": "Bearer \xff\xfe"}, None),
    ("GET", "/api/models/org/small", {"Authorization": "Bearer a\tb"}, None),
    ("GET", "/api/models/org/small/tree/main/..%2F..%2Fetc", {}, None),
    ("GET", "/api/models/org/small/tree/%2e%2e", {}, None),
    ("GET", "/api/models/org/small/revision/..", {}, None),
    ("GET", "/api/models/org/small/revision/a%00", {}, None),
    ("GET", "/api/models/..%2F..%2Fetc", {}, None),
    ("GET", "/api/models/a/b/c/d/e", {}, None),
    ("GET", "/api/datasets/org/small/paths-info/main", {}, None),
    ("POST", "/api/models/org/small", {}, b""),
    (
        "POST",
        "/api/models/org/small/paths-info/main",
        {"Content-Type": "application/x-www-form-urlencoded"},
        b"paths=../x",
    ),
    ("POST", "/api/models/org/small/paths-info/main", {"Content-Type": "application/json"}, b"{not json"),
    ("POST", "/api/models/org/small/paths-info/main", {"Content-Type": "application/json"}, b'{"paths": [1, 2]}'),
    ("POST", "/api/models/org/small/paths-info/%2e%2e", {"Content-Type": "application/json"}, b'{"paths": []}'),
]


def test_bad_input_gets_4xx_json_never_a_crash(daemons, hub):
    d = daemons()
    for method, path, headers, body in BAD_INPUTS:
        status, resp_headers, data = raw(d, method, path, headers, body)
        assert 400 <= status < 500, (method, path, headers, status, data[:300])
        if method != "HEAD" and "X-Big" not in headers:
            assert "error" in json.loads(data), (path, data[:300])
    # A legal but missing file is the Hub's 404 with its error code.
    status, headers, _ = raw(d, "GET", "/org/small/resolve/main/nope.bin")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    assert headers["X-Repo-Commit"] == hub.commits[SMALL]
    status, headers, _ = raw(d, "GET", "/org/small/resolve/nobranch/config.json")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    # The daemon's own routes are not shadowed by the mirror's catch-alls.
    for path in ("/healthz", "/readyz", "/metrics", "/v1/status"):
        with urllib.request.urlopen(d.url + path, timeout=5) as r:
            assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(d.url + "/v1/x/resolve/main/y", timeout=5)
    assert e.value.code == 404
    # The only traceback allowed is aiohttp's own log line for the oversized header
    # (it answers 400 before any handler runs); nothing from nodecache.
    log = d.log()
    assert log.count("Traceback") == log.count("LineTooLong: 400") <= 1
    assert "ERROR nodecache" not in log


# ---- access (issue 14): one decision for every route, asked of the repo's own sources ----------

GOOD, OTHER, ADMIN = "hf_good_token_123", "hf_other_user_456", "admin-token-0123456789"
SECRET = b"tenant A's private weights\n"
TWIN = b"the operator's bucket, not the Hub's twin\n"


@pytest.fixture
def access_hub(small_repo):
    """The Hub as tenants see it: public, gated and private repos; GOOD is granted everything."""
    with HubEmulator(token=GOOD) as h:
        h.other_tokens.add(OTHER)
        h.commits = {
            "org/public": h.add_repo("org/public", small_repo),
            "org/gated": h.add_repo("org/gated", small_repo, gated=True),
            "org/secret": h.add_repo("org/secret", {"secret.txt": SECRET}, private=True),
            "org/twin": h.add_repo("org/twin", {"secret.txt": b"the Hub's public twin\n"}),
        }
        yield h


@pytest.fixture
def nodes(tmp_path, access_hub):
    """Daemons against `access_hub`; each one started is stopped after the test."""
    _need_fuse()
    started: list[DaemonProcess] = []

    def make(repos=(), env=None, name="node", extra_args=None) -> DaemonProcess:
        base = {"NODECACHE_CHUNK_SIZE": str(MiB), "NODECACHE_READ_TIMEOUT": "20", "NODECACHE_FSYNC": "false"}
        d = DaemonProcess(
            tmp_path / name, access_hub.url, list(repos), env={**base, **(env or {})}, extra_args=extra_args
        )
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def prefetched(d: DaemonProcess, repo: str) -> None:
    """Every byte of `repo` in the node's store, through the admin API (as an operator would)."""
    status, _, body = raw(d, "POST", "/v1/prefetch", bearer(ADMIN), json.dumps({"repo": repo}).encode())
    assert status == 202, body
    status, _, body = raw(d, "GET", f"/v1/jobs/{json.loads(body)['id']}?wait=60", bearer(ADMIN))
    assert json.loads(body)["state"] == "ready", body


def repos_listed(d: DaemonProcess) -> set[str]:
    return {r["repo"] for r in json.loads(raw(d, "GET", "/v1/repos")[2])["repos"]}


def test_paths_info_opens_no_gated_files(nodes, access_hub, small_repo):
    """Bypass: an anonymous paths-info of a gated repo was remembered as access to its files."""
    d = nodes(repos=("org/gated",), env={"HF_TOKEN": GOOD})
    path = "/org/gated/resolve/main/config.json"
    want = (small_repo / "config.json").read_bytes()
    assert raw(d, "GET", path, bearer(GOOD))[2] == want  # cached now
    status, _, body = raw(
        d,
        "POST",
        "/api/models/org/gated/paths-info/main",
        {"Content-Type": "application/json"},
        b'{"paths": ["config.json"]}',
    )
    assert status == 200 and [e["path"] for e in json.loads(body)] == ["config.json"]  # gated metadata is public
    for method in ("GET", "HEAD"):
        status, headers, body = raw(d, method, path)
        assert (status, headers.get("X-Error-Code")) == (401, "GatedRepo"), (method, status, body[:200])
        assert want not in body
    status, headers, _ = raw(d, "GET", path, bearer(OTHER))  # a token the Hub did not grant
    assert (status, headers.get("X-Error-Code")) == (403, "GatedRepo")


def test_a_caller_shaped_answer_makes_nothing_public(nodes, access_hub, small_repo):
    """Bypass: `?expand[]=downloads` has no private/gated fields, and was read as "public"."""
    d = nodes(repos=("org/gated", "org/secret"), env={"HF_TOKEN": GOOD})
    assert raw(d, "GET", "/org/gated/resolve/main/config.json", bearer(GOOD))[0] == 200
    assert raw(d, "GET", "/org/secret/resolve/main/secret.txt", bearer(GOOD))[2] == SECRET
    status, _, body = raw(d, "GET", "/api/models/org/gated?expand[]=downloads")
    assert status == 200 and json.loads(body) == {"_id": json.loads(body)["_id"], "id": "org/gated", "downloads": 0}
    assert raw(d, "GET", "/api/models/org/secret?expand[]=downloads")[0] == 401
    for path, code in (
        ("/org/gated/resolve/main/config.json", "GatedRepo"),
        ("/org/secret/resolve/main/secret.txt", "RepoNotFound"),
    ):
        status, headers, body = raw(d, "GET", path)
        assert (status, headers.get("X-Error-Code")) == (401, code), (path, status, body[:200])


@pytest.mark.parametrize("down_status", [503, 429])
def test_restart_with_the_hub_down_serves_private_bytes_to_nobody(nodes, access_hub, small_repo, tmp_path, down_status):
    """Bypass: after a restart with the Hub unreachable, cached private repos were served to anyone."""
    (tmp_path / "secret-token").write_text(GOOD)
    shutil.copytree(small_repo, tmp_path / "bucket" / "weights")
    env = {
        "NODECACHE_REPO_TOKENS": f"org/secret={tmp_path / 'secret-token'}",  # no node-wide token
        "NODECACHE_SOURCES": f"local/weights=file://{tmp_path / 'bucket' / 'weights'}",
        "NODECACHE_ADMIN_TOKEN": ADMIN,
    }
    d = nodes(repos=("org/public",), env=env)
    for repo in ("org/secret", "org/public", "local/weights"):
        prefetched(d, repo)
    d.stop()
    access_hub.down, access_hub.down_status = True, down_status
    d.start()
    private = ("/org/secret/resolve/main/secret.txt", "/local/weights/resolve/main/config.json")
    for path in private:
        for method in ("GET", "HEAD"):
            status, headers, body = raw(d, method, path)
            assert (status, headers.get("X-Error-Code")) == (401, "RepoNotFound"), (path, method, status, body[:200])
            assert SECRET not in body
    status, _, body = raw(d, "GET", private[0], bearer(GOOD))  # a token nobody can check now
    assert status == 503 and SECRET not in body and "error" in json.loads(body)
    for api in ("/api/models/org/secret", "/api/models/org/secret/tree/main", "/api/models/local/weights"):
        assert raw(d, "GET", api)[0] == 401, api
    # Known public (recorded when the Hub last answered): still served from the cache.
    status, _, body = raw(d, "GET", "/org/public/resolve/main/config.json")
    assert status == 200 and body == (small_repo / "config.json").read_bytes()
    # The operator (admin token) reads anything the node holds.
    assert raw(d, "GET", private[0], bearer(ADMIN))[2] == SECRET
    access_hub.down = False
    assert raw(d, "GET", private[0], bearer(GOOD))[2] == SECRET
    assert raw(d, "GET", private[0], bearer(OTHER))[0] == 401
    assert f"Bearer {ADMIN}" not in access_hub.stats.tokens, "the admin token went upstream"


def test_a_public_hub_twin_does_not_open_a_bucket(nodes, access_hub, tmp_path):
    """Bypass: access was asked of the Hub while the bytes came from the repo's bucket."""
    bucket = tmp_path / "bucket" / "twin"
    bucket.mkdir(parents=True)
    (bucket / "secret.txt").write_bytes(TWIN)
    env = {"HF_TOKEN": GOOD, "NODECACHE_SOURCES": f"org/twin=file://{bucket}", "NODECACHE_ADMIN_TOKEN": ADMIN}
    d = nodes(env=env)
    calls = [
        ("GET", "/org/twin/resolve/main/secret.txt", {}, None),
        ("HEAD", "/org/twin/resolve/main/secret.txt", {}, None),
        ("GET", "/api/models/org/twin", {}, None),
        ("GET", "/api/models/org/twin/revision/main", {}, None),
        ("GET", "/api/models/org/twin/tree/main", {}, None),
        (
            "POST",
            "/api/models/org/twin/paths-info/main",
            {"Content-Type": "application/json"},
            b'{"paths": ["secret.txt"]}',
        ),
    ]
    for method, path, headers, body in calls:
        for auth in ({}, bearer(GOOD)):
            status, _, data = raw(d, method, path, {**headers, **auth}, body)
            assert status == 401, (method, path, auth, status, data[:200])
            assert TWIN not in data and b"public twin" not in data
    # The operator reads it, and the listing is the bucket's, not the Hub's twin.
    assert raw(d, "GET", calls[0][1], bearer(ADMIN))[2] == TWIN
    status, _, data = raw(d, "GET", "/api/models/org/twin", bearer(ADMIN))
    assert status == 200 and [s["rfilename"] for s in json.loads(data)["siblings"]] == ["secret.txt"]
    assert json.loads(data)["private"] is True
    assert f"Bearer {ADMIN}" not in access_hub.stats.tokens


def test_mirror_public_opens_a_bucket_backed_repo_to_everyone(nodes, access_hub, tmp_path):
    bucket = tmp_path / "bucket" / "shared"
    bucket.mkdir(parents=True)
    (bucket / "weights.txt").write_bytes(TWIN)
    env = {"NODECACHE_SOURCES": f"team/shared=file://{bucket}", "NODECACHE_MIRROR_PUBLIC": "team/*"}
    d = nodes(env=env)
    assert raw(d, "GET", "/team/shared/resolve/main/weights.txt")[2] == TWIN
    status, _, data = raw(d, "GET", "/api/models/team/shared/tree/main")
    assert status == 200 and [e["path"] for e in json.loads(data)] == ["weights.txt"]


def test_only_allowed_repos_are_fetched_and_a_range_fills_no_whole_blob(daemons, hub, big_repo):
    """Bypass: any GET registered any repo and a 1-byte Range filled the whole file (disk, eviction)."""
    hub.add_repo("evil/huge", big_repo)
    d = daemons(repos=(SMALL,), env={"NODECACHE_ON_DEMAND": "org/b*"})  # org/big: allowed, not configured
    before = dict(hub.stats.requests)
    for method, path in (
        ("GET", "/evil/huge/resolve/main/weights.bin"),
        ("HEAD", "/evil/huge/resolve/main/weights.bin"),
        ("GET", "/api/models/evil/huge"),
        ("GET", "/api/models/evil/huge/tree/main"),
    ):
        status, headers, _ = raw(d, method, path, {"Range": "bytes=0-0"})
        assert (status, headers.get("X-Error-Code")) == (404, "RepoNotFound"), (method, path, status)
    status, _, _ = raw(d, "POST", "/api/models/evil/huge/paths-info/main", {"Content-Type": "application/json"}, b"{}")
    assert status == 404
    assert hub.stats.requests == before, "a repo outside mirror_allow was asked upstream"
    assert "evil/huge" not in repos_listed(d)
    # Allowed but not configured: a Range fetches its chunks (and read-ahead), not the whole blob.
    data = (big_repo / "weights.bin").read_bytes()
    status, _, body = raw(d, "GET", f"/{BIG}/resolve/main/weights.bin", {"Range": "bytes=0-0"})
    assert status == 206 and body == data[:1]
    wait_settled(d)
    assert hub.stats.data_bytes <= 9 * MiB, hub.stats.data_bytes  # chunk 0 + 8 read-ahead
    assert "org/big" in repos_listed(d)


def test_mirror_allow_is_the_list_when_set(daemons, hub):
    d = daemons(repos=(SMALL,), env={"NODECACHE_MIRROR_ALLOW": "org/big"})
    assert raw(d, "GET", f"/{SMALL}/resolve/main/config.json")[0] == 404  # configured for the mount, not mirrored
    assert raw(d, "GET", f"/{BIG}/resolve/main/config.json")[0] == 200
    # The admin may make the node fetch anything, as with /v1/prefetch; no admin token configured: nobody is admin.
    assert raw(d, "GET", f"/{SMALL}/resolve/main/config.json", bearer(ADMIN))[0] == 404


def test_access_rules_are_pure_and_explicit():
    from nodecache import config
    from nodecache.mirror.rules import matches, named_by, proof_needed

    assert proof_needed("public", files=True) is None
    assert proof_needed("gated", files=False) is None and proof_needed("gated", files=True) == "files"
    assert proof_needed("private", files=False) == "meta" and proof_needed("unknown", files=True) == "files"
    globs = ("team/*", "datasets/org/c", "org/d")
    assert matches(globs, "model", "team/x") and not matches(globs, "dataset", "team/x")
    assert matches(globs, "dataset", "org/c") and not matches(globs, "model", "org/c")
    assert named_by(globs, "model", "org/d") and not named_by(globs, "model", "team/x")
    assert config.load(environ={"NODECACHE_MIRROR_ALLOW": ""}).mirror_allow == ()  # explicit: nothing
    assert config.load(environ={}).mirror_allow is None  # unset: the node's own rule
    for key in ("NODECACHE_MIRROR_ALLOW", "NODECACHE_MIRROR_PUBLIC"):
        with pytest.raises(config.ConfigError, match=key.removeprefix("NODECACHE_").lower()):
            config.load(environ={key: "org/a@main"})


def test_a_wildcard_resolves_no_private_repo_for_a_mirror_caller(nodes, access_hub, small_repo):
    """As for lookups through the mount: only a named repo may be private (else it would enter the tree)."""
    d = nodes(env={"HF_TOKEN": GOOD, "NODECACHE_ON_DEMAND": "org/*"})
    for auth in ({}, bearer(GOOD)):
        for path in ("/org/secret/resolve/main/secret.txt", "/org/secret/resolve/nobranch/secret.txt"):
            status, headers, body = raw(d, "GET", path, auth)
            assert (status, headers.get("X-Error-Code")) == (404, "RepoNotFound"), (path, auth, status)
            assert b"private" not in body and b"revision" not in body.lower()  # nothing told of what refused it
    assert raw(d, "GET", "/org/public/resolve/main/config.json")[2] == (small_repo / "config.json").read_bytes()
    assert repos_listed(d) == {"org/public"}
    assert not (d.hub / "models--org--secret").exists()
    # Named exactly, it resolves; the caller still proves access with its own token.
    d = nodes(env={"HF_TOKEN": GOOD, "NODECACHE_MIRROR_ALLOW": "org/secret org/public"}, name="named")
    assert raw(d, "GET", "/org/secret/resolve/main/secret.txt")[0] == 401
    assert raw(d, "GET", "/org/secret/resolve/main/secret.txt", bearer(GOOD))[2] == SECRET


def test_sigterm_does_not_wait_for_a_client_that_stopped_reading(daemons, hub, big_repo):
    """A mirror client that stops reading mid-download (its socket full) must not hold the daemon's
    exit: the HTTP server's shutdown grace is bounded (aiohttp's default waits 60 s per handler),
    or a rolling update waits out kubelet's grace period and the pod is killed."""
    d = daemons(repos=(BIG,))
    stalled = socket.create_connection(("127.0.0.1", d.port), timeout=30)
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(f"GET /{BIG}/resolve/main/weights.bin HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert stalled.recv(4096).startswith(b"HTTP/1.1 200"), "the download started"
        time.sleep(0.5)  # the handler now waits for the client to read
        t0 = time.monotonic()
        d.stop(timeout=10)  # raises LeftBehind if it had to be killed
        assert d.proc.returncode == 0 and time.monotonic() - t0 < 10
    finally:
        stalled.close()
