"""Scrub: the background re-hash holds `scrub_bps`, and what it costs; a verify job at full speed.

One blob of `--size-gib` random bytes is prefetched (proven once), then:
  1. `POST /v1/verify` re-hashes it at full speed -> MB/s, daemon CPU-s per GiB
  2. for each `--rates` value, a daemon over the same cache with that `scrub_bps`
     and `scrub_interval` 0 (re-hash without pause) -> achieved bytes/s over
     `--seconds` (from `scrubbed_bytes_total`), daemon CPU as a share of one core
Writes bench/results/scrub.json and scrub.png.

    python bench/scrub.py --size-gib 1 --rates 16Mi 32Mi 128Mi --seconds 30
"""

from __future__ import annotations

import argparse
import time

from common import (
    Daemon,
    GiB,
    MiB,
    add_run_args,
    http_json,
    http_post_json,
    machine_info,
    now_iso,
    print_table,
    proc_cpu_seconds,
    provenance,
    save_figure,
    wait_quiet,
    workdir,
    write_json,
    write_random_file,
)

from nodecache.config import parse_size
from nodecache.testing.hub import HubEmulator

REPO = "bench/scrub"


def scrubbed(d: Daemon) -> float:
    return d.metric_values().get("nodecache_scrubbed_bytes_total", 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--rates", nargs="+", default=["16Mi", "32Mi", "128Mi"])
    p.add_argument("--seconds", type=float, default=30.0)
    add_run_args(p)
    args = p.parse_args()
    size = int(args.size_gib * GiB) // MiB * MiB
    load = wait_quiet(args.wait_quiet)
    with workdir("nodecache-bench-scrub-", args.keep) as work, HubEmulator() as hub:
        src = work / "w.safetensors"
        write_random_file(src, size)
        hub.add_repo(REPO, {"w.safetensors": src})
        env = {"NODECACHE_SCRUB_BPS": "0"}
        d = Daemon(work, hub.url, [REPO], env=env).start()
        try:
            job = http_post_json(d.url + "/v1/prefetch", {"repo": REPO})
            assert http_json(f"{d.url}/v1/jobs/{job['id']}?wait=300", timeout=310)["state"] == "ready"
            cpu0, t0 = proc_cpu_seconds(d.pid), time.monotonic()
            job = http_post_json(d.url + "/v1/verify", {"repo": REPO})
            job = http_json(f"{d.url}/v1/jobs/{job['id']}?wait=300", timeout=310)
            seconds, cpu = time.monotonic() - t0, proc_cpu_seconds(d.pid) - cpu0
            assert job["state"] == "ready" and job["failed"] == 0, job
        finally:
            d.stop()
        verify = {"bytes": size, "seconds": round(seconds, 3), "MBps": round(size / seconds / 1e6, 1)}
        verify["cpu_s_per_gib"] = round(cpu / (size / GiB), 3)
        background = []
        for rate in args.rates:
            d = Daemon(work, hub.url, [REPO], env={"NODECACHE_SCRUB_BPS": rate, "NODECACHE_SCRUB_INTERVAL": "0"})
            d.start()
            try:
                while scrubbed(d) == 0:  # the pass has begun (its first piece is not paced)
                    time.sleep(0.05)
                b0, cpu0, t0 = scrubbed(d), proc_cpu_seconds(d.pid), time.monotonic()
                time.sleep(args.seconds)
                b1, cpu1, t1 = scrubbed(d), proc_cpu_seconds(d.pid), time.monotonic()
            finally:
                d.stop()
            background.append(
                {
                    "scrub_bps": parse_size(rate),
                    "achieved_Bps": round((b1 - b0) / (t1 - t0)),
                    "cpu_share_of_one_core": round((cpu1 - cpu0) / (t1 - t0), 4),
                    "seconds": round(t1 - t0, 1),
                }
            )
    rows = [
        (
            "verify job (full speed)",
            "-",
            f"{verify['MBps'] / 1.048576:.0f} MiB/s",
            f"{verify['cpu_s_per_gib']} CPU-s/GiB",
        )
    ]
    for b in background:
        rows.append(
            (
                "background scrub",
                f"{b['scrub_bps'] / MiB:.0f} MiB/s",
                f"{b['achieved_Bps'] / MiB:.1f} MiB/s",
                f"{b['cpu_share_of_one_core']:.1%} of a core",
            )
        )
    print_table(rows, ("what", "configured", "achieved", "daemon CPU"))
    result = {
        "when": now_iso(),
        "machine": machine_info(),
        "machine_load": load,
        **provenance(),
        "size_bytes": size,
        "verify_job": verify,
        "background": background,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "scrub.json", result)
    plot(background, args.out / "scrub.png")


def plot(background: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    want = [b["scrub_bps"] / MiB for b in background]
    got = [b["achieved_Bps"] / MiB for b in background]
    ax1.plot(want, want, "--", color="grey", label="configured")
    ax1.plot(want, got, "o-", label="achieved")
    ax1.set(xlabel="scrub_bps (MiB/s)", ylabel="re-hashed (MiB/s)", title="background scrub rate")
    ax1.legend()
    ax2.bar([f"{w:.0f}" for w in want], [b["cpu_share_of_one_core"] * 100 for b in background])
    ax2.set(xlabel="scrub_bps (MiB/s)", ylabel="% of one core", title="daemon CPU while scrubbing")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
