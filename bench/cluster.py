"""N-node time-to-ready: nodecache peer-to-peer fill vs every node running snapshot_download.

One repo of `--size-gib` (two safetensors-named shards of random bytes plus a
config.json) is generated once. For each N in `--nodes`, in the same run:

  nodecache   a fresh `testkit.cluster.Cluster` of N nodes (network
              namespaces, a bridge, veth pairs, tc tbf limits: `--upstream-mbit`
              on the emulator's link, `--node-mbit` on every node's link, both
              directions). Once every daemon is up, `POST /v1/prefetch {"repo": ...}`
              goes to every node at once (one thread per node, common start
              barrier); each node then fills the whole repo, the owner of each
              (blob, chunk) (HRW) from upstream, everybody else from the owner.
              all_ready_s = time from the POSTs until every node's /v1/repos
              says the snapshot is complete (every blob stored and its sha256
              verified), polled every 0.1 s.
  baseline    a fresh Cluster of the same shape (same tc limits); its daemons are
              stopped right after start, only the namespaces are used. Every node
              runs `huggingface_hub.snapshot_download(REPO, cache_dir=NODE_DIR,
              endpoint=HUB)` in its own namespace (`nsenter --net`), all at once.
              Each child imports huggingface_hub first, says "ready", then waits
              for "go" on stdin, so interpreter start-up is not timed.
              baseline_s = time from "go" until the last child finished.
  bound       bound_s = S / min(B_node, B_upstream), B from the tc rates in bytes/s
              (mbit x 1e6 / 8). With N >= 1 every node must receive S through its
              own link and upstream must send S at least once.

Upstream bytes are the emulator's `data_bytes` counter (body bytes of data
responses), as a multiple of S. Peer bytes per node come from each daemon's
/metrics. CPU seconds of every daemon, the emulator and the baseline children,
and the machine's busy fraction during each fill, are recorded: this machine
has 2 cores, and at N=4 the daemons move ~7 S through Python sockets.

    python bench/cluster.py [--nodes 1,2,4] [--size-gib 1] [--upstream-mbit 800] [--node-mbit 1600]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import GiB, MiB  # noqa: E402

from nodecache import mounts  # noqa: E402

REPO = "bench/cluster"
SHARDS = 2
POLL_S = 0.1


# ---- the repo ----------------------------------------------------------------------------


def make_repo(root: Path, size: int) -> dict[str, int]:
    root.mkdir(parents=True, exist_ok=True)
    shard = size // SHARDS
    shard -= shard % MiB  # whole MiB, so both shards are the same size
    for i in range(SHARDS):
        common.write_random_file(root / f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors", shard)
    (root / "config.json").write_text(json.dumps({"architectures": ["BenchModel"], "shards": SHARDS}) + "\n")
    return {p.name: p.stat().st_size for p in sorted(root.iterdir())}


# ---- small helpers -----------------------------------------------------------------------


def machine_jiffies() -> tuple[int, int]:
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle, sum(v[:8])


def busy_between(a: tuple[int, int], b: tuple[int, int]) -> float:
    return round((b[0] - a[0]) / max(1, b[1] - a[1]), 3)


def cpu_s(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return common.proc_cpu_seconds(pid)
    return float("nan")


def dirty_bytes() -> int:
    """Dirty + Writeback page-cache bytes, machine-wide (/proc/meminfo)."""
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(("Dirty:", "Writeback:")):
            total += int(line.split()[1]) * 1024
    return total


def thread_cpu_s(pid: int) -> tuple[float, float]:
    """(main thread, all other threads) CPU seconds of a process: the event loop vs its executor."""
    main = other = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                f = (task / "stat").read_text().rpartition(")")[2].split()
                t = (int(f[11]) + int(f[12])) / tick
                if task.name == str(pid):
                    main += t
                else:
                    other += t
    return main, other


def all_cpu() -> dict[int, float]:
    """CPU seconds of every process on the machine, by pid."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                out[int(d.name)] = common.proc_cpu_seconds(int(d.name))
    return out


