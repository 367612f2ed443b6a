"""`nodecache` command line: serve, prefetch, verify, ls, status, pin, unpin, evict, demo.

Exit codes: 0 ok, 1 error (one line on stderr, never a traceback), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import cccli, control
from . import config as config_mod
from .fill import FillError
from .layout import InvalidName, RepoSpec
from .tokenfile import read_secret
from .upstream import UpstreamError


class CliError(Exception):
    """A failure to report as one line and exit 1."""


def shown_percent(done: int, total: int, complete: bool) -> float:
    """100 only for a verified snapshot: a partial one never shows more than 99.9 (rounded or not)."""
    pct = done / total * 100 if total else 100.0
    return pct if complete else min(pct, 99.9)


class Progress:
    """A one-line progress bar on stderr: percent, bytes, rate, ETA."""

    def __init__(self, total: int, label: str, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.start = time.monotonic()
        self._last_print = 0.0
        self.tty = stream.isatty()

    def update(self, done: int, final: bool = False, complete: bool = False) -> None:
        """`complete`: every byte is stored and verified (only then 100%)."""
        now = time.monotonic()
        if not final and now - self._last_print < (0.2 if self.tty else 2.0):
            return
        self._last_print = now
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        pct = shown_percent(done, self.total, complete)
        bar = "#" * int(pct * 30 / 100)
        eta = f"ETA {(self.total - done) / rate:,.0f}s" if rate > 0 else ""
        line = f"{self.label} [{bar:<30}] {pct:5.1f}% {done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB {rate / 1e6:,.1f} MB/s {eta}"
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


def _token(args: argparse.Namespace, flag: str) -> str | None:
    """The token in the file a `--*-token-file` flag names (a mounted Secret), without its line end."""
    path = getattr(args, flag, None)
    if not path:
        return None
    try:
        return read_secret(path)
    except ValueError as e:
        raise CliError(f"--{flag.replace('_', '-')}: {e}") from None


def _cfg(args: argparse.Namespace) -> config_mod.Config:
    token, admin = _token(args, "token_file"), _token(args, "admin_token_file")
    return config_mod.load(
        {
            "admin_token": admin,
            "mount": getattr(args, "mount", None),
            "cache_dir": args.cache_dir,
            "repos": tuple(getattr(args, "repo", None) or ()) or None,
            "hub_url": args.hub_url,
            "hub_token": token,
            "listen": getattr(args, "listen", None),
            "read_timeout": getattr(args, "read_timeout", None),
            "fill_on_open": False if getattr(args, "no_fill_on_open", False) else None,
            "passthrough": False if getattr(args, "no_passthrough", False) else None,
            "keeper_socket": getattr(args, "keeper_socket", None),
        },
        file=Path(args.config) if getattr(args, "config", None) else None,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from . import daemon

    cfg = _cfg(args)
    if cfg.mount is None:
        raise CliError("serve needs --mount (or NODECACHE_MOUNT)")
    daemon.run(cfg)
    # Everything is closed (index, store, sockets). With a keeper, the pods' readers wait for this
    # process to end (kubelet starts the next daemon only then): skip the interpreter's teardown
    # of every module and object, 0.1-0.2 s here.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


async def _prefetch_standalone(cfg: config_mod.Config, spec: str) -> None:
    from .daemon import Daemon

    d = Daemon(cfg)
    await d.open()
    try:
        ref, sizes, blobs = await d.catalog.add_repo(RepoSpec.parse(spec))
        d.filler.must_fit(ref, sizes)
        total = sum(sizes.values())
        bar = Progress(total, f"{ref.repo_id}@{ref.revision}")
        await d.filler.fill_blobs(blobs, bar.update)
        bar.update(total, final=True, complete=True)
        print(f"ready: {ref} {len(set(blobs))} blobs, {total:,} bytes verified in {cfg.cache_dir}")
    finally:
        await d.close()


def _endpoint(args: argparse.Namespace) -> str:
    if getattr(args, "endpoint", None):
        return args.endpoint.rstrip("/")
    return "http://" + config_mod.load().listen


def _call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict:
    """One control-API call; any failure becomes a one-line CliError."""
    token = _token(args, "admin_token_file")
    if token is None:
        token = os.environ.get("NODECACHE_ADMIN_TOKEN")
    try:
        return control.call(_endpoint(args), method, path, body, token, timeout=120)
    except control.ApiError as e:
        if e.status is None:
            raise CliError(f"cannot reach the daemon at {_endpoint(args)}: {e.detail}") from None
        raise CliError(f"daemon answered {e.status}: {e.detail}") from None


def _spec_body(text: str) -> dict:
    """`[datasets/]org/name[@rev]` -> the /v1 body naming it (no revision key when none is given)."""
    spec = RepoSpec.parse(text)
    body = {"repo": spec.repo_id, "repo_type": spec.repo_type}
    if spec.revision is not None:
        body["revision"] = spec.revision
    return body


def _follow(args: argparse.Namespace, job: dict) -> None:
    """Poll a prefetch job with a live progress bar until it is ready or failed."""
    bar = Progress(job["total"], f"{job['repo']}@{job['revision']}")
    while job["state"] == "running":
        bar.update(job["done"])
        time.sleep(0.3)
        job = _call(args, "GET", f"/v1/jobs/{job['id']}")
    bar.update(job["done"], final=True, complete=job["state"] == "ready")
    if job["state"] != "ready":
        raise CliError(job["error"] or f"job {job['id']} is {job['state']}")
    print(f"ready: {job['repo']}@{job['revision']} ({job['commit'][:12]}) {job['total']:,} bytes verified")


def cmd_prefetch(args: argparse.Namespace) -> int:
    if not args.endpoint:
        asyncio.run(_prefetch_standalone(_cfg(args), args.spec))
        return 0
    job = _call(args, "POST", "/v1/prefetch", _spec_body(args.spec))
    if args.no_wait:
        print(f"job {job['id']}: {job['repo']}@{job['revision']} ({job['commit'][:12]}) {job['state']}")
    else:
        _follow(args, job)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    job = _call(args, "POST", "/v1/verify", _spec_body(args.spec) if args.spec else {})
    what = args.spec or "the whole cache"
    if args.no_wait:
        print(f"job {job['id']}: verify {what} {job['state']}")
        return 0
    bar = Progress(job["total"], f"verify {what}")
    while job["state"] == "running":
        bar.update(job["done"])
        job = _call(args, "GET", f"/v1/jobs/{job['id']}?wait=1")
    bar.update(job["done"], final=True)
    if job["state"] != "ready":
        raise CliError(job["error"] or f"job {job['id']} is {job['state']}")
    line = f"verified {what}: {job['checked']} blobs, {job['total']:,} bytes"
    if job["failed"]:
        line += f"; {job['failed']} failed (quarantined, fetched again, now proven): " + " ".join(job["failed_blobs"])
    if job["dropped_chunks"]:
        line += f"; {job['dropped_chunks']} stored chunk(s) of partial blobs were damaged and will be fetched again"
    print(line)
    return 0


def _age(ts: float) -> str:
    if not ts:
        return "never"
    s = time.time() - ts
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def cmd_ls(args: argparse.Namespace) -> int:
    if args.compile_caches:
        return cccli.ls(lambda m, p, b: _call(args, m, p, b), args.json)
    repos = _call(args, "GET", "/v1/repos")["repos"]
    if args.json:
        print(json.dumps(repos, indent=2))
        return 0
    rows = [("REPO", "REVISION", "COMMIT", "SIZE", "CACHED", "PINNED", "LAST USED")]
    for r in repos:
        for snap in r["snapshots"]:
            revs = ",".join(snap["revisions"]) or "-"
            pinned = ",".join(
                f"{rev}:{m}" for rev, m in r["pinned"].items() if rev in snap["revisions"] or rev == snap["commit"]
            )
            total = snap["bytes_total"]
            pct = shown_percent(snap["bytes_cached"], total, snap["complete"])
            cached = "100%" if snap["complete"] else f"{pct:.1f}%"
            name = r["repo"] if r["repo_type"] == "model" else f"{r['repo_type']}s/{r['repo']}"
            rows.append(
                (
                    name,
                    revs,
                    snap["commit"][:12],
                    f"{total / 1e6:,.1f} MB",
                    cached,
                    pinned or "-",
                    _age(snap["last_access"]),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = _call(args, "GET", "/v1/status")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"nodecache {st['version']}  ready={st['ready']}  mount={st['mount']}")
    for t in st["tiers"]:
        print(f"tier {t['name']:<5} {t['used'] / 1e9:,.2f} / {t['capacity'] / 1e9:,.2f} GB used  ({t['path']})")
    print(
        f"blobs {st['blobs']}  filling {st['blobs_filling']}  chunks in flight {st['fills_inflight']}  jobs {st['jobs']}"
    )
    for p in st["pins"]:
        latest = p.get("latest") or p["commit"]  # a daemon of an older version does not say
        moved = "" if latest == p["commit"] else f"; its revision names {latest[:12]} now"
        print(f"pinned {p['repo']}@{p['revision']} ({p['commit'][:12]}{moved}) {p['mode']}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    job = _call(args, "POST", "/v1/pin", {**_spec_body(args.spec), "mode": "hot" if args.hot else "pin"})
    print(f"pinned {job['repo']}@{job['revision']} ({job['commit'][:12]})")
    if args.wait:
        _follow(args, job)
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    print("unpinned " + _call(args, "DELETE", "/v1/pin", _spec_body(args.spec))["unpinned"])
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    if args.compile_cache is not None:
        if args.spec or args.all:
            raise CliError("give a repo, --all or --compile-cache KEY, not several")
        return cccli.evict(lambda m, p, b: _call(args, m, p, b), args.compile_cache)
    if bool(args.spec) == bool(args.all):
        raise CliError("give a repo (org/name[@rev]) or --all")
    out = _call(args, "POST", "/v1/evict", {"all": True} if args.all else _spec_body(args.spec))
    print(
        f"evicted {out['evicted_blobs']} blobs, {out['freed_bytes']:,} bytes; kept {out['kept_in_use_or_pinned']} in use or pinned"
    )
    return 0


def cmd_keeper(args: argparse.Namespace) -> int:
    from . import keeper

    keeper.run(Path(args.socket))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(Path(args.workdir), keep=args.keep)


def cmd_csi(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    from .csi import driver

    node_id = args.node_id or os.environ.get("KUBE_NODE_NAME")
    if not node_id:
        raise CliError("csi needs --node-id (or KUBE_NODE_NAME)")
    mount = args.mount or os.environ.get("NODECACHE_MOUNT")
    if not mount:
        raise CliError("csi needs --mount (or NODECACHE_MOUNT)")
    token = _token(args, "admin_token_file")
    token = token or os.environ.get("NODECACHE_ADMIN_TOKEN") or None
    policy = driver.PolicyFile(Path(args.policy)) if args.policy else None
    if policy is not None:
        policy.current()  # logs what it loaded, or why not; a bad file refuses volumes, it never stops the plugin
    d = driver.Driver(
        Path(mount),
        node_id,
        args.daemon_url,
        args.kubelet_dir,
        args.wait_timeout,
        admin_token=token,
        policy=policy,
        allow_whole_cache=args.allow_whole_cache,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        driver.serve(d, args.endpoint, stop)
    except ValueError as e:
        raise CliError(str(e)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodecache", description="Per-node HuggingFace model cache over FUSE.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)
    _node_commands(sub)
    _client_commands(sub)
    _demo_command(sub)
    _csi_command(sub)
    return p


def _common(sp: argparse.ArgumentParser) -> None:
    """What a command that opens the cache itself is told."""
    sp.add_argument("--config", help="YAML config file (keys as in the README; or $NODECACHE_CONFIG)")
    sp.add_argument("--cache-dir", help="index + blob store (default /var/lib/nodecache)")
    sp.add_argument("--hub-url", help="upstream Hub endpoint (default $HF_ENDPOINT or https://huggingface.co)")
    sp.add_argument("--token-file", help="file holding the HF token (a mounted Secret)")


def _node_commands(sub) -> None:
    """serve, keeper, prefetch: the commands that run the cache."""
    s = sub.add_parser("serve", help="mount the cache and serve health/metrics/API")
    _common(s)
    s.add_argument("--mount", help="FUSE mountpoint; its hub/ is an HF_HUB_CACHE")
    s.add_argument("--repo", action="append", help="[datasets/]org/name[@rev] to resolve at start (repeatable)")
    s.add_argument("--listen", help="HOST:PORT for /healthz /readyz /metrics /v1 (default 127.0.0.1:8470)")
    s.add_argument("--read-timeout", type=float, help="seconds a read may wait for its bytes before EIO")
    s.add_argument("--no-fill-on-open", action="store_true", help="fetch only what is read (plus read-ahead)")
    s.add_argument(
        "--no-passthrough", action="store_true", help="serve every read from the daemon (no FUSE passthrough)"
    )
    s.add_argument("--admin-token-file", help="file with the admin token that mutating /v1 calls must present")
    s.add_argument("--keeper-socket", help="`nodecache keeper`'s socket: the mount's connection outlives this daemon")
    s.set_defaults(fn=cmd_serve)

    k = sub.add_parser("keeper", help="hold the FUSE connection across daemon restarts (run apart from serve)")
    k.add_argument("--socket", default="/run/nodecache/keeper.sock", help="unix socket the daemons reach it on")
    k.set_defaults(fn=cmd_keeper)

    f = sub.add_parser("prefetch", help="fill a repo completely (standalone, or through --endpoint)")
    _common(f)
    f.add_argument("spec", help="[datasets/]org/name[@rev]")
    f.add_argument("--endpoint", help="a running daemon, e.g. http://127.0.0.1:8470")
    f.add_argument("--no-wait", action="store_true", help="with --endpoint: print the job id and return")
    f.add_argument("--admin-token-file", help="file with the daemon's admin token (or $NODECACHE_ADMIN_TOKEN)")
    f.set_defaults(fn=cmd_prefetch)


def _client(sub, name: str, help_: str, fn) -> argparse.ArgumentParser:
    """A command that asks a running daemon."""
    c = sub.add_parser(name, help=help_)
    c.add_argument("--endpoint", help="the daemon (default http://$NODECACHE_LISTEN or 127.0.0.1:8470)")
    c.add_argument("--admin-token-file", help="file with the daemon's admin token (or $NODECACHE_ADMIN_TOKEN)")
    c.set_defaults(fn=fn)
    return c


def _client_commands(sub) -> None:
    """ls, status, pin, unpin, verify, evict, compile-cache: the daemon's clients."""
    c = _client(sub, "ls", "list cached repos: revision, commit, size, cached %%, pinned, last used", cmd_ls)
    c.add_argument("--json", action="store_true")
    c.add_argument("--compile-caches", action="store_true", help="list compile caches instead")
    c = _client(sub, "status", "tiers, blobs, fills, jobs, pins", cmd_status)
    c.add_argument("--json", action="store_true")
    c = _client(sub, "pin", "keep a revision (never evicted) and fill it", cmd_pin)
    c.add_argument("spec", help="[datasets/]org/name[@rev]")
    c.add_argument("--hot", action="store_true", help="place it in the shm tier when it fits")
    c.add_argument("--wait", action="store_true", help="wait until it is fully cached")
    c = _client(sub, "unpin", "remove a pin", cmd_unpin)
    c.add_argument("spec", help="[datasets/]org/name[@rev]")
    c = _client(
        sub,
        "verify",
        "re-hash the stored bytes of a repo/revision (or of every repo); damage is fetched again",
        cmd_verify,
    )
    c.add_argument("spec", nargs="?", help="[datasets/]org/name[@rev] (default: the whole cache)")
    c.add_argument("--no-wait", action="store_true", help="print the job id and return")
    c = _client(sub, "evict", "drop cached bytes of a repo/revision, or of everything unpinned", cmd_evict)
    c.add_argument("spec", nargs="?", help="[datasets/]org/name[@rev]")
    c.add_argument("--all", action="store_true")
    c.add_argument("--compile-cache", metavar="KEY", help="remove a compile cache (as `ls --compile-caches` names it)")
    c = _client(sub, "compile-cache", "seal a compile cache now (peers can then fill from it)", None)
    c.add_argument("action", choices=["seal"])
    c.add_argument("key", help="the compile cache's key, as `ls --compile-caches` names it")
    c.set_defaults(fn=lambda args: cccli.seal(lambda m, p, b: _call(args, m, p, b), args.key))


