"""Node labels for fully cached repos. kube-apiserver cannot run here, so a small aiohttp
stand-in serves GET/PATCH /api/v1/nodes/{name} with merge-patch semantics and checks the token."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import pytest
from conftest import BIG, SMALL

from nodecache.labels import label_key
from nodecache.testing.daemon import free_port


class FakeNodeAPI:
    def __init__(self, token: str):
        from aiohttp import web

        self.token = token
        self.labels: dict[str, str] = {"kubernetes.io/hostname": "node-a", "nodecache.io/0000000000000000": "ready"}
        self.patches: list[dict] = []
        self.port = free_port()
        self.loop = asyncio.new_event_loop()

        async def node(request: web.Request) -> web.Response:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return web.json_response({"kind": "Status", "code": 401}, status=401)
            if request.match_info["name"] != "node-a":
                return web.json_response({"kind": "Status", "code": 404}, status=404)
            if request.method == "PATCH":
                assert request.content_type == "application/merge-patch+json"
                patch = await request.json()
                self.patches.append(patch)
                for k, v in patch["metadata"]["labels"].items():
                    if v is None:
                        self.labels.pop(k, None)
                    else:
                        self.labels[k] = v
            return web.json_response({"kind": "Node", "metadata": {"name": "node-a", "labels": self.labels}})

        app = web.Application()
        app.router.add_route("*", "/api/v1/nodes/{name}", node)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()


@pytest.fixture
def kube():
    api = FakeNodeAPI("sa-token")
    yield api
    api.stop()


def test_node_is_labelled_with_fully_cached_repos(hub, daemons, tmp_path, kube):
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    env = {
        "NODECACHE_NODE_NAME": "node-a",
        "NODECACHE_KUBE_API": f"http://127.0.0.1:{kube.port}",
        "NODECACHE_KUBE_TOKEN_FILE": str(token),
        "NODECACHE_REF_TTL": "1",
    }
    d = daemons(repos=(SMALL, BIG), env=env)
    small, big = label_key("model", SMALL), label_key("model", BIG)

    def wait(pred) -> bool:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not pred():
            time.sleep(0.1)
        return pred()

    assert wait(lambda: "nodecache.io/0000000000000000" not in kube.labels), "stale nodecache labels are removed"
    assert small not in kube.labels, "nothing is cached yet"
    req = urllib.request.Request(d.url + "/v1/prefetch", data=json.dumps({"repo": SMALL}).encode(), method="POST")
    urllib.request.urlopen(req, timeout=30).close()
    assert wait(lambda: kube.labels.get(small) == "ready")
    assert big not in kube.labels and kube.labels["kubernetes.io/hostname"] == "node-a", "other labels untouched"
    with urllib.request.urlopen(d.url + f"/v1/repos/{SMALL}") as r:
        assert json.load(r)["node_label"] == small
    req = urllib.request.Request(d.url + "/v1/evict", data=json.dumps({"repo": SMALL}).encode(), method="POST")
    urllib.request.urlopen(req, timeout=30).close()
    assert wait(lambda: small not in kube.labels), "the label goes when the bytes go"
    assert all(set(p) == {"metadata"} for p in kube.patches)


def test_unreadable_kube_token_file_turns_labels_off_not_the_daemon(tmp_path, caplog):
    """A Secret that did not mount is a log line, not a crash loop: labels only help the scheduler."""
    from types import SimpleNamespace

    from nodecache.labels import NodeLabeler

    cfg = SimpleNamespace(node_name="node-a", kube_api="http://127.0.0.1:1", kube_token_file=tmp_path / "missing")
    with caplog.at_level("ERROR", logger="nodecache.labels"):
        assert NodeLabeler.from_config(cfg, session=None) is None
    assert "node labels are off" in caplog.text and "missing" in caplog.text


def test_token_file_reader_names_the_file_never_the_content(tmp_path):
    from nodecache.tokenfile import read_secret

    good = tmp_path / "token"
    good.write_text("hf_secret\n")
    assert read_secret(good) == "hf_secret"
    bad = tmp_path / "binary"
    bad.write_bytes(b"\xff\xfe hf_secret")
    for path in (bad, tmp_path / "absent"):
        with pytest.raises(ValueError) as e:
            read_secret(path)
        assert str(path) in str(e.value) and "hf_secret" not in str(e.value)


def test_ready_repos_are_kept_per_changed_repo_not_read_from_every_snapshot(tmp_path):
    """A labelling round reads the readiness of the repos whose blobs or snapshots changed since
    the last round, from the index's per-snapshot counts: no snapshot's file list, and none of
    the other 49 repos."""
    from nodecache.index import BlobRecord, Index
    from nodecache.layout import FileEntry
    from nodecache.readiness import ReadyRepos

    index = Index(tmp_path / "index", map_size=1 << 26)
    try:
        shared = BlobRecord("f" * 64, 10, "sha256", 1 << 16)
        recs = {i: BlobRecord(f"{i:064x}", 10, "sha256", 1 << 16) for i in range(50)}
        index.blobs.add([shared, *recs.values()])
        for i in range(50):
            files = [FileEntry("a.bin", 10, recs[i].blob_id)] + (
                [FileEntry("b.bin", 10, shared.blob_id)] if i < 2 else []
            )
            index.snapshots.put("model", f"org/r{i}", f"{i:040x}", files)
        reads: list[tuple[str, str]] = []
        counts = index.links.snapshots_missing
        index.links.snapshots_missing = lambda *repo: reads.append(repo) or counts(*repo)
        lists = []
        decode = index.snapshots.decode
        index.snapshots.decode = lambda raw: lists.append(raw) or decode(raw)
        ready = ReadyRepos(index)

        def complete(*records: BlobRecord, state: str = "complete") -> None:
            for rec in records:
                rec.state = state
                index.blobs.put(rec)

        assert ready.labels() == set() and len(reads) == 50, "the first round reads every repo's counts"
        reads.clear()
        assert ready.labels() == set() and reads == [], "nothing changed: nothing read"
        complete(recs[7], recs[0])
        assert ready.labels() == {label_key("model", "org/r7")}, "org/r0 still waits for the shared blob"
        assert sorted(reads) == [("model", "org/r0"), ("model", "org/r7")]
        reads.clear()
        complete(shared)  # listed by org/r0 and org/r1
        assert ready.labels() == {label_key("model", f"org/r{i}") for i in (0, 7)}
        assert sorted(reads) == [("model", "org/r0"), ("model", "org/r1")]
        index.refs.put("model", "org/r7", "main", f"{7:040x}")
        index.snapshots.put("model", "org/r7", "e" * 40, [FileEntry("c.bin", 10, "e" * 64)])  # a new revision
        complete(recs[0], state="partial")  # evicted
        assert ready.labels() == {label_key("model", "org/r7")}, "main still names the complete snapshot"
        reads.clear()
        index.refs.put("model", "org/r7", "main", f"{7:040x}")  # a refresh that found the same commit
        assert ready.labels() == {label_key("model", "org/r7")} and reads == []
        index.refs.put("model", "org/r7", "main", "e" * 40)  # main moved to a commit not filled yet
        assert ready.labels() == set() and reads == [("model", "org/r7")]
        index.refs.put("model", "org/r7", "v1", f"{7:040x}")  # another ref names the complete one
        assert ready.labels() == {label_key("model", "org/r7")}
        assert lists == [], "no snapshot's file list was read"

        index.meta.put("derived_v4", None)  # an index from before the counts: derived once on open
        index.close()
        index = Index(tmp_path / "index", map_size=1 << 26)
        assert ReadyRepos(index).labels() == {label_key("model", "org/r7")}
        assert index.links.snapshots_missing("model", "org/r0") == {f"{0:040x}": 1}
    finally:
        index.close()
