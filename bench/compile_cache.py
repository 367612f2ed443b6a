"""Compile caches: how long a second node takes to get a warm compile cache, three ways, one run.

Node A (a real daemon on 127.0.0.1) publishes a key and a Triton/Inductor-shaped tree is written
into it: ~20,000 files of 200 B-8 KiB in hash-named folders plus a few big `.so`-like files,
~500 MiB in all (testkit.compiletree). Then:
  * recompile    : the time that tree took to write on A (what a node without any cache pays at
                   least: the real compile costs far more than writing its output)
  * peer warm-up : A seals the key; node B (a second daemon, peers with A) publishes it:
                   `POST /v1/compile-caches/acquire` until it answers, i.e. the blobs fetched from
                   A (small ones in batches, each sha256-checked), the tree built and swapped in
  * boto3 copy   : the same tree uploaded to moto's S3 on 127.0.0.1 beforehand (not timed), then
                   copied down the way `aws s3 sync` does: list the prefix, download_file every
                   object with 10 threads (the CLI's default max_concurrent_requests)
Both copies are compared with A's tree (modes, sizes, bytes, links; the boto3 copy keeps no
modes or links, so only its bytes are compared).

    python bench/compile_cache.py [--files 20000] [--mib 500]

Writes bench/results/compile_cache.json (`peer_warm_s`, `boto3_copy_s`, `speedup_vs_boto3`,
`files`, `bytes`, `tree_identical`, ...) and compile_cache.png.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

from nodecache.testing.daemon import DaemonProcess, free_port
from testkit.compiletree import digest, make_tree
from testkit.s3 import MotoServer

KEY = "bench/qwen2.5-7b@abc/h100/cuda-12.8/vllm-0.11.0"
TOKEN = "bench-cluster-token"
AVG_SMALL = (200 + 8192) / 2  # make_tree's small files: uniform 200 B-8 KiB
COPY_THREADS = 10  # aws s3 sync's default max_concurrent_requests


def tree_shape(files: int, mib: float) -> tuple[int, int, int]:
    """(small, big, big_size) so that the tree has `files` files and about `mib` MiB."""
    big = max(1, min(16, files // 1000))
    small = files - big
    big_size = max(1 << 20, int((mib * common.MiB - small * AVG_SMALL) / big))
    return small, big, big_size


def daemon(work: Path, name: str, port: int, peers: str, extra: dict[str, str]) -> DaemonProcess:
    d = work / name
    d.mkdir()
    env = {
        "PYTHONPATH": str(common.REPO_ROOT),
        "NODECACHE_PEERS": peers,
        "NODECACHE_CLUSTER_TOKEN": TOKEN,
        "NODECACHE_FSYNC": "false",
        "NODECACHE_COMPILE_CACHE_SEAL_AFTER": "86400",  # sealed when the bench says so
        "NODECACHE_COMPILE_CACHE_FILL_TIMEOUT": "3600",  # never cut a measured fill short
        **extra,
    }
    return DaemonProcess(d, "http://127.0.0.1:9", [], env=env, port=port)


def acquire(node: DaemonProcess, target: str) -> dict:
    return common.http_post_json(node.url + "/v1/compile-caches/acquire", {"key": KEY, "target": target}, 3600)


def boto3_sync(client, bucket: str, prefix: str, dest: Path) -> tuple[float, int]:
    """`aws s3 sync s3://bucket/prefix dest` the boto3 way: list, then download every object, 10 at a time."""
    t0 = time.perf_counter()
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        for o in page.get("Contents", [])
    ]

    def one(key: str) -> None:
        path = dest / key[len(prefix) + 1 :]
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(path))

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(one, keys))
    return time.perf_counter() - t0, len(keys)


def upload(client, bucket: str, prefix: str, root: Path) -> int:
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]

    def one(p: Path) -> None:
        client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(root).as_posix()}")

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(one, files))
    return len(files)


def file_bytes(root: Path) -> dict[str, str]:
    """path -> sha256 of every regular file (not following links)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            if not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(args) -> dict:
    small, big, big_size = tree_shape(args.files, args.mib)
    with common.workdir("nodecache-bench-cc-", keep=args.keep) as work, MotoServer(work / "moto.log") as moto:
        pa, pb = free_port(), free_port()
        peers = f"127.0.0.1:{pa},127.0.0.1:{pb}"
        a = daemon(work, "a", pa, peers, {}).start(60)
        b = daemon(work, "b", pb, peers, {}).start(60)
        try:
            tree_a = Path(acquire(a, "/pods/a/cc")["path"])
            t0 = time.perf_counter()
            nbytes = make_tree(tree_a, small=small, big=big, big_size=big_size, seed=1)
            os.sync()
            recompile_s = time.perf_counter() - t0
            want = digest(tree_a)
            files = sum(v[0] == "file" for v in want.values())
            print(f"tree: {files:,} files, {nbytes / common.MiB:,.0f} MiB, written in {recompile_s:.2f} s", flush=True)
            t0 = time.perf_counter()
            sealed = common.http_post_json(a.url + "/v1/compile-caches/seal", {"key": KEY}, 3600)
            seal_s = time.perf_counter() - t0
            print(f"sealed on A in {seal_s:.2f} s ({sealed['files']:,} files)", flush=True)

            with common.CpuMeter() as peer_cpu:
                t0 = time.perf_counter()
                got = acquire(b, "/pods/b/cc")
                peer_warm_s = time.perf_counter() - t0
            if got["filled"] != "peer":
                raise RuntimeError(f"node B did not fill from its peer: {got}")
            tree_identical = digest(Path(got["path"])) == want
            print(f"peer warm-up on B: {peer_warm_s:.2f} s, identical: {tree_identical}", flush=True)

            client = moto.client()
            client.create_bucket(Bucket="nc-bench")
            t0 = time.perf_counter()
            uploaded = upload(client, "nc-bench", "cc", tree_a)
            upload_s = time.perf_counter() - t0
            print(f"uploaded {uploaded:,} objects to moto in {upload_s:.1f} s (not timed)", flush=True)
            copy = work / "boto3-copy"
            with common.CpuMeter() as copy_cpu:
                boto3_copy_s, objects = boto3_sync(client, "nc-bench", "cc", copy)
            copy_identical = file_bytes(copy) == file_bytes(tree_a)
            print(f"boto3 copy: {boto3_copy_s:.2f} s ({objects:,} objects), bytes identical: {copy_identical}")
            m = common.parse_metrics(b.metrics())
            verify_failures = m.get('nodecache_verify_failures_total{source="compile_cache_peer"}', 0.0)
        finally:
            a.stop()
            b.stop()
    return {
        "benchmark": "compile_cache",
        "date": common.now_iso(),
        "machine": common.machine_info(),
        **common.provenance(),
        "files": files,
        "bytes": nbytes,
        "tree": {"small_files": small, "big_files": big, "big_file_bytes": big_size},
        "recompile_s": round(recompile_s, 3),
        "seal_s": round(seal_s, 3),
        "peer_warm_s": round(peer_warm_s, 3),
        "boto3_copy_s": round(boto3_copy_s, 3),
        "speedup_vs_boto3": round(boto3_copy_s / peer_warm_s, 2),
        "speedup_vs_recompile": round(recompile_s / peer_warm_s, 2),
        "tree_identical": tree_identical,
        "boto3_copy_bytes_identical": copy_identical,
        "peer_verify_failures": verify_failures,
        "machine_busy_during_peer_warm": round(peer_cpu.machine_busy, 3),
        "machine_busy_during_boto3_copy": round(copy_cpu.machine_busy, 3),
        "targets": {"speedup_vs_boto3": 3.0, "tree_identical": True},
        "method": (
            "Two daemons on 127.0.0.1 (peers, cluster token), moto's S3 server on 127.0.0.1, one run. "
            "recompile_s: make_tree on A's published key directory, then sync. peer_warm_s: B's "
            "POST /v1/compile-caches/acquire of the key A sealed, until it answers (blobs fetched and "
            "verified, tree built and swapped in). boto3_copy_s: list + download_file of every object "
            f"with {COPY_THREADS} threads from moto (the tree uploaded before, not timed; no modes or links)."
        ),
        "units": "seconds wall time, bytes",
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["recompile\n(write on A)", "boto3 copy\nfrom S3 (moto)", "nodecache\npeer warm-up"]
    values = [res["recompile_s"], res["boto3_copy_s"], res["peer_warm_s"]]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    bars = ax.bar(names, values, color=["#7f7f7f", "#ff7f0e", "#1f77b4"])
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.1f} s", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("seconds until node B has the tree")
    ax.set_ylim(0, max(values) * 1.15)
    common.save_figure(
        fig,
        path,
        f"{res['files']:,} files, {res['bytes'] / common.MiB:,.0f} MiB; peer {res['speedup_vs_boto3']:.1f}x "
        f"faster than boto3; {res['machine']['nproc']} CPUs, {res['date'][:10]}",
    )


def main(argv: list[str] | None = None) -> int:
    p = common.arg_parser(__doc__)
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--mib", type=float, default=500)
    p.add_argument("--name", default="compile_cache", help="output file stem")
    common.add_run_args(p)
    args = p.parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse (the daemons mount their FUSE file systems)", file=sys.stderr)
        return 2
    res = common.run_and_write(args, run, plot)
    print(f"speedup vs boto3 {res['speedup_vs_boto3']}x (target 3), vs recompile {res['speedup_vs_recompile']}x")
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
