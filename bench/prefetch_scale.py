"""A prefetch of many small files: its cost per file must not grow with the number of files.

For each N a repo of N files of a few bytes (100 per folder, scale.py's tree) is
served by the Hub emulator in its own process; a fresh `nodecache serve` (no
repo resolved at its start) is asked, as users do, `nodecache prefetch REPO
--endpoint URL` (a child process: resolve, then the job, its progress polled
until the repo is verified). Measured per N:

- `wall_s`: the prefetch command, start to exit (resolve included); `job_s`: the
  job's own `seconds` (the fill, from the job's start to its verified end);
- `daemon_cpu_s`: the daemon's utime+stime over the command (/proc/PID/stat);
- `peak_rss_MiB`: the daemon's VmHWM at the end (it started fresh for this N),
  `rss_anon_MiB`: its RssAnon then, `rss_before_MiB`: its VmRSS before the prefetch;
- the same per file (`us_per_file_wall`, `us_per_file_job`, `us_per_file_cpu`,
  `KiB_per_file_peak_rss`: the peak over the RSS before, per file): flat from 10^4 to
  10^5 is the target.

A prefetch that fails or does not end within `--job-timeout` (the command is killed there)
has `finished: false`, its exit code and last line, and the files done by then (the job's
`done` bytes over the repo's), so the per-file figures are of what it did. (The command
gives up itself when the daemon does not answer a poll within 120 s.) The daemon writes without fsync (NODECACHE_FSYNC=false,
as scale.py), so the disk's sync cost, the same per file at every N, is left out.

Writes bench/results/prefetch_scale.json (`rows`) and .png.

    python bench/prefetch_scale.py [--cases 10k,100k] [--big] [--job-timeout S] [--name STEM]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from common import (
    REPO_ROOT,
    Daemon,
    add_run_args,
    arg_parser,
    http_json,
    loadavg,
    machine_info,
    now_iso,
    print_table,
    proc_cpu_seconds,
    provenance,
    run_cases,
    save_figure,
    wait_quiet,
    write_json,
)
from scale import Hub, make_tree, rss_mib

from nodecache.testing.daemon import LeftBehind

CASES = {"1k": 1_000, "10k": 10_000, "100k": 100_000, "1M": 1_000_000}
REPO = "scale/prefetch"


def run_case(name: str, work: Path, job_timeout: float) -> dict:
    files = CASES[name]
    src = work / "src"
    t0 = time.perf_counter()
    make_tree(src, files, 100)
    hub = Hub({REPO: src})
    print(f"  {name}: tree + emulator ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    total_files = files + 1  # and config.json
    row: dict = {"case": name, "files": total_files}
    d = Daemon(work, hub.url, [], env={"NODECACHE_FSYNC": "false"})
    try:
        d.start(timeout=120)
        rss0 = rss_mib(d.pid)
        cpu0 = proc_cpu_seconds(d.pid)
        cmd = [sys.executable, "-m", "nodecache", "prefetch", REPO, "--endpoint", d.url]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=job_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        finished = proc.returncode == 0
        wall = time.perf_counter() - t0
        cpu = proc_cpu_seconds(d.pid) - cpu0
        try:  # a daemon whose loop is stuck (the prefetch's own work) may answer late, or never
            job = http_json(d.url + "/v1/jobs/1", timeout=120)
        except (OSError, RuntimeError) as e:
            job = {"state": f"no answer: {e}", "done": 0, "total": 0, "seconds": wall}
        share = job["done"] / job["total"] if job["total"] else 0.0
        done_files = total_files if finished else round(share * total_files)
        row.update(
            finished=finished,
            prefetch_exit=proc.returncode,
            state=job["state"],
            done_files=done_files,
            wall_s=round(wall, 2),
            job_s=job["seconds"],
            daemon_cpu_s=round(cpu, 2),
            rss_before_MiB=round(rss0, 1),
            peak_rss_MiB=round(rss_mib(d.pid, "VmHWM"), 1),
            rss_anon_MiB=round(rss_mib(d.pid, "RssAnon"), 1),
        )
        if not finished:
            row["prefetch_output_tail"] = out.strip().splitlines()[-1:] if out else []
        row["KiB_per_file_peak_rss"] = round(1024 * (row["peak_rss_MiB"] - rss0) / total_files, 3)
        if done_files:  # else not known (the daemon answered no poll): no per-file figure
            row.update(
                us_per_file_wall=round(1e6 * wall / done_files, 1),
                us_per_file_job=round(1e6 * job["seconds"] / done_files, 1),
                us_per_file_cpu=round(1e6 * cpu / done_files, 1),
            )
        return row
    finally:
        try:
            d.stop()
        except LeftBehind as e:  # stuck in the prefetch's own work: killed, its mount detached
            row["daemon_stop"] = str(e).splitlines()[0]
        finally:
            hub.stop()


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    labels = [r["case"] + ("" if r.get("finished") else " (stopped)") for r in rows]
    axes[0].bar(labels, [r.get("us_per_file_wall") or 0 for r in rows], color="tab:blue", label="wall")
    axes[0].plot(labels, [r.get("us_per_file_cpu") or 0 for r in rows], "ko", label="daemon CPU")
    axes[0].set_title("prefetch, us per file (flat in N is the target)")
    axes[0].legend()
    axes[1].bar(labels, [r.get("wall_s", 0) for r in rows], color="tab:orange")
    axes[1].set_title("prefetch wall time (s)")
    axes[2].bar(labels, [r.get("peak_rss_MiB", 0) for r in rows], color="tab:green")
    axes[2].set_title("daemon peak RSS (MiB)")
    save_figure(fig, path, title)


def main() -> None:
    p = arg_parser(__doc__)
    add_run_args(p)
    p.add_argument("--cases", default="10k,100k")
    p.add_argument("--big", action="store_true", help="also 10^6 files")
    p.add_argument("--job-timeout", type=float, default=900.0, help="stop a prefetch still running after S s")
    p.add_argument("--name", default="prefetch_scale", help="stem of the JSON and PNG in --out")
    args = p.parse_args()
    cases = args.cases.split(",") + (["1M"] if args.big else [])
    quiet = wait_quiet(args.wait_quiet)
    rows = run_cases(
        cases, "nodecache-bench-prefetch-", lambda name, work: run_case(name, work, args.job_timeout), args.keep
    )
    keys = ("case", "files", "finished", "wall_s", "job_s", "daemon_cpu_s", "peak_rss_MiB",
            "us_per_file_wall", "us_per_file_cpu", "KiB_per_file_peak_rss")  # fmt: skip
    print_table([tuple(r.get(k) for k in keys) for r in rows], keys)
    result = {
        "bench": "prefetch_scale",
        "when": now_iso(),
        "machine": machine_info(),
        "machine_state": {**quiet, "loadavg_after": loadavg()},
        **provenance(),
        "fsync": False,
        "job_timeout_s": args.job_timeout,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", result)
    plot(rows, args.out / f"{args.name}.png", f"prefetch of N small files via the daemon ({result['git_commit'][:10]})")


if __name__ == "__main__":
    main()
