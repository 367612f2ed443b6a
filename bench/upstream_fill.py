"""Upstream fill: `nodecache prefetch` vs `huggingface_hub.snapshot_download`, one run.

A repo of four safetensors shards (256 MiB each at the default 1 GiB) plus
small json files is served by the Hub emulator with a per-connection
(per-response) rate cap, like a CDN that throttles each stream (the emulator
paces in the kernel too, SO_MAX_PACING_RATE). Every pass measures, as wall
time of a child process into a fresh directory:

  daemon_prefetch    a running `nodecache serve` (started untimed, as on a node) is asked
                     `POST /v1/prefetch`, then `GET /v1/jobs/ID?wait=300`: request to
                     verified completion (resolve, fetch, fsync, sha256)
  prefetch           `python -m nodecache prefetch REPO --cache-dir NEW --hub-url HUB`
                     (the same fill in a fresh process: interpreter start and imports too)
  snapshot_download  `huggingface_hub.snapshot_download(REPO, cache_dir=NEW, endpoint=HUB)`
                     (one GET per file, 8 files at a time; hf_transfer unused, no Xet)
  lazy_read          a fresh `nodecache serve`, then `cat` of every snapshot file in turn
                     through the mount, as a loader reads a checkpoint: the small files,
                     then the shards in the index's order (daemon start not timed)
  anchor             `curl -o FILE` + `openssl dgst -sha256 FILE` per file, 8 files at once
                     (like snapshot_download): what C tools pay for the same bytes
  parallel8          a second repo of 8 x 128 MiB files; a fresh `nodecache serve`, then
                     eight `cat`s at once, one per file, cold, through the mount
  curl8              eight `curl -o /dev/null` at once of the same 8 files, same emulator
  anchor8            (unthrottled only) the anchor on the 8 files of the second repo

The throttled passes run at --rate-mbps per connection; daemon_prefetch,
anchor, parallel8 and curl8 run unthrottled too (suffix `_unthrottled` in
samples), for the CPU per GiB of the daemon (/proc/PID/stat, from the POST
to the verified end) and of the anchor's processes, and for parallel8_vs_curl.

The unthrottled anchors are this machine's verified-fill bound in the same run:
C tools fetching the same bytes from the same emulator, writing and sha256-ing
them, every file at once (on 2 cores they are CPU-bound, below the loopback
rate). A verifying fill cannot beat them by much, so the ratios to them
(`*_vs_verified_*`) are given beside the ratios to cap and to curl:

  verified_cap_MBps = min(cap_MBps, unthrottled anchor rate of the repo)

Before the passes a probe child process (aiohttp, no disk) fetches the same
8 MiB ranges with as many connections as nodecache used, unthrottled and
throttled, to give the cap honestly:

  cap_MBps = min(rate x connections nodecache used, unthrottled loopback rate)
  fill_MBps = repo bytes / daemon_prefetch time (the node's path); the standalone
  process is reported beside it as prefetch_process_MBps

After them, one `curl --parallel` process fetches the shards' 8 MiB ranges,
throttled, as many at a time as nodecache used connections, on kept
connections, to /dev/null (probe_curl_throttled): the rate a C client without
disk or hash reaches against this emulator on this machine in the same run.

    python bench/upstream_fill.py [--size-gib 1] [--rate-mbps 50] [--reps 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import GiB, MiB  # noqa: E402

from nodecache import mounts  # noqa: E402

REPO = "bench/upstream-fill"
REPO8 = "bench/parallel8"
SHARDS = 4
PARALLEL = 8  # readers at once, one file each
PARALLEL_FILE = 128 * MiB


# ---- the repo ----------------------------------------------------------------------------


def make_repo(root: Path, size: int) -> dict[str, int]:
    """SHARDS random shards of size/SHARDS plus the small files a real checkpoint has."""
    root.mkdir(parents=True, exist_ok=True)
    shard = size // SHARDS
    names = [f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors" for i in range(SHARDS)]
    for n in names:
        common.write_random_file(root / n, shard)
    weight_map = {f"layers.{i:02d}.weight": names[i * SHARDS // 64] for i in range(64)}
    small = {
        "config.json": {"model_type": "bench", "hidden_size": 4096, "num_hidden_layers": 64},
        "generation_config.json": {"do_sample": False, "max_new_tokens": 32},
        "model.safetensors.index.json": {"metadata": {"total_size": shard * SHARDS}, "weight_map": weight_map},
        "tokenizer_config.json": {"model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"},
        "tokenizer.json": {"model": {"vocab": {os.urandom(6).hex(): i for i in range(60_000)}}},
    }
    for n, obj in small.items():
        (root / n).write_text(json.dumps(obj, indent=1) + "\n")
    return {p.name: p.stat().st_size for p in sorted(root.iterdir())}


def make_repo8(root: Path, size: int) -> dict[str, int]:
    """PARALLEL files of `size` random bytes, each read by its own reader."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(PARALLEL):
        common.write_random_file(root / f"part-{i + 1:02d}.safetensors", size)
    return {p.name: p.stat().st_size for p in sorted(root.iterdir())}


