"""The Hub emulator must behave like the real Hub, or tests built on it prove nothing."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from nodecache.testing.hub import Fault, HubEmulator

pytestmark = pytest.mark.timeout(60)

REPO = "org/name"
ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = random.Random(0).randbytes(300_000)
FILES = {"config.json": b'{"a": 1}', "model.safetensors": WEIGHTS, "sub/tokenizer.json": b"tok" * 50}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def pointer(data: bytes) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(data)}\nsize {len(data)}\n".encode()


def request(
    url: str, path: str = "", method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One raw request: no redirect following, no path normalisation."""
    parts = urlsplit(url + path)
    conn = http.client.HTTPConnection(parts.netloc, timeout=10)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def get_json(url: str, path: str = "", headers: dict[str, str] | None = None) -> Any:
    status, _, body = request(url, path, headers=headers)
    assert status == 200, body
    return json.loads(body)


@pytest.fixture
def hub() -> Iterator[HubEmulator]:
    with HubEmulator() as emulator:
        emulator.add_repo(REPO, FILES)
        yield emulator


def test_ids_and_model_info(hub: HubEmulator) -> None:
    commit = hub.add_repo(REPO, FILES)  # same content => same commit
    info = get_json(hub.url, f"/api/models/{REPO}?blobs=true")
    assert isinstance(info, dict)
    assert info["id"] == info["modelId"] == REPO
    assert info["sha"] == commit and len(commit) == 40
    assert info["private"] is False and info["gated"] is False
    siblings = {s["rfilename"]: s for s in info["siblings"]}
    assert set(siblings) == set(FILES)
    for path, data in FILES.items():
        assert siblings[path]["size"] == len(data)
    lfs = siblings["model.safetensors"]
    assert lfs["blobId"] == git_sha1(pointer(WEIGHTS))
    assert lfs["lfs"] == {"sha256": sha256(WEIGHTS), "size": len(WEIGHTS), "pointerSize": len(pointer(WEIGHTS))}
    assert siblings["config.json"]["blobId"] == git_sha1(FILES["config.json"])
    assert "lfs" not in siblings["config.json"]

    plain = get_json(hub.url, f"/api/models/{REPO}/revision/{commit}")
    assert isinstance(plain, dict) and plain["sha"] == commit
    assert all(set(s) == {"rfilename"} for s in plain["siblings"])


