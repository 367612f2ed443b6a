"""Adversarial tests (issue 14): what a curious pod or a network neighbour can do to a node.

Each attack is reproduced against a real daemon (real HTTP, real FUSE mount,
the Hub emulator with public, gated and private repos) and must get a clear
refusal while the node keeps serving correct bytes and restarts cleanly.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import socket
import urllib.error
import urllib.parse
import urllib.request

import lmdb
import pytest
from conftest import MiB, _need_fuse, wait_until

from nodecache.backoff import delays
from nodecache.expiring import ExpiringSet
from nodecache.jobs import Jobs
from nodecache.peers import Membership, join_host_port
from nodecache.repos import RepoRef
from nodecache.testing.daemon import DaemonProcess
from nodecache.testing.hub import HubEmulator
from nodecache.upstream.hf import visibility_of

TOKEN = "hf_node_token_0123456789"
PUBLIC, GATED, PRIVATE = "org/public", "org/gated", "org/private"


@pytest.fixture
def tenant_hub(small_repo):
    """A Hub with one public, one gated and one private repo; the node's token sees all three."""
    with HubEmulator(token=TOKEN) as h:
        h.commits = {
            PUBLIC: h.add_repo(PUBLIC, small_repo),
            GATED: h.add_repo(GATED, small_repo, gated=True),
            PRIVATE: h.add_repo(PRIVATE, {"secret.txt": b"tenant A's private weights\n"}, private=True),
        }
        yield h


def node(tmp_path, hub, repos=(PUBLIC,), env=None, **kw) -> DaemonProcess:
    """A daemon holding the node's HF token, as the shipped DaemonSet does."""
    _need_fuse()
    base = {
        "NODECACHE_CHUNK_SIZE": str(MiB),
        "NODECACHE_READ_TIMEOUT": "20",
        "NODECACHE_FSYNC": "false",
        "HF_TOKEN": TOKEN,
    }
    return DaemonProcess(tmp_path, hub.url, list(repos), env={**base, **(env or {})}, **kw)


