"""Read throughput while eviction churns vs without, and the daemon's memory while serving a big repo.

Same run, same repo (N files of random bytes), emulator in its own process:
  1. no quota: read every file once through the mount (cold, lazy fill) -> MB/s, peak RSS
  2. quota < repo size: the same reads force LRU eviction all along -> MB/s, evictions
Writes bench/results/eviction.json and eviction.png.

    python bench/eviction.py --files 10 --file-gib 1 --quota-gib 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from nodecache.testing.daemon import DaemonProcess, free_port

REPO = "bench/evict"
MiB = 1 << 20


def make_repo(root: Path, files: int, size: int) -> None:
    root.mkdir(parents=True)
    block = 16 * MiB
    for i in range(files):
        with open(root / f"model-{i:05d}.safetensors", "wb") as f:
            for _ in range(size // block):
                f.write(os.urandom(block))


def start_hub(repo: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "nodecache.testing.hub", "--repo", f"{REPO}={repo}", "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    if "listening" not in proc.stdout.readline():
        raise SystemExit("hub emulator did not start")
    return proc, f"http://127.0.0.1:{port}"


def peak_rss(pid: int, stop: threading.Event, out: list[int]) -> None:
    """Sample VmRSS every 100 ms (VmHWM would include start-up imports too)."""
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]) * 1024)
        except OSError:
            return
        stop.wait(0.1)


def one_pass(work: Path, hub_url: str, env: dict[str, str]) -> dict:
    d = DaemonProcess(work, hub_url, [REPO], env={"NODECACHE_MIN_FREE": "0", **env}).start(60)
    rss: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=peak_rss, args=(d.proc.pid, stop, rss))
    sampler.start()
    try:
        snaps = d.hub / ("models--" + REPO.replace("/", "--")) / "snapshots"
        snap = next(snaps.iterdir())
        files = sorted(snap.iterdir())
        total = 0
        t0 = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while buf := fh.read(16 * MiB):
                    total += len(buf)
        elapsed = time.perf_counter() - t0
        with urllib.request.urlopen(d.url + "/metrics") as r:
            metrics = r.read().decode()
        evictions = sum(
            float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("nodecache_evictions_total")
        )
        return {
            "bytes": total,
            "seconds": elapsed,
            "MBps": total / elapsed / 1e6,
            "evictions": evictions,
            "peak_rss_MiB": max(rss) / MiB if rss else None,
        }
    finally:
        stop.set()
        sampler.join()
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--file-gib", type=float, default=1.0)
    ap.add_argument("--quota-gib", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved passes of each kind; medians are reported")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    size = int(args.file_gib * 1024) * MiB
    tmp = Path(tempfile.mkdtemp(prefix="nodecache-bench-evict-"))
    hub = None
    try:
        print(f"generating {args.files} x {size / 2**30:.1f} GiB ...", flush=True)
        make_repo(tmp / "repo", args.files, size)
        hub, url = start_hub(tmp / "repo")
        quota = int(args.quota_gib * 2**30)
        runs: dict[str, list[dict]] = {"free": [], "quota": []}
        for i in range(args.repeats):  # interleaved, so drift on a noisy machine hits both alike
            for kind, env in (("free", {}), ("quota", {"NODECACHE_DISK_MAX": str(quota)})):
                r = one_pass(tmp / f"{kind}{i}", url, env)
                shutil.rmtree(tmp / f"{kind}{i}" / "cache")
                runs[kind].append(r)
                print(
                    f"{kind:>6}: {r['MBps']:7.1f} MB/s  peak RSS {r['peak_rss_MiB']:.0f} MiB  {r['evictions']:.0f} evictions",
                    flush=True,
                )
        free, churn = (sorted(runs[k], key=lambda r: r["MBps"])[len(runs[k]) // 2] for k in ("free", "quota"))
    finally:
        if hub is not None:
            hub.terminate()
            hub.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release()},
        "repo_bytes": args.files * size,
        "quota_bytes": quota,
        "no_quota": free,
        "with_eviction": churn,
        "runs": runs,
        "eviction_throughput_ratio": churn["MBps"] / free["MBps"],
        "peak_rss_MiB": max(free["peak_rss_MiB"] or 0, churn["peak_rss_MiB"] or 0),
        "targets": {"eviction_throughput_ratio": ">= 0.9", "peak_rss_MiB": "<= 300"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eviction.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "eviction.png")
    print(json.dumps({k: result[k] for k in ("eviction_throughput_ratio", "peak_rss_MiB")}))


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    a.bar(["no quota", "evicting"], [r["no_quota"]["MBps"], r["with_eviction"]["MBps"]], color=["#7f7f7f", "#1f77b4"])
    a.set_ylabel("MB/s (cold read through the mount)")
    a.set_title(f"ratio {r['eviction_throughput_ratio']:.2f} (target >= 0.9)")
    b.bar(["peak RSS"], [r["peak_rss_MiB"]], color="#1f77b4")
    b.axhline(300, color="red", linestyle="--", label="target 300 MiB")
    b.set_ylabel("MiB")
    b.set_title(f"daemon serving {r['repo_bytes'] / 2**30:.0f} GiB")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
