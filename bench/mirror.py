"""snapshot_download through the nodecache mirror (cold, then warm) vs straight from the Hub emulator.

Everything runs in one go on this machine: the Hub emulator as its own process
with a per-response rate limit (like a CDN connection), `nodecache serve` as
another, and each `snapshot_download` in a fresh client process with a fresh
client cache, so every run downloads every byte:

- direct: HF_ENDPOINT = the emulator (LFS files 302 to its CDN origin);
- mirror cold: HF_ENDPOINT = the daemon, whose store is empty (new cache dir per run);
- mirror warm: the same daemon again, every blob already in its store.

Writes bench/results/mirror.json (`warm_speedup` = direct / warm,
`cold_overhead_ratio` = cold / direct, medians) and bench/results/mirror.png.

    python bench/mirror.py [--files 4 --file-mib 64 --rate-limit-mbps 200 --repeats 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
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


def start_hub(repo_dir: Path, rate_mbps: float, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "nodecache.testing.hub", "--repo", f"{REPO}={repo_dir}"]
    args += ["--listen", f"127.0.0.1:{port}", "--rate-limit-mbps", str(rate_mbps)]
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    deadline = time.monotonic() + 120  # hashing the repo first
    while time.monotonic() < deadline:
        if "hub listening" in log.read_text(errors="replace"):
            return proc, f"http://127.0.0.1:{port}"
        if proc.poll() is not None:
            raise RuntimeError(f"hub emulator exited:\n{log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("hub emulator did not start")


def download(endpoint: str, cache: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(cache.parent / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DOWNLOAD_TIMEOUT="60", HF_HUB_ETAG_TIMEOUT="60")
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, REPO, str(cache)], env=env, capture_output=True, text=True, timeout=1800
    )
    if out.returncode:
        raise RuntimeError(f"snapshot_download via {endpoint} failed:\n{out.stderr[-3000:]}")
    shutil.rmtree(cache, ignore_errors=True)
    return float(out.stdout.strip().splitlines()[-1])


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


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("direct", "direct from Hub\n(emulator, rate-limited)", "#7f7f7f"),
        ("mirror_cold", "mirror, cold\n(fills the node store)", "#ff7f0e"),
        ("mirror_warm", "mirror, warm\n(node store)", "#1f77b4"),
    ]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    size_mb = res["repo_bytes"] / 1e6
    raw = statistics.median(res["seconds"]["mirror_warm_raw_http"])
    keys.append(("mirror_warm_raw_http", "mirror, warm, bare\nHTTP client (no hf)", "#2ca02c"))
    for i, (key, label, color) in enumerate(keys):
        secs = res["seconds"][key]
        med = statistics.median(secs)
        ax.bar(i, med, color=color, width=0.6, label=label)
        ax.scatter([i] * len(secs), secs, color="black", s=12, zorder=3)
        ax.text(i, med, f"{med:.2f} s\n{size_mb / med:.0f} MB/s", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(keys)), [k[1] for k in keys])
    ax.set_ylabel("snapshot_download time (s), median and runs")
    ax.set_ylim(0, max(max(v) for v in res["seconds"].values()) * 1.3)
    ax.set_title(
        f"snapshot_download of {size_mb:.0f} MB ({res['params']['files']} LFS shards), "
        f"emulator at {res['params']['rate_limit_mbps']:.0f} Mbit/s per response\n"
        f"warm speedup {res['warm_speedup']:.1f}x, cold overhead {res['cold_overhead_ratio']:.2f}x"
        f" (bare HTTP reads the warm node at {size_mb / raw:.0f} MB/s)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--file-mib", type=int, default=64)
    ap.add_argument("--rate-limit-mbps", type=float, default=200.0, help="emulator cap per response")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "mirror.json")
    ap.add_argument("--workdir", type=Path, help="default: a temp dir under /var/tmp, removed after")
    args = ap.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        sys.exit("bench/mirror.py: needs root and /dev/fuse (the daemon always mounts)")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="nodecache-bench-mirror-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    hub = daemon = None
    try:
        size = make_repo(work / "repo", args.files, args.file_mib)
        hub, hub_url = start_hub(work / "repo", args.rate_limit_mbps, work / "hub.log")
        secs: dict[str, list[float]] = {"direct": [], "mirror_cold": [], "mirror_warm": [], "mirror_warm_raw_http": []}
        cold_up, warm_up, settle = [], [], []
        for r in range(args.repeats):
            # Interleaved, so drift on this noisy machine hits every mode alike.
            secs["direct"].append(download(hub_url, work / "client"))
            if daemon is not None:
                daemon.stop()
            run_dir = work / f"node{r}"
            run_dir.mkdir()
            # Not resolved at start: the mirror adds it on the first call (mirror_allow lets it).
            daemon = DaemonProcess(run_dir, hub_url, [], env={"NODECACHE_MIRROR_ALLOW": REPO}).start(timeout=60)
            secs["mirror_cold"].append(download(daemon.url, work / "client"))
            settle.append(wait_settled(daemon))  # warm = every blob in the store and verified
            cold_up.append(upstream_bytes(daemon))
            before = upstream_bytes(daemon)
            secs["mirror_warm"].append(download(daemon.url, work / "client"))
            secs["mirror_warm_raw_http"].append(raw_http_seconds(daemon, work / "repo"))
            warm_up.append(upstream_bytes(daemon) - before)
            print(
                f"run {r + 1}/{args.repeats}: direct {secs['direct'][-1]:.2f}s  cold {secs['mirror_cold'][-1]:.2f}s"
                f"  warm {secs['mirror_warm'][-1]:.2f}s",
                flush=True,
            )
            daemon.stop()
            shutil.rmtree(run_dir / "cache", ignore_errors=True)
            daemon = None
        med = {k: statistics.median(v) for k, v in secs.items()}
        res = {
            "bench": "mirror",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
            "params": {
                "files": args.files,
                "file_mib": args.file_mib,
                "rate_limit_mbps": args.rate_limit_mbps,
                "repeats": args.repeats,
                "daemon": "defaults (8 MiB chunks, 8 parallel per blob, fsync on), mirror_allow the repo",
                "client": "huggingface_hub snapshot_download, fresh process and cache per run",
            },
            "repo_bytes": size,
            "seconds": secs,
            "median_seconds": med,
            "median_MBps": {k: size / 1e6 / v for k, v in med.items()},
            "upstream_bytes_cold": cold_up,
            "settle_seconds_after_cold": settle,
            "upstream_bytes_warm": warm_up,
            "warm_speedup": med["direct"] / med["mirror_warm"],
            "cold_overhead_ratio": med["mirror_cold"] / med["direct"],
            "targets": {"cold_overhead_ratio": "<= 1.1", "warm_speedup": ">= 3"},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        plot(res, args.out.with_suffix(".png"))
        print(f"\n{'mode':<12} {'median s':>9} {'MB/s':>8}")
        for k in secs:
            print(f"{k:<12} {med[k]:>9.2f} {res['median_MBps'][k]:>8.1f}")
        print(f"warm_speedup {res['warm_speedup']:.2f}x  cold_overhead_ratio {res['cold_overhead_ratio']:.2f}x")
        print(f"upstream bytes: cold {cold_up}  warm {warm_up}  (repo {size})")
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    finally:
        if daemon is not None:
            daemon.stop()
        if hub is not None and hub.poll() is None:
            hub.send_signal(signal.SIGTERM)
            hub.wait(10)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
