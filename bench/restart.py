"""Restarts under a reader: what a pod sees while the daemon is restarted, crashed, or swapped.

A keeper (`nodecache keeper`) holds the FUSE connection; a reader
(`testkit/reader.py`) runs in a mount namespace of its own with private
propagation, holding an open fd and an mmap of a safetensors file, reading
the small files of the snapshot whole, opening the safetensors file again
(its head), listing refs/ and asking an xattr in a loop (ops slower than 5 ms
are recorded with their start). The daemon is then
  - stopped with SIGTERM and started again (`--sigterm` times),
  - killed with -9 and started again (`--kill9` times),
  - restarted writing the other connection-state format (`--swaps` times: 1, 2, 1, ...).
Each restart waits for the reader to finish two more rounds. The stall of a
restart is the longest reader op that ended between the stop and those two
rounds (0 when none took 5 ms); errors are the reader's failed syscalls and
wrong bytes in that window. Writes bench/results/restart.json and restart.png.

    python bench/restart.py --sigterm 10 --kill9 3 --swaps 2
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import (
    REPO_ROOT,
    CpuMeter,
    Daemon,
    MiB,
    add_run_args,
    arg_parser,
    loadavg,
    machine_info,
    now_iso,
    print_table,
    provenance,
    save_figure,
    wait_quiet,
    workdir,
    write_json,
)

from nodecache.testing.daemon import KeeperProcess
from nodecache.testing.hub import HubEmulator
from testkit import READER

REPO = "bench/restart"


def make_repo(root: Path, size: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    root.mkdir(parents=True)
    rng = np.random.default_rng(17)
    save_file({"w": rng.standard_normal(size // 4, dtype=np.float32)}, str(root / "model.safetensors"))
    (root / "config.json").write_text('{"model_type": "bench"}')
    (root / "tokenizer.json").write_text(json.dumps({"vocab": [f"t{i}" for i in range(20000)]}))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else 0.0


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--sigterm", type=int, default=10)
    p.add_argument("--kill9", type=int, default=3)
    p.add_argument("--swaps", type=int, default=2)
    p.add_argument("--size-mib", type=int, default=64, help="the safetensors file held open and mmapped")
    add_run_args(p)
    args = p.parse_args()
    load = wait_quiet(args.wait_quiet)
    kinds = ["sigterm"] * args.sigterm + ["kill9"] * args.kill9 + ["version_swap"] * args.swaps
    with workdir("nodecache-bench-restart-", args.keep) as work, HubEmulator() as hub:
        src = work / "repo"
        make_repo(src, args.size_mib * MiB)
        commit = hub.add_repo(REPO, src)
        keeper = KeeperProcess(work).start()
        d = Daemon(work, hub.url, [REPO], env={"NODECACHE_FSYNC": "false"}, keeper=keeper)
        reader = None
        try:
            d.start()
            snap = d.snapshot_dir(REPO, commit)
            for f in src.iterdir():
                assert (snap / f.name).read_bytes() == f.read_bytes()
            while float(os.getxattr(snap, "user.nodecache.cached")) < 1:  # every blob proven: passthrough
                time.sleep(0.05)
            out, stop = work / "reader.json", work / "reader.stop"
            spec = {
                # the small files whole; the big one is opened anew (its head) and read through the fd and mmap
                "files": {str(snap / f.name): sha256(f) for f in src.iterdir() if f.name != "model.safetensors"},
                "hold": str(snap / "model.safetensors"),
                "hold_sha256": sha256(src / "model.safetensors"),
                "list": str(snap.parent.parent / "refs"),
                "out": str(out),
                "stop": str(stop),
            }
            (work / "spec.json").write_text(json.dumps(spec))
            cmd = ["unshare", "--mount", "--propagation", "private", sys.executable, str(READER)]
            env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
            reader = subprocess.Popen([*cmd, str(work / "spec.json")], env=env)

            def rounds() -> int:
                if reader.poll() is not None:
                    raise RuntimeError(f"the reader died ({reader.returncode})")
                try:
                    return json.loads(out.read_text())["rounds"]
                except (OSError, ValueError):
                    return 0

            def two_more() -> None:
                start = rounds()
                while rounds() < start + 2:
                    time.sleep(0.02)

            two_more()
            windows = []
            fmt = 2
            with CpuMeter() as cpu:
                for kind in kinds:
                    t0 = time.monotonic()
                    if kind == "kill9":
                        d.kill9()
                    else:
                        d.stop()
                    if kind == "version_swap":
                        fmt = 1 if fmt == 2 else 2
                        d.env["NODECACHE_STATE_FORMAT"] = str(fmt)
                    d.start()
                    t_ready = time.monotonic()
                    two_more()
                    windows.append((kind, t0, t_ready, time.monotonic()))
            stop.touch()
            reader.wait(60)
            stats = json.loads(out.read_text())
            took_over = d.log().count("took over the connection")
        finally:
            if reader is not None and reader.poll() is None:
                reader.kill()
                reader.wait(10)
            d.stop()
            keeper.stop()
    per_restart = []
    for kind, t0, t_ready, t1 in windows:
        # an op belongs to the restart during which it ended (one in flight at a stop ends after it)
        slow = [s for s in stats["slow"] if t0 <= s[0] + s[1] <= t1]
        errors = [e for e in stats["errors"] if t0 <= e[0] <= t1]
        per_restart.append(
            {
                "kind": kind,
                "stall_s": round(max((s[1] for s in slow), default=0.0), 4),
                "daemon_down_to_ready_s": round(t_ready - t0, 3),
                "errors": len(errors),
                "held_fd_and_mmap_stall_s": round(
                    max((s[1] for s in slow if s[2] in ("held fd", "mmap")), default=0.0), 4
                ),
            }
        )
    result = {
        "when": now_iso(),
        "machine": machine_info(),
        "machine_load": {**load, "cpu_busy_during": round(cpu.machine_busy, 3), "loadavg_after": loadavg()},
        **provenance(),
        "held_file_bytes": (src / "model.safetensors").stat().st_size if src.exists() else args.size_mib * MiB,
        "reader": {"rounds": stats["rounds"], "ops": stats["ops"], "errors_total": len(stats["errors"])},
        "reader_exit_code": reader.returncode if reader is not None else None,
        "takeovers": took_over,
    }
    rows = []
    for kind in ("sigterm", "kill9", "version_swap"):
        mine = [r for r in per_restart if r["kind"] == kind]
        stalls = [r["stall_s"] for r in mine]
        result[kind] = {
            "restarts": len(mine),
            "errors": sum(r["errors"] for r in mine),
            "stall_p50_s": round(percentile(stalls, 0.5), 4),
            "stall_p99_s": round(percentile(stalls, 0.99), 4),
            "stall_max_s": round(max(stalls, default=0.0), 4),
            "held_fd_and_mmap_stall_max_s": max((r["held_fd_and_mmap_stall_s"] for r in mine), default=0.0),
            "reader_propagation": "private",
        }
        k = result[kind]
        rows.append((kind, k["restarts"], k["errors"], k["stall_p50_s"], k["stall_p99_s"], k["stall_max_s"]))
    result["restarts"] = per_restart
    print_table(rows, ("kind", "restarts", "errors", "stall p50 s", "stall p99 s", "stall max s"))
    print(f"reader: {stats['rounds']} rounds, {stats['ops']} ops, exit {result['reader_exit_code']}; machine {load}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "restart.json", result)
    plot(per_restart, args.out / "restart.png")


def plot(per_restart: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sigterm": "tab:blue", "kill9": "tab:red", "version_swap": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, r in enumerate(per_restart):
        ax.bar(i, r["stall_s"], color=colors[r["kind"]], label=r["kind"])
        ax.plot(i, r["held_fd_and_mmap_stall_s"], "k.", label="held fd / mmap")
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    ax.legend(seen.values(), seen.keys(), fontsize=8)
    ax.axhline(1.0, color="tab:blue", ls="--", lw=0.8)
    ax.axhline(3.0, color="tab:red", ls="--", lw=0.8)
    ax.set(xlabel="restart", ylabel="longest reader op (s)", title="what a private-namespace reader waits per restart")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
