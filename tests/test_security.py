"""Adversarial tests (issue 14): what a curious pod or a network neighbour can do to a node.

Each attack is reproduced against a real daemon (real HTTP, real FUSE mount,
the Hub emulator with public, gated and private repos) and must get a clear
refusal while the node keeps serving correct bytes and restarts cleanly.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from conftest import MiB, _need_fuse

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