def loader_order(sizes: dict[str, int]) -> list[str]:
    """The order a loader reads a checkpoint in: small files, then the shards in index order."""
    shards = sorted(n for n in sizes if n.endswith(".safetensors"))
    return [n for n in sorted(sizes, key=lambda n: sizes[n]) if n not in shards] + shards


# ---- the emulator, counting concurrent data responses -------------------------------------


def make_hub(rate_bps: int | None):
    from nodecache.testing.hub import HubEmulator

    class CountingHub(HubEmulator):
        """Records (time, concurrent data GETs) at every change, to see how many streams ran."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.active = 0
            self.events: list[tuple[float, int]] = []
            self._lock = threading.Lock()

        def _bump(self, d: int) -> None:
            with self._lock:
                self.active += d
                self.events.append((time.monotonic(), self.active))

        async def _send(self, request, f, headers):
            if request.method != "GET":
                return await super()._send(request, f, headers)
            self._bump(+1)
            try:
                return await super()._send(request, f, headers)
            finally:
                self._bump(-1)

        def window(self, t0: float, t1: float) -> dict:
            """Peak and time-weighted mean concurrency between the first and last data event in [t0, t1]."""
            with self._lock:
                ev = [(t, a) for t, a in self.events if t0 <= t <= t1]
            if len(ev) < 2:
                return {"peak_connections": 0, "mean_connections": 0.0, "data_window_s": 0.0}
            area = sum(a * (ev[i + 1][0] - t) for i, (t, a) in enumerate(ev[:-1]))
            span = ev[-1][0] - ev[0][0]
            return {
                "peak_connections": max(a for _, a in ev),
                "mean_connections": round(area / span, 2) if span > 0 else 0.0,
                "data_window_s": round(span, 3),
            }

    return CountingHub(rate_limit_bps=rate_bps)


# ---- the loopback probe (runs as a child: `upstream_fill.py --probe ...`) ----------------------


async def _probe(hub_url: str, repo: str, files: list[str], conns: int, chunk: int) -> dict:
    """Fetch every byte of `files` as `chunk`-sized ranges over `conns` connections; bytes discarded."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False) as s:
        ranges = []
        for name in files:
            url = f"{hub_url}/{repo}/resolve/main/{name}"
            async with s.head(url, allow_redirects=False) as r:
                loc = r.headers.get("Location", url)
                size = int(r.headers.get("X-Linked-Size") or r.headers["Content-Length"])
            ranges += [(loc, a, min(a + chunk, size)) for a in range(0, size, chunk)]
        todo = iter(ranges)
        total = 0

        async def worker() -> None:
            nonlocal total
            for loc, a, b in todo:
                async with s.get(loc, headers={"Range": f"bytes={a}-{b - 1}"}) as r:
                    data = await r.read()
                    if r.status != 206 or len(data) != b - a:
                        raise RuntimeError(f"probe: HTTP {r.status}, {len(data)} of {b - a} bytes")
                    total += len(data)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        secs = time.perf_counter() - t0
    return {"bytes": total, "seconds": round(secs, 3), "MBps": round(total / secs / 1e6, 1)}


def probe(hub_url: str, files: list[str], conns: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--probe", hub_url, "--probe-conns", str(conns), "--probe-chunk", str(chunk)]
    out = subprocess.run([*cmd, *files], check=True, capture_output=True, text=True, cwd=common.REPO_ROOT)
    return json.loads(out.stdout)


def cdn_location(url: str) -> str:
    """Where the Hub's resolve URL redirects (the CDN), asked once, as a fill resolves once."""
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("HEAD", u.path)
        r = conn.getresponse()
        r.read()
        return urllib.parse.urljoin(url, r.getheader("Location") or url)
    finally:
        conn.close()


def curl_probe(hub_url: str, files: dict[str, int], conns: int, chunk: int) -> dict:
    """A C client's bound on this emulator: one `curl` process fetches every byte of the files
    as `chunk`-sized ranges, `conns` transfers at a time on kept connections (`--parallel`),
    to /dev/null: no disk, no hash, no Python; the CDN locations resolved first."""
    ranges = []
    for name, size in files.items():
        loc = cdn_location(f"{hub_url}/{REPO}/resolve/main/{name}")
        ranges += [(loc, a, min(a + chunk, size)) for a in range(0, size, chunk)]
    cmd = ["curl", "--parallel", "--parallel-max", str(conns), "--parallel-immediate"]
    for i, (loc, a, b) in enumerate(ranges):
        cmd += [*(["--next"] if i else []), "-sf", "-r", f"{a}-{b - 1}", "-o", "/dev/null", loc]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"curl probe failed ({r.returncode}): {r.stderr[-500:]!r}")
    total = sum(b - a for _, a, b in ranges)
    return {"bytes": total, "seconds": round(secs, 3), "MBps": round(total / secs / 1e6, 1)}