def others_cpu_s(before: dict[int, float], after: dict[int, float], ours: set[int]) -> float:
    """CPU used by processes that are not this benchmark's during a window (the machine is shared)."""
    mine = ours | {os.getpid()}
    return round(sum(v - before.get(p, 0.0) for p, v in after.items() if p not in mine), 2)


def admin_headers() -> dict[str, str]:
    tok = os.environ.get("NODECACHE_ADMIN_TOKEN")
    return {"Authorization": f"Bearer {tok}"} if tok else {}


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **admin_headers()},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def snapshot_state(node_url: str) -> tuple[bool, int]:
    """(complete, bytes_cached) of REPO's snapshot on one node, as /v1/repos says."""
    for r in get_json(node_url + "/v1/repos")["repos"]:
        if r["repo"] == REPO and r["snapshots"]:
            snaps = r["snapshots"]
            return all(s["complete"] for s in snaps), sum(s["bytes_cached"] for s in snaps)
    return False, 0


def metric_sum(m: dict[str, float], name: str) -> dict[str, float]:
    """Samples of one metric family, keyed by their label string ('' when unlabelled)."""
    out = {}
    for k, v in m.items():
        base, _, labels = k.partition("{")
        if base == name:
            out[labels.rstrip("}")] = v
    return out


def node_metrics(node) -> dict:
    m = common.parse_metrics(node.metrics())
    one = lambda name: int(sum(metric_sum(m, name).values()))  # noqa: E731
    return {
        "peer_bytes_sent": one("nodecache_peer_bytes_sent_total"),
        "peer_bytes_received": one("nodecache_peer_bytes_received_total"),
        "upstream_bytes": one("nodecache_upstream_bytes_total"),
        "peer_fallbacks": {k or "-": int(v) for k, v in metric_sum(m, "nodecache_peer_fallbacks_total").items()},
        "verify_failures": {k or "-": int(v) for k, v in metric_sum(m, "nodecache_verify_failures_total").items()},
        "peer_fetches": int(metric_sum(m, "nodecache_peer_fetch_seconds_count").get("", 0)),
        "peer_fetch_s_sum": round(metric_sum(m, "nodecache_peer_fetch_seconds_sum").get("", 0.0), 2),
        "coalesced_waits": one("nodecache_coalesced_waits_total"),
    }


def new_cluster(work: Path, name: str, repo_dir: Path, n: int, args: argparse.Namespace):
    from testkit.cluster import Cluster

    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    env = dict(kv.split("=", 1) for kv in args.daemon_env)
    return Cluster(d, {REPO: repo_dir}, nodes=n, upstream_mbit=args.upstream_mbit, node_mbit=args.node_mbit, env=env)


def stop_cluster(c) -> None:
    c.stop()
    live = mounts.under(c.workdir)
    if live:
        print(f"warning: still mounted under {c.workdir}: {live}", file=sys.stderr)
    else:
        shutil.rmtree(c.workdir, ignore_errors=True)


# ---- nodecache -----------------------------------------------------------------------------


