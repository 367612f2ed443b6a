"""S3 as the upstream: nodecache fill vs boto3 `download_file` of the same objects, one run.

A moto server on 127.0.0.1 holds a repo (one big file + a few smaller ones).
Measured, each cold, against the same server:
  * boto3  : `download_file` (TransferManager, default multipart config) of every object
  * nodecache full fill : `POST /v1/prefetch` until the job is ready (every byte stored
    and verified: sha256 from x-amz-checksum-sha256, else per-chunk for source ids)
  * time to first byte of the big file through the FUSE mount (fresh cache) vs the
    time boto3 needs to download that whole file.

    python bench/s3_fill.py [--big-mib 1024] [--small 4x64] [--rounds 2]

Writes bench/results/s3_fill.json (`speedup_vs_boto3_download` = boto3 time /
nodecache fill time, best of rounds each) and s3_fill.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from nodecache.testing.daemon import DaemonProcess  # noqa: E402
from testkit.s3 import MotoServer  # noqa: E402

MiB = 1024 * 1024
REPO = "local/bench"


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def make_objects(client, bucket: str, big_mib: int, small: tuple[int, int], work: Path) -> dict[str, int]:
    """Upload the repo; the big file with a full-object sha256 checksum, the rest without
    (so both verification paths are exercised)."""
    sizes = {"model.safetensors": big_mib * MiB, **{f"shard-{i}.bin": small[1] * MiB for i in range(small[0])}}
    src = work / "src"
    src.mkdir()
    for name, size in sizes.items():
        with open(src / name, "wb") as f:
            left = size
            while left:
                n = min(left, 64 * MiB)
                f.write(os.urandom(n))
                left -= n
        extra = {"ChecksumAlgorithm": "SHA256"} if name == "model.safetensors" else {}
        with open(src / name, "rb") as f:
            client.put_object(Bucket=bucket, Key=f"bench/{name}", Body=f, **extra)
    (src / "config.json").write_text("{}")
    client.put_object(Bucket=bucket, Key="bench/config.json", Body=b"{}")
    sizes["config.json"] = 2
    return sizes


def boto3_download(client, bucket: str, names: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    t0 = time.perf_counter()
    for name in names:
        client.download_file(bucket, f"bench/{name}", str(out / name))
    return time.perf_counter() - t0


def daemon(work: Path, moto: MotoServer, bucket: str, tag: str) -> DaemonProcess:
    d = work / tag
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    env = {**moto.env, "NODECACHE_SOURCES": f"{REPO}=s3://{bucket}/bench", "NODECACHE_FSYNC": "false"}
    return DaemonProcess(d, "http://127.0.0.1:9", [], env=env).start(60)


def nodecache_fill(work: Path, moto: MotoServer, bucket: str, tag: str) -> float:
    d = daemon(work, moto, bucket, tag)
    try:
        t0 = time.perf_counter()
        job = _post(d.url + "/v1/prefetch", {"repo": REPO})
        while job["state"] == "running":
            time.sleep(0.02)
            job = _get(f"{d.url}/v1/jobs/{job['id']}")
        dt = time.perf_counter() - t0
        if job["state"] != "ready":
            raise RuntimeError(f"prefetch failed: {job}")
        blobs = _get(d.url + "/v1/status")["blobs"]
        if blobs.get("quarantined"):
            raise RuntimeError(f"quarantined blobs: {blobs}")
        return dt
    finally:
        d.stop()


def ttfb(work: Path, moto: MotoServer, bucket: str, tag: str) -> float:
    d = daemon(work, moto, bucket, tag)
    try:
        snap = next((d.hub / "models--local--bench" / "snapshots").iterdir())
        t0 = time.perf_counter()
        with open(snap / "model.safetensors", "rb", buffering=0) as f:
            f.read(MiB)
        return time.perf_counter() - t0
    finally:
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--small", default="4x64", help="COUNTxMIB of smaller shards")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    args = ap.parse_args()
    count, mib = (int(x) for x in args.small.split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nc-s3bench-"))
    try:
        with MotoServer(work / "moto.log") as moto:
            client = moto.client()
            bucket = "nc-bench"
            client.create_bucket(Bucket=bucket)
            sizes = make_objects(client, bucket, args.big_mib, (count, mib), work)
            total = sum(sizes.values())
            names = sorted(sizes)
            rows = {"boto3_s": [], "nodecache_s": [], "ttfb_s": [], "boto3_big_s": []}
            for r in range(args.rounds):  # interleaved, so drift hits both alike
                rows["boto3_s"].append(boto3_download(client, bucket, names, work / "dl"))
                rows["nodecache_s"].append(nodecache_fill(work, moto, bucket, f"fill{r}"))
                rows["boto3_big_s"].append(boto3_download(client, bucket, ["model.safetensors"], work / "dl"))
                rows["ttfb_s"].append(ttfb(work, moto, bucket, f"ttfb{r}"))
                print(
                    f"round {r}: boto3 {rows['boto3_s'][-1]:.2f}s  nodecache {rows['nodecache_s'][-1]:.2f}s  "
                    f"ttfb {rows['ttfb_s'][-1] * 1000:.0f}ms (boto3 big file {rows['boto3_big_s'][-1]:.2f}s)",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v) for k, v in rows.items()}
    result = {
        "bytes_total": total,
        "files": sizes,
        "rounds": rows,
        "best": best,
        "boto3_MBps": total / best["boto3_s"] / 1e6,
        "nodecache_MBps": total / best["nodecache_s"] / 1e6,
        "speedup_vs_boto3_download": best["boto3_s"] / best["nodecache_s"],
        "ttfb_big_file_s": best["ttfb_s"],
        "boto3_big_file_download_s": best["boto3_big_s"],
        "ttfb_fraction_of_full_download": best["ttfb_s"] / best["boto3_big_s"],
        "notes": "moto server on 127.0.0.1 (one Python process) is the upstream for both; fsync off in nodecache; "
        "nodecache times include verification (sha256 of the big file, per-chunk xxh3 for source-identified ones).",
        "nproc": os.cpu_count(),
    }
    (out / "s3_fill.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'':24}{'seconds':>10}{'MB/s':>10}")
    print(f"{'boto3 download_file':24}{best['boto3_s']:10.2f}{result['boto3_MBps']:10.1f}")
    print(f"{'nodecache prefetch':24}{best['nodecache_s']:10.2f}{result['nodecache_MBps']:10.1f}")
    print(f"speedup_vs_boto3_download = {result['speedup_vs_boto3_download']:.2f}")
    print(
        f"TTFB of {args.big_mib} MiB file: {best['ttfb_s'] * 1000:.0f} ms vs {best['boto3_big_s']:.2f} s full download"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.bar(
            ["boto3\ndownload_file", "nodecache\nprefetch"],
            [best["boto3_s"], best["nodecache_s"]],
            color=["grey", "C0"],
        )
        a.set_ylabel("seconds (best of rounds)")
        a.set_title(
            f"full fill, {total / 1e9:.2f} GB from S3 (moto)\nspeedup {result['speedup_vs_boto3_download']:.2f}x"
        )
        b.bar(
            ["boto3 full\ndownload", "nodecache\nfirst byte"],
            [best["boto3_big_s"], best["ttfb_s"]],
            color=["grey", "C0"],
        )
        b.set_ylabel("seconds")
        b.set_title(f"{args.big_mib} MiB file: time to first MiB")
        fig.tight_layout()
        fig.savefig(out / "s3_fill.png", dpi=100)
    except ImportError:
        print("matplotlib missing: no PNG")


if __name__ == "__main__":
    main()