# ---- the three ways to get the bytes ---------------------------------------------------------


SNAPSHOT_DOWNLOAD = """
import sys
from huggingface_hub import snapshot_download
print(snapshot_download(sys.argv[1], cache_dir=sys.argv[2], endpoint=sys.argv[3]))
"""


def hf_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ENABLE_HF_TRANSFER="0",  # hf_transfer is not installed either; plain HTTP GETs
        PYTHONPATH=str(common.REPO_ROOT),
    )
    return env


def timed(cmd: list[str], env: dict[str, str], what: str, cpu: dict | None = None) -> tuple[float, str]:
    """Wall time of a child; `cpu` gets its CPU seconds, ours (the emulator's) and how busy the machine was."""
    c0 = os.times()
    with common.CpuMeter() as meter:
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=common.REPO_ROOT)
        secs = time.perf_counter() - t0
    c1 = os.times()
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    if cpu is not None:
        cpu["child_cpu_s"] = round(c1.children_user - c0.children_user + c1.children_system - c0.children_system, 2)
        cpu["emulator_cpu_s"] = round(meter.own_cpu_s, 2)  # the emulator serves from this process
        cpu["machine_cpu_busy"] = round(meter.machine_busy, 2)
    return secs, r.stdout


def check_tree(root: Path, sizes: dict[str, int]) -> None:
    for name, size in sizes.items():
        got = (root / name).stat().st_size
        if got != size:
            raise RuntimeError(f"{root / name}: {got} bytes, want {size}")


def data_window_stats(total: int, prefetch: list[dict]) -> dict:
    """Where the prefetch wall time goes: the data transfer window vs everything else."""
    return {
        "fill_data_window_MBps": round(common.median([total / d["data_window_s"] / 1e6 for d in prefetch]), 1),
        "prefetch_overhead_s": round(common.median([d["seconds"] - d["data_window_s"] for d in prefetch]), 3),
        "prefetch_mean_connections": round(common.median([d["mean_connections"] for d in prefetch]), 2),
    }


THROTTLED = ("daemon_prefetch", "prefetch", "snapshot_download", "lazy_read", "anchor", "parallel8", "curl8")
UNTHROTTLED = ("daemon_prefetch", "anchor", "parallel8", "curl8", "anchor8")

ANCHOR = """
dir=$1; shift
printf '%s\\n' "$@" | xargs -P 8 -n 1 sh -c \\
  'out="$0/$(basename "$1")"; curl -sfL -o "$out" "$1" && openssl dgst -sha256 "$out" >/dev/null' \\
  "$dir"
"""
CURL8 = """printf '%s\\n' "$@" | xargs -P 8 -n 1 curl -sfL -o /dev/null"""
CATS = """for f in "$@"; do cat "$f" >/dev/null & done; wait"""


def read_wait(m: dict[str, float]) -> dict:
    """How long reads waited for chunks, from the daemon's histogram."""
    n, total = m.get("nodecache_read_wait_seconds_count", 0), m.get("nodecache_read_wait_seconds_sum", 0)
    return {
        "read_waits": int(n),
        "read_wait_s_total": round(total, 3),
        "read_wait_ms_mean": round(1e3 * total / n, 2) if n else None,
    }