def run_nodecache(work: Path, repo_dir: Path, n: int, size: int, args: argparse.Namespace) -> dict:
    c = new_cluster(work, f"nodecache-{n}", repo_dir, n, args)
    try:
        c.start()
        bytes0 = c.hub_stats()["data_bytes"]
        pids = [node.proc.pid for node in c.nodes]
        cpu0 = [cpu_s(p) for p in pids] + [cpu_s(c.hub_proc.pid)]
        th0 = [thread_cpu_s(p) for p in pids]
        barrier = threading.Barrier(n + 1)
        errors: list[BaseException] = []
        jobs: list[dict | None] = [None] * n

        def post(i: int) -> None:
            try:
                barrier.wait()
                jobs[i] = post_json(c.nodes[i].url + "/v1/prefetch", {"repo": REPO})
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        j0, procs0 = machine_jiffies(), all_cpu()
        barrier.wait()
        t0 = time.monotonic()
        for t in threads:
            t.join(30)
        if errors:
            raise errors[0]
        ready: list[float | None] = [None] * n
        all_bytes: list[float | None] = [None] * n  # every chunk stored (before the sha256 proof)
        timeline: list[tuple[float, list[int], int]] = []
        up_done = None  # upstream has sent S
        dirty_max = 0
        deadline = t0 + args.timeout
        while any(r is None for r in ready):
            if time.monotonic() > deadline:
                raise TimeoutError(f"N={n}: not every node ready after {args.timeout}s: {ready}")
            cached = []
            for i, node in enumerate(c.nodes):
                done, got = snapshot_state(node.url)
                cached.append(got)
                now = time.monotonic() - t0
                if got >= size and all_bytes[i] is None:
                    all_bytes[i] = now
                if done and ready[i] is None:
                    ready[i] = now
                    all_bytes[i] = all_bytes[i] or now
            up = c.hub_stats()["data_bytes"] - bytes0
            if up >= size and up_done is None:
                up_done = time.monotonic() - t0
            dirty_max = max(dirty_max, dirty_bytes())
            timeline.append((round(time.monotonic() - t0, 2), cached, up))
            time.sleep(POLL_S)
        all_ready = max(ready)
        j1, procs1 = machine_jiffies(), all_cpu()
        c.wait_all_ready(REPO, timeout=10)  # the harness's own check agrees
        cpu1 = [cpu_s(p) for p in pids] + [cpu_s(c.hub_proc.pid)]
        th1 = [thread_cpu_s(p) for p in pids]
        hub_stats = c.hub_stats()
        upstream = hub_stats["data_bytes"] - bytes0
        job_states = [get_json(f"{c.nodes[i].url}/v1/jobs/{jobs[i]['id']}")["state"] for i in range(n)]
        per_node = []
        for i, node in enumerate(c.nodes):
            row = {"node": i, "ready_s": round(ready[i], 2), "all_bytes_stored_s": round(all_bytes[i], 2)}
            row.update(job=job_states[i], **node_metrics(node))
            row["cpu_s"] = round(cpu1[i] - cpu0[i], 2)
            row["cpu_s_per_GiB"] = round((cpu1[i] - cpu0[i]) / (size / GiB), 2)  # every node stores all of S
            row["cpu_loop_thread_s"] = round(th1[i][0] - th0[i][0], 2)
            row["cpu_other_threads_s"] = round(th1[i][1] - th0[i][1], 2)
            per_node.append(row)
        # the fill rate over time (every ~1 s), summed over nodes, for the record
        sampled = [timeline[k] for k in range(0, len(timeline), max(1, int(1 / POLL_S)))]
        return {
            "all_ready_s": round(all_ready, 2),
            "upstream_bytes": upstream,
            "per_node": per_node,
            "hub_cpu_s": round(cpu1[-1] - cpu0[-1], 2),
            "daemons_cpu_s": round(sum(cpu1[:-1]) - sum(cpu0[:-1]), 2),
            "upstream_sent_S_s": None if up_done is None else round(up_done, 2),
            "upstream_peak_requests_per_blob": max(hub_stats.get("peak", {}).values(), default=0),
            "last_chunk_stored_s": round(max(all_bytes), 2),
            "verify_tail_s": round(all_ready - max(all_bytes), 2),  # last chunk stored -> sha256 proven
            "machine_busy": busy_between(j0, j1),
            "other_processes_cpu_s": others_cpu_s(procs0, procs1, {*pids, c.hub_proc.pid}),
            "dirty_max_MiB": dirty_max // MiB,
            "progress": [{"t": t, "bytes_cached": b, "upstream_bytes": u} for t, b, u in sampled],
        }
    finally:
        stop_cluster(c)


# ---- baseline: snapshot_download on every node -----------------------------------------------

CHILD = r"""
import json, sys, time
from huggingface_hub import snapshot_download
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
path = snapshot_download(sys.argv[1], cache_dir=sys.argv[2], endpoint=sys.argv[3])
print(json.dumps({"path": path, "seconds": time.perf_counter() - t0}), flush=True)
"""


