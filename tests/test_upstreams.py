"""Upstreams beyond the public Hub (issue 6): S3 via a real moto server, HTTP,
local directories, per-repo source chains with mid-file fallback, per-repo
tokens, and config errors. Daemons are real (`nodecache serve`, FUSE mount);
clients are real (`huggingface_hub` offline on the mount, boto3)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from conftest import BIG, SMALL, MiB, files_containing, sha256_file, wait_until

from nodecache import config
from nodecache.blobfile import bad_chunks
from nodecache.index import BlobRecord
from nodecache.metrics import Metrics
from nodecache.testing.daemon import free_port
from nodecache.testing.hub import Fault, HubEmulator
from nodecache.upstream import NotFound, UpstreamError
from nodecache.upstream.manifest import (
    MANIFEST,
    SOURCE_KIND,
    BadManifest,
    SourceObject,
    build_snapshot,
    checksum_sha256,
    source_blob_id,
)
from nodecache.upstream.s3 import S3Upstream
from nodecache.upstream.sourcespec import hide_userinfo, parse_s3_url, parse_sources, shown_url
from testkit.s3 import MotoServer, upload_dir

pytestmark = pytest.mark.timeout(180)


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as s:
        yield s


@pytest.fixture
def bucket(moto) -> str:
    name = "nc-" + uuid.uuid4().hex[:12]
    moto.client().create_bucket(Bucket=name)
    return name


def run(coro):
    return asyncio.run(coro)


def s3_upstream(moto, url: str) -> S3Upstream:
    return S3Upstream(url, Metrics(), endpoint_url=moto.url, region="us-east-1", path_style=True, max_workers=4)


@pytest.fixture
def aws_env(moto, monkeypatch):
    for k, v in moto.env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)


# --- pure: layouts, ids, commits ----------------------------------------------------------


def _reader(texts: dict[str, bytes]):
    async def read(key: str) -> bytes:
        return texts[key]

    return read


def test_plain_listing_ids_and_commit():
    objs = [SourceObject("a.bin", 10, "e1"), SourceObject("d/b.txt", 3, "e2", sha256="ab" * 32)]
    snap = run(build_snapshot(objs, _reader({}), "s3://bkt/p"))
    assert snap.layout == "plain"
    by = {f.path: f for f in snap.files}
    assert by["d/b.txt"].kind == "sha256" and by["d/b.txt"].blob_id == "ab" * 32
    assert by["a.bin"].kind == SOURCE_KIND and by["a.bin"].blob_id == source_blob_id("s3://bkt/p", "a.bin", "e1", 10)
    again = run(build_snapshot(list(reversed(objs)), _reader({}), "s3://bkt/p"))
    assert again.commit == snap.commit and re.fullmatch(r"[0-9a-f]{40}", snap.commit)
    changed = run(build_snapshot([SourceObject("a.bin", 10, "e9"), objs[1]], _reader({}), "s3://bkt/p"))
    assert changed.commit != snap.commit  # a new version of an object is a new commit


def test_manifest_local_dir_and_hf_cache_layouts():
    files = [{"path": "w.bin", "size": 4, "sha256": "cd" * 32}, {"path": "c.json", "size": 2, "blob_id": "ef" * 20}]
    objs = [SourceObject(MANIFEST, 1), SourceObject("w.bin", 4), SourceObject("c.json", 2)]
    snap = run(build_snapshot(objs, _reader({MANIFEST: json.dumps(files).encode()}), "x"))
    assert snap.layout == "manifest" and {f.kind for f in snap.files} == {"sha256", "gitsha1"}
    with pytest.raises(BadManifest, match="manifest says"):
        run(
            build_snapshot(objs[:2] + [SourceObject("c.json", 3)], _reader({MANIFEST: json.dumps(files).encode()}), "x")
        )
    with pytest.raises(BadManifest, match="not JSON"):
        run(build_snapshot(objs, _reader({MANIFEST: b"{"}), "x"))
    with pytest.raises(BadManifest, match="not JSON"):  # RecursionError is no ValueError
        run(build_snapshot(objs, _reader({MANIFEST: b"[" * 100_000 + b"]" * 100_000}), "x"))

    commit = "1" * 40
    meta = ".cache/huggingface/download/w.bin.metadata"
    objs = [SourceObject("w.bin", 4), SourceObject(meta, 90), SourceObject(".cache/huggingface/.gitignore", 1)]
    snap = run(build_snapshot(objs, _reader({meta: f"{commit}\n{'cd' * 32}\n1.0\n".encode()}), "x"))
    assert (snap.layout, snap.commit, [f.path for f in snap.files]) == ("local-dir", commit, ["w.bin"])
    assert snap.files[0].blob_id == "cd" * 32

    objs = [
        SourceObject("refs/main", 40),
        SourceObject(f"snapshots/{commit}/w.bin", 4),
        SourceObject(f"snapshots/{commit}/c.json", 2),
        SourceObject("blobs/" + "cd" * 32, 4),
        SourceObject("blobs/" + "ef" * 20, 2),
    ]
    snap = run(build_snapshot(objs, _reader({"refs/main": commit.encode()}), "x"))
    assert snap.layout == "hf-cache" and snap.commit == commit
    assert {(f.path, f.key, f.kind) for f in snap.files} == {
        ("w.bin", "blobs/" + "cd" * 32, "sha256"),
        ("c.json", "blobs/" + "ef" * 20, "gitsha1"),
    }


def test_checksum_and_url_parsing():
    digest = hashlib.sha256(b"x").digest()
    assert checksum_sha256(base64.b64encode(digest).decode()) == digest.hex()
    assert checksum_sha256(base64.b64encode(digest).decode() + "-3") is None  # composite (multipart)
    assert parse_s3_url("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    for bad in ("s3://My_Bucket/x", "s3://ab/x", "s3://bkt/a/../b", "s3://u:p@bkt/x"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)
    assert [s.scheme for s in parse_sources(("org/a=hf", "s3://bkt/p"))[("model", "org/a")]] == ["hf", "s3"]


def test_verify_chunks_catches_a_flipped_byte(tmp_path):
    import xxhash

    data = os.urandom(3 * 65536 + 5)
    p = tmp_path / "blob"
    p.write_bytes(data)
    chunks = {i: xxhash.xxh3_64_intdigest(data[i * 65536 : (i + 1) * 65536]) for i in range(4)}
    assert bad_chunks(p, 65536, len(data), chunks) == []
    with open(p, "r+b") as f:
        f.seek(65536 + 7)
        f.write(bytes([data[65536 + 7] ^ 1]))
    assert bad_chunks(p, 65536, len(data), chunks) == [1]


def test_bad_source_config_names_the_key(tmp_path):
    cases = {
        "ftp://host/x": "sources: 'ftp://host/x': unknown source scheme",
        "s3://Not_A_Bucket/p": "sources: 's3://Not_A_Bucket/p': 'Not_A_Bucket' is not a valid bucket name",
    }
    for src, msg in cases.items():
        with pytest.raises(config.ConfigError, match=re.escape(msg)):
            config.load({"sources": (f"org/a={src}",)}, environ={})
        # and `serve` refuses to start, naming the key, in one line
        env = {**os.environ, "NODECACHE_SOURCES": f"org/a={src}"}
        r = subprocess.run(
            [sys.executable, "-m", "nodecache", "serve", "--mount", str(tmp_path / "m"), "--cache-dir", str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1 and r.stderr.strip().startswith("nodecache: error: sources:"), r.stderr
        assert "Traceback" not in r.stderr
    with pytest.raises(config.ConfigError, match="s3_endpoint_url"):
        config.load({"s3_endpoint_url": "localhost:9000"}, environ={})
    with pytest.raises(config.ConfigError, match="repo_tokens"):
        config.load({"repo_tokens": ("org/a=relative/path",)}, environ={})
    y = tmp_path / "c.yaml"
    y.write_text("repos:\n  - id: org/a\n    sources: [hf, s3://bkt/a]\n  - org/b\n")
    cfg = config.load(environ={}, file=y)
    assert cfg.repos == ("org/a", "org/b") and cfg.sources == ("org/a=hf,s3://bkt/a",)


def test_source_urls_are_shown_without_their_userinfo():
    cases = {
        "http://user:s3cret@127.0.0.1:8080/base": "http://***@127.0.0.1:8080/base",
        "https://user@host/b": "https://***@host/b",  # a user name alone is hidden too
        "http://user:s3cret@[::1]:8080/b": "http://***@[::1]:8080/b",
        "http://user:p@ss@h/b/x@y": "http://***@h/b/x@y",  # as urlsplit reads it: up to the authority's last @
        "http://user:%2Fs3@h": "http://***@h",
    }
    for plain in ("http://127.0.0.1:8080/base", "http://[::1]:80/b", "https://h/a@b", "s3://bkt/p", "/data/m", "hf"):
        cases[plain] = plain
    for url, shown in cases.items():
        assert shown_url(url) == shown, url
        assert hide_userinfo(url) == shown, url
        if "://" in url:  # the same host and port: only the userinfo went
            a, b = urlsplit(url), urlsplit(shown)
            assert (a.hostname, a.port, a.path) == (b.hostname, b.port, b.path), url
    said = "Cannot connect to URL('http://u:s3cret@h:8/x') via https://a@b, not http://h/x@y"
    assert hide_userinfo(said) == "Cannot connect to URL('http://***@h:8/x') via https://***@b, not http://h/x@y"


def _serve_with_sources(tmp_path, sources: str) -> subprocess.CompletedProcess:
    """`nodecache serve` with this `sources` setting (it refuses it before mounting anything)."""
    env = {**os.environ, "NODECACHE_SOURCES": sources}
    cmd = [sys.executable, "-m", "nodecache", "serve", "--mount", str(tmp_path / "m"), "--cache-dir", str(tmp_path)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_a_rejected_source_never_shows_its_password(tmp_path):
    """Config errors name the source they refuse, without the user or password (even one whose
    unencoded `/`, `?`, `#` or `,` cut the URL short of its `@`)."""
    cases = {
        "org/a=http://user:s3cret@127.0.0.1/b?x=1": "'http://***@127.0.0.1/b?x=1': an http source is a base URL",
        "org/a=http://user:s3cret@127.0.0.1:99999/b": "'http://...': not a valid host[:port]",
        "org/a=http://user:s3cret@/b": "'http://...': not a valid host[:port]",
        "org/a=http://user:s3/cret@h/b": "'http://...': not a valid host[:port]",
        "org/a=http://user:s3?cret@h/b": "'http://...': not a valid host[:port]",
        "org/a=http://user:s3,cret@h/b": "'http://...': a ',' in a URL's user name or password",
        "org/a=http://user:123,cret@h/b": "'http://...': a ',' in a URL's user name or password",
        "org/a=ftp://user:s3cret@h/x": "'ftp://***@h/x': unknown source scheme",
        "org/a=s3://user:s3cret@bkt/p": "'s3://***@bkt/p': not an s3://bucket/prefix URL",
        "org/a=file://user:s3cret@h/x": "'file://***@h/x': a local source needs an absolute path",
        "http://user:s3cret@h/b": "'http://***@h/b': an entry is REPO=SOURCE",
    }
    for entry, msg in cases.items():
        with pytest.raises(config.ConfigError) as e:
            config.load({"sources": (entry,)}, environ={})
        assert str(e.value).startswith(f"sources: {msg}"), (entry, str(e.value))
        assert "cret" not in str(e.value), str(e.value)
    with pytest.raises(config.ConfigError) as e:
        config.load({"sources": ("org/a=http://user:s3cret@h/b", 5)}, environ={})
    assert "not a valid tuple" in str(e.value) and "s3cret" not in str(e.value)
    y = tmp_path / "c.yaml"
    y.write_text("repos:\n  - sources: [http://user:s3cret@h/b]\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(environ={}, file=y)
    assert "needs an 'id'" in str(e.value) and "s3cret" not in str(e.value)
    # An `=` in a password no longer splits the entry: the part before it is no repo.
    specs = parse_sources(["org/a=hf,http://user:s3=cret@h/b"])[("model", "org/a")]
    assert [s.url for s in specs] == ["hf", "http://user:s3=cret@h/b"]
    # `serve` says it in one line, without the password.
    r = _serve_with_sources(tmp_path, "org/a=http://user:s3cret@127.0.0.1/b?x=1")
    assert r.returncode == 1 and r.stderr.startswith("nodecache: error: sources: 'http://***@127.0.0.1/b?x=1'")
    assert "s3cret" not in r.stderr and "Traceback" not in r.stderr


def test_a_hub_or_s3_endpoint_with_a_password_is_refused_without_showing_it(tmp_path):
    """hub_url, s3_endpoint_url and kube_api take no user or password (the Hub takes a token, S3
    the boto3 chain's credentials, the API server kube_token_file's token): refused at load, in one line that names the URL without them, whichever
    way it is given (flag, NODECACHE_*, HF_ENDPOINT, YAML)."""
    port = free_port()
    hub = f"http://u:s3cret@127.0.0.1:{port}"
    cases = {
        ("hub_url", hub): f"hub_url: 'http://***@127.0.0.1:{port}': a user or password in the URL is not supported",
        ("hub_url", "https://u:s3/cret@h"): "hub_url: 'https://...': a user or password in the URL is not supported",
        ("hub_url", "u:s3cret@h:80"): "hub_url: '...': a user or password in the URL is not supported",
        ("hub_url", "huggingface.co"): "hub_url: 'huggingface.co' is not an http(s) URL",
        ("s3_endpoint_url", "http://u:s3cret@minio:9000"): "s3_endpoint_url: 'http://***@minio:9000': a user or",
        ("s3_endpoint_url", "u:s3cret@minio:9000"): "s3_endpoint_url: '...': a user or password",
        ("kube_api", "https://u:s3cret@10.0.0.1:6443"): "kube_api: 'https://***@10.0.0.1:6443': a user or password",
    }
    for (key, url), msg in cases.items():
        for given in ({"overrides": {key: url}}, {"environ": {f"NODECACHE_{key.upper()}": url}}):
            with pytest.raises(config.ConfigError) as e:
                config.load(given.get("overrides"), environ=given.get("environ", {}))
            assert str(e.value).startswith(msg) and "cret" not in str(e.value), (given, str(e.value))
    with pytest.raises(config.ConfigError, match=re.escape("hub_url: 'http://***@127.0.0.1")):
        config.load(environ={"HF_ENDPOINT": hub})
    (tmp_path / "c.yaml").write_text(f"hub_url: {hub}\n")
    with pytest.raises(config.ConfigError, match=re.escape("hub_url: 'http://***@127.0.0.1")):
        config.load(environ={}, file=tmp_path / "c.yaml")
    assert config.load({"hub_url": "http://127.0.0.1:8080/hub"}, environ={}).hub_url == "http://127.0.0.1:8080/hub"
    # A daemon given one refuses to start, in one line without the password.
    for how in (["--hub-url", hub], []):
        r = subprocess.run(
            [sys.executable, "-m", "nodecache", "serve", "--mount", str(tmp_path / "m"), "--cache-dir", str(tmp_path)]
            + how,
            env={**os.environ, "HF_ENDPOINT": hub, "NODECACHE_REPOS": "org/a"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1 and r.stderr.startswith("nodecache: error: hub_url: 'http://***@127.0.0.1:"), r.stderr
        assert len(r.stderr.splitlines()) == 1 and "cret" not in r.stderr + r.stdout, r.stderr


def test_a_comma_in_a_source_password_asks_for_percent_encoding(tmp_path):
    """`sources` entries are split at commas: a password with one ends the URL there (`http://user:123`
    is even a valid URL). The error says to percent-encode it, quoting no part of the password."""
    hint = "a ',' in a URL's user name or password ends the source there: percent-encode it as %2C"
    cases = {
        "org/a=http://user:12345,zq9x@h/b": ["12345", "zq9x"],  # the part before the comma is a port
        "org/a=http://user:4242,7777,zq9x@h/b": ["4242", "7777", "zq9x"],
        "org/a=https://user:4242,hf@h/b": ["4242", "hf@"],  # the part after it is a source name
        "org/a=hf,http://u:4242,zq=9x@h/b": ["4242", "zq"],  # an `=` after it reads as a new entry
        "org/a=http://user:s3cr,et9x@h/b,s3://bkt/p": ["s3cr", "et9x"],
    }
    for entry, parts in cases.items():
        with pytest.raises(config.ConfigError) as e:
            config.load({"sources": (entry,)}, environ={"NODECACHE_SOURCES": entry})
        said = str(e.value)
        assert said.startswith("sources: 'http"), said
        assert hint in said and "'/', '?', '#' or '@' in it as %2F, %3F, %23, %40" in said, said
        assert not any(p in said for p in parts), (entry, said)
    assert str(e.value).startswith("sources: 'http://...': a ','"), str(e.value)
    y = tmp_path / "c.yaml"
    y.write_text("repos:\n  - id: org/a\n    sources: [hf, 'http://user:12345,zq9x@h/b']\n")
    with pytest.raises(config.ConfigError, match=re.escape(hint)) as e:
        config.load(environ={}, file=y)
    assert "12345" not in str(e.value) and "zq9x" not in str(e.value)
    # Percent-encoded, it is one source; a comma-split list without a password still is several.
    specs = parse_sources(["org/a=http://user:12345%2Czq9x@h/b", "org/b=http://h/b,/data/x@v2,org/c=/d@1"])
    assert [s.url for s in specs[("model", "org/a")]] == ["http://user:12345%2Czq9x@h/b"]
    assert [s.url for s in specs[("model", "org/b")]] == ["http://h/b", "/data/x@v2"]
    assert [s.url for s in specs[("model", "org/c")]] == ["/d@1"]
    r = _serve_with_sources(tmp_path, "org/a=http://user:12345,zq9x@h/b")
    assert r.returncode == 1 and r.stderr.startswith(f"nodecache: error: sources: 'http://...': {hint}"), r.stderr
    assert len(r.stderr.splitlines()) == 1 and "zq9x" not in r.stderr and "12345" not in r.stderr, r.stderr


# --- S3 upstream against moto, no mount -------------------------------------------------------


def test_s3_resolve_fetch_and_version_pinning(moto, aws_env, bucket, small_repo):
    c = moto.client()
    upload_dir(c, bucket, "small", small_repo, checksum=False)
    c.put_object(
        Bucket=bucket,
        Key="small/config.json",
        Body=(small_repo / "config.json").read_bytes(),
        ChecksumAlgorithm="SHA256",
    )
    up = s3_upstream(moto, f"s3://{bucket}/small")

    async def go():
        res = await up.resolve("model", "local/small", "main")
        files = {f.entry.path: f for f in res.files}
        assert set(files) == set(tree_hashes(small_repo))
        cfg = files["config.json"]
        assert (cfg.kind, cfg.entry.blob_id) == ("sha256", sha256_file(small_repo / "config.json"))
        st = files["model.safetensors"]
        assert st.kind == SOURCE_KIND
        rec = BlobRecord(st.entry.blob_id, st.entry.size, st.kind, MiB, path="model.safetensors", repo_id="local/small")
        data = (small_repo / "model.safetensors").read_bytes()
        assert bytes(await up.fetch(rec, 1000, 1000 + MiB)) == data[1000 : 1000 + MiB]
        # Overwrite the object: the next range must not mix versions.
        c.put_object(Bucket=bucket, Key="small/model.safetensors", Body=b"other content")
        with pytest.raises(NotFound, match="changed since it was listed"):
            await up.fetch(rec, 0, 100)
        res2 = await up.resolve("model", "local/small", "main")
        assert res2.commit != res.commit
        await up.close()

    run(go())


def test_s3_clear_errors(moto, aws_env, bucket, monkeypatch, tmp_path):
    async def resolve(url):
        up = s3_upstream(moto, url)
        try:
            await up.resolve("model", "local/x", "main")
        finally:
            await up.close()

    with pytest.raises(NotFound, match="bucket does not exist"):
        run(resolve("s3://no-such-bucket-here/x"))
    with pytest.raises(NotFound, match="no objects under this prefix"):
        run(resolve(f"s3://{bucket}/missing"))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(NotFound, match="no S3 credentials"):
        run(resolve(f"s3://{bucket}/x"))


# --- real daemons on a real mount ------------------------------------------------------------


def offline_snapshot(daemon, repo_id: str, revision: str = "main") -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(daemon.hub), local_files_only=True))


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def status(daemon) -> dict:
    import urllib.request

    with urllib.request.urlopen(daemon.url + "/v1/status", timeout=10) as r:
        return json.loads(r.read())


def wait_complete(daemon, n_blobs: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        blobs = status(daemon)["blobs"]
        if blobs.get("complete", 0) >= n_blobs or blobs.get("quarantined"):
            return blobs
        time.sleep(0.1)
    return status(daemon)["blobs"]


def test_s3_plain_prefix_through_the_mount(daemons, moto, bucket, small_repo):
    c = moto.client()
    upload_dir(c, bucket, "models/small", small_repo)
    c.put_object(
        Bucket=bucket,
        Key="models/small/README.md",
        Body=(small_repo / "README.md").read_bytes(),
        ChecksumAlgorithm="SHA256",
    )
    env = {**moto.env, "NODECACHE_SOURCES": f"local/small=s3://{bucket}/models/small"}
    d = daemons(repos=(), env=env)
    snap = offline_snapshot(d, "local/small")
    assert tree_hashes(snap) == tree_hashes(small_repo)
    readme = os.readlink(snap / "README.md")
    assert readme.endswith(sha256_file(small_repo / "README.md"))  # x-amz-checksum-sha256 became the id
    blobs = wait_complete(d, 4)
    assert blobs.get("quarantined", 0) == 0 and blobs["complete"] == 4, blobs  # source-identified ones too
    m = d.metrics()
    assert metric(m, "nodecache_upstream_bytes_total", upstream="s3") >= sum(
        p.stat().st_size for p in small_repo.rglob("*") if p.is_file()
    )
    assert moto.env["AWS_SECRET_ACCESS_KEY"] not in d.log() + m


def test_s3_hf_cache_and_local_dir_copies_keep_real_ids(daemons, hub, moto, bucket, small_repo, tmp_path, monkeypatch):
    from huggingface_hub import snapshot_download

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # restored after the test
    cache = tmp_path / "hfcache"
    snapshot_download(SMALL, cache_dir=str(cache), endpoint=hub.url)
    local_dir = tmp_path / "localdir"
    snapshot_download(SMALL, local_dir=str(local_dir), endpoint=hub.url)
    c = moto.client()
    upload_dir(c, bucket, "hf/small", cache / "models--org--small")  # symlinks dereferenced, as `aws s3 sync` does
    upload_dir(c, bucket, "dl/small", local_dir)
    env = {**moto.env, "NODECACHE_SOURCES": f"{SMALL}=s3://{bucket}/hf/small other/small=s3://{bucket}/dl/small"}
    d = daemons(repos=(), env=env)
    for repo in (SMALL, "other/small"):
        snap = offline_snapshot(d, repo)
        assert snap.name == hub.commits[SMALL], repo  # the real commit
        assert tree_hashes(snap) == tree_hashes(small_repo)
        want = git_sha1((small_repo / "config.json").read_bytes())
        assert os.readlink(snap / "config.json").endswith(want)  # the real git-sha1 id
    blobs = wait_complete(d, 4)
    assert blobs.get("quarantined", 0) == 0, blobs


@pytest.mark.parametrize("how", ["down", "faults"])
def test_fallback_hf_to_s3_mid_file(daemons, hub, moto, bucket, big_repo, how):
    upload_dir(moto.client(), bucket, "big", big_repo)
    env = {
        **moto.env,
        "NODECACHE_SOURCES": f"{BIG}=hf,s3://{bucket}/big",
        "NODECACHE_FILL_ON_OPEN": "false",
        "NODECACHE_READ_AHEAD_CHUNKS": "0",
        "NODECACHE_RETRY_BASE": "0.05",
    }
    d = daemons(repos=(BIG,), env=env)
    path = d.hub / f"models--{BIG.replace('/', '--')}" / "snapshots" / hub.commits[BIG] / "weights.bin"
    want = (big_repo / "weights.bin").read_bytes()
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        head = f.read(8 * MiB)  # from the Hub
        h.update(head)
        if how == "down":
            hub.down = True
        else:
            hub.faults = [Fault("reset") for _ in range(200)]  # every Hub body breaks half-way
        while buf := f.read(4 * MiB):
            h.update(buf)
    assert h.hexdigest() == hashlib.sha256(want).hexdigest()
    m = d.metrics()
    hf, s3 = (
        metric(m, "nodecache_upstream_bytes_total", upstream="hf"),
        metric(m, "nodecache_upstream_bytes_total", upstream="s3"),
    )
    assert hf >= 8 * MiB and s3 >= 32 * MiB, (hf, s3)
    blobs = wait_complete(d, 1)  # weights.bin, whole-blob sha256 verified; config.json was never read
    assert blobs.get("quarantined", 0) == 0 and blobs["complete"] == 1, blobs


def test_local_directory_upstream(daemons, small_repo, tmp_path):
    src = tmp_path / "nfs" / "small"
    shutil.copytree(small_repo, src)
    d = daemons(repos=(), env={"NODECACHE_SOURCES": f"local/nfs-small=file://{src}"})
    snap = offline_snapshot(d, "local/nfs-small")
    assert tree_hashes(snap) == tree_hashes(small_repo)
    assert wait_complete(d, 4).get("quarantined", 0) == 0


class _StaticServer:
    """aiohttp static files with Range support, optional bearer auth, in a thread; the paths in
    `answers` are answered with that status instead, or with each (status, body) of a list in
    turn, then served as they are."""

    def __init__(self, root: Path, token: str | None = None, answers: dict[str, int | list] | None = None):
        self.root, self.token, self.answers = root, token, answers or {}
        self.loop = asyncio.new_event_loop()
        self.requests: list[str] = []
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)

        @web.middleware
        async def auth(request, handler):
            self.requests.append(request.path)
            if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
                return web.Response(status=401)
            answer = self.answers.get(request.path)
            if isinstance(answer, int):
                return web.Response(status=answer)
            if answer:
                status, body = answer.pop(0)
                return web.Response(status=status, body=body)
            return await handler(request)

        app = web.Application(middlewares=[auth])
        app.router.add_static("/", self.root)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        ready.set()
        self.loop.run_forever()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_http_upstream_with_manifest_and_auth(daemons, small_repo, tmp_path):
    root = tmp_path / "www"
    shutil.copytree(small_repo, root / "small")
    manifest = [
        {"path": p, "size": (small_repo / p).stat().st_size, "sha256": h} for p, h in tree_hashes(small_repo).items()
    ]
    (root / "small" / MANIFEST).write_text(json.dumps(manifest))
    token = "http-secret-" + uuid.uuid4().hex
    (tmp_path / "auth").write_text(f"Bearer {token}\n")
    srv = _StaticServer(root, token)
    try:
        env = {
            "NODECACHE_SOURCES": f"local/web-small={srv.url}/small",
            "NODECACHE_HTTP_AUTH_FILE": str(tmp_path / "auth"),
        }
        d = daemons(repos=(), env=env)
        snap = offline_snapshot(d, "local/web-small")
        assert tree_hashes(snap) == tree_hashes(small_repo)
        assert all(os.readlink(snap / p).endswith(h) for p, h in tree_hashes(small_repo).items())
        assert wait_complete(d, 4) == {"partial": 0, "complete": 4, "quarantined": 0}
        assert token not in d.log() + d.metrics()
        assert files_containing(d.cache_dir, token) == [], "the token is in no index entry"
    finally:
        srv.close()


def test_a_source_password_is_in_no_message(daemons, small_repo, tmp_path):
    """`http://user:password@host/base`: the password goes as Basic auth and nowhere else, whatever
    fails (a 404, a 500, a port nobody listens on): not in the log, the status, an HTTP error
    body of the mirror or `/v1`, nor a CLI error."""
    password = "s3cret-" + uuid.uuid4().hex
    root = tmp_path / "www"
    shutil.copytree(small_repo, root / "base")
    manifest = [
        {"path": p, "size": (small_repo / p).stat().st_size, "sha256": h} for p, h in tree_hashes(small_repo).items()
    ]
    (root / "base" / MANIFEST).write_text(json.dumps(manifest))
    answers = {"/base/model.safetensors": 500, "/base/config.json": 404, "/broken/" + MANIFEST: 500}
    srv = _StaticServer(root, answers=answers)
    try:
        base = srv.url.replace("http://", f"http://user:{password}@")
        down = f"http://user:{password}@127.0.0.1:{free_port()}/base"
        sources = [f"local/web={base}/base", f"local/gone={base}/missing", f"local/broken={base}/broken"]
        env = {
            "NODECACHE_SOURCES": ",".join([*sources, f"local/down={down}"]),
            "NODECACHE_MIRROR_PUBLIC": "local/*",
            "NODECACHE_READ_TIMEOUT": "2",  # the 500s of model.safetensors are retried for this long
        }
        d = daemons(repos=(), env=env)
        failing = wait_until(
            lambda: len(f := status(d)["repos_failing"]) == 3 and f, "the three broken sources to fail at start"
        )
        assert set(failing) == {"local/gone", "local/broken", "local/down"}, failing
        assert "http://***@127.0.0.1:" in failing["local/gone"]["error"], failing
        said = [json.dumps(status(d))]
        code, _, body = _raw_get(d, "/local/web/resolve/main/config.json")  # its 404
        assert code == 502 and b"could not fetch" in body, (code, body)
        said.append(body.decode())
        for repo in ("local/down", "local/web"):
            job = _post_json(d, "/v1/prefetch", {"repo": repo})
            if "id" in job:
                job = _get_json(d, f"/v1/jobs/{job['id']}?wait=30")
                assert job["state"] == "error", job
            said.append(json.dumps(job))
            r = subprocess.run(
                [sys.executable, "-m", "nodecache", "prefetch", repo, "--endpoint", d.url],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("nodecache: error:"), r.stderr
            assert "Traceback" not in r.stderr
            said.append(r.stderr)
        assert all("http://***@127.0.0.1:" in s for s in said), said  # they do name the source
        said += [d.log(), d.metrics()]
        assert srv.requests, "the sources were asked"
        for text in said:
            assert password not in text and f"user:{password[:6]}" not in text, text
        assert files_containing(d.cache_dir, password) == [], "the password is in no index entry"
    finally:
        srv.close()


def _manifest_of(repo: Path) -> bytes:
    return json.dumps(
        [{"path": p, "size": (repo / p).stat().st_size, "sha256": h} for p, h in tree_hashes(repo).items()]
    ).encode()


def test_an_http_manifest_answered_5xx_is_retried_never_parsed(small_repo, tmp_path):
    """A 503, a 429 or a 500 (even one whose body is a manifest) is an UpstreamError worth
    retrying, naming the status; no body but a 2xx one is read as the manifest."""
    from nodecache.upstream.http import HttpUpstream
    from nodecache.upstream.receive import Receiver

    root = tmp_path / "www"
    shutil.copytree(small_repo, root / "base")
    (root / "base" / MANIFEST).write_bytes(_manifest_of(small_repo))
    size, digest = (small_repo / "config.json").stat().st_size, tree_hashes(small_repo)["config.json"]
    decoy = json.dumps({"commit": "ab" * 20, "files": [{"path": "config.json", "size": size, "sha256": digest}]})
    busy = [(503, b"Service Unavailable"), (429, b"slow down"), (500, decoy.encode()), (502, b"[]")]
    srv = _StaticServer(root, answers={"/base/" + MANIFEST: list(busy)})

    async def main():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            receiver = Receiver(threads=1, keep_buffers=1)
            up = HttpUpstream(srv.url + "/base", session, receiver, Metrics())
            try:
                for status, _ in busy:
                    with pytest.raises(UpstreamError) as e:
                        await up.resolve("model", "local/web", "main")
                    assert type(e.value) is UpstreamError, (status, repr(e.value))  # neither NotFound nor BadManifest
                    assert str(e.value) == f"{srv.url}/base/{MANIFEST}: HTTP {status}", str(e.value)
                return await up.resolve("model", "local/web", "main")
            finally:
                await receiver.close()

    try:
        res = run(main())
    finally:
        srv.close()
    assert res.commit != "ab" * 20
    assert {f.entry.path: f.entry.blob_id for f in res.files} == tree_hashes(small_repo)


def test_an_http_source_is_resolved_from_one_answer_of_its_manifest(small_repo, tmp_path):
    """The manifest of an http source is its listing and its snapshot both: one resolve reads
    it once, so a manifest replaced between two reads cannot give a listing of one and files of
    the other (it was read twice)."""
    from nodecache.upstream.http import HttpUpstream
    from nodecache.upstream.receive import Receiver

    root = tmp_path / "www"
    shutil.copytree(small_repo, root / "base")
    (root / "base" / MANIFEST).write_bytes(_manifest_of(small_repo))
    size, digest = (small_repo / "config.json").stat().st_size, tree_hashes(small_repo)["config.json"]
    newer = json.dumps({"commit": "cd" * 20, "files": [{"path": "config.json", "size": size, "sha256": digest}]})
    srv = _StaticServer(root, answers={"/base/" + MANIFEST: [(200, _manifest_of(small_repo)), (200, newer.encode())]})

    async def main():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            receiver = Receiver(threads=1, keep_buffers=1)
            up = HttpUpstream(srv.url + "/base", session, receiver, Metrics())
            try:
                first = await up.resolve("model", "local/web", "main")
                asked = srv.requests.count("/base/" + MANIFEST)
                second = await up.resolve("model", "local/web", "main")
                return first, asked, second
            finally:
                await receiver.close()

    try:
        first, asked, second = run(main())
    finally:
        srv.close()
    assert asked == 1, f"the manifest was read {asked} times for one resolve"
    assert {f.entry.path: f.entry.blob_id for f in first.files} == tree_hashes(small_repo)
    assert second.commit == "cd" * 20 and [f.entry.path for f in second.files] == ["config.json"]


def test_a_repo_whose_http_source_answers_503_resolves_when_it_recovers(daemons, small_repo, tmp_path):
    """A configured repo whose manifest answers 503 is failing with that status (a retryable
    UpstreamError, not a malformed manifest) and resolves on a retry once the server recovers."""
    root = tmp_path / "www"
    shutil.copytree(small_repo, root / "base")
    (root / "base" / MANIFEST).write_bytes(_manifest_of(small_repo))
    busy = [(503, b"<html>Service Unavailable</html>")] * 2  # two: the failure shows for 3 s at least
    srv = _StaticServer(root, answers={"/base/" + MANIFEST: busy})
    try:
        d = daemons(repos=(), env={"NODECACHE_SOURCES": f"local/web={srv.url}/base"})
        failing = wait_until(lambda: status(d)["repos_failing"], "the repo to fail on the 503")
        assert failing["local/web"]["error"] == f"UpstreamError: {srv.url}/base/{MANIFEST}: HTTP 503", failing
        wait_until(lambda: not status(d)["repos_failing"], "the repo to resolve on a retry", timeout=30)
        assert not busy, "the 503 was answered"
        assert tree_hashes(offline_snapshot(d, "local/web")) == tree_hashes(small_repo)
    finally:
        srv.close()


def _raw_get(daemon, path: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(daemon.url + path, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _post_json(daemon, path: str, body: dict) -> dict:
    req = urllib.request.Request(daemon.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return {"status": e.code, **json.loads(e.read())}


def _get_json(daemon, path: str) -> dict:
    with urllib.request.urlopen(daemon.url + path, timeout=60) as r:
        return json.loads(r.read())


def test_private_repo_per_repo_token(tmp_path, small_repo, daemons):
    token = "hf_private_" + uuid.uuid4().hex
    with HubEmulator(token=token) as h:
        commit = h.add_repo("org/secret", small_repo, private=True)
        from nodecache.testing.daemon import DaemonProcess

        base = {"NODECACHE_CHUNK_SIZE": str(MiB), "NODECACHE_FSYNC": "false", "NODECACHE_READ_TIMEOUT": "20"}
        bad = DaemonProcess(tmp_path / "a", h.url, ["org/secret"], env=base)
        (tmp_path / "a").mkdir()
        bad.start()  # serves, naming the repo it could not resolve (no token, so the Hub says 404)
        try:
            assert "not found upstream" in bad.status()["repos_failing"]["org/secret"]["error"]
            assert not (bad.hub / "models--org--secret").exists()
        finally:
            bad.stop()
        assert token not in bad.log()
        tok = tmp_path / "tok"
        tok.write_text(token + "\n")
        (tmp_path / "b").mkdir()
        good = DaemonProcess(
            tmp_path / "b", h.url, ["org/secret"], env={**base, "NODECACHE_REPO_TOKENS": f"org/secret={tok}"}
        )
        try:
            good.start()
            snap = offline_snapshot(good, "org/secret")
            assert snap.name == commit and tree_hashes(snap) == tree_hashes(small_repo)
            assert token not in good.log() + good.metrics() + json.dumps(status(good))
            assert wait_complete(good, 4)["complete"] == 4
        finally:
            good.stop()
        assert token not in good.log()
        assert files_containing(good.cache_dir, token) == [], "the token is in no index entry"
