"""Shared helpers for the nodecache benchmarks: daemon subprocess, cache dropping, timed reads.

The daemon always runs as a child process: the benchmark reads its mount, and a
process that touches its own FUSE mount from the serving loop deadlocks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB
READ_BUF = MiB  # every timed read uses 1 MiB requests
REPO_ROOT = Path(__file__).resolve().parent.parent

if str(REPO_ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from nodecache import mounts  # noqa: E402
from nodecache.testing.daemon import DaemonProcess  # noqa: E402

# ---- machine and bookkeeping ---------------------------------------------------------


def machine_info() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": cpu,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
    }


def provenance() -> dict:
    """The nodecache code measured: commit, and whether nodecache/ had uncommitted edits."""

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "nodecache")
    return {"git_commit": git("rev-parse", "HEAD"), "nodecache_dirty_files": len(dirty.splitlines()) if dirty else 0}


def _cpu_snap() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(v[:8]) - v[3] - v[4], sum(v[:8])


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of all CPUs busy (not idle/iowait) over `seconds`."""
    b0, t0 = _cpu_snap()
    time.sleep(seconds)
    b1, t1 = _cpu_snap()
    return (b1 - b0) / max(1, t1 - t0)


class CpuMeter:
    """CPU used during a block: this process (all threads), and every CPU of the machine.

    `machine_busy` near 1.0 means the CPUs were saturated (by us, the daemon, or others).
    """

    def __enter__(self) -> CpuMeter:
        self._own = os.times()
        self._sys = _cpu_snap()
        return self

    def __exit__(self, *exc: object) -> None:
        own, sysnow = os.times(), _cpu_snap()
        self.own_cpu_s = (own.user - self._own.user) + (own.system - self._own.system)
        self.machine_busy = (sysnow[0] - self._sys[0]) / max(1, sysnow[1] - self._sys[1])