def http(url: str, method: str = "GET", body: dict | None = None, headers=None) -> tuple[int, dict | bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in ctype else raw


def counters(d: DaemonProcess, name: str) -> dict[str, float]:
    """label value -> sample of one labelled counter in /metrics."""
    out = {}
    for line in d.metrics().splitlines():
        if line.startswith(name + "{"):
            label = line.split('"')[1]
            out[label] = float(line.rsplit(" ", 1)[1])
    return out


def test_visibility_comes_only_from_the_hubs_own_fields():
    assert visibility_of({"private": False, "gated": False}) == "public"
    assert visibility_of({"private": False, "gated": "manual"}) == "gated"
    assert visibility_of({"private": True, "gated": False}) == "private"
    assert visibility_of({"sha": "x"}) == "unknown"  # an answer shaped by someone else's query
    assert visibility_of({"private": "no", "gated": False}) == "private"  # anything but False is not public


def test_repo_visibility_is_recorded_and_shown(tmp_path, tenant_hub):
    with node(tmp_path, tenant_hub, repos=(PUBLIC, GATED, PRIVATE)) as d:
        status, body = http(d.url + "/v1/repos")
        assert status == 200
        seen = {r["repo"]: r["visibility"] for r in body["repos"]}
        assert seen == {PUBLIC: "public", GATED: "gated", PRIVATE: "private"}


# --- the peer API -----------------------------------------------------------------------

BRICK = (
    "/v1/blobs/"
    + "ab" * 32
    + "?chunk=0&commit="
    + "c" * 40
    + "&kind=sha256&size=999999999999999999&repo=org/x&path=a.bin"
)


def test_the_brick_request_is_refused_and_the_node_restarts(tmp_path, tenant_hub):
    """Was: 500 (OSError: File too large), and every later start died with MemoryError."""
    d = node(tmp_path, tenant_hub).start()
    try:
        status, body = http(d.url + BRICK)  # a node without a cluster token serves no peer at all
        assert status == 403 and body["error"] == "peer_api_disabled", body
    finally:
        assert d.stop() == 0
    d = node(tmp_path, tenant_hub, env={"NODECACHE_CLUSTER_TOKEN": "k"}).start()
    try:
        auth = {"Authorization": "Bearer k"}
        assert http(d.url + BRICK)[0] == 401
        status, body = http(d.url + BRICK, headers=auth)  # org/x: not a repo this node fetches
        assert status == 403 and body["error"] == "not_allowed", body
        assert "ab" * 32 not in json.dumps(http(d.url + "/v1/repos")[1])
    finally:
        assert d.stop() == 0
    with d:  # the next start mounts and serves
        snap = d.hub / "models--org--public" / "snapshots" / tenant_hub.commits[PUBLIC]
        assert (snap / "config.json").read_bytes() == b'{"hidden_size": 512, "model_type": "tiny"}'
        own = len(os.listdir(d.hub / "models--org--public" / "blobs"))
        assert sum(d.status()["blobs"].values()) == own, d.status()["blobs"]  # only PUBLIC's own blobs


def test_a_peer_cannot_plant_a_blob_or_open_a_private_repo(tmp_path, tenant_hub, small_repo):
    env = {"NODECACHE_CLUSTER_TOKEN": "k"}
    with node(tmp_path, tenant_hub, repos=(PUBLIC,), env=env) as d:
        auth = {"Authorization": "Bearer k"}
        commit = tenant_hub.commits[PUBLIC]
        base = f"{d.url}/v1/blobs/%s?chunk=0&repo=%s&commit=%s"
        # A well-known id claimed to be in PUBLIC's snapshot, which does not list it: 404, nothing recorded.
        status, body = http(base % ("f" * 64, PUBLIC, commit), headers=auth)
        assert status == 404 and body["error"] == "not_found"
        # A repo this node was never told to fetch (private, with the node's token): 403, no upstream call.
        before = tenant_hub.stats.api_calls if hasattr(tenant_hub.stats, "api_calls") else None
        status, body = http(base % ("f" * 64, PRIVATE, tenant_hub.commits[PRIVATE]), headers=auth)
        assert status == 403 and body["error"] == "not_allowed"
        if before is not None:
            assert tenant_hub.stats.api_calls == before
        assert [r["repo"] for r in http(d.url + "/v1/repos")[1]["repos"]] == [PUBLIC]
        # A real blob of the snapshot is served, with sizes this node resolved itself.
        blob = hashlib.sha256((small_repo / "model.safetensors").read_bytes()).hexdigest()
        status, body = http(base % (blob, PUBLIC, commit) + "&size=1&kind=gitsha1&path=x", headers=auth)
        assert status == 200 and body == (small_repo / "model.safetensors").read_bytes()[:MiB]


# --- the index: nothing stored may stop a start -------------------------------------------


def test_hostile_index_entries_are_dropped_not_fatal(tmp_path, tenant_hub):
    d = node(tmp_path, tenant_hub)
    with d:
        pass
    env = lmdb.open(str(d.cache_dir / "index"), max_dbs=8)
    bad = {
        b"blobs": {
            ("ab" * 32).encode(): json.dumps(
                {"blob_id": "ab" * 32, "size": 10**18, "kind": "sha256", "chunk_size": 1 << 20}
            ).encode(),
            ("cd" * 32).encode(): b"\xff not json",
            ("ef" * 32).encode(): json.dumps(
                {"blob_id": "ef" * 32, "size": 5, "kind": "md5", "chunk_size": 7}
            ).encode(),
        },
        b"snapshots": {
            b"model:org/public\x00" + b"1" * 40: json.dumps({"files": [["../../etc/passwd", 1, "a" * 64]]}).encode(),
            b"model:../x\x00" + b"2" * 40: json.dumps({"files": []}).encode(),
        },
        b"refs": {b"model:org/public\x00evil": json.dumps({"commit": "../../x", "at": 0}).encode()},
        b"pins": {
            b"model:org/public\x00main": json.dumps({"mode": "forever"}).encode(),
            b"model:org/public\x00v2": json.dumps({"mode": "pin", "commit": "../../x"}).encode(),
        },
        b"repos": {b"model:org/public\x00": b"[]"},
    }
    with env.begin(write=True) as txn:
        for name, entries in bad.items():
            db = env.open_db(name, txn=txn)
            for key, value in entries.items():
                txn.put(key, value, db=db)
    env.close()
    with d:  # starts, mounts, serves the good repo
        snap = d.hub / "models--org--public" / "snapshots" / tenant_hub.commits[PUBLIC]
        assert (snap / "config.json").read_bytes() == b'{"hidden_size": 512, "model_type": "tiny"}'
        assert sorted(os.listdir(d.hub / "models--org--public" / "snapshots")) == [tenant_hub.commits[PUBLIC]]
        assert "dropping invalid blobs entry" in d.log()
        dropped = counters(d, "nodecache_index_invalid_entries_total")
        assert dropped.get("blobs", 0) >= 3 and dropped.get("refs", 0) >= 1 and dropped.get("pins", 0) >= 2, dropped
    with d:  # and they are gone for good
        assert "dropping invalid" not in d.log().rsplit("mounted at", 2)[-1]


# --- start and housekeeping -----------------------------------------------------------------


def test_a_repo_that_does_not_resolve_never_stops_serve(tmp_path, tenant_hub, small_repo):
    typo = "org/pubilc"
    with node(tmp_path, tenant_hub, repos=(typo, PUBLIC)) as d:
        snap = d.hub / "models--org--public" / "snapshots" / tenant_hub.commits[PUBLIC]
        assert (snap / "config.json").read_bytes() == (small_repo / "config.json").read_bytes()
        failing = d.status()["repos_failing"]
        assert list(failing) == [typo] and "not found" in failing[typo]["error"]
        assert http(d.url + "/readyz") == (200, {"ready": True, "repos_failing": [typo]})
        commit = tenant_hub.add_repo(typo, small_repo)  # the repo appears upstream: the retry finds it
        wait_until(lambda: not d.status()["repos_failing"], "the retry to resolve it")
        assert (d.hub / "models--org--pubilc" / "snapshots" / commit / "config.json").exists()


def test_bad_upstream_metadata_on_refresh_does_not_end_housekeeping(tmp_path, tenant_hub, small_repo):
    with node(tmp_path, tenant_hub, repos=(PUBLIC, GATED), env={"NODECACHE_REF_TTL": "1"}) as d:
        tenant_hub.add_repo(PUBLIC, {"a\\b": b"x", "config.json": b"{}"})  # a name we refuse
        new = tenant_hub.add_repo(GATED, {"config.json": b'{"v": 2}'}, gated=True)
        refs = d.hub / "models--org--gated" / "refs" / "main"
        wait_until(lambda: refs.read_text() == new, "housekeeping to go on past the bad repo")
        wait_until(lambda: "invalid file path 'a\\\\b'" in d.log(), "the refusal in the log")
        assert (d.hub / "models--org--public" / "refs" / "main").read_text() == tenant_hub.commits[PUBLIC]
        assert d.proc.poll() is None


# --- on_demand -----------------------------------------------------------------------------------


def test_on_demand_wildcards_resolve_only_public_repos(tmp_path, tenant_hub):
    env = {"NODECACHE_ON_DEMAND": "org/*"}
    with node(tmp_path, tenant_hub, repos=(), env=env) as d:
        assert os.path.isdir(d.hub / "models--org--public")
        for name in ("models--org--private", "models--org--gated"):
            assert not os.path.exists(d.hub / name), name
        assert sorted(r["repo"] for r in http(d.url + "/v1/repos")[1]["repos"]) == [PUBLIC]
    env = {"NODECACHE_ON_DEMAND": f"{PRIVATE} org/pub*"}  # named exactly: the operator chose it
    with node(tmp_path / "named", tenant_hub, repos=(), env=env) as d:
        assert (d.hub / "models--org--private" / "snapshots" / tenant_hub.commits[PRIVATE] / "secret.txt").exists()
        assert not os.path.exists(d.hub / "models--org--gated")


def test_negative_cache_is_bounded_in_size_and_time():
    now = [0.0]
    s = ExpiringSet(ttl=30, max_items=3, clock=lambda: now[0])
    for k in "abcd":
        s.add(k)
    assert "a" not in s and all(k in s for k in "bcd") and len(s) == 3
    now[0] = 31
    assert "b" not in s and len(s) == 0


def test_retry_delays_double_with_jitter_and_cap():
    got = list(itertools.islice(delays(2.0, 10.0, jitter=lambda lo, hi: 1.0), 5))
    assert got == [2.0, 4.0, 8.0, 10.0, 10.0]
    low = list(itertools.islice(delays(2.0, 10.0, jitter=lambda lo, hi: lo), 2))
    assert low == [1.0, 2.0]


def test_ipv6_peers_are_written_with_brackets():
    assert join_host_port("fd00::1", 8470) == "[fd00::1]:8470"
    assert join_host_port("10.0.0.1", "8470") == "10.0.0.1:8470"
    m = Membership("[::1]:8470", dns="::1:8470")
    asyncio.run(m.resolve_dns())
    assert m.members == ["[::1]:8470"]


def test_a_job_that_hits_an_unexpected_error_ends_in_error():
    class Broken:
        async def fill_blobs(self, blobs, progress):
            raise RuntimeError("disk on fire")

    async def run():
        jobs = Jobs(Broken())
        job = jobs.start(RepoRef("model", "org/x", "main", "c" * 40), ["a" * 64], 1)
        await job.task
        return job

    job = asyncio.run(run())
    assert job.state == "error" and "disk on fire" in job.error


def test_a_finished_job_lets_go_of_its_blob_list():
    """Up to MAX_KEPT finished jobs are remembered for GET /v1/jobs: each kept the ids of every
    blob it filled (10^5 for a big repo, ~12 MB), so repeated prefetches of one big repo grew the
    daemon by a repo's list each. A job's answer never showed them."""

    class Filler:
        async def fill_blobs(self, blobs, progress):
            progress(len(blobs))

    async def run():
        jobs = Jobs(Filler())
        job = jobs.start(RepoRef("model", "org/x", "main", "c" * 40), ["a" * 64, "b" * 64], 2)
        assert job.blobs == ["a" * 64, "b" * 64]
        await job.task
        return job

    job = asyncio.run(run())
    assert job.state == "ready" and job.done == 2 and job.blobs == []


# --- a bounded fuzz of every HTTP face ------------------------------------------------------

HOSTILE = [
    "..", "%2e%2e", "../../etc/passwd", "%00", "a%00b", "%ff%fe", "\u00e9t\u00e9", "\U0001f600", "a\\b", "-1", "0",
    "99999999999999999999", "NaN", "inf", "[]", "{}", ";", "'", '"', "%", "//", "models--org--public", "refs/pr/1",
    "main", "x" * 300, "y" * 5000, "c" * 40, "ab" * 32, "org/public", "org/private", "datasets/org/x", " ", "*/*",
]  # fmt: skip
QUERY_KEYS = ["chunk", "chunk_size", "repo", "commit", "repo_type", "size", "kind", "path", "local_only", "wait",
              "expand[]", "blobs", "recursive", "cursor", "revision"]  # fmt: skip


def _request(rng: random.Random, blob: str, commit: str) -> tuple[str, str, dict[str, str], bytes]:
    """One hostile request: a method, a raw path with query, headers, a body."""
    pick = lambda: rng.choice(HOSTILE)  # noqa: E731
    enc = lambda t: urllib.parse.quote(t, safe="/%") if rng.random() < 0.7 else t.replace(" ", "%20")  # noqa: E731
    templates = [  # (the method the route expects, a path)
        ("GET", f"/v1/blobs/{rng.choice([blob, pick()])}"), ("GET", "/v1/repos"), ("GET", f"/v1/repos/{pick()}"),
        ("GET", f"/v1/repos/org/{pick()}"), ("GET", f"/v1/jobs/{pick()}"), ("GET", "/v1/status"),
        ("POST", "/v1/prefetch"), ("POST", "/v1/pin"), ("DELETE", "/v1/pin"), ("POST", "/v1/evict"),
        ("GET", f"/org/public/resolve/{rng.choice(['main', commit, pick()])}/{rng.choice(['config.json', pick()])}"),
        ("HEAD", f"/org/{rng.choice(['public', 'private', 'gated'])}/resolve/main/{rng.choice(['config.json', pick()])}"),
        ("GET", f"/{pick()}/resolve/main/{pick()}"), ("GET", f"/datasets/{pick()}/resolve/{pick()}/{pick()}"),
        ("GET", f"/api/models/{rng.choice(['org/public', 'org/private', 'org/gated', pick()])}"),
        ("GET", f"/api/models/org/public/revision/{pick()}"), ("GET", f"/api/models/{pick()}/tree/{pick()}/{pick()}"),
        ("POST", f"/api/models/org/{rng.choice(['public', 'private', 'gated'])}/paths-info/{pick()}"),
        ("GET", f"/api/datasets/{pick()}"), ("GET", "/healthz"), ("GET", "/metrics"), ("GET", f"/{pick()}"),
    ]  # fmt: skip
    method, path = rng.choice(templates)
    if rng.random() < 0.15:
        method = rng.choice(["GET", "HEAD", "POST", "DELETE", "PUT", "PATCH"])
    path = enc(path)
    if rng.random() < 0.8:
        query = [(rng.choice(QUERY_KEYS), rng.choice([pick(), commit, blob, "0", "1", "true"])) for _ in range(4)]
        path += "?" + "&".join(f"{urllib.parse.quote(k)}={enc(v)}" for k, v in query)
    headers = {}
    if rng.random() < 0.7:
        right = "k" if path.startswith("/v1/blobs") else "adm"
        headers["Authorization"] = "Bearer " + rng.choice([right, right, right, "hf_x", TOKEN, pick()[:100]])
    if rng.random() < 0.3:
        headers["Range"] = rng.choice(["bytes=0-0", "bytes=-1", "bytes=5-2", "bytes=0-", "bytes=a-b", "bytes=0-1,4-5",
                                       "bytes=99999999999999999999-", pick()[:100]])  # fmt: skip
    body = b""
    if method in ("POST", "PUT", "DELETE", "PATCH"):
        body = rng.choice([
            json.dumps({"repo": rng.choice(["org/public", pick()]), "revision": pick(), "all": rng.random() < 0.1,
                        "mode": pick(), "fill": rng.choice([False, True, pick()])}).encode(),
            json.dumps({"paths": [pick() for _ in range(rng.randint(0, 5))]}).encode(),
            json.dumps([1, 2]).encode(), b"{not json", b"\xff\xfe", b"[" * 5000 + b"]" * 5000,
            json.dumps({"paths": ["a"] * 20000}).encode(), b"paths=config.json&paths=..",
        ])  # fmt: skip
        headers["Content-Type"] = rng.choice(["application/json", "application/x-www-form-urlencoded", "text/plain"])
    return method, path, headers, body


def _send(port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> int:
    """The raw request over a socket (no client library tidies it up); the status code."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head.encode("utf-8", "surrogateescape") + b"\r\n" + body)
        status_line = s.makefile("rb").readline()
    return int(status_line.split()[1])


def test_fuzzing_every_http_face_leaves_a_node_that_serves_and_restarts(tmp_path, tenant_hub, small_repo):
    rng = random.Random(1414)
    blob = hashlib.sha256((small_repo / "model.safetensors").read_bytes()).hexdigest()
    commit = tenant_hub.commits[PUBLIC]
    env = {"NODECACHE_CLUSTER_TOKEN": "k", "NODECACHE_ADMIN_TOKEN": "adm", "NODECACHE_ON_DEMAND": "org/*"}
    d = node(tmp_path, tenant_hub, repos=(PUBLIC,), env=env)
    statuses: dict[int, int] = {}
    with d:
        for i in range(4000):
            method, path, headers, body = _request(rng, blob, commit)
            status = _send(d.port, method, path, headers, body)
            statuses[status] = statuses.get(status, 0) + 1
            assert status != 500, (i, method, path[:300], headers, body[:200], d.log()[-3000:])
        assert http(d.url + "/healthz") == (200, {"ok": True})
        snap = d.hub / "models--org--public" / "snapshots" / commit
        assert (snap / "model.safetensors").read_bytes() == (small_repo / "model.safetensors").read_bytes()
        assert "Traceback" not in d.log()
    assert d.stop() == 0
    with d:  # a clean restart over whatever the fuzz made the daemon store
        assert (snap / "config.json").read_bytes() == (small_repo / "config.json").read_bytes()
    assert sum(v for k, v in statuses.items() if 400 <= k < 500) > 1000, statuses  # most were refused
