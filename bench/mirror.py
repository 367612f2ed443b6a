"""snapshot_download through the nodecache mirror (cold, then warm) vs straight from the Hub emulator.

Everything runs in one go on this machine: the Hub emulator as its own process
with a per-response rate limit (like a CDN connection), `nodecache serve` as
another, and each `snapshot_download` in a fresh client process with a fresh
client cache, so every run downloads every byte:

- direct: HF_ENDPOINT = the emulator (LFS files 302 to its CDN origin);
- mirror cold: HF_ENDPOINT = the daemon, whose store is empty (new cache dir per run);
- mirror warm: the same daemon again, every blob already in its store.

Two cases, each a repo of its own:

- small (`--files` x `--file-mib`, `--rate-limit-mbps` per response): the
  original keys (`warm_speedup` = direct / warm, `cold_overhead_ratio` =
  cold / direct, medians);
- sharded (`--shards` x `--shard-mib`, like a real checkpoint, at
  `--conn-cap-MBps` per connection) with one more row, the ceiling: the same
  client against a second, uncapped emulator serving the same repo, i.e. the
  fastest this client gets on this machine in this run. Speed ratios (higher
  is faster): `sharded_cold_vs_ceiling` = ceiling time / cold time,
  `sharded_warm_vs_ceiling`, `sharded_cold_vs_direct` = direct / cold,
  `sharded_direct_vs_ceiling`; `ceiling_MBps`; CPU-s per GiB of the repo
  (`sharded.cpu_s_per_GiB`: per row, the client's, with its interpreter's start, and the
  servers', medians; `daemon_cold` the daemon's alone).

The emulator sends file bytes by sendfile (capped ones paced in the same
pieces), so its own CPU (~0.15-0.3 CPU-s per GiB) takes little from the
client and the daemon on a small machine; before, its Python reads and writes
(~0.6-0.9 CPU-s per GiB) held the ceiling row below what the client itself
reaches (the warm mirror, by sendfile, was 1.26x that "ceiling").

Rows are interleaved per repeat, so drift on this shared machine hits every
mode alike; the load average is recorded beside each run, and the daemon's
and the client's CPU-s per cold run (a 2-core machine: a CPU-bound client or
daemon shows there). Writes bench/results/mirror.json and mirror.png.

    python bench/mirror.py [--case both|small|sharded] [--shards 4 --shard-mib 256 --conn-cap-MBps 40]
                           [--files 4 --file-mib 64 --rate-limit-mbps 200] [--repeats 3]
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common import CpuMeter, GiB, arg_parser, loadavg, machine_info, now_iso, proc_cpu_seconds, provenance, wait_quiet  # noqa: E402

from nodecache.testing.daemon import DaemonProcess, free_port  # noqa: E402

MiB = 1024 * 1024
REPO = "bench/model"
CLIENT = """
import sys, time
from huggingface_hub import snapshot_download
t0 = time.perf_counter()
snapshot_download(sys.argv[1], cache_dir=sys.argv[2])
print(time.perf_counter() - t0)
"""


def make_repo(root: Path, files: int, file_mib: int) -> int:
    """A model-shaped repo: `files` LFS shards of random bytes plus small JSON files."""
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(files):
        p = root / f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        with p.open("wb") as f:
            for _ in range(file_mib):
                f.write(os.urandom(MiB))
        total += p.stat().st_size
    for name, text in {
        "config.json": '{"model_type": "bench"}',
        "tokenizer_config.json": "{}",
        "README.md": "# bench",
    }.items():
        (root / name).write_text(text)
        total += len(text)
    return total


def start_hub(repo_dir: Path, rate_mbps: float | None, log: Path) -> tuple[subprocess.Popen, str]:
    """The emulator as its own process; `rate_mbps` (megabit/s) caps each response, None: uncapped."""
    port = free_port()
    args = [sys.executable, "-m", "nodecache.testing.hub", "--repo", f"{REPO}={repo_dir}"]
    args += ["--listen", f"127.0.0.1:{port}"]
    if rate_mbps:
        args += ["--rate-limit-mbps", str(rate_mbps)]
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    deadline = time.monotonic() + 300  # hashing the repo first
    while time.monotonic() < deadline:
        if "hub listening" in log.read_text(errors="replace"):
            return proc, f"http://127.0.0.1:{port}"
        if proc.poll() is not None:
            raise RuntimeError(f"hub emulator exited:\n{log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("hub emulator did not start")


def stop_hub(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def download(endpoint: str, cache: Path) -> tuple[float, float]:
    """One snapshot_download in a fresh process and cache: (seconds inside the client, its CPU-s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(cache.parent / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DOWNLOAD_TIMEOUT="60", HF_HUB_ETAG_TIMEOUT="60")
    cpu0 = children_cpu()
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, REPO, str(cache)], env=env, capture_output=True, text=True, timeout=1800
    )
    cpu = children_cpu() - cpu0
    if out.returncode:
        raise RuntimeError(f"snapshot_download via {endpoint} failed:\n{out.stderr[-3000:]}")
    shutil.rmtree(cache, ignore_errors=True)
    return float(out.stdout.strip().splitlines()[-1]), cpu