def add_run_args(p: argparse.ArgumentParser, wait_quiet: float = 120) -> None:
    """The flags every bench shares: where results go, keeping the scratch dir, waiting for idle CPUs."""
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--keep", action="store_true", help="keep the scratch dir")
    p.add_argument("--wait-quiet", type=float, default=wait_quiet, help="wait up to this long for idle CPUs first (s)")


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench's command line: its module docstring is the help text, as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def save_figure(fig, path: Path, title: str | None = None) -> None:
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cases(names: list[str], prefix: str, run, keep: bool) -> list[dict]:
    """run(name, dir) for each case, each in a scratch dir of its own under /var/tmp (large
    trees: not the tmpfs), removed after it unless `keep`; the rows, in order."""
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        for name in names:
            print(f"case {name}", file=sys.stderr, flush=True)
            rows.append(run(name, scratch / name))
            print(rows[-1], file=sys.stderr, flush=True)
            if not keep:
                shutil.rmtree(scratch / name, ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return rows


def wait_quiet(max_wait: float, threshold: float = 0.15) -> dict:
    """Wait (up to max_wait s) until other work leaves the CPUs mostly idle; say what was seen.

    This machine is shared: a test suite running beside a benchmark halves its numbers.
    """
    t0 = time.monotonic()
    busy = cpu_busy()
    while busy > threshold and time.monotonic() - t0 < max_wait:
        print(f"waiting for a quiet machine: CPUs {busy:.0%} busy", file=sys.stderr, flush=True)
        busy = cpu_busy(5.0)
    return {"cpu_busy_before": round(busy, 3), "waited_s": round(time.monotonic() - t0, 1), "loadavg_before": loadavg()}


def run_and_write(args, run, plot, name: str | None = None) -> dict:
    """Wait for a quiet machine, run, record the load before and after, write NAME.json and NAME.png."""
    quiet = wait_quiet(args.wait_quiet)
    res = run(args)
    res["machine_load"] = {**quiet, "loadavg_after": loadavg()}
    stem = name or args.name
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{stem}.json", res)
    plot(res, args.out / f"{stem}.png")
    return res


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def print_table(rows: list[tuple], headers: tuple) -> None:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


# ---- files ---------------------------------------------------------------------------------


def write_random_file(path: Path, size: int, block: int = 64 * MiB) -> None:
    """`size` bytes of os.urandom (incompressible, no repeated chunks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n


def fadvise_dontneed(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_caches(files: list[Path] = ()) -> str:
    """Empty the page cache (all of it, FUSE inodes included); fadvise fallback per file.

    Returns the method that worked, for the JSON.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in files:
            fadvise_dontneed(p)
        return "fadvise_dontneed"


def timed_read(path: Path, start: int = 0, length: int | None = None) -> tuple[int, float]:
    """Read [start, start+length) sequentially in 1 MiB requests; (bytes, seconds incl. open)."""
    buf = bytearray(READ_BUF)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        if length is None:
            length = os.fstat(fd).st_size - start
        end, pos = start + length, start
        while pos < end:
            n = os.preadv(fd, [memoryview(buf)[: min(READ_BUF, end - pos)]], pos)
            if n <= 0:
                raise OSError(f"short read of {path} at {pos}")
            pos += n
    finally:
        os.close(fd)
    return pos - start, time.perf_counter() - t0


def parallel_read(path: Path, readers: int) -> tuple[int, float]:
    """`readers` threads, each its own fd, each reading a disjoint 1/readers slice (1 MiB requests).

    os.preadv releases the GIL, so the threads really read in parallel. Wall time
    runs from a common start barrier to the last reader's end.
    """
    size = path.stat().st_size
    step = -(-size // readers)
    step = -(-step // READ_BUF) * READ_BUF  # slice starts on 1 MiB boundaries
    slices = [(i * step, max(0, min(step, size - i * step))) for i in range(readers)]
    barrier = threading.Barrier(readers + 1)
    results: list[int] = [0] * readers
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = timed_read(path, *slices[i])[0]
        except BaseException as e:  # surfaced after join
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(readers)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(results), elapsed


# ---- mounts ------------------------------------------------------------------------------


def bdi_read_ahead_kb(mnt: Path) -> int | None:
    entry = mounts.top(os.path.abspath(mnt))
    if entry is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        return int(Path(f"/sys/class/bdi/{entry.dev}/read_ahead_kb").read_text())
    return None


@contextlib.contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A scratch dir on the same disk as /tmp; removed only if nothing is mounted inside."""
    base = Path(os.environ.get("NODECACHE_BENCH_TMP", tempfile.gettempdir()))
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield d
    finally:
        live = mounts.under(d)
        if live:
            print(f"warning: not removing {d}: still mounted: {live}", file=sys.stderr)
        elif not keep:
            shutil.rmtree(d, ignore_errors=True)


# ---- the daemon -------------------------------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post_json(url: str, body: dict, timeout: float = 30.0) -> dict:
    """POST a JSON body; the JSON answer of a 2xx, else RuntimeError."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url}: HTTP {e.code}: {e.read()[:200]!r}") from None


def http_json(url: str, timeout: float = 5.0) -> dict:
    status, body = http_get(url, timeout)
    if status != 200:
        raise RuntimeError(f"GET {url}: HTTP {status}: {body[:200]!r}")
    return json.loads(body)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; comments dropped."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(val)
    return out


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Daemon(DaemonProcess):
    """The tests' daemon harness (by PID; reports a mount `serve` left), plus what benches
    read: one sub-directory per daemon of a work dir, metrics as numbers, a snapshot's path."""

    def __init__(
        self, work: Path, hub_url: str, repos: list[str], env: dict[str, str] | None = None, name="d", keeper=None
    ):
        (work / name).mkdir(parents=True, exist_ok=True)
        env = {"PYTHONPATH": str(REPO_ROOT), **(env or {})}
        super().__init__(work / name, hub_url, repos, env=env, keeper=keeper)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def snapshot_dir(self, repo_id: str, commit: str) -> Path:
        return self.hub / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit

    def start(self, timeout: float = 60.0) -> Daemon:
        super().start(timeout)
        return self

    def metric_values(self) -> dict[str, float]:
        return parse_metrics(self.metrics())
