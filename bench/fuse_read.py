"""FUSE read throughput vs the raw store file, measured in one run.

One file of random bytes is served by the Hub emulator, a `nodecache serve`
daemon (a child process) fills it completely, then every pass measures, with
1 MiB read() calls:

  raw_cold       the store's blob file, page cache dropped
  page_cache     the same file again, from the page cache (raw warm)
  fuse_cold      the file through the mount, page cache dropped, as users get it:
                 a complete blob is opened in FUSE passthrough mode where the kernel allows it
  fuse_warm      the mount again, from the page cache
  raw_parallel8  8 threads, own fd each, disjoint 1/8 slices of the blob file, cold
  fuse_parallel8 the same through the mount, cold

Then the daemon is restarted with NODECACHE_PASSTHROUGH=false over the same
cache, and the served_* phases repeat the FUSE ones with every read answered
by the daemon (the path of a blob still filling, and of kernels without
passthrough); served_store_warm drops only the FUSE inode's pages, so the
store file is in the page cache: the cost of the FUSE + daemon path alone.

Each is repeated --reps times; the JSON holds the medians, every sample and the
daemon's own counters (requests, CPU) per phase.

    python bench/fuse_read.py [--size-gib 2] [--reps 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import GiB, MiB  # noqa: E402

REPO = "bench/fuse-read"
FILE = "model.safetensors"
READERS = 8
PHASES = ("raw_cold", "page_cache", "fuse_cold", "fuse_warm", "raw_parallel8", "fuse_parallel8")
SERVED = ("served_cold", "served_warm", "served_store_warm", "served_parallel8")


def make_repo(root: Path, size: int) -> str:
    """The repo dir with one random file; returns its sha256 (the store's blob id)."""
    path = root / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            block = os.urandom(min(64 * MiB, left))
            h.update(block)
            f.write(block)
            left -= len(block)
    (root / "config.json").write_text('{"model_type": "bench"}\n')
    return h.hexdigest()


class Probe:
    """Daemon-side view of one phase: FUSE read requests, bytes served, CPU seconds."""

    def __init__(self, d: common.Daemon):
        self.d = d

    def __enter__(self) -> Probe:
        self.m0, self.cpu0 = self.d.metric_values(), common.proc_cpu_seconds(self.d.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        m1, cpu1 = self.d.metric_values(), common.proc_cpu_seconds(self.d.pid)

        def delta(key: str) -> float:
            return m1.get(key, 0.0) - self.m0.get(key, 0.0)

        self.requests = int(delta('nodecache_fuse_requests_total{op="read"}'))
        self.bytes = int(delta('nodecache_read_bytes_total{source="local"}'))
        self.cpu = cpu1 - self.cpu0


def run(args: argparse.Namespace) -> dict:
    size = int(args.size_gib * GiB)
    env = {"NODECACHE_CHUNK_SIZE": str(args.chunk_size)} if args.chunk_size else {}
    chunk_size = args.chunk_size or int(os.environ.get("NODECACHE_CHUNK_SIZE", 8 * MiB))
    samples: dict[str, list[float]] = {p: [] for p in (*PHASES, *SERVED, "tmpfs_page_cache")}
    daemon_side: dict[str, list[dict]] = {p: [] for p in (*PHASES, *SERVED) if not p.startswith(("raw", "page"))}
    cpu_side: dict[str, list[dict]] = {p: [] for p in (*PHASES, *SERVED)}
    drop_method = ""
    passthrough = {}

    from nodecache.testing.hub import HubEmulator

    with common.workdir("nodecache-bench-fuse-", keep=args.keep) as work:
        print(f"generating {size / GiB:.2f} GiB of random data in {work}", flush=True)
        blob_id = make_repo(work / "repo", size)
        hub = HubEmulator()
        d = None
        try:
            hub.start()
            commit = hub.add_repo(REPO, work / "repo")
            d = common.Daemon(work, hub.url, [REPO], env=env).start()
            t0 = time.perf_counter()
            common.subprocess.run(
                [sys.executable, "-m", "nodecache", "prefetch", REPO, "--endpoint", d.url],
                check=True,
                cwd=common.REPO_ROOT,
                env=d.env,
                stdout=common.subprocess.DEVNULL,
            )
            fill_s = time.perf_counter() - t0
            print(f"filled through the daemon in {fill_s:.1f} s ({size / fill_s / 1e6:,.0f} MB/s)", flush=True)
            blob = d.cache_dir / "blobs" / blob_id[:2] / blob_id
            fused = d.snapshot_dir(REPO, commit) / FILE
            if blob.stat().st_size != size:
                raise RuntimeError(f"{blob} is not the filled blob")
            read_ahead = common.bdi_read_ahead_kb(d.mount)
            files = [blob, fused]

            def measure(phase: str, fn, *fn_args, drop: bool | str) -> None:
                nonlocal drop_method
                if drop == "fuse-only":
                    common.timed_read(blob)  # the store file is in the page cache...
                    common.fadvise_dontneed(fused)  # ...and the FUSE inode's pages are not
                elif drop:
                    drop_method = common.drop_caches(files)
                with Probe(d) as probe, common.CpuMeter() as cpu:
                    n, secs = fn(*fn_args)
                cpu_side[phase].append(
                    {
                        "reader_cpu_s_per_GiB": round(cpu.own_cpu_s / (n / GiB), 2),
                        "machine_cpu_busy": round(cpu.machine_busy, 2),
                    }
                )
                if phase in daemon_side:
                    daemon_side[phase].append(
                        {
                            "requests": probe.requests,
                            "avg_request_KiB": round(probe.bytes / probe.requests / 1024, 1) if probe.requests else 0,
                            "daemon_cpu_s": round(probe.cpu, 2),
                            "daemon_cpu_s_per_GiB": round(probe.cpu / (n / GiB), 2),
                        }
                    )
                if n != size:
                    raise RuntimeError(f"{phase}: read {n} of {size} bytes")
                samples[phase].append(n / secs / 1e6)
                print(f"  {phase:<17} {samples[phase][-1]:9,.0f} MB/s  ({secs:.2f} s)", flush=True)

            passthrough["fuse"] = common.http_json(d.url + "/v1/status")["passthrough"]
            for rep in range(args.reps):
                print(f"pass {rep + 1}/{args.reps} (passthrough {'on' if passthrough['fuse'] else 'off'})", flush=True)
                measure("raw_cold", common.timed_read, blob, drop=True)
                measure("page_cache", common.timed_read, blob, drop=False)
                measure("fuse_cold", common.timed_read, fused, drop=True)
                measure("fuse_warm", common.timed_read, fused, drop=False)
                measure("raw_parallel8", common.parallel_read, blob, READERS, drop=True)
                measure("fuse_parallel8", common.parallel_read, fused, READERS, drop=True)
            final_metrics = d.metric_values()
            d.stop()
            d = common.Daemon(work, hub.url, [REPO], env={**env, "NODECACHE_PASSTHROUGH": "false"}).start()
            passthrough["served"] = common.http_json(d.url + "/v1/status")["passthrough"]
            for rep in range(args.reps):
                print(f"pass {rep + 1}/{args.reps} (passthrough off: the daemon serves every read)", flush=True)
                measure("served_cold", common.timed_read, fused, drop=True)
                measure("served_warm", common.timed_read, fused, drop=False)
                measure("served_store_warm", common.timed_read, fused, drop="fuse-only")
                measure("served_parallel8", common.parallel_read, fused, READERS, drop=True)
            served_metrics = d.metric_values()
            shm = Path("/dev/shm") / f"nodecache-bench-{os.getpid()}"
            try:  # reference: a page cache of 4 KiB pages (tmpfs, no huge pages), like the FUSE inode's
                common.write_random_file(shm, size)
                for _ in range(args.reps):
                    n, secs = common.timed_read(shm)
                    samples["tmpfs_page_cache"].append(n / secs / 1e6)
            finally:
                shm.unlink(missing_ok=True)
        finally:
            if d is not None:
                rc = d.stop()
                if rc not in (0, None):
                    print(f"warning: daemon exited with {rc}; log tail:\n{d.log()[-2000:]}", file=sys.stderr)
            hub.stop()

    med = {p: round(common.median(v), 1) for p, v in samples.items()}
    errors = {k: v for m in (final_metrics, served_metrics) for k, v in m.items() if "fuse_errors_total" in k}
    return {
        "benchmark": "fuse_read",
        "date": common.now_iso(),
        "machine": common.machine_info(),
        **common.provenance(),
        "size_bytes": size,
        "size_gib": round(size / GiB, 3),
        "chunk_size": chunk_size,
        "read_size": common.READ_BUF,
        "reps": args.reps,
        "parallel_readers": READERS,
        "parallel_mode": "8 threads, own fd each, disjoint 1/8 slices of the file (os.preadv releases the GIL)",
        "cache_drop_method": drop_method,
        "fuse_bdi_read_ahead_kb": read_ahead,
        "passthrough": passthrough,
        "fill_s": round(fill_s, 2),
        "raw_cold_MBps": med["raw_cold"],
        "fuse_cold_MBps": med["fuse_cold"],
        "cold_ratio": round(med["fuse_cold"] / med["raw_cold"], 3),
        "page_cache_MBps": med["page_cache"],
        "fuse_warm_MBps": med["fuse_warm"],
        "warm_ratio": round(med["fuse_warm"] / med["page_cache"], 3),
        "raw_parallel8_MBps": med["raw_parallel8"],
        "fuse_parallel8_MBps": med["fuse_parallel8"],
        "parallel8_ratio": round(med["fuse_parallel8"] / med["raw_parallel8"], 3),
        "served_cold_MBps": med["served_cold"],
        "served_cold_ratio": round(med["served_cold"] / med["raw_cold"], 3),
        "served_warm_MBps": med["served_warm"],
        "served_warm_ratio": round(med["served_warm"] / med["page_cache"], 3),
        "served_parallel8_MBps": med["served_parallel8"],
        "served_parallel8_ratio": round(med["served_parallel8"] / med["raw_parallel8"], 3),
        "served_store_warm_MBps": med["served_store_warm"],
        "tmpfs_page_cache_MBps": med["tmpfs_page_cache"],
        "notes": {
            "fuse_*": "the default: a complete blob opened in passthrough mode (see 'passthrough'); the kernel reads "
            "the store file, the daemon sees no read requests (daemon_side)",
            "served_*": "NODECACHE_PASSTHROUGH=false: every read goes to the daemon, as for a blob still filling",
            "page_cache": "the store file (ext4) read again from the page cache; ext4 caches in large folios",
            "served_warm": "kernel FUSE page cache (keep_cache, 4 KiB pages), first re-read after the cold read",
            "served_store_warm": "FUSE pages dropped with fadvise, store file cached: the FUSE + daemon path alone",
            "tmpfs_page_cache": "reference: a same-size file on /dev/shm (tmpfs, 4 KiB pages), read the same way",
        },
        "targets": {"cold_ratio": 0.8, "warm_ratio": 0.9},
        "samples_MBps": {p: [round(x, 1) for x in v] for p, v in samples.items()},
        "daemon_side": daemon_side,
        "cpu_side": cpu_side,
        "daemon_fuse_errors": errors,
        "units": "MBps = 1e6 bytes per second; medians over reps",
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grey, blue, light = "#7f7f7f", "#1f77b4", "#aec7e8"
    panels = [
        (
            "cold: page cache dropped before each read",
            [
                ("raw, 1 reader", "raw_cold", grey),
                ("FUSE, 1 reader", "fuse_cold", blue),
                ("served, 1 reader", "served_cold", light),
                (f"raw, {READERS} readers", "raw_parallel8", grey),
                (f"FUSE, {READERS} readers", "fuse_parallel8", blue),
                (f"served, {READERS}\nreaders", "served_parallel8", light),
                ("served, store\nfile cached", "served_store_warm", light),
            ],
            [("cold_ratio", 0, 1), ("parallel8_ratio", 3, 4)],
        ),
        (
            "warm: from the page cache",
            [
                ("store file (ext4)", "page_cache", grey),
                ("FUSE re-read", "fuse_warm", blue),
                ("served re-read\n(keep_cache)", "served_warm", light),
                ("tmpfs file\n(4 KiB pages, ref.)", "tmpfs_page_cache", light),
            ],
            [("warm_ratio", 0, 1)],
        ),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [7, 4]})
    for ax, (title, bars, ratios) in zip(axes, panels, strict=True):
        meds = []
        for i, (_label, key, color) in enumerate(bars):
            s = res["samples_MBps"][key]
            med = common.median(s)
            meds.append(med)
            ax.bar(i, med, 0.7, color=color)
            ax.errorbar(i, med, yerr=[[med - min(s)], [max(s) - med]], color="black", capsize=3, lw=1)
            ax.text(i + 0.37, med, f"{med:,.0f}", ha="left", va="bottom", fontsize=8)
        top = max(max(res["samples_MBps"][k]) for _, k, _ in bars)
        for key, a, b in ratios:
            y = top * 1.06
            ax.plot([a, a, b, b], [y * 0.98, y, y, y * 0.98], color="black", lw=0.8)
            ax.text((a + b) / 2, y, f"FUSE/raw {res[key]:.2f}", ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, top * 1.18)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("MB/s (median; whiskers min-max)")
    m = res["machine"]
    common.save_figure(
        fig,
        path,
        f"nodecache FUSE (passthrough {'on' if res['passthrough'].get('fuse') else 'off'}; served = every read "
        f"through the daemon) vs raw store file: {res['size_gib']} GiB, chunk {res['chunk_size'] // MiB} MiB, "
        f"1 MiB reads, {res['reps']} passes, {m['nproc']} CPUs, kernel {m['kernel']}, {res['date'][:10]}",
    )


def main(argv: list[str] | None = None) -> int:
    p = common.arg_parser(__doc__)
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunk-size", type=int, help="NODECACHE_CHUNK_SIZE for the daemon (default: its own, 8 MiB)")
    common.add_run_args(p)
    args = p.parse_args(argv)
    res = common.run_and_write(args, run, plot, "fuse_read")
    rows = [
        ("cold, 1 reader", res["raw_cold_MBps"], res["fuse_cold_MBps"], res["cold_ratio"], ">= 0.8"),
        ("warm, 1 reader", res["page_cache_MBps"], res["fuse_warm_MBps"], res["warm_ratio"], ">= 0.9"),
        (f"cold, {READERS} readers", res["raw_parallel8_MBps"], res["fuse_parallel8_MBps"], res["parallel8_ratio"], ""),
        ("served cold, 1 reader", res["raw_cold_MBps"], res["served_cold_MBps"], res["served_cold_ratio"], ""),
        ("served warm, 1 reader", res["page_cache_MBps"], res["served_warm_MBps"], res["served_warm_ratio"], ""),
        (
            f"served cold, {READERS} readers",
            res["raw_parallel8_MBps"],
            res["served_parallel8_MBps"],
            res["served_parallel8_ratio"],
            "",
        ),
    ]
    print()
    common.print_table(
        [(a, f"{b:,.0f}", f"{c:,.0f}", f"{r:.2f}", t) for a, b, c, r, t in rows],
        ("case", "raw MB/s", "FUSE MB/s", "FUSE/raw", "target"),
    )
    print(f"\nwrote {args.out / 'fuse_read.json'} and {args.out / 'fuse_read.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
