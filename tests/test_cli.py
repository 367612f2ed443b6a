"""The command line: clear one-line errors, prefetch standalone and through a daemon."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import BIG, SMALL, MiB, sha256_file, snapshot_dir, verified, wait_until


def nodecache(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nodecache", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("org/nope", "repository model 'org/nope' not found upstream"),
        ("org/small@no-such-branch", "revision 'no-such-branch' of model 'org/small' not found upstream"),
        ("../etc", "invalid repo id"),
        ("org/small@../../x", "invalid revision"),
    ],
)
def test_bad_repo_or_revision_is_one_line_and_exit_1(hub, tmp_path, spec, message):
    cmds = [["prefetch", spec]]
    if "invalid" in message:  # a config error stops serve; a repo upstream lacks does not (test_security)
        cmds.append(["serve", "--mount", str(tmp_path / "mnt"), "--repo", spec])
    for cmd in cmds:
        out = nodecache(*cmd, "--cache-dir", str(tmp_path / "cache"), "--hub-url", hub.url)
        assert out.returncode == 1, out
        assert message in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nodecache: error:"), out.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_usage_errors_exit_2():
    assert nodecache().returncode == 2
    assert nodecache("prefetch").returncode == 2
    assert nodecache("serve", "--no-such-flag").returncode == 2


def test_unreachable_upstream_is_one_line(tmp_path):
    out = nodecache("prefetch", SMALL, "--cache-dir", str(tmp_path / "c"), "--hub-url", "http://127.0.0.1:9")
    assert out.returncode == 1 and "Cannot connect" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_prefetch_standalone_fills_and_verifies_inside_cache_dir(hub, tmp_path, small_repo):
    cache = tmp_path / "cache"
    out = nodecache("prefetch", SMALL, "--cache-dir", str(cache), "--hub-url", hub.url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ready: {SMALL}@main ({hub.commits[SMALL][:12]})")
    assert "100.0%" in out.stderr  # the progress bar reached the end
    blobs = sorted(p.name for p in (cache / "blobs").rglob("*") if p.is_file())
    sources = {sha256_file(p) for p in small_repo.rglob("*") if p.is_file()}
    assert sha256_file(small_repo / "model.safetensors") in blobs
    assert len(blobs) == len(sources)
    # nothing was written anywhere but the cache dir
    assert {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")} == {"cache"}
    # a second prefetch fetches nothing and is still truthful
    before = hub.stats.data_bytes
    again = nodecache("prefetch", SMALL, "--cache-dir", str(cache), "--hub-url", hub.url)
    assert again.returncode == 0 and hub.stats.data_bytes == before


def test_prefetch_through_the_daemon(hub, daemons, big_repo):
    d = daemons(repos=(SMALL,))
    out = nodecache("prefetch", BIG, "--endpoint", d.url)
    assert out.returncode == 0, out.stderr
    assert f"ready: {BIG}@main ({hub.commits[BIG][:12]})" in out.stdout
    path = snapshot_dir(d, BIG, hub.commits[BIG]) / "weights.bin"
    assert os.getxattr(path, "user.nodecache.cached") == b"1.000000"
    before = hub.stats.data_bytes
    assert sha256_file(path) == sha256_file(big_repo / "weights.bin")
    assert hub.stats.data_bytes == before, "served from the store"
    bad = nodecache("prefetch", "org/nope", "--endpoint", d.url)
    assert bad.returncode == 1 and "404" in bad.stderr


def test_every_subcommand_has_working_help():
    from nodecache.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    for name in ["", *sub.choices]:
        out = nodecache(*([name] if name else []), "--help")
        assert out.returncode == 0 and "usage: nodecache" in out.stdout, (name, out.stderr)


def test_prefetch_of_a_repo_with_an_empty_file(hub, tmp_path):
    """A 0-byte file (`__init__.py`, `.gitkeep`) is one empty chunk: proven, never fetched."""
    hub.add_repo("org/with-empty", {"config.json": b'{"a": 1}\n', "pkg/__init__.py": b"", ".gitkeep": b""})
    cache = tmp_path / "cache"
    out = nodecache("prefetch", "org/with-empty", "--cache-dir", str(cache), "--hub-url", hub.url, timeout=60)
    assert out.returncode == 0, out.stderr
    empty = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # `git hash-object /dev/null`
    blob = cache / "blobs" / empty[:2] / empty
    assert blob.is_file() and blob.stat().st_size == 0
    ranges = [(s, e) for _, s, e in hub.stats.ranges]
    assert all(e > s for s, e in ranges), "no request for an empty range"


def test_a_partial_snapshot_never_shows_more_than_99_9_percent(hub, daemons):
    """All of a snapshot but one byte is here, and the test holds that byte's response:
    the progress bar, `nodecache ls` and the mount's xattr say 99.9 %, never 100."""
    import threading

    from nodecache.testing.hub import Fault

    commit = hub.add_repo("org/nearly", {"w.bin": os.urandom(4 * MiB), "z.txt": b"z"})
    d = daemons(repos=("org/nearly",), env={"NODECACHE_FILL_SNAPSHOT_ON_OPEN": "false"})  # z.txt stays unread
    snap = snapshot_dir(d, "org/nearly", commit)
    assert len((snap / "w.bin").read_bytes()) == 4 * MiB
    wait_until(lambda: verified(snap / "w.bin"), "w.bin verified")
    held = Fault("hold")
    hub.faults.append(held)
    cli = subprocess.Popen(
        [sys.executable, "-m", "nodecache", "prefetch", "org/nearly", "--endpoint", d.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(cli.stderr), daemon=True)
    reader.start()
    try:
        assert held.reached.wait(30), "the last byte was never asked for"
        assert os.getxattr(snap, "user.nodecache.cached") == b"0.999000"
        ls = nodecache("ls", "--endpoint", d.url)
        assert ls.returncode == 0 and " 99.9% " in ls.stdout, ls.stdout
        # the bar prints every 2 s when not on a terminal: wait for a line with all but 1 byte done
        line = wait_until(lambda: next((ln for ln in lines if "4.2/4.2 MB" in ln), None), "a progress line")
        assert " 99.9% " in line and not any("100.0%" in ln for ln in lines), lines
    finally:
        held.release.set()
        out = cli.stdout.read()
        cli.wait(60)
        reader.join(10)
    assert cli.returncode == 0 and out.startswith("ready: org/nearly@main")
    assert "100.0%" in lines[-1], "verified: now it is 100 %"
    assert os.getxattr(snap, "user.nodecache.cached") == b"1.000000"


def test_unreadable_token_file_is_one_line_naming_the_flag(tmp_path):
    out = nodecache("ls", "--endpoint", "http://127.0.0.1:1", "--admin-token-file", str(tmp_path / "absent"))
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out
    assert "--admin-token-file" in out.stderr and "absent" in out.stderr


def test_status_of_a_daemon_of_an_older_version_prints(tmp_path):
    """The CLI may talk to a daemon of another version: a status without the pins' `latest`
    (older daemons) prints, where it raised KeyError."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    status = {
        "version": "0.old", "ready": True, "mount": "/hub", "tiers": [], "blobs": {}, "blobs_filling": 0,
        "fills_inflight": 0, "jobs": {}, "pins": [{"repo": "o/m", "revision": "main", "commit": "a" * 40, "mode": "pin"}],
    }  # fmt: skip

    class Old(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(status).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Old)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = nodecache("status", "--endpoint", f"http://127.0.0.1:{server.server_port}", timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 0 and "pinned o/m@main (aaaaaaaaaaaa) pin" in out.stdout, out
