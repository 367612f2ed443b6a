"""Peer-to-peer fill on a real multi-node cluster (network namespaces, veth, bridge, tc)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import machine
import pytest
from conftest import BIG, SMALL, MiB, counter, full_listener, sha256_file, snapshot_dir, wait_until

from nodecache import mounts
from nodecache import peers as peers_mod
from nodecache.index.records import BlobRecord
from nodecache.metrics import Metrics
from nodecache.upstream import UpstreamError
from nodecache.upstream.receive import Receiver
from testkit.cluster import Cluster, JobFailed

REPO = "org/shared"


@pytest.fixture(scope="module")
def shared_repo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shared_repo")
    for i in range(2):
        with open(d / f"model-{i:05d}-of-00002.safetensors", "wb") as f:
            for _ in range(16):
                f.write(os.urandom(16 * MiB))  # 2 x 256 MiB
    (d / "config.json").write_text('{"layers": 2}')
    return d


@pytest.fixture
def cluster_factory(tmp_path):
    if reason := machine.netns():
        pytest.skip(reason)
    made: list[Cluster] = []

    def make(repos: dict[str, Path], **kw) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", repos, **kw)
        c.workdir.mkdir()
        made.append(c)
        return c.start()  # ClusterUnavailable here is a failure: the machine said it can

    yield make
    for c in made:
        c.stop()


def commit_of(c: Cluster, repo: str) -> str:
    with urllib.request.urlopen(f"{c.hub_url}/api/models/{repo}", timeout=10) as r:
        return json.load(r)["sha"]


def read_all(c: Cluster, nodes, repo: str, files: list[str]) -> dict[tuple[int, str], str]:
    """Every given node reads every file concurrently; returns sha256 per (node, file)."""
    commit = commit_of(c, repo)
    out: dict[tuple[int, str], str] = {}
    errors: list[BaseException] = []

    def reader(i: int, name: str) -> None:
        try:
            node = c.nodes[i]
            out[(i, name)] = sha256_file(node.hub / f"models--{repo.replace('/', '--')}" / "snapshots" / commit / name)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i, f)) for i in nodes for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return out


def test_three_nodes_share_one_upstream_transfer(cluster_factory, shared_repo):
    c = cluster_factory({REPO: shared_repo}, nodes=3)
    files = sorted(p.name for p in shared_repo.iterdir())
    want = {f: sha256_file(shared_repo / f) for f in files}
    got = read_all(c, range(3), REPO, files)
    assert got == {(i, f): want[f] for i in range(3) for f in files}
    size = sum((shared_repo / f).stat().st_size for f in files)
    upstream = c.hub_stats()["data_bytes"]
    assert upstream <= 1.05 * size, f"upstream sent {upstream / size:.2f}x the repo"
    sent = [counter(n, "nodecache_peer_bytes_sent_total") for n in c.nodes]
    assert all(s > 0 for s in sent), f"every node serves its share: {sent}"


def test_chunks_served_to_peers_stay_out_of_the_page_cache(cluster_factory, shared_repo):
    """Two nodes prefetch at once: the owner writes a chunk a peer asks for, and reads it back
    for the peer, around the page cache (the peer keeps its own copy); before, every chunk of
    both nodes was written through it while a peer asked (fresh pages: ~1.3 CPU-s per GiB
    per node at N = 4)."""
    from conftest import in_page_cache, need_direct_io

    c = cluster_factory({REPO: shared_repo}, nodes=2)
    need_direct_io(c.nodes[0].cache_dir)
    c.wait_all_ready(REPO, timeout=300, jobs=c.prefetch(REPO))
    assert all(counter(n, "nodecache_peer_bytes_sent_total") > 0 for n in c.nodes)
    for i, node in enumerate(c.nodes):
        for p in sorted(shared_repo.glob("*.safetensors")):
            want = sha256_file(p)
            blob = node.cache_dir / "blobs" / want[:2] / want
            n = blob.stat().st_size // MiB
            cached = sum(in_page_cache(blob, k * MiB, MiB) for k in range(n))
            assert cached <= n // 16, f"node {i}: {cached} of {n} MiB of {p.name} in the page cache"
            assert sha256_file(blob) == want


def test_owner_killed_mid_transfer_others_fall_back_then_it_resumes(cluster_factory, shared_repo):
    c = cluster_factory({REPO: shared_repo}, nodes=3, upstream_mbit=800)
    name = "model-00000-of-00002.safetensors"
    want = sha256_file(shared_repo / name)
    reading, killed_mid_transfer = threading.Event(), []

    def kill_once_it_serves() -> None:  # the owner of a third of the chunks, once it has sent some
        wait_until(lambda: counter(c.nodes[2], "nodecache_peer_bytes_sent_total") > 0, "node 2 serving peers")
        killed_mid_transfer.append(reading.is_set())
        c.nodes[2].kill9()

    killer = threading.Thread(target=kill_once_it_serves)
    killer.start()
    try:
        reading.set()
        got = read_all(c, (0, 1), REPO, [name])
        reading.clear()
    finally:
        killer.join(120)
    assert killed_mid_transfer == [True], "the readers were done before the owner died"
    assert got == {(0, name): want, (1, name): want}
    assert c.nodes[2].proc.returncode is not None
    fallbacks = sum(counter(n, "nodecache_peer_fallbacks_total") for n in c.nodes[:2])
    assert fallbacks > 0, "the dead owner's chunks came from elsewhere"
    c.nodes[2].start()  # on the same cache; `serve` detaches its dead mount itself
    assert read_all(c, (2,), REPO, [name]) == {(2, name): want}


def test_a_peer_serving_flipped_bits_is_caught(cluster_factory, shared_repo):
    c = cluster_factory({REPO: shared_repo}, nodes=3, tampered={0: True})
    files = sorted(p.name for p in shared_repo.iterdir())
    want = {f: sha256_file(shared_repo / f) for f in files}
    got = read_all(c, (1, 2), REPO, files)
    assert got == {(i, f): want[f] for i in (1, 2) for f in files}
    caught = sum(counter(n, "nodecache_verify_failures_total", source="peer") for n in c.nodes[1:])
    assert caught > 0


def test_peer_api_needs_the_cluster_token_and_rejects_bad_input(hub, daemons, small_repo):
    d = daemons(repos=(SMALL,), env={"NODECACHE_CLUSTER_TOKEN": "tok", "NODECACHE_PEERS": "127.0.0.1:9"})
    blob = sha256_file(small_repo / "model.safetensors")
    commit = hub.commits[SMALL]
    good = {
        "chunk": "0",
        "repo": SMALL,
        "commit": commit,
        "path": "model.safetensors",
        "size": str((small_repo / "model.safetensors").stat().st_size),
        "kind": "sha256",
        "chunk_size": str(MiB),
    }

    def get(blob_id: str, params: dict, token: str | None = "tok") -> tuple[int, bytes, dict]:
        url = f"{d.url}/v1/blobs/{blob_id}?" + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    assert get(blob, good, token=None)[0] == 401
    assert get(blob, good, token="wrong")[0] == 401
    status, body, headers = get(blob, good)
    assert status == 200 and len(body) == MiB
    assert body == (small_repo / "model.safetensors").read_bytes()[:MiB]
    assert headers[peers_mod.XXH3_HEADER] == f"{peers_mod.xxhash.xxh3_64_intdigest(body):016x}"
    bad_cases = [
        ("../etc/passwd", good),
        (blob, {**good, "chunk": "-1"}),
        (blob, {**good, "chunk": "x"}),
        (blob, {**good, "chunk": "99999"}),
        (blob, {**good, "chunk": "9" * 40}),
        (blob, {**good, "chunk_size": "12345"}),
        (blob, {k: v for k, v in good.items() if k != "chunk"}),
        ("b" * 64, {**good, "commit": "zz"}),
        ("c" * 64, {**good, "path": "../../x"}),
        ("d" * 64, {**good, "repo": "../x"}),
        ("e" * 64, {**good, "kind": "md5"}),
    ]
    for blob_id, params in bad_cases:
        status, body, _ = get(blob_id, params)
        assert 400 <= status < 500, (blob_id, params, status, body)
        assert b"Traceback" not in body
    # local_only answers only from what is here: chunk 1 was never asked for, until it is
    assert get(blob, {**good, "chunk": "1", "local_only": "1"})[0] == 404
    assert get(blob, {**good, "chunk": "1"})[0] == 200
    status, body, _ = get(blob, {**good, "chunk": "1", "local_only": "1"})
    assert status == 200 and body == (small_repo / "model.safetensors").read_bytes()[MiB : 2 * MiB]
    assert d.proc.poll() is None


def test_hrw_ownership_moves_about_one_nth():
    members = [f"10.0.0.{i}:8470" for i in range(8)]
    keys = [(hashlib.sha256(str(i).encode()).hexdigest(), c) for i in range(200) for c in range(10)]
    before = {k: peers_mod.rank(members, *k)[0] for k in keys}
    after = {k: peers_mod.rank(members[:-1], *k)[0] for k in keys}
    moved = sum(before[k] != after[k] for k in keys) / len(keys)
    assert 0.06 < moved < 0.2, moved  # ~1/8 of the chunks, only those the leaver owned
    assert all(after[k] == before[k] for k in keys if before[k] != members[-1])
    counts = {m: sum(v == m for v in before.values()) for m in members}
    assert max(counts.values()) < 1.3 * len(keys) / len(members)


def test_dns_discovery_through_the_system_resolver(cluster_factory, shared_repo):
    """Members come from the A records of one name, resolved by glibc via /etc/netns/<ns>/hosts."""
    c = cluster_factory({REPO: shared_repo}, nodes=2, dns_name="peers.nodecache.test")
    for node in c.nodes:
        for _ in range(100):
            with urllib.request.urlopen(node.url + "/v1/status", timeout=10) as r:
                peers = json.load(r)["peers"]
            if len(peers) == 2:
                break
            time.sleep(0.1)
        assert sorted(p["peer"] for p in peers) == sorted(n.address for n in c.nodes)
        assert [p["self"] for p in peers].count(True) == 1
    jobs = c.prefetch(REPO)  # both fill the whole repo at once
    c.wait_all_ready(REPO, timeout=300, jobs=jobs)
    size = sum(p.stat().st_size for p in shared_repo.iterdir())
    assert c.hub_stats()["data_bytes"] <= 1.05 * size
    assert all(counter(n, "nodecache_peer_bytes_received_total") > 0 for n in c.nodes)


def test_a_full_disk_ends_both_prefetches_with_an_error_not_a_wait(tmp_path, shared_repo):
    """Two nodes whose caches share a filesystem too small for the repo (min_free binds: each
    evicts to make room, as the DNS test's nodes did on a nearly full disk) both prefetch it:
    each job ends in error, "full", and says so in the node's log. Before, the jobs ended so
    in a second, silently, and wait_all_ready waited its whole timeout (the DNS test: 300 s)."""
    if reason := machine.netns() or machine.mount_tmpfs():
        pytest.skip(reason)
    fs = tmp_path / "fs"
    fs.mkdir()
    # The repo (512 MiB) fits the filesystem's 640 less min_free (a prefetch of more is refused at
    # once), not what 200 MiB of other files and min_free leave usable, even for one node alone.
    mounts.mount("tmpfs", str(fs), "tmpfs", 0, "size=640m")
    try:
        (fs / "other-files").write_bytes(bytes(200 * MiB))
        (fs / "cluster").mkdir()
        env = {"NODECACHE_MIN_FREE": str(64 * MiB), "NODECACHE_DIRECT_IO": "false"}  # tmpfs: no O_DIRECT
        with Cluster(fs / "cluster", {REPO: shared_repo}, nodes=2, env=env) as c:
            jobs = c.prefetch(REPO)
            t0 = time.monotonic()
            with pytest.raises(JobFailed, match="full"):
                c.wait_all_ready(REPO, timeout=60, jobs=jobs)
            for node, job_id in zip(c.nodes, jobs, strict=True):
                with urllib.request.urlopen(f"{node.url}/v1/jobs/{job_id}?wait=60", timeout=70) as r:
                    job = json.load(r)
                assert job["state"] == "error" and "full" in job["error"], job
                assert f"prefetch job {job_id} ({REPO}@main " in node.log(), "a failed job is in the log"
            assert time.monotonic() - t0 < 60
            assert all(n.proc.poll() is None for n in c.nodes)
    finally:
        mounts.unmount(str(fs))


def test_peer_uploads_are_paced(hub, daemons, small_repo):
    env = {"NODECACHE_PEERS": "127.0.0.1:9", "NODECACHE_PEER_UPLOAD_BPS": str(4 * MiB), "NODECACHE_CLUSTER_TOKEN": "t"}
    d = daemons(repos=(SMALL,), env=env)
    blob = sha256_file(small_repo / "model.safetensors")
    (d.hub / "models--org--small" / "snapshots" / hub.commits[SMALL] / "model.safetensors").read_bytes()
    t0 = time.monotonic()
    for k in range(3):
        req = urllib.request.Request(f"{d.url}/v1/blobs/{blob}?chunk={k}", headers={"Authorization": "Bearer t"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert len(r.read()) == MiB
    assert time.monotonic() - t0 >= 0.45, "3 MiB at 4 MiB/s: the 2nd and 3rd chunk wait"


def test_a_failed_peer_is_skipped_for_5_s(hub, daemons, big_repo):
    """A member that cannot be reached is not asked again for 5 s (chunks it owns go straight
    upstream), then it is asked again."""
    import mmap

    from nodecache.testing.daemon import free_port

    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connection refused
    env = {"NODECACHE_PEERS": dead, "NODECACHE_CLUSTER_TOKEN": "tok"}
    env.update(NODECACHE_FILL_ON_OPEN="false", NODECACHE_READ_AHEAD_CHUNKS="0")  # one chunk per read
    d = daemons(repos=(BIG,), env=env)
    blob = sha256_file(big_repo / "weights.bin")
    owned = [k for k in range(72) if peers_mod.rank(sorted([d.address, dead]), blob, k)[0] == dead]
    want = (big_repo / "weights.bin").read_bytes()
    fd = os.open(snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin", os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, MiB)

    def read_chunk(k: int) -> None:  # O_DIRECT: exactly this chunk, no kernel read-ahead
        assert os.preadv(fd, [buf], k * MiB) == MiB and buf[:] == want[k * MiB : (k + 1) * MiB]

    def healthy() -> bool:
        return next(p["healthy"] for p in d.status()["peers"] if p["peer"] == dead)

    def unreachable() -> float:
        return counter(d, "nodecache_peer_fallbacks_total", reason="unreachable")

    try:
        t0 = time.monotonic()
        read_chunk(owned[0])
        assert unreachable() == 1 and not healthy()
        for k in owned[1:4]:
            read_chunk(k)
        assert not healthy(), "this machine took 5 s for three local reads"
        assert unreachable() == 1, "asked again within 5 s"
        wait_until(healthy, "the failed peer back in the member list", timeout=30)
        assert time.monotonic() - t0 >= 5.0
        read_chunk(owned[4])
        assert unreachable() == 2, "asked again after 5 s"
    finally:
        os.close(fd)
        buf.close()


@contextlib.contextmanager
def _blackhole():
    """A 127.0.0.1 address whose connects hang (a vanished node's)."""
    with full_listener() as (_, port):
        yield f"127.0.0.1:{port}"


def _peer_source(member: str, rx: Receiver, timeout: float) -> tuple[peers_mod.PeerSource, Metrics]:
    m = Metrics()
    membership = peers_mod.Membership("127.0.0.1:1", (member,))
    return peers_mod.PeerSource(member, rx, "tok", m, membership, timeout), m


_REC = BlobRecord("a" * 64, MiB, "sha256", MiB, repo_id="org/r", commit="c" * 40)


def test_a_peer_that_never_accepts_frees_its_thread_when_peer_timeout_gives_up():
    """`peer_timeout` shorter than the receiver's connect timeout (10 s): the fetch gives up, and
    the thread that was connecting is let go with it, not after 10 s in connect (the daemon's
    stop, and fills, would wait for it)."""

    async def main(member: str) -> None:
        rx = Receiver(threads=2, keep_buffers=1)
        src, m = _peer_source(member, rx, 0.5)
        try:
            with pytest.raises(UpstreamError, match="no chunk within"):
                await src.fetch(_REC, 0, MiB)
            assert m.registry.get_sample_value("nodecache_peer_fallbacks_total", {"reason": "unreachable"}) == 1
            t0 = time.monotonic()
            while rx._busy:
                assert time.monotonic() - t0 < 3, "the connect outlived its fetch"
                await asyncio.sleep(0.01)
        finally:
            await rx.close()

    with _blackhole() as member:
        asyncio.run(main(member))


def _chunk_answer(body: bytes, digest: str, after: float = 0.0):
    """A peer's answer to one chunk request: `body` with this xxh3 header, `after` seconds late."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(after)
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{peers_mod.XXH3_HEADER}: {digest}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()

    return answer


def test_a_peer_slow_to_answer_is_waited_for_up_to_peer_timeout():
    """An owner filling through answers late (its fill waits for a slot behind its readers):
    the fetch gives up after `peer_timeout`, as aiohttp's total timeout did before 4f76dd5, not
    after the receiver's own read timeout for upstreams (30 s in the daemon; 0.5 s here)."""
    body = os.urandom(MiB)
    digest = f"{peers_mod.xxhash.xxh3_64_intdigest(body):016x}"

    async def main() -> None:
        server = await asyncio.start_server(_chunk_answer(body, digest, after=1.5), "127.0.0.1", 0)
        rx = Receiver(threads=2, keep_buffers=1, connect_timeout=0.5, read_timeout=0.5)
        src, m = _peer_source(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", rx, 10.0)
        try:
            data = await src.fetch(_REC, 0, MiB)
            assert b"".join(bytes(p) for p in data) == body
        finally:
            await rx.close()
            server.close()

    asyncio.run(main())


def test_a_chunk_that_fails_its_xxh3_gives_its_buffer_back():
    """The error of a chunk whose xxh3 does not match is kept by the fill (its retries, the log,
    a failed task); the receiver's buffer the chunk arrived in must not be kept with it."""
    body = os.urandom(MiB)

    async def main() -> None:
        server = await asyncio.start_server(_chunk_answer(body, f"{0:016x}"), "127.0.0.1", 0)
        rx = Receiver(threads=2, keep_buffers=1)
        src, m = _peer_source(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", rx, 10.0)
        try:
            with pytest.raises(UpstreamError, match="xxh3") as failed:
                await src.fetch(_REC, 0, MiB)
            assert m.registry.get_sample_value("nodecache_peer_fallbacks_total", {"reason": "verify"}) == 1
            assert src.member in src.membership.live(), "a chunk failing its xxh3 does not skip the peer"
            kept = [id(buf) for buf in rx.buffers._kept]  # not the buffer: that would be a holder too
            assert len(kept) == 1
            t0 = time.monotonic()  # the receive thread lets go of it just after handing the part over
            while id(rx.buffers.take(MiB)) != kept[0]:
                assert time.monotonic() - t0 < 3, "the failed chunk's error holds its buffer"
                await asyncio.sleep(0.01)
            del failed
        finally:
            await rx.close()
            server.close()

    asyncio.run(main())


def test_a_peer_answering_the_wrong_body_never_gives_wrong_bytes():
    """A peer's 200 with a short body, a longer one, a chunked one, or a redirect (never followed:
    the cluster token goes to members only): each chunk is the peer's exact bytes or an error,
    counted by its reason; a body that breaks off skips the peer for a while."""
    body = os.urandom(MiB)
    digest = f"{peers_mod.xxhash.xxh3_64_intdigest(body):016x}"
    redirected = []

    async def elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        redirected.append(await reader.read(1))
        writer.close()

    def answer(kind: str, port: int):
        head = f"HTTP/1.1 200 OK\r\n{peers_mod.XXH3_HEADER}: {digest}\r\n"
        replies = {
            "short": f"{head}Content-Length: {MiB - 10}\r\n\r\n".encode() + body[:-10],
            "long": f"{head}Content-Length: {MiB + 10}\r\n\r\n".encode() + body + b"0123456789",
            "chunked": f"{head}Transfer-Encoding: chunked\r\n\r\n".encode()
            + b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in (body[:300_000], body[300_000:]))
            + b"0\r\n\r\n",
            "redirect": f"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/v1\r\nContent-Length: 0\r\n\r\n".encode(),
        }

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(replies[kind])
                await writer.drain()
            writer.close()

        return serve

    async def fetch(kind: str, port: int) -> tuple[bytes | str, dict, bool]:
        server = await asyncio.start_server(answer(kind, port), "127.0.0.1", 0)
        rx = Receiver(threads=2, keep_buffers=1)
        src, m = _peer_source(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", rx, 10.0)
        try:
            got: bytes | str = b"".join(bytes(p) for p in await src.fetch(_REC, 0, MiB))
        except UpstreamError as e:
            got = str(e)
        finally:
            await rx.close()
            server.close()
        reasons = ("truncated", "error", "unreachable", "verify", "missing")
        counts = {r: m.registry.get_sample_value("nodecache_peer_fallbacks_total", {"reason": r}) for r in reasons}
        return got, {r: n for r, n in counts.items() if n}, src.member in src.membership.live()

    async def main() -> None:
        other = await asyncio.start_server(elsewhere, "127.0.0.1", 0)
        port = other.sockets[0].getsockname()[1]
        try:
            got, counted, live = await fetch("short", port)
            assert "truncated body" in got and counted == {"truncated": 1} and not live
            assert await fetch("long", port) == (body, {}, True)
            assert await fetch("chunked", port) == (body, {}, True)
            got, counted, live = await fetch("redirect", port)
            assert "HTTP 302" in got and counted == {"error": 1} and live
            assert redirected == []
        finally:
            other.close()

    asyncio.run(main())