def _demo_command(sub) -> None:
    d = sub.add_parser("demo", help="serve the bundled all-MiniLM-L6-v2 through the Hub emulator, mount, list, load")
    d.add_argument("--workdir", default="/tmp/nodecache-demo")
    d.add_argument("--keep", action="store_true", help="keep serving until Ctrl-C")
    d.set_defaults(fn=cmd_demo)


def _csi_command(sub) -> None:
    c = sub.add_parser("csi", help="serve the CSI node plugin (Identity + Node) on a unix socket")
    c.add_argument("--endpoint", default="unix:///csi/csi.sock", help="unix:///path, unix:/path or a path")
    c.add_argument("--node-id", help="this node's name (default $KUBE_NODE_NAME)")
    c.add_argument("--mount", help="the daemon's FUSE mountpoint (default $NODECACHE_MOUNT)")
    c.add_argument("--daemon-url", default="http://127.0.0.1:8470", help="the daemon's HTTP API")
    c.add_argument("--kubelet-dir", default="/var/lib/kubelet", help="kubelet root: binds under pods/ are ours")
    c.add_argument("--wait-timeout", type=float, default=90.0, help="waitForCache bound, below kubelet's 2 min")
    c.add_argument(
        "--admin-token-file",
        help="the daemon's admin token (prefetch is a mutating /v1 call; or $NODECACHE_ADMIN_TOKEN)",
    )
    c.add_argument(
        "--policy",
        help="YAML file: pod namespace (and service account) -> repo globs it may mount, re-read when it changes "
        "(default: public repos only, for every pod)",
    )
    c.add_argument(
        "--allow-whole-cache",
        action="store_true",
        help="let a volume without `model` publish the whole hub/ (every repo on the node, private ones included)",
    )
    c.set_defaults(fn=cmd_csi)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (CliError, config_mod.ConfigError, InvalidName, UpstreamError, FillError, OSError) as e:
        print(f"nodecache: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
