"""Compile caches across a real cluster (network namespaces): a sealed tree on node A arrives identical on
node B when it publishes the key, the newest snapshot wins whole, and a flipped byte on a peer is caught."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import SMALL
from test_peers import cluster_factory  # noqa: F401  (fixture)

from testkit.compiletree import digest, make_tree

KEY = "team-a/qwen2.5-7b@abc/h100/vllm-0.11"


def call(node, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(node.url + path, data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def acquire(node, target: str) -> tuple[Path, str]:
    out = call(node, "/v1/compile-caches/acquire", {"key": KEY, "target": target})
    return Path(out["path"]), out["filled"]


def metric(node, needle: str) -> float:
    for line in node.metrics().splitlines():
        if line.startswith(needle):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sealed_tree_travels_newest_wins_and_flips_are_caught(cluster_factory, small_repo):  # noqa: F811
    c = cluster_factory(
        {SMALL: small_repo}, nodes=3, tampered={0: False}, env={"NODECACHE_COMPILE_CACHE_SEAL_AFTER": "3600"}
    )
    a, b, cnode = c.nodes
    tree_a, how = acquire(a, "/pods/a/cc")
    assert how == "empty"
    make_tree(tree_a, small=2000, big=3)
    sealed = call(a, "/v1/compile-caches/seal", {"key": KEY})
    assert sealed["files"] == 2003
    call(a, "/v1/compile-caches/release", {"target": "/pods/a/cc"})

    tree_b, how = acquire(b, "/pods/b/cc")
    assert how == "peer"
    want = digest(tree_a)
    assert digest(tree_b) == want, "modes, sizes, bytes and links identical"
    assert metric(b, 'nodecache_compile_cache_events_total{event="fill"}') == 1.0

    # B changes the tree (a file gone, one new) and seals: newer than A's snapshot
    victim = next(p for p in tree_b.rglob("*.json"))
    victim.unlink()
    (tree_b / "flashinfer.txt").write_text("newer")
    call(b, "/v1/compile-caches/seal", {"key": KEY})
    call(b, "/v1/compile-caches/release", {"target": "/pods/b/cc"})
    tree_a2, how = acquire(a, "/pods/a/cc2")  # A's tree is clean (as sealed): it takes B's newer one whole
    assert how == "peer"
    assert digest(tree_a2) == digest(tree_b) != want, "the newest snapshot, never a mix of two"
    call(a, "/v1/compile-caches/release", {"target": "/pods/a/cc2"})

    # A now serves flipped bytes: C gets every blob from B instead, verified file by file
    c.set_tamper(0, True)
    tree_c, how = acquire(cnode, "/pods/c/cc")
    assert how == "peer"
    assert digest(tree_c) == digest(tree_b)
    assert metric(cnode, 'nodecache_verify_failures_total{source="compile_cache_peer"}') >= 1


def test_a_key_in_use_is_never_swapped_and_no_peer_means_empty(cluster_factory, small_repo):  # noqa: F811
    c = cluster_factory({SMALL: small_repo}, nodes=2, env={"NODECACHE_COMPILE_CACHE_SEAL_AFTER": "3600"})
    a, b = c.nodes
    tree_b, how = acquire(b, "/pods/b/1")
    assert how == "empty" and os.listdir(tree_b) == []  # nobody has it yet
    (tree_b / "mine").write_text("local")
    tree_a, _ = acquire(a, "/pods/a/1")
    (tree_a / "theirs").write_text("remote")
    call(a, "/v1/compile-caches/seal", {"key": KEY})
    # B's key is published to a pod: a second pod gets the same directory, untouched
    tree_b2, how = acquire(b, "/pods/b/2")
    assert how == "local" and tree_b2 == tree_b and (tree_b / "mine").is_file()
    # a malformed key is a 400, not a crash
    with pytest.raises(urllib.error.HTTPError) as ei:
        call(b, "/v1/compile-caches/acquire", {"key": "\x00", "target": "/x"})
    assert ei.value.code == 400