def test_directory_source_and_lfs_threshold(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_bytes(b"ref")
    (tmp_path / ".gitattributes").write_bytes(b"*.bin lfs")
    (tmp_path / "big.dat").write_bytes(b"x" * 2048)
    (tmp_path / "small.dat").write_bytes(b"y" * 10)
    with HubEmulator() as hub:
        hub.add_repo("solo", tmp_path, repo_type="dataset", lfs_min_size=1024)
        info = get_json(hub.url, "/api/datasets/solo?blobs=true")
        assert isinstance(info, dict) and "modelId" not in info
        siblings = {s["rfilename"]: s for s in info["siblings"]}
        assert set(siblings) == {".gitattributes", "big.dat", "small.dat"}
        assert siblings["big.dat"]["lfs"]["sha256"] == sha256(b"x" * 2048)
        assert "lfs" not in siblings["small.dat"]
        status, headers, body = request(hub.url, "/datasets/solo/resolve/main/small.dat")
        assert (status, body, headers["ETag"]) == (200, b"y" * 10, f'"{git_sha1(b"y" * 10)}"')
        assert request(hub.url, "/datasets/solo/resolve/main/big.dat", "HEAD")[0] == 302


def test_lfs_resolve_redirects_to_signed_cdn_url(hub: HubEmulator) -> None:
    commit = get_json(hub.url, f"/api/models/{REPO}")["sha"]
    locations = []
    for method in ("HEAD", "GET"):
        status, headers, body = request(hub.url, f"/{REPO}/resolve/main/model.safetensors", method)
        assert status == 302 and body == b""
        assert headers["X-Repo-Commit"] == commit
        assert headers["X-Linked-Etag"] == headers["ETag"] == f'"{sha256(WEIGHTS)}"'
        assert headers["X-Linked-Size"] == str(len(WEIGHTS))
        assert headers["Content-Length"] == "0"
        locations.append(headers["Location"])
    assert locations[0] != locations[1]
    for location in locations:
        parts = urlsplit(location)
        assert f"{parts.scheme}://{parts.netloc}" == hub.cdn_url != hub.url
        assert parts.path == f"/blobs/{sha256(WEIGHTS)}" and "sig=" in parts.query
        status, headers, body = request(location)
        assert status == 200 and body == WEIGHTS and headers["ETag"] == f'"{sha256(WEIGHTS)}"'
    forged = locations[0].replace("sig=", "sig=00")
    assert request(forged)[0] == 403
    assert request(hub.cdn_url, f"/blobs/{sha256(WEIGHTS)}")[0] == 403


def test_small_file_resolve_and_ranges(hub: HubEmulator) -> None:
    data = FILES["sub/tokenizer.json"]
    status, headers, body = request(hub.url, f"/{REPO}/resolve/main/sub/tokenizer.json")
    assert (status, body) == (200, data)
    assert headers["ETag"] == f'"{git_sha1(data)}"' and headers["Accept-Ranges"] == "bytes"
    status, headers, body = request(
        hub.url, f"/{REPO}/resolve/main/sub%2Ftokenizer.json", headers={"Range": "bytes=3-5"}
    )
    assert (status, body, headers["Content-Range"]) == (206, data[3:6], f"bytes 3-5/{len(data)}")
    status, headers, body = request(hub.url, f"/{REPO}/resolve/main/config.json", "HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(len(FILES["config.json"])))


def test_cdn_range_semantics(hub: HubEmulator) -> None:
    size = len(WEIGHTS)
    location = request(hub.url, f"/{REPO}/resolve/main/model.safetensors", "HEAD")[1]["Location"]
    cases = {
        "bytes=10-19": (10, 20),
        "bytes=299990-": (299990, size),
        "bytes=-7": (size - 7, size),
        "bytes=5-999999999": (5, size),
    }
    for header, (start, end) in cases.items():
        status, headers, body = request(location, headers={"Range": header})
        assert status == 206, header
        assert body == WEIGHTS[start:end]
        assert headers["Content-Length"] == str(end - start)
        assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
    for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 9}", "bytes=-0"):
        status, headers, _ = request(location, headers={"Range": header})
        assert (status, headers["Content-Range"]) == (416, f"bytes */{size}"), header
    status, headers, body = request(location, method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(size))
    assert hub.stats.ranges[:2] == [(sha256(WEIGHTS), 10, 20), (sha256(WEIGHTS), 299990, size)]


def test_error_codes(hub: HubEmulator) -> None:
    commit = get_json(hub.url, f"/api/models/{REPO}")["sha"]
    expectations = [
        ("/api/models/org/missing", 404, "RepoNotFound"),
        ("/org/missing/resolve/main/config.json", 404, "RepoNotFound"),
        (f"/api/models/{REPO}/revision/nope", 404, "RevisionNotFound"),
        (f"/{REPO}/resolve/nope/config.json", 404, "RevisionNotFound"),
        (f"/{REPO}/resolve/main/absent.json", 404, "EntryNotFound"),
        (f"/api/models/{REPO}/tree/main/absent", 404, "EntryNotFound"),
        (f"/datasets/{REPO}/resolve/main/config.json", 404, "RepoNotFound"),
    ]
    for path, want_status, code in expectations:
        status, headers, body = request(hub.url, path)
        assert (status, headers["X-Error-Code"]) == (want_status, code), path
        assert "error" in json.loads(body)
    assert request(hub.url, f"/{REPO}/resolve/main/absent.json")[1]["X-Repo-Commit"] == commit
    for unsafe in ("../config.json", "%2E%2E/config.json", "sub/../config.json", "/etc/passwd", "..%2F..%2Fx"):
        assert request(hub.url, f"/{REPO}/resolve/main/{unsafe}")[0] == 400, unsafe


def test_private_repo_needs_token() -> None:
    with HubEmulator(token="hf_secret") as hub:
        hub.add_repo("org/private", FILES, private=True)
        hub.add_repo("org/public", FILES)
        for path in ("/api/models/org/private", "/org/private/resolve/main/config.json"):
            status, headers, _ = request(hub.url, path)
            assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")
            status, headers, _ = request(hub.url, path, headers={"Authorization": "Bearer wrong"})
            assert status == 401 and "X-Error-Code" not in headers
            assert request(hub.url, path, headers={"Authorization": "Bearer hf_secret"})[0] == 200
        assert request(hub.url, "/api/models/org/public")[0] == 200
        assert get_json(hub.url, "/api/models/org/private", {"Authorization": "Bearer hf_secret"})["private"]


def test_tree_pagination_and_listing() -> None:
    files = {f"d{i % 3}/sub/f{i:02d}.txt": b"%d" % i for i in range(23)} | {"top.bin": b"\0" * 9}
    with HubEmulator() as hub:
        hub.add_repo(REPO, files)
        seen: list[str] = []
        url, pages = f"{hub.url}/api/models/{REPO}/tree/main?recursive=true&limit=4", 0
        while url:
            status, headers, body = request(url)
            assert status == 200
            page = json.loads(body)
            assert len(page) <= 4
            seen += [e["path"] for e in page]
            link = headers.get("Link")
            url = link.split(">")[0].lstrip("<") if link else ""
            assert not link or 'rel="next"' in link and "cursor=" in link
            pages += 1
        dirs = {f"d{i}" for i in range(3)} | {f"d{i}/sub" for i in range(3)}
        assert sorted(seen) == sorted(set(files) | dirs) and len(seen) == len(set(seen))
        assert pages == -(-len(seen) // 4)

        top = get_json(hub.url, f"/api/models/{REPO}/tree/main")
        assert {(e["type"], e["path"]) for e in top} == {("file", "top.bin")} | {
            ("directory", f"d{i}") for i in range(3)
        }
        sub = get_json(hub.url, f"/api/models/{REPO}/tree/main/d1%2Fsub")
        assert sorted(e["path"] for e in sub) == sorted(p for p in files if p.startswith("d1/"))
        assert all(e["oid"] == git_sha1(files[e["path"]]) for e in sub)
        assert "lfs" in next(e for e in top if e["path"] == "top.bin")


def test_new_commits_and_refs(hub: HubEmulator) -> None:
    old = get_json(hub.url, f"/api/models/{REPO}")["sha"]
    new = hub.add_repo(REPO, {**FILES, "config.json": b'{"a": 2}'})
    assert new != old
    assert get_json(hub.url, f"/api/models/{REPO}")["sha"] == new
    assert request(hub.url, f"/{REPO}/resolve/main/config.json")[2] == b'{"a": 2}'
    assert request(hub.url, f"/{REPO}/resolve/{old}/config.json")[2] == b'{"a": 1}'
    hub.set_ref(REPO, "refs/pr/1", old)
    assert get_json(hub.url, f"/api/models/{REPO}/revision/refs%2Fpr%2F1")["sha"] == old
    for rev in ("refs%2Fpr%2F1", "refs/pr/1"):
        status, headers, body = request(hub.url, f"/{REPO}/resolve/{rev}/config.json")
        assert (status, body, headers["X-Repo-Commit"]) == (200, b'{"a": 1}', old)
    with pytest.raises(ValueError):
        hub.set_ref(REPO, "refs/pr/2", "0" * 40)


def test_fault_500_and_fifo(hub: HubEmulator) -> None:
    hub.faults += [Fault("500"), Fault("500")]
    assert request(hub.url, f"/api/models/{REPO}")[0] == 200  # api does not consume
    assert request(hub.url, f"/{REPO}/resolve/main/config.json", "HEAD")[0] == 200  # nor HEAD
    location = request(hub.url, f"/{REPO}/resolve/main/model.safetensors")[1]["Location"]  # nor 302
    assert len(hub.faults) == 2
    status, _, body = request(location)
    assert status == 500 and "error" in json.loads(body)
    assert request(hub.url, f"/{REPO}/resolve/main/config.json")[0] == 500
    assert hub.faults == []
    assert request(location)[2] == WEIGHTS


def test_fault_truncate(hub: HubEmulator) -> None:
    location = request(hub.url, f"/{REPO}/resolve/main/model.safetensors")[1]["Location"]
    hub.faults.append(Fault("truncate"))
    with pytest.raises(http.client.IncompleteRead) as err:
        request(location)
    assert len(err.value.partial) == len(WEIGHTS) // 2
    assert err.value.partial == WEIGHTS[: len(WEIGHTS) // 2]
    assert request(location)[2] == WEIGHTS and hub.faults == []


def test_fault_reset_seen_by_aiohttp(hub: HubEmulator) -> None:
    location = request(hub.url, f"/{REPO}/resolve/main/model.safetensors")[1]["Location"]
    hub.faults.append(Fault("reset"))

    async def fetch() -> tuple[int, int]:
        received = 0
        async with aiohttp.ClientSession() as session, session.get(location) as resp:
            assert resp.headers["Content-Length"] == str(len(WEIGHTS))
            try:
                async for chunk in resp.content.iter_chunked(65536):
                    received += len(chunk)
            except aiohttp.ClientError:
                return resp.status, received
        raise AssertionError("body completed despite reset")

    status, received = asyncio.run(fetch())
    assert status == 200 and received < len(WEIGHTS)
    assert hub.faults == [] and request(location)[2] == WEIGHTS


def test_fault_slow(hub: HubEmulator) -> None:
    hub.faults.append(Fault("slow", seconds=0.4))
    t0 = time.monotonic()
    assert request(hub.url, f"/{REPO}/resolve/main/config.json")[2] == FILES["config.json"]
    assert time.monotonic() - t0 >= 0.35
    with pytest.raises(ValueError):
        Fault("bogus")  # type: ignore[arg-type]


def test_faults_that_send_wrong_bytes(hub: HubEmulator) -> None:
    """Each looks like a good response to a client that checks only status and length."""
    location = request(hub.url, f"/{REPO}/resolve/main/model.safetensors")[1]["Location"]
    rng = {"Range": "bytes=1000-1999"}
    hub.add_repo("org/other", {"w.bin": bytes(400_000)}, lfs_patterns=["*.bin"])
    hub.faults += [Fault("flip"), Fault("flip", at=1000), Fault("flip", whole=True), Fault("wrong_range")]
    hub.faults += [Fault("other_file"), Fault("whole")]
    status, headers, body = request(location, headers=rng)
    assert (status, headers["Content-Range"], len(body)) == (206, "bytes 1000-1999/300000", 1000)
    assert [i for i in range(1000) if body[i] != WEIGHTS[1000 + i]] == [500]  # the middle byte
    assert body[500] == WEIGHTS[1500] ^ 0xFF
    body = request(location, headers=rng)[2]
    assert body[0] == WEIGHTS[1000] ^ 0xFF and body[1:] == WEIGHTS[1001:2000]
    status, headers, body = request(location, headers=rng)  # Range ignored, then flipped
    assert status == 200 and "Content-Range" not in headers and len(body) == len(WEIGHTS)
    assert [i for i in range(len(WEIGHTS)) if body[i] != WEIGHTS[i]] == [len(WEIGHTS) // 2]
    status, headers, body = request(location, headers=rng)
    assert (status, headers["Content-Range"], body) == (206, "bytes 2000-2999/300000", WEIGHTS[2000:3000])
    status, headers, body = request(location, headers=rng)
    assert (status, headers["Content-Range"], body) == (206, "bytes 1000-1999/300000", bytes(1000))
    assert request(location, headers=rng)[:3:2] == (200, WEIGHTS)
    assert hub.faults == []
    assert request(location, headers=rng)[2] == WEIGHTS[1000:2000], "faults are consumed"


def test_fault_hold_waits_for_the_test(hub: HubEmulator) -> None:
    import threading

    fault = Fault("hold")
    hub.faults.append(fault)
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(request(hub.url, f"/{REPO}/resolve/main/config.json")[2]))
    t.start()
    assert fault.reached.wait(10), "the request never reached the emulator"
    time.sleep(0.2)  # a held response stays held: nothing arrives while release is unset
    assert got == [] and t.is_alive()
    fault.release.set()
    t.join(10)
    assert got == [FILES["config.json"]]
    later = Fault("500", after=2)
    hub.faults.append(later)
    assert [request(hub.url, f"/{REPO}/resolve/main/config.json")[0] for _ in range(4)] == [200, 200, 500, 200]


def test_down(hub: HubEmulator) -> None:
    location = request(hub.url, f"/{REPO}/resolve/main/model.safetensors")[1]["Location"]
    hub.down = True
    for url in (f"{hub.url}/api/models/{REPO}", f"{hub.url}/{REPO}/resolve/main/config.json", location):
        status, _, body = request(url)
        assert status == 503 and "error" in json.loads(body)
    hub.down = False
    assert request(location)[0] == 200


def test_stats(hub: HubEmulator) -> None:
    hub.stats.reset()
    get_json(hub.url, f"/api/models/{REPO}")
    get_json(hub.url, f"/api/models/{REPO}/tree/main")
    request(hub.url, f"/{REPO}/resolve/main/config.json", "HEAD")
    request(hub.url, f"/{REPO}/resolve/main/config.json")
    location = request(hub.url, f"/{REPO}/resolve/main/model.safetensors")[1]["Location"]
    request(location, headers={"Range": "bytes=0-99", "Authorization": "Bearer leak"})
    s = hub.stats
    assert (s.requests["api"], s.requests["tree"], s.requests["resolve_head"]) == (1, 1, 1)
    assert (s.requests["resolve_get"], s.requests["cdn_get"], s.auth_on_cdn) == (2, 1, 1)
    assert s.data_bytes == len(FILES["config.json"]) + 100
    assert s.ranges == [(git_sha1(FILES["config.json"]), 0, len(FILES["config.json"])), (sha256(WEIGHTS), 0, 100)]
    s.reset()
    assert (sum(s.requests.values()), s.data_bytes, s.ranges, s.auth_on_cdn) == (0, 0, [], 0)


def test_rate_limit() -> None:
    data = os.urandom(1024 * 1024)
    with HubEmulator(rate_limit_bps=4 * 1024 * 1024) as hub:
        hub.add_repo(REPO, {"w.bin": data})
        location = request(hub.url, f"/{REPO}/resolve/main/w.bin")[1]["Location"]
        t0 = time.monotonic()
        assert request(location)[2] == data
        elapsed = time.monotonic() - t0
    assert 0.15 <= elapsed < 2.0


def test_file_responses_by_sendfile_are_exact_and_paced(tmp_path: Path) -> None:
    """Unharmed, a file from a directory leaves by sendfile (uncapped: in pieces of
    SENDFILE_PIECE): the same bytes and ranges, each piece counted before it is sent,
    and a capped response still takes as long as its cap says."""
    from nodecache.testing.hub import SENDFILE_PIECE

    data = os.urandom(2 * SENDFILE_PIECE + 12345)
    (tmp_path / "w.bin").write_bytes(data)
    with HubEmulator() as hub:
        hub.add_repo(REPO, tmp_path)
        location = request(hub.url, f"/{REPO}/resolve/main/w.bin", "HEAD")[1]["Location"]
        hub.stats.reset()
        assert request(location)[2] == data
        start, end = SENDFILE_PIECE - 7, 2 * SENDFILE_PIECE + 9  # across both piece boundaries
        status, headers, body = request(location, headers={"Range": f"bytes={start}-{end - 1}"})
        assert (status, body, headers["Content-Length"]) == (206, data[start:end], str(end - start))
        assert hub.stats.data_bytes == len(data) + end - start
        hub.faults.append(Fault("flip", at=5))  # a fault still goes the old way, byte by byte
        assert request(location)[2] == data[:5] + bytes([data[5] ^ 0xFF]) + data[6:]
        hub.rate_limit_bps = 4 * 1024 * 1024
        t0 = time.monotonic()
        assert request(location, headers={"Range": "bytes=0-1048575"})[2] == data[: 1024 * 1024]
        assert 0.15 <= time.monotonic() - t0 < 2.0


def test_huggingface_hub_in_process(hub: HubEmulator, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    commit = get_json(hub.url, f"/api/models/{REPO}")["sha"]
    folder = Path(snapshot_download(REPO, cache_dir=tmp_path / "a", endpoint=hub.url, token=False))
    assert folder.name == commit
    assert {p: (folder / p).read_bytes() for p in FILES} == FILES

    single = hf_hub_download(REPO, "sub/tokenizer.json", cache_dir=tmp_path / "b", endpoint=hub.url, token=False)
    assert Path(single).read_bytes() == FILES["sub/tokenizer.json"]

    info = HfApi(endpoint=hub.url, token=False).model_info(REPO, files_metadata=True)
    assert info.sha == commit
    by_name = {s.rfilename: s for s in info.siblings or []}
    assert {p: by_name[p].size for p in FILES} == {p: len(d) for p, d in FILES.items()}
    lfs = by_name["model.safetensors"].lfs
    assert lfs is not None and lfs.sha256 == sha256(WEIGHTS)
    assert hub.stats.requests["cdn_get"] >= 1 and hub.stats.auth_on_cdn == 0


CLIENT_SCRIPT = """
import json, sys
from huggingface_hub import HfApi, snapshot_download
folder = snapshot_download(sys.argv[1], cache_dir=sys.argv[2])
info = HfApi().model_info(sys.argv[1], files_metadata=True)
print(json.dumps({"folder": folder, "lfs": {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs}}))
"""


def test_huggingface_hub_env_endpoint_with_token(tmp_path: Path) -> None:
    """A separate process configured only through HF_ENDPOINT/HF_TOKEN, as nodecache's users will be."""
    with HubEmulator(token="hf_secret") as hub:
        hub.add_repo("org/private", FILES, private=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env |= {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_secret", "HF_HOME": str(tmp_path)}
        env |= {"HF_HUB_DISABLE_TELEMETRY": "1"}
        out = subprocess.run(
            [sys.executable, "-c", CLIENT_SCRIPT, "org/private", str(tmp_path / "cache")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        folder = Path(result["folder"])
        assert {p: (folder / p).read_bytes() for p in FILES} == FILES
        assert result["lfs"] == {"model.safetensors": sha256(WEIGHTS)}
        assert hub.stats.requests["cdn_get"] == 1
        assert hub.stats.auth_on_cdn == 0


def test_cli_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes(b"{}")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "weights.bin").write_bytes(b"w" * 1000)
    cmd = [sys.executable, "-m", "nodecache.testing.hub", "--repo", f"{REPO}={tmp_path}", "--listen", "127.0.0.1:0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("hub listening on http://127.0.0.1:") and "(cdn http://127.0.0.1:" in line
        url = line.split()[3]
        info = get_json(url, f"/api/models/{REPO}")
        assert isinstance(info, dict)
        assert sorted(s["rfilename"] for s in info["siblings"]) == ["config.json", "nested/weights.bin"]
        assert request(url, f"/{REPO}/resolve/main/nested/weights.bin", "HEAD")[0] == 302
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
