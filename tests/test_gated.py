"""Gated repos: metadata is public, files need a token that was granted access (401/403 GatedRepo)."""

from __future__ import annotations

import errno
import os
import urllib.error
import urllib.request

import pytest
from conftest import MiB, _need_fuse, counter, files_containing, sha256_file

from nodecache.testing.daemon import DaemonProcess
from nodecache.testing.hub import HubEmulator

GATED = "org/gated"
GOOD, OTHER = "hf_good_token_123", "hf_other_user_456"


@pytest.fixture
def gated_hub(small_repo):
    _need_fuse()
    with HubEmulator(token=GOOD) as h:
        h.other_tokens.add(OTHER)
        h.commit = h.add_repo(GATED, small_repo, gated=True)
        yield h


def daemon(tmp_path, hub, **env) -> DaemonProcess:
    base = {"NODECACHE_CHUNK_SIZE": str(MiB), "NODECACHE_READ_TIMEOUT": "20", "NODECACHE_FSYNC": "false"}
    return DaemonProcess(tmp_path, hub.url, [GATED], env={**base, **env}).start()


def test_gated_repo_through_the_mount(gated_hub, tmp_path, small_repo):
    d = daemon(tmp_path / "anon", gated_hub)
    try:
        snap = d.hub / "models--org--gated" / "snapshots" / gated_hub.commit
        assert "config.json" in os.listdir(snap), "metadata of a gated repo is public"
        with pytest.raises(OSError) as e:
            (snap / "config.json").read_bytes()
        assert e.value.errno == errno.EIO
        assert counter(d, "nodecache_upstream_requests_total", code="401") >= 1, "the Hub refused it"
        assert "org/gated/config.json: HTTP 401" in d.log()  # the reason, naming the file
    finally:
        d.stop()
    d = daemon(tmp_path / "granted", gated_hub, HF_TOKEN=GOOD)
    try:
        snap = d.hub / "models--org--gated" / "snapshots" / gated_hub.commit
        gated_hub.stats.reset()
        assert sha256_file(snap / "model.safetensors") == sha256_file(small_repo / "model.safetensors")
        assert GOOD not in d.log() and GOOD not in d.metrics()
        # the Hub needed the token (gated); its CDN got the bytes requests, never the token
        assert gated_hub.stats.requests["cdn_get"] >= 1 and gated_hub.stats.auth_on_cdn == 0
        assert files_containing(d.cache_dir, GOOD) == [], "the token is in no index entry"
    finally:
        d.stop()


def test_mirror_serves_cached_gated_bytes_only_to_granted_callers(gated_hub, tmp_path, small_repo):
    d = daemon(tmp_path, gated_hub, HF_TOKEN=GOOD)
    url = f"{d.url}/{GATED}/resolve/main/config.json"

    def get(token: str | None) -> tuple[int, bytes, str]:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read(), ""
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("X-Error-Code", "")

    try:
        status, body, _ = get(GOOD)
        assert status == 200 and body == (small_repo / "config.json").read_bytes()
        for token, want in ((None, 401), (OTHER, 403)):  # cached now, still refused
            status, _, code = get(token)
            assert (status, code) == (want, "GatedRepo"), token
        assert files_containing(d.cache_dir, GOOD) == files_containing(d.cache_dir, OTHER) == []
    finally:
        d.stop()