def raw_http_seconds(daemon: DaemonProcess, repo_dir: Path) -> float:
    """Every file through the mirror with a bare HTTP client, bytes discarded: the node's own speed."""
    t0 = time.perf_counter()
    for p in sorted(repo_dir.iterdir()):
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
        conn.request("GET", f"/{REPO}/resolve/main/{p.name}")
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        while resp.read(4 * MiB):
            pass
        conn.close()
    return time.perf_counter() - t0


def upstream_bytes(daemon: DaemonProcess) -> int:
    m = re.search(r"^nodecache_upstream_bytes_total\{[^}]*\} (\S+)$", daemon.metrics(), re.M)
    return int(float(m[1])) if m else 0


def wait_settled(daemon: DaemonProcess, timeout: float = 120) -> float:
    """Until every blob is complete (filled and verified) and nothing is in flight; returns seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = daemon.metrics()
        partial = re.search(r'^nodecache_blobs\{state="partial"\} (\S+)$', m, re.M)
        inflight = re.search(r"^nodecache_fill_inflight (\S+)$", m, re.M)
        if (not partial or float(partial[1]) == 0) and (not inflight or float(inflight[1]) == 0):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError("daemon did not settle")


def run_case(
    name: str,
    work: Path,
    repo_dir: Path,
    hub: tuple[str, int],
    ceiling: tuple[str, int] | None,
    repeats: int,
    env: dict[str, str],
) -> dict:
    """`repeats` interleaved rounds of [ceiling,] direct, mirror cold (a new daemon), mirror warm, bare HTTP.

    `hub`, `ceiling`: (url, pid) of the emulators. Per row: the client's CPU-s, the
    servers' (emulator, daemon), and how busy the machine's CPUs were meanwhile.
    """
    rows = (["ceiling"] if ceiling else []) + ["direct", "mirror_cold", "mirror_warm", "mirror_warm_raw_http"]
    secs: dict[str, list[float]] = {k: [] for k in rows}
    out: dict = {"seconds": secs, "upstream_bytes_cold": [], "settle_seconds_after_cold": [], "upstream_bytes_warm": []}
    out.update(client_cpu_s={k: [] for k in rows[:-1]}, server_cpu_s={k: [] for k in rows[:-1]})
    out.update(machine_busy={k: [] for k in rows[:-1]}, daemon_cpu_s_cold=[], loadavg=[])

    def row(key: str, url: str, pids: list[int], settle: DaemonProcess | None = None) -> None:
        """One snapshot_download; then, inside the CPU accounting, the wait for `settle`'s fills and proofs."""
        c0 = [proc_cpu_seconds(p) for p in pids]
        with CpuMeter() as m:
            s, c = download(url, work / "client")
            if settle:
                out["settle_seconds_after_cold"].append(wait_settled(settle))
        secs[key].append(s)
        out["client_cpu_s"][key].append(c)
        out["server_cpu_s"][key].append(sum(proc_cpu_seconds(p) for p in pids) - sum(c0))
        out["machine_busy"][key].append(round(m.machine_busy, 3))

    for r in range(repeats):
        if ceiling:
            row("ceiling", ceiling[0], [ceiling[1]])
        row("direct", hub[0], [hub[1]])
        run_dir = work / f"{name}-node{r}"
        run_dir.mkdir()
        # Not resolved at start: the mirror adds it on the first call (mirror_allow lets it).
        daemon = DaemonProcess(run_dir, hub[0], [], env={"NODECACHE_MIRROR_ALLOW": REPO, **env}).start(timeout=60)
        try:
            assert daemon.proc is not None
            d0 = proc_cpu_seconds(daemon.proc.pid)
            row("mirror_cold", daemon.url, [daemon.proc.pid, hub[1]], settle=daemon)  # warm = all stored, verified
            out["daemon_cpu_s_cold"].append(proc_cpu_seconds(daemon.proc.pid) - d0)
            out["upstream_bytes_cold"].append(upstream_bytes(daemon))
            before = upstream_bytes(daemon)
            row("mirror_warm", daemon.url, [daemon.proc.pid])
            secs["mirror_warm_raw_http"].append(raw_http_seconds(daemon, repo_dir))
            out["upstream_bytes_warm"].append(upstream_bytes(daemon) - before)
        finally:
            daemon.stop()
            shutil.rmtree(run_dir / "cache", ignore_errors=True)
        out["loadavg"].append(loadavg())
        print(f"{name} run {r + 1}/{repeats}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in secs.items())
              + f"  load {out['loadavg'][-1]}", flush=True)  # fmt: skip
    out["median_seconds"] = {k: statistics.median(v) for k, v in secs.items()}
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "ceiling": ("client's ceiling\n(uncapped emulator)", "#9467bd"),
        "direct": ("direct from Hub\n(emulator, capped)", "#7f7f7f"),
        "mirror_cold": ("mirror, cold\n(fills the node store)", "#ff7f0e"),
        "mirror_warm": ("mirror, warm\n(node store)", "#1f77b4"),
        "mirror_warm_raw_http": ("mirror, warm, bare\nHTTP client (no hf)", "#2ca02c"),
    }
    cases = [(c, res[c] if c == "sharded" else res) for c in ("small", "sharded") if c in res.get("cases", [])]
    fig, axes = plt.subplots(1, len(cases), figsize=(7.5 * len(cases), 4.8), squeeze=False)
    for ax, (case, r) in zip(axes[0], cases, strict=True):
        size_mb = r["repo_bytes"] / 1e6
        keys = list(r["seconds"])
        for i, key in enumerate(keys):
            secs = r["seconds"][key]
            med = statistics.median(secs)
            ax.bar(i, med, color=labels[key][1], width=0.6)
            ax.scatter([i] * len(secs), secs, color="black", s=12, zorder=3)
            ax.text(i, med, f"{med:.2f} s\n{size_mb / med:.0f} MB/s", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(keys)), [labels[k][0] for k in keys], fontsize=8)
        ax.set_ylabel("snapshot_download time (s), median and runs")
        ax.set_ylim(0, max(max(v) for v in r["seconds"].values()) * 1.3)
        p = r["params"]
        if case == "small":
            title = (
                f"{size_mb:.0f} MB ({p['files']} LFS files), {p['rate_limit_mbps']:.0f} Mbit/s per response\n"
                f"warm speedup {r['warm_speedup']:.1f}x, cold/direct time {r['cold_overhead_ratio']:.2f}x"
            )
        else:
            title = (f"{size_mb:.0f} MB ({p['shards']} shards), {p['conn_cap_MBps']:.0f} MB/s per connection\n"
                     f"cold {res['sharded_cold_vs_ceiling']:.2f}x, warm {res['sharded_warm_vs_ceiling']:.2f}x "
                     f"of the ceiling ({res['ceiling_MBps']:.0f} MB/s); cold {res['sharded_cold_vs_direct']:.2f}x "
                     "direct's speed")  # fmt: skip
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"snapshot_download through the nodecache mirror (load before: {res['machine_load']['loadavg_before']})",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--case", choices=("both", "small", "sharded"), default="both")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--file-mib", type=int, default=64)
    ap.add_argument("--rate-limit-mbps", type=float, default=200.0, help="small case: emulator cap per response")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=256)
    ap.add_argument("--conn-cap-MBps", type=float, default=40.0, help="sharded case: cap per connection, MB/s")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "mirror.json")
    ap.add_argument("--workdir", type=Path, help="default: a temp dir under /var/tmp, removed after")
    ap.add_argument("--daemon-env", action="append", default=[], metavar="K=V", help="NODECACHE_* for the daemon")
    ap.add_argument("--wait-quiet", type=float, default=120, help="wait up to this long for idle CPUs first (s)")
    args = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in args.daemon_env)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        sys.exit("bench/mirror.py: needs root and /dev/fuse (the daemon always mounts)")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="nodecache-bench-mirror-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    hubs: list[subprocess.Popen] = []
    cases = ["small", "sharded"] if args.case == "both" else [args.case]
    res: dict = {"bench": "mirror", "when": now_iso(), "machine": machine_info(), **provenance(), "cases": cases}
    try:
        if "small" in cases:
            size = make_repo(work / "repo", args.files, args.file_mib)
            small_hub, small_url = start_hub(work / "repo", args.rate_limit_mbps, work / "hub.log")
            hubs.append(small_hub)
        if "sharded" in cases:
            sharded_size = make_repo(work / "sharded", args.shards, args.shard_mib)
            rate = args.conn_cap_MBps * 8  # MB/s -> the emulator's megabit/s
            capped, capped_url = start_hub(work / "sharded", rate, work / "hub-capped.log")
            uncapped, uncapped_url = start_hub(work / "sharded", None, work / "hub-uncapped.log")
            hubs += [capped, uncapped]
        res["machine_load"] = wait_quiet(args.wait_quiet)
        if "small" in cases:
            r = run_case("small", work, work / "repo", (small_url, small_hub.pid), None, args.repeats, env)
            med = r["median_seconds"]
            res.update(r)
            res.update(
                params={
                    "files": args.files,
                    "file_mib": args.file_mib,
                    "rate_limit_mbps": args.rate_limit_mbps,
                    "repeats": args.repeats,
                    "daemon": "defaults (8 MiB chunks, 8 parallel per blob, fsync on), mirror_allow the repo",
                    "client": "huggingface_hub snapshot_download, fresh process and cache per run",
                    "daemon_env": env,
                },
                repo_bytes=size,
                median_MBps={k: size / 1e6 / v for k, v in med.items()},
                warm_speedup=med["direct"] / med["mirror_warm"],
                cold_overhead_ratio=med["mirror_cold"] / med["direct"],
            )
        if "sharded" in cases:
            r = run_case(
                "sharded",
                work,
                work / "sharded",
                (capped_url, capped.pid),
                (uncapped_url, uncapped.pid),
                args.repeats,
                env,
            )
            med = r["median_seconds"]
            r.update(
                params={
                    "shards": args.shards,
                    "shard_mib": args.shard_mib,
                    "conn_cap_MBps": args.conn_cap_MBps,
                    "repeats": args.repeats,
                    "ceiling": "the same client against a second emulator, uncapped, serving the same repo (sendfile)",
                    "daemon_env": env,
                },
                repo_bytes=sharded_size,
                median_MBps={k: sharded_size / 1e6 / v for k, v in med.items()},
            )
            res["sharded"] = r
            per_gib = GiB / sharded_size
            r["cpu_s_per_GiB"] = {
                who: {k: round(statistics.median(v) * per_gib, 2) for k, v in r[f"{who}_cpu_s"].items()}
                for who in ("client", "server")
            }
            r["cpu_s_per_GiB"]["daemon_cold"] = round(statistics.median(r["daemon_cpu_s_cold"]) * per_gib, 2)
            res.update(
                ceiling_MBps=sharded_size / 1e6 / med["ceiling"],
                sharded_cold_vs_ceiling=med["ceiling"] / med["mirror_cold"],
                sharded_warm_vs_ceiling=med["ceiling"] / med["mirror_warm"],
                sharded_cold_vs_direct=med["direct"] / med["mirror_cold"],
                sharded_direct_vs_ceiling=med["ceiling"] / med["direct"],
            )
        res["loadavg_after"] = loadavg()
        res["targets"] = {
            "cold_overhead_ratio": "<= 1.1",
            "warm_speedup": ">= 3",
            "sharded_cold_vs_ceiling": ">= 0.8 (and > sharded_direct_vs_ceiling)",
            "sharded_warm_vs_ceiling": ">= 0.9",
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        plot(res, args.out.with_suffix(".png"))
        for case in cases:
            r = res if case == "small" else res["sharded"]
            print(f"\n{case}: {'mode':<22} {'median s':>9} {'MB/s':>8}")
            for k, v in r["median_seconds"].items():
                print(f"{'':<{len(case) + 2}}{k:<22} {v:>9.2f} {r['median_MBps'][k]:>8.1f}")
        if "small" in cases:
            print(f"warm_speedup {res['warm_speedup']:.2f}x  cold_overhead_ratio {res['cold_overhead_ratio']:.2f}x")
        if "sharded" in cases:
            print(f"ceiling {res['ceiling_MBps']:.0f} MB/s  cold {res['sharded_cold_vs_ceiling']:.2f}x  "
                  f"warm {res['sharded_warm_vs_ceiling']:.2f}x of it  cold vs direct {res['sharded_cold_vs_direct']:.2f}x"
                  f"  daemon CPU-s cold {res['sharded']['daemon_cpu_s_cold']}")  # fmt: skip
            print(f"CPU-s per GiB (medians): {res['sharded']['cpu_s_per_GiB']}")
        print(f"load: before {res['machine_load']['loadavg_before']}  after {res['loadavg_after']}")
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    finally:
        for hub in hubs:
            stop_hub(hub)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