def run(args: argparse.Namespace) -> dict:
    size = int(args.size_gib * GiB)
    rate = int(args.rate_mbps * 1e6)
    from nodecache import config as nc_config

    cfg = nc_config.load()  # what the nodecache children run with: same NODECACHE_* environment
    chunk_size = cfg.chunk_size
    kinds = [*THROTTLED, *(k + "_unthrottled" for k in UNTHROTTLED)]
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    details: dict[str, list[dict]] = {k: [] for k in kinds}

    with common.workdir("nodecache-bench-fill-", keep=args.keep) as work:
        sizes = make_repo(work / "repo", size)
        sizes8 = make_repo8(work / "repo8", int(args.parallel_mib * MiB))
        total, total8 = sum(sizes.values()), sum(sizes8.values())
        big = sorted(n for n, s in sizes.items() if s >= 10 * MiB)
        print(
            f"repo: {len(sizes)} files, {total / 1e6:,.1f} MB ({len(big)} shards); per-connection cap {args.rate_mbps} MB/s; "
            f"parallel repo: {PARALLEL} x {args.parallel_mib:g} MiB"
        )
        hub = make_hub(rate)
        try:
            hub.start()
            commit = hub.add_repo(REPO, work / "repo")
            commit8 = hub.add_repo(REPO8, work / "repo8")

            def urls(repo: str, names) -> list[str]:
                return [f"{hub.url}/{repo}/resolve/main/{n}" for n in names]

            def one(kind: str, rep: int, throttled: bool) -> None:
                hub.rate_limit_bps = rate if throttled else None
                key = kind if throttled else kind + "_unthrottled"
                dest = work / f"{key}-{rep}"
                dest.mkdir(parents=True, exist_ok=True)
                nbytes = total8 if kind in ("parallel8", "curl8", "anchor8") else total
                bytes0, t0 = hub.stats.data_bytes, time.monotonic()
                extra: dict = {}
                if kind == "prefetch":
                    cmd = [sys.executable, "-m", "nodecache", "prefetch", REPO]
                    cmd += ["--cache-dir", str(dest), "--hub-url", hub.url]
                    secs, out = timed(cmd, {**os.environ, "PYTHONPATH": str(common.REPO_ROOT)}, "prefetch", extra)
                    if "ready:" not in out:
                        raise RuntimeError(f"prefetch printed no ready line: {out!r}")
                elif kind == "daemon_prefetch":
                    d = common.Daemon(dest, hub.url, [], name="pf")
                    try:
                        d.start()
                        cpu0 = common.proc_cpu_seconds(d.pid)
                        bytes0, t0 = hub.stats.data_bytes, time.monotonic()
                        ranges0 = len(hub.stats.ranges)
                        with common.CpuMeter() as meter:
                            t = time.perf_counter()
                            job = common.http_post_json(f"{d.url}/v1/prefetch", {"repo": REPO})
                            job = common.http_json(f"{d.url}/v1/jobs/{job['id']}?wait=300", timeout=310)
                            secs = time.perf_counter() - t
                        if job["state"] != "ready":
                            raise RuntimeError(f"daemon prefetch ended {job['state']}: {job['error']}")
                        extra.update(
                            job_seconds=job["seconds"],
                            # Requests sent as follow-ups (receive.py), of the data requests.
                            data_requests=len(hub.stats.ranges) - ranges0,
                            requests_chained=d.metric_values().get("nodecache_upstream_requests_chained_total", 0),
                            daemon_cpu_s=round(common.proc_cpu_seconds(d.pid) - cpu0, 2),
                            emulator_cpu_s=round(meter.own_cpu_s, 2),
                            machine_cpu_busy=round(meter.machine_busy, 2),
                        )
                    finally:
                        d.stop()
                elif kind == "snapshot_download":
                    cmd = [sys.executable, "-c", SNAPSHOT_DOWNLOAD, REPO, str(dest / "hub"), hub.url]
                    secs, out = timed(cmd, hf_env(dest / "hf_home"), "snapshot_download", extra)
                    check_tree(Path(out.strip().splitlines()[-1]), sizes)
                elif kind in ("anchor", "anchor8"):
                    repo, repo_sizes = (REPO, sizes) if kind == "anchor" else (REPO8, sizes8)
                    cmd = ["sh", "-c", ANCHOR, "anchor", str(dest), *urls(repo, repo_sizes)]
                    secs, _ = timed(cmd, dict(os.environ), "curl + openssl", extra)
                    check_tree(dest, repo_sizes)
                    extra["anchor_cpu_s"] = extra.pop("child_cpu_s")
                elif kind == "curl8":
                    secs, _ = timed(["sh", "-c", CURL8, "curl8", *urls(REPO8, sizes8)], dict(os.environ), "curl", extra)
                else:  # lazy_read, parallel8: a fresh daemon, then readers through its mount
                    repo, snap_commit, names = (
                        (REPO, commit, loader_order(sizes)) if kind == "lazy_read" else (REPO8, commit8, list(sizes8))
                    )
                    d = common.Daemon(dest, hub.url, [repo], name=kind)
                    try:
                        d.start()
                        t0 = time.monotonic()
                        bytes0 = hub.stats.data_bytes
                        snap = d.snapshot_dir(repo, snap_commit)
                        script = 'for f in "$@"; do cat "$f"; done >/dev/null' if kind == "lazy_read" else CATS
                        cpu0 = common.proc_cpu_seconds(d.pid)
                        secs, _ = timed(["sh", "-c", script, "cat", *(str(snap / n) for n in names)],
                                        dict(os.environ), "cat", extra)  # fmt: skip
                        extra["daemon_cpu_s"] = round(common.proc_cpu_seconds(d.pid) - cpu0, 2)
                        m = d.metric_values()
                        extra["daemon_upstream_bytes"] = int(m.get('nodecache_upstream_bytes_total{upstream="hf"}', 0))
                        extra["daemon_fuse_errors"] = {k: v for k, v in m.items() if "fuse_errors" in k}
                        # Opens of a complete blob are read by the kernel (passthrough); the rest by the daemon.
                        extra["opens"] = {
                            mode: int(m.get(f'nodecache_fuse_opens_total{{mode="{mode}"}}', 0))
                            for mode in ("passthrough", "served")
                        }
                        extra.update(read_wait(m))
                    finally:
                        d.stop()
                t1 = time.monotonic()
                samples[key].append(secs)
                details[key].append(
                    {"seconds": round(secs, 3), "MBps": round(nbytes / secs / 1e6, 1),
                     "upstream_bytes": hub.stats.data_bytes - bytes0, **hub.window(t0, t1), **extra}
                )  # fmt: skip
                print(f"  {key:<30} {secs:7.2f} s  {nbytes / secs / 1e6:8,.1f} MB/s  "
                      f"peak {details[key][-1]['peak_connections']} conns", flush=True)  # fmt: skip
                live = mounts.under(dest)
                if not live:
                    shutil.rmtree(dest, ignore_errors=True)

            for rep in range(args.reps):
                print(f"pass {rep + 1}/{args.reps}", flush=True)
                for kind in THROTTLED:
                    if kind == "lazy_read" and args.no_lazy:
                        continue
                    one(kind, rep, throttled=True)
                for kind in UNTHROTTLED:
                    one(kind, rep, throttled=False)

            conns = min(cfg.parallel_total, cfg.parallel_per_blob * len(big))
            hub.rate_limit_bps = None
            unthrottled = probe(hub.url, big, conns, chunk_size)
            hub.rate_limit_bps = rate
            throttled = probe(hub.url, big, conns, chunk_size)
            curls = [curl_probe(hub.url, {n: sizes[n] for n in big}, conns, chunk_size) for _ in range(args.reps)]
            curl_throttled = {
                **sorted(curls, key=lambda c: c["seconds"])[len(curls) // 2],
                "samples_s": [c["seconds"] for c in curls],
            }
            print(
                f"  probe, {conns} conns: unthrottled {unthrottled['MBps']:,.0f} MB/s, throttled {throttled['MBps']:,.0f} MB/s, "
                f"curl throttled {curl_throttled['MBps']:,.0f} MB/s"
            )
        finally:
            hub.stop()

    med = {k: common.median(v) for k, v in samples.items() if v}
    window = data_window_stats(total, details["daemon_prefetch"])
    cap = min(args.rate_mbps * conns, unthrottled["MBps"])
    fill = total / med["daemon_prefetch"] / 1e6
    process = total / med["prefetch"] / 1e6
    gib, gib8 = total / GiB, total8 / GiB

    def cpu_per_gib(kind: str, field: str, nbytes_gib: float) -> float:
        return round(common.median([x[field] for x in details[kind]]) / nbytes_gib, 2)

    cpu = {}
    for suffix, tag in (("", "_unthrottled"), ("_throttled", "")):
        daemon = cpu_per_gib("daemon_prefetch" + tag, "daemon_cpu_s", gib)
        anchor = cpu_per_gib("anchor" + tag, "anchor_cpu_s", gib)
        p8, c8 = total8 / med["parallel8" + tag] / 1e6, total8 / med["curl8" + tag] / 1e6
        cpu.update({
            "daemon_cpu_s_per_GiB" + suffix: daemon,
            "anchor_cpu_s_per_GiB" + suffix: anchor,
            "cpu_ratio_vs_anchor" + suffix: round(daemon / anchor, 2),
            "parallel8_cold_MBps" + suffix: round(p8, 1),
            "parallel8_curl_MBps" + suffix: round(c8, 1),
            "parallel8_vs_curl" + suffix: round(p8 / c8, 3),
            "parallel8_daemon_cpu_s_per_GiB" + suffix: cpu_per_gib("parallel8" + tag, "daemon_cpu_s", gib8),
        })  # fmt: skip
    lazy = total / med["lazy_read"] / 1e6 if samples["lazy_read"] else None
    verified = total / med["anchor_unthrottled"] / 1e6
    verified_cap = min(cap, verified)
    verified8 = total8 / med["anchor8_unthrottled"] / 1e6
    res = {
        "benchmark": "upstream_fill",
        "date": common.now_iso(),
        "machine": common.machine_info(),
        **common.provenance(),
        "size_bytes": total,
        "files": sizes,
        "shards": SHARDS,
        "parallel8_files": sizes8,
        "rate_MBps_per_connection": args.rate_mbps,
        "chunk_size": chunk_size,
        "reps": args.reps,
        "daemon_prefetch_s": round(med["daemon_prefetch"], 3),
        "prefetch_s": round(med["prefetch"], 3),
        "snapshot_download_s": round(med["snapshot_download"], 3),
        "speedup_vs_snapshot_download": round(med["snapshot_download"] / med["prefetch"], 2),
        "fill_MBps": round(fill, 1),
        "prefetch_process_MBps": round(process, 1),
        "prefetch_process_vs_cap": round(process / cap, 3),
        "snapshot_download_MBps": round(total / med["snapshot_download"] / 1e6, 1),
        "anchor_MBps": round(total / med["anchor"] / 1e6, 1),
        "connections_used": conns,
        "cap_MBps": round(cap, 1),
        "fill_vs_cap": round(fill / cap, 3),
        **window,
        "lazy_read_s": round(med["lazy_read"], 3) if lazy else None,
        "lazy_read_MBps": round(lazy, 1) if lazy else None,
        "lazy_read_vs_cap": round(lazy / cap, 3) if lazy else None,
        "lazy_read_speedup_vs_snapshot_download": round(med["snapshot_download"] / med["lazy_read"], 2)
        if lazy
        else None,
        **cpu,
        "verified_anchor_MBps": round(verified, 1),
        "verified_cap_MBps": round(verified_cap, 1),
        "fill_vs_verified_cap": round(fill / verified_cap, 3),
        "lazy_read_vs_verified_cap": round(lazy / verified_cap, 3) if lazy else None,
        "parallel8_verified_anchor_MBps": round(verified8, 1),
        "parallel8_vs_verified_anchor": round(cpu["parallel8_cold_MBps"] / verified8, 3),
        "anchor8_cpu_s_per_GiB": cpu_per_gib("anchor8_unthrottled", "anchor_cpu_s", gib8),
        "cap_note": (
            f"The emulator caps each data response at {args.rate_mbps} MB/s. nodecache prefetch used up to "
            f"{conns} concurrent range requests on the shards (parallel_per_blob={cfg.parallel_per_blob} x "
            f"{len(big)} shards, under parallel_total={cfg.parallel_total}; details.prefetch shows the peak and "
            f"time-weighted mean of concurrent data responses the emulator saw). cap = min({args.rate_mbps} x {conns} = {args.rate_mbps * conns:.0f}, "
            f"unthrottled loopback rate {unthrottled['MBps']:.0f}) MB/s; the loopback rate is a no-disk aiohttp "
            f"client in its own process fetching the shards as {chunk_size // MiB} MiB ranges over {conns} "
            f"connections from this emulator. fill_MBps is repo bytes / time from POST /v1/prefetch to the "
            f"job's verified completion on a running daemon (resolve, fetch, fsync, sha256); "
            f"prefetch_process_MBps is the same fill as a fresh `nodecache prefetch` process (interpreter "
            f"start and imports, ~0.2 s here, included). speedup_vs_snapshot_download compares that process "
            f"with snapshot_download's process. lazy_read is `cat` of the files one after another through a "
            f"fresh daemon's mount (small files, then shards in index order), lazy_read_vs_cap its rate over cap."
        ),
        "cpu_note": (
            "daemon_cpu_s_per_GiB: utime+stime of the running daemon (/proc/PID/stat, all threads) from POST "
            "/v1/prefetch to the verified end, per GiB of the repo (fetch, write, fsync, xxh3, sha256). "
            "anchor_cpu_s_per_GiB: every process of `curl -o FILE && openssl dgst -sha256 FILE`, 8 files at "
            "once, per GiB (rusage of the children). Without suffix: unthrottled emulator on loopback; "
            "_throttled: at rate_MBps_per_connection. The emulator serves from this bench process, so its CPU "
            "is not in either figure; on a 2-core machine shared with others, a CPU-bound run is slower for both."
        ),
        "verified_note": (
            "The machine's verified-fill bound, measured in this run: verified_anchor_MBps is the unthrottled "
            "anchor (`curl -o FILE && openssl dgst -sha256 FILE`, every file at once) on the repo, "
            "parallel8_verified_anchor_MBps the same on the 8 files of the second repo. Both fetch every byte "
            "from the same emulator, write it and hash it, as a verifying fill must; on a machine with few "
            "cores they are CPU-bound (details.anchor_unthrottled: machine_cpu_busy), below the loopback rate "
            "of the no-disk probe and far below eight `curl -o /dev/null`. verified_cap_MBps = min(cap_MBps, "
            "verified_anchor_MBps); fill_vs_verified_cap and lazy_read_vs_verified_cap are the fill and lazy "
            "read over it, parallel8_vs_verified_anchor the eight cold readers over the anchor of their files. "
            "The anchors' readers are openssl reading back from the page cache; the lazy read and the eight "
            "readers also pay `cat` through the mount."
        ),
        "parallel8_note": (
            f"{PARALLEL} files of {args.parallel_mib:g} MiB (repo {REPO8}); parallel8: a fresh daemon, then "
            f"{PARALLEL} `cat`s at once through its mount, cold; curl8: {PARALLEL} `curl -o /dev/null` at once "
            "from the same emulator (no disk, no hash). Without suffix unthrottled, _throttled at the cap."
        ),
        "probe_unthrottled": unthrottled,
        "probe_throttled": throttled,
        "probe_curl_throttled": curl_throttled,
        "fill_vs_curl_probe": round(fill / curl_throttled["MBps"], 3),
        "lazy_read_vs_curl_probe": round(lazy / curl_throttled["MBps"], 3) if lazy else None,
        "curl_probe_vs_cap": round(curl_throttled["MBps"] / cap, 3),
        "curl_probe_note": (
            f"probe_curl_throttled: one `curl --parallel --parallel-max {conns}` process, throttled, fetches the "
            f"shards' bytes as {chunk_size // MiB} MiB ranges, {conns} at a time on kept connections, to "
            "/dev/null (no disk, no hash, no Python; the CDN locations resolved first): what a C client reaches "
            "against this emulator on this machine in the same run (median of reps). curl_probe_vs_cap is how "
            "close to cap it gets (its gaps between a connection's requests, the pacing); fill_vs_curl_probe "
            "and lazy_read_vs_curl_probe compare the daemon with it."
        ),
        "targets": {
            "speedup_vs_snapshot_download": 1.5,
            "fill_vs_cap": 0.9,
            "lazy_read_vs_cap": 0.8,
            "lazy_read_speedup_vs_snapshot_download": 3.0,
            "parallel8_vs_curl": 0.8,
            "parallel8_vs_curl_throttled": 0.8,
            "cpu_ratio_vs_anchor": 1.5,
            "cpu_ratio_vs_anchor_throttled": 1.5,
        },
        "samples_s": {k: [round(x, 3) for x in v] for k, v in samples.items()},
        "details": details,
        "units": "MBps = 1e6 bytes per second; medians over reps; times are wall time of the child process",
    }
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [
        ("snapshot_download", "snapshot_\ndownload", "#7f7f7f"),
        ("prefetch", "nodecache\nprefetch\n(new process)", "#aec7e8"),
        ("daemon_prefetch", "prefetch via\nrunning daemon", "#1f77b4"),
    ]
    if res["samples_s"]["lazy_read"]:
        kinds.append(("lazy_read", "nodecache\nlazy cat", "#2ca02c"))
    kinds.append(("anchor", "curl -o +\nopenssl,\n8 at once", "#ff7f0e"))
    total = res["size_bytes"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for i, (k, _label, color) in enumerate(kinds):
        s = res["samples_s"][k]
        med = common.median(s)
        a1.bar(i, med, color=color)
        a1.errorbar(i, med, yerr=[[med - min(s)], [max(s) - med]], color="black", capsize=3, lw=1)
        a1.text(i + 0.41, med, f"{med:.1f} s", ha="left", va="bottom", fontsize=8)
        mbps = total / med / 1e6
        a2.bar(i, mbps, color=color)
        a2.text(i, mbps, f"{mbps:,.0f}", ha="center", va="bottom", fontsize=8)
    a2.axhline(res["cap_MBps"], color="red", ls="--", lw=1, label=f"cap {res['cap_MBps']:,.0f} MB/s")
    a2.axhline(0.9 * res["cap_MBps"], color="red", ls=":", lw=1, label="0.9 x cap")
    conns = res["connections_used"]
    for key, color, what in (
        ("probe_throttled", "#9467bd", f"no-disk client, {conns} conns"),
        ("probe_curl_throttled", "#8c564b", f"curl --parallel {conns}, the ranges"),
    ):
        label = f"{what}, throttled: {res[key]['MBps']:,.0f}"
        a2.axhline(res[key]["MBps"], color=color, ls="-.", lw=1, label=label)
    for ax in (a1, a2):
        ax.set_xticks(range(len(kinds)), [k[1] for k in kinds], fontsize=8)
    a1.set_ylabel("wall time, s (median, whiskers min-max)")
    a2.set_ylabel("MB/s")
    a2.legend(fontsize=8)
    common.save_figure(
        fig,
        path,
        f"Upstream fill of {total / 1e9:.2f} GB at {res['rate_MBps_per_connection']} MB/s per connection: "
        f"speedup {res['speedup_vs_snapshot_download']:.2f}x, fill/cap {res['fill_vs_cap']:.2f} "
        f"({res['machine']['nproc']} CPUs, {res['date'][:10]})",
    )


def main(argv: list[str] | None = None) -> int:
    p = common.arg_parser(__doc__)
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--rate-mbps", type=float, default=40.0, help="per-connection cap of the emulator, MB/s (1e6 B/s)")
    p.add_argument("--parallel-mib", type=float, default=128.0, help="size of each of the 8 files read at once")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--name", default="upstream_fill", help="output file stem (e.g. for a second rate)")
    p.add_argument("--no-lazy", action="store_true", help="skip the lazy read through the mount")
    common.add_run_args(p)
    p.add_argument("--probe", metavar="HUB_URL", help=argparse.SUPPRESS)
    p.add_argument("--probe-conns", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--probe-chunk", type=int, default=8 * MiB, help=argparse.SUPPRESS)
    p.add_argument("probe_files", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(asyncio.run(_probe(args.probe, REPO, args.probe_files, args.probe_conns, args.probe_chunk))))
        return 0
    res = common.run_and_write(args, run, plot)
    print()
    rows = [
        ("snapshot_download", res["snapshot_download_s"], res["snapshot_download_MBps"], ""),
        ("nodecache prefetch (process)", res["prefetch_s"], res["prefetch_process_MBps"], ""),
        ("prefetch via running daemon", res["daemon_prefetch_s"], res["fill_MBps"], ""),
    ]
    if res["lazy_read_s"] is not None:
        rows.append(("nodecache lazy cat, shard after shard", res["lazy_read_s"], res["lazy_read_MBps"], ""))
    rows.append(("curl -o + openssl dgst, 8 at once", round(res["size_bytes"] / res["anchor_MBps"] / 1e6, 3),
                 res["anchor_MBps"], ""))  # fmt: skip
    common.print_table([(a, f"{b:.2f}", f"{c:,.1f}") for a, b, c, _ in rows], ("method", "wall s", "MB/s"))
    print()
    metrics = [
        ("speedup_vs_snapshot_download", "", ">= 1.5"),
        ("cap_MBps", "", ""),
        ("fill_vs_cap", "", ">= 0.9"),
        ("prefetch_process_vs_cap", "", ""),
        ("lazy_read_vs_cap", "", ">= 0.8"),
        ("lazy_read_speedup_vs_snapshot_download", "", ">= 3"),
        ("parallel8_cold_MBps", "", ""),
        ("parallel8_curl_MBps", "", ""),
        ("parallel8_vs_curl", "", ">= 0.8"),
        ("parallel8_cold_MBps", "_throttled", ""),
        ("parallel8_curl_MBps", "_throttled", ""),
        ("parallel8_vs_curl", "_throttled", ">= 0.8"),
        ("verified_anchor_MBps", "", ""),
        ("verified_cap_MBps", "", ""),
        ("fill_vs_verified_cap", "", ""),
        ("lazy_read_vs_verified_cap", "", ""),
        ("curl_probe_vs_cap", "", ""),
        ("fill_vs_curl_probe", "", ""),
        ("lazy_read_vs_curl_probe", "", ""),
        ("parallel8_verified_anchor_MBps", "", ""),
        ("parallel8_vs_verified_anchor", "", ""),
        ("daemon_cpu_s_per_GiB", "", ""),
        ("anchor_cpu_s_per_GiB", "", ""),
        ("cpu_ratio_vs_anchor", "", "<= 1.5"),
        ("daemon_cpu_s_per_GiB", "_throttled", ""),
        ("anchor_cpu_s_per_GiB", "_throttled", ""),
        ("cpu_ratio_vs_anchor", "_throttled", "<= 1.5"),
    ]
    common.print_table(
        [(k + sfx, "-" if res[k + sfx] is None else f"{res[k + sfx]:,.2f}", t) for k, sfx, t in metrics],
        ("metric", "value", "target"),
    )
    print(f"\nwrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
