"""Compile caches on the move, for real: the batched peer route (frames, bounds, hostile bodies), sealed
snapshots through moto's S3 on 127.0.0.1 (a node with no peer holding the key starts warm from the bucket;
flipped bytes there are caught), and the CSI plugin telling a restarted daemon which targets use a key."""

from __future__ import annotations

import hashlib
import json
import struct
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import wait_until
from test_compile_cache import api, listing
from test_csi import csi  # noqa: F401  (fixture)

from nodecache import ccframes as cf
from nodecache import ccmanifest as cm
from nodecache import config
from nodecache.config import ConfigError
from testkit.compiletree import digest, make_tree
from testkit.s3 import MotoServer

KEY = "team-a/qwen2.5-7b@abc/h100/vllm-0.11"
TOKEN = "cluster-secret"


def post(daemon, path: str, body: bytes, token: str | None = TOKEN) -> tuple[int, bytes, str]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(daemon.url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def frames(data: bytes, n: int) -> list[bytes | None]:
    out, pos = [], 0
    for _ in range(n):
        (size,) = struct.unpack_from(">Q", data, pos)
        pos += 8
        if size == cf.ABSENT:
            out.append(None)
            continue
        out.append(data[pos : pos + size])
        pos += size
    assert pos == len(data), "nothing after the last frame"
    return out


def sealed_tree(d, small: int = 50) -> tuple[dict, cm.Manifest]:
    tree = api(d, "POST", "/v1/compile-caches/acquire", {"key": KEY, "target": "/pods/a/cc"})[1]["path"]
    make_tree(Path(tree), small=small, big=2)
    api(d, "POST", "/v1/compile-caches/seal", {"key": KEY})
    m = cm.parse((d.cache_dir / "compile-caches" / "keys" / cm.key_name(KEY) / "sealed.json").read_bytes(), KEY)
    return digest(Path(tree)), m


def test_batch_route_frames_bounds_and_hostile_bodies(daemons):
    d = daemons(env={"NODECACHE_CLUSTER_TOKEN": TOKEN, "NODECACHE_COMPILE_CACHE_SEAL_AFTER": "3600"})
    _, m = sealed_tree(d)
    files = [e for e in m.entries if e.type == "file"]
    small = sorted({e.sha256: e.size for e in files if e.size <= cf.SMALL}.items())
    big = next(e for e in files if e.size > cf.SMALL)
    path = "/v1/compile-caches/peer/blobs"

    ids = [small[0][0], "0" * 64, small[1][0]]
    status, data, ctype = post(d, path, json.dumps({"ids": ids}).encode())
    assert status == 200 and ctype == "application/octet-stream"
    got = frames(data, 3)
    assert got[1] is None, "a blob this node lacks is an ABSENT frame"
    for sha, blob in ((ids[0], got[0]), (ids[2], got[2])):
        assert hashlib.sha256(blob).hexdigest() == sha

    def refused(body: bytes, token: str | None = TOKEN) -> tuple[int, str]:
        status, data, ctype = post(d, path, body, token)
        assert ctype.startswith("application/json"), (status, data[:200])
        return status, json.loads(data)["error"]

    ok = json.dumps({"ids": [small[0][0]]}).encode()
    assert refused(ok, token=None)[0] == 401
    assert refused(ok, token="wrong")[0] == 401
    for body in (
        b"not json",
        b"[" * 100_000,
        b"[1, 2]",
        json.dumps({"ids": "abc"}).encode(),
        json.dumps({"ids": []}).encode(),
        json.dumps({"ids": ["A" * 64]}).encode(),
        json.dumps({"ids": ["../../../etc/passwd"]}).encode(),
        json.dumps({"ids": [5]}).encode(),
        json.dumps({"ids": [small[0][0], small[0][0]]}).encode(),
        json.dumps({"ids": [f"{i:064x}" for i in range(cf.BATCH_IDS + 1)]}).encode(),
    ):
        assert refused(body) == (400, "bad_request"), body[:80]
    assert refused(json.dumps({"ids": [big.sha256]}).encode()) == (413, "too_large"), "big blobs are streamed alone"
    # the single-blob route still streams a big one whole
    req = urllib.request.Request(
        f"{d.url}/v1/compile-caches/peer/blobs/{big.sha256}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert hashlib.sha256(r.read()).hexdigest() == big.sha256
    assert api(d, "GET", "/v1/compile-caches")[0] == 200, "still serving after all that"


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as s:
        yield s


def test_a_node_without_peers_starts_warm_from_s3_and_flipped_bytes_are_caught(daemons, moto, tmp_path):
    bucket = "nc-" + uuid.uuid4().hex[:12]
    s3 = moto.client()
    s3.create_bucket(Bucket=bucket)
    env = {
        **moto.env,
        "NODECACHE_COMPILE_CACHE_UPSTREAM": f"s3://{bucket}/cc",
        "NODECACHE_COMPILE_CACHE_SEAL_AFTER": "3600",
    }
    a = daemons(env=env, workdir=tmp_path / "a")
    want, m = sealed_tree(a, small=300)
    wait_until(lambda: listing(a)[KEY]["sealed"]["uploaded"], what="the snapshot uploaded to the bucket")
    assert 'nodecache_compile_cache_events_total{event="upload"} 1.0' in a.metrics()
    objects = {
        o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page["Contents"]
    }
    assert {f"cc/blobs/{sha}" for sha in m.blobs()} <= objects
    assert f"cc/keys/{cm.key_name(KEY)}/{round(m.sealed_at * 1e6):020d}-{m.id}.json" in objects

    # node C: no peers at all, its own disk; it publishes the key and finds it warm, byte for byte
    c = daemons(env=env, workdir=tmp_path / "c")
    out = api(c, "POST", "/v1/compile-caches/acquire", {"key": KEY, "target": "/pods/c/cc"})[1]
    assert out["filled"] == "upstream"
    assert digest(Path(out["path"])) == want
    assert 'nodecache_compile_cache_publishes_total{filled="upstream"} 1.0' in c.metrics()
    assert not listing(c)[KEY]["sealed"]["uploaded"], "C did not seal it: C does not upload it again"

    # a flipped byte in one blob of the bucket: caught, never in a tree (D gets no tree rather than a bad one)
    victim = next(e for e in m.entries if e.type == "file" and e.size > 1000)
    orig = s3.get_object(Bucket=bucket, Key=f"cc/blobs/{victim.sha256}")["Body"].read()
    body = bytearray(orig)
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket=bucket, Key=f"cc/blobs/{victim.sha256}", Body=bytes(body))
    d = daemons(env=env, workdir=tmp_path / "d")
    out = api(d, "POST", "/v1/compile-caches/acquire", {"key": KEY, "target": "/pods/d/cc"})[1]
    assert out["filled"] == "empty" and list(Path(out["path"]).iterdir()) == []
    metrics = d.metrics()
    assert 'nodecache_verify_failures_total{source="compile_cache_upstream"} 1.0' in metrics
    assert 'nodecache_compile_cache_events_total{event="fill_failed"} 1.0' in metrics
    assert not (d.cache_dir / "compile-caches" / "blobs" / victim.sha256).exists()

    # a manifest whose content is not what its name says is refused too
    name = f"cc/keys/{cm.key_name(KEY)}/{round(m.sealed_at * 1e6) + 1:020d}-{'f' * 64}.json"
    s3.put_object(Bucket=bucket, Key=name, Body=m.dump())
    e = daemons(env=env, workdir=tmp_path / "e")
    s3.put_object(Bucket=bucket, Key=f"cc/blobs/{victim.sha256}", Body=orig)
    out = api(e, "POST", "/v1/compile-caches/acquire", {"key": KEY, "target": "/pods/e/cc"})[1]
    assert out["filled"] == "upstream" and digest(Path(out["path"])) == want, "the next intact manifest, mended blob"
    assert "content is not what its name says" in e.log()


def test_uploads_to_peers_are_paced_to_peer_upload_bps(daemons):
    d = daemons(
        env={
            "NODECACHE_CLUSTER_TOKEN": TOKEN,
            "NODECACHE_COMPILE_CACHE_SEAL_AFTER": "3600",
            "NODECACHE_PEER_UPLOAD_BPS": "1Mi",
            "NODECACHE_PEER_UPLOADS": "1",
        }
    )
    _, m = sealed_tree(d, small=20)
    big = sorted({e.sha256 for e in m.entries if e.type == "file" and e.size > cf.SMALL})
    assert len(big) == 2

    def get(sha: str) -> str:
        req = urllib.request.Request(
            f"{d.url}/v1/compile-caches/peer/blobs/{sha}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return hashlib.sha256(r.read()).hexdigest()

    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(get, big)) == big
    # 4 MiB at 1 MiB/s in 1 MiB pieces, the node's total: the first piece goes at once, the others wait
    assert time.monotonic() - t0 >= 3.0


def test_compile_cache_upstream_must_be_an_s3_url():
    for bad in ("http://bucket/x", "s3://", "s3://b/../x", "s3://UPPER/x"):
        with pytest.raises(ConfigError, match="compile_cache_upstream"):
            config.load(environ={"NODECACHE_COMPILE_CACHE_UPSTREAM": bad})
    assert config.load(environ={"NODECACHE_COMPILE_CACHE_UPSTREAM": "s3://b-1/p/q"}).compile_cache_upstream