def hf_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ENABLE_HF_TRANSFER="0",  # hf_transfer is not installed; plain HTTP GETs
    )
    return env


def run_baseline(work: Path, repo_dir: Path, n: int, sizes: dict[str, int], args: argparse.Namespace) -> dict:
    c = new_cluster(work, f"baseline-{n}", repo_dir, n, args)
    procs: list[subprocess.Popen] = []
    try:
        c.start()
        for node in c.nodes:  # only the namespaces and their tc limits are used
            node.stop()
        bytes0 = c.hub_stats()["data_bytes"]
        for i in range(n):
            ns = f"nc{c.id}n{i}"
            assert ns in c.namespaces, (ns, c.namespaces)
            d = c.workdir / f"hf{i}"
            cmd = [
                "nsenter",
                f"--net=/var/run/netns/{ns}",
                sys.executable,
                "-c",
                CHILD,
                REPO,
                str(d / "hub"),
                c.hub_url,
            ]
            procs.append(
                subprocess.Popen(cmd, env=hf_env(d / "home"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        for p in procs:
            line = p.stdout.readline() if p.stdout else ""
            if line.strip() != "ready":
                raise RuntimeError(f"snapshot_download child did not start: {line!r}")
        j0, cpus0 = machine_jiffies(), all_cpu()
        t0 = time.monotonic()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        done: list[float | None] = [None] * n
        outs: list[str] = [""] * n
        deadline = t0 + args.timeout
        while any(d is None for d in done):
            if time.monotonic() > deadline:
                raise TimeoutError(f"N={n}: snapshot_download not done after {args.timeout}s")
            for i, p in enumerate(procs):
                if done[i] is None and p.poll() is not None:
                    done[i] = time.monotonic() - t0
            time.sleep(0.05)
        j1, cpus1 = machine_jiffies(), all_cpu()
        per_node = []
        for i, p in enumerate(procs):
            outs[i] = p.stdout.read() if p.stdout else ""
            if p.returncode != 0:
                raise RuntimeError(f"snapshot_download on node {i} failed ({p.returncode}): {outs[i][-2000:]}")
            res = json.loads(outs[i].strip().splitlines()[-1])
            snap = Path(res["path"])
            for name, sz in sizes.items():
                got = (snap / name).stat().st_size
                if got != sz:
                    raise RuntimeError(f"node {i}: {snap / name} has {got} bytes, want {sz}")
            per_node.append({"node": i, "done_s": round(done[i], 2), "child_s": round(res["seconds"], 2)})
        hub_stats = c.hub_stats()
        upstream = hub_stats["data_bytes"] - bytes0
        return {
            "baseline_s": round(max(done), 2),
            "upstream_bytes": upstream,
            "per_node": per_node,
            "machine_busy": busy_between(j0, j1),
            "other_processes_cpu_s": others_cpu_s(cpus0, cpus1, {p.pid for p in procs} | {c.hub_proc.pid}),
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        stop_cluster(c)


# ---- run, plot, main -------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    from nodecache import config as nc_config

    cfg = nc_config.load()
    ns = [int(x) for x in args.nodes.split(",") if x.strip()]
    size_req = int(args.size_gib * GiB)
    up_Bps, node_Bps = args.upstream_mbit * 1e6 / 8, args.node_mbit * 1e6 / 8
    rows = []
    with common.workdir("nodecache-bench-cluster-", keep=args.keep) as work:
        sizes = make_repo(work / "repo", size_req)
        size = sum(sizes.values())
        bound = size / min(up_Bps, node_Bps)
        print(
            f"repo: {len(sizes)} files, {size / 1e6:,.1f} MB; upstream {up_Bps / 1e6:.0f} MB/s, "
            f"node links {node_Bps / 1e6:.0f} MB/s; bound {bound:.2f} s",
            flush=True,
        )
        for n in ns:
            nc = run_nodecache(work, repo_dir := work / "repo", n, size, args)
            print(
                f"  N={n}: nodecache all ready {nc['all_ready_s']:6.2f} s, upstream {nc['upstream_bytes'] / size:.3f} S, "
                f"machine busy {nc['machine_busy']:.0%} (other processes {nc['other_processes_cpu_s']} CPU s); "
                f"CPU-s per GiB per node {', '.join(str(r['cpu_s_per_GiB']) for r in nc['per_node'])}; "
                f"upstream sent S at {nc['upstream_sent_S_s']} s, {nc['upstream_peak_requests_per_blob']} requests "
                "of one blob at most at once",
                flush=True,
            )
            if args.skip_baseline:
                base = {"baseline_s": float("nan"), "upstream_bytes": 0, "machine_busy": 0, "other_processes_cpu_s": 0}
            else:
                base = run_baseline(work, repo_dir, n, sizes, args)
            print(
                f"  N={n}: snapshot_download   {base['baseline_s']:6.2f} s, upstream {base['upstream_bytes'] / size:.3f} S, "
                f"machine busy {base['machine_busy']:.0%} (other processes {base['other_processes_cpu_s']} CPU s)",
                flush=True,
            )
            rows.append(
                {
                    "nodes": n,
                    "all_ready_s": nc["all_ready_s"],
                    "bound_s": round(bound, 2),
                    "ratio_to_bound": round(nc["all_ready_s"] / bound, 3),
                    "upstream_bytes_ratio": round(nc["upstream_bytes"] / size, 4),
                    "baseline_s": base["baseline_s"],
                    "baseline_upstream_bytes_ratio": round(base["upstream_bytes"] / size, 4),
                    "speedup_vs_baseline": round(base["baseline_s"] / nc["all_ready_s"], 2),
                    "nodecache": nc,
                    "baseline": base,
                }
            )
    return {
        "benchmark": "cluster",
        "date": common.now_iso(),
        "machine": common.machine_info(),
        **common.provenance(),
        "size_bytes": size,
        "files": sizes,
        "upstream_mbit": args.upstream_mbit,
        "node_mbit": args.node_mbit,
        "upstream_MBps": up_Bps / 1e6,
        "node_MBps": node_Bps / 1e6,
        "chunk_size": cfg.chunk_size,
        "parallel_per_blob": cfg.parallel_per_blob,
        "parallel_total": cfg.parallel_total,
        "peer_uploads": cfg.peer_uploads,
        "method": (
            "nodecache: POST /v1/prefetch on every node at once; all_ready_s until every node's /v1/repos "
            "reports the snapshot complete (all blobs stored and sha256-verified). baseline: "
            "huggingface_hub.snapshot_download in every node's namespace at once (start-up excluded). "
            "Fresh cluster (namespaces, tc tbf on both directions of every link) for each measurement."
        ),
        "bound_note": (
            "bound_s = S / min(B_node, B_upstream) with B = mbit x 1e6 / 8 bytes/s. tc tbf counts whole "
            "Ethernet frames, so TCP payload tops out at ~1448/1514 = 95.6% of the rate: even a perfect "
            "transfer has ratio_to_bound >= ~1.05."
        ),
        "targets": {"ratio_to_bound": 1.3, "ratio_to_bound_flat_in_N": True, "upstream_bytes_ratio": 1.05},
        "rows": rows,
        "units": "seconds wall time; upstream ratios are emulator data bytes / S",
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    ns = [r["nodes"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    a1.plot(ns, [r["baseline_s"] for r in rows], "o-", color="#7f7f7f", label="snapshot_download on every node")
    a1.plot(ns, [r["all_ready_s"] for r in rows], "o-", color="#1f77b4", label="nodecache (peer-to-peer prefetch)")
    a1.plot(ns, [r["bound_s"] for r in rows], "--", color="red", label="bound S / min(B_node, B_up)")
    a1.plot(ns, [1.3 * r["bound_s"] for r in rows], ":", color="red", lw=1, label="1.3 x bound")
    for r in rows:
        a1.annotate(f"{r['all_ready_s']:.1f}", (r["nodes"], r["all_ready_s"]), textcoords="offset points",
                    xytext=(6, -12), ha="left", fontsize=8, color="#1f77b4")  # fmt: skip
        a1.annotate(f"{r['baseline_s']:.1f}", (r["nodes"], r["baseline_s"]), textcoords="offset points",
                    xytext=(-6, 5), ha="right", fontsize=8, color="#555555")  # fmt: skip
    a1.set_xlabel("nodes N")
    a1.set_ylabel("time until every node has the repo, s")
    a1.set_xticks(ns)
    a1.set_xlim(min(ns) - 0.6, max(ns) + 0.6)
    a1.set_ylim(bottom=0)
    a1.legend(fontsize=8)
    w = 0.35
    a2.bar([x - w / 2 for x in range(len(ns))], [r["baseline_upstream_bytes_ratio"] for r in rows], w,
           color="#7f7f7f", label="snapshot_download")  # fmt: skip
    a2.bar([x + w / 2 for x in range(len(ns))], [r["upstream_bytes_ratio"] for r in rows], w,
           color="#1f77b4", label="nodecache")  # fmt: skip
    a2.axhline(1.05, color="red", ls=":", lw=1, label="1.05 x S")
    a2.set_xticks(range(len(ns)), [str(n) for n in ns])
    a2.set_xlabel("nodes N")
    a2.set_ylabel("upstream bytes / S")
    a2.legend(fontsize=8)
    common.save_figure(
        fig,
        path,
        f"{res['size_bytes'] / 1e9:.2f} GB repo, upstream {res['upstream_MBps']:.0f} MB/s, node links "
        f"{res['node_MBps']:.0f} MB/s (tc tbf), {res['machine']['nproc']} CPUs, {res['date'][:10]}",
    )


def main(argv: list[str] | None = None) -> int:
    p = common.arg_parser(__doc__)
    p.add_argument("--nodes", default="1,2,4", help="comma-separated node counts")
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--upstream-mbit", type=int, default=800, help="tc rate of the emulator's link (800 = 100 MB/s)")
    p.add_argument("--node-mbit", type=int, default=1600, help="tc rate of every node's link (1600 = 200 MB/s)")
    p.add_argument("--timeout", type=float, default=300, help="give up on one fill after this long (s)")
    p.add_argument("--name", default="cluster", help="output file stem")
    p.add_argument("--skip-baseline", action="store_true", help="nodecache rows only (a quick A/B)")
    p.add_argument("--daemon-env", action="append", default=[], metavar="K=V", help="NODECACHE_* for every daemon")
    common.add_run_args(p, wait_quiet=300)
    args = p.parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root, /dev/fuse and network namespaces (ip netns)", file=sys.stderr)
        return 2
    res = common.run_and_write(args, run, plot)
    print()
    common.print_table(
        [
            (
                r["nodes"],
                f"{r['all_ready_s']:.2f}",
                f"{r['bound_s']:.2f}",
                f"{r['ratio_to_bound']:.2f}",
                f"{r['upstream_bytes_ratio']:.3f}",
                f"{r['baseline_s']:.2f}",
                f"{r['baseline_upstream_bytes_ratio']:.3f}",
                f"{r['speedup_vs_baseline']:.2f}",
                f"{r['nodecache']['upstream_sent_S_s']}",
                f"{r['nodecache']['verify_tail_s']:.2f}",
                f"{r['nodecache']['machine_busy']:.0%}",
            )
            for r in res["rows"]
        ],
        (
            "N",
            "all_ready_s",
            "bound_s",
            "ratio",
            "up_bytes/S",
            "baseline_s",
            "base_up/S",
            "speedup",
            "up_done_s",
            "tail_s",
            "CPU",
        ),
    )
    print(
        "\nup_done_s: upstream had sent S; tail_s: last chunk stored -> every blob's sha256 proven; "
        "CPU: machine busy during the nodecache fill"
    )
    print("targets: ratio_to_bound <= 1.3 and flat in N; upstream_bytes_ratio <= 1.05")
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
