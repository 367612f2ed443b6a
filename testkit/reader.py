"""A reader that must not notice daemon restarts: `python testkit/reader.py SPEC.json`.

Run it in a mount namespace of its own with private propagation (`unshare
--mount --propagation private`): its copy of the mount is one no later mount
can reach, like a container that did not ask for HostToContainer. It holds an
open fd and an mmap of one file from start to end, and in a loop opens and
reads every file whole, opens the held file again and reads its head, reads
the held fd and the mmap at offsets that move,
lists a folder and asks an xattr (both always reach the daemon), and compares
every byte with the expected digests. A failed syscall is recorded, never
retried; a SIGBUS kills it (the test sees the signal).

The spec (JSON): {"files": {path: sha256}, "hold": path, "hold_sha256": str,
"list": dir, "out": path, "stop": path}. It writes `out` (JSON) after every
round and stops when `stop` exists: {"ops", "rounds", "errors": [...],
"slow": [[start, seconds, op], ...]} (ops slower than 5 ms, with their start
on the monotonic clock).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import time

SLOW = 0.005


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    files: dict[str, str] = spec["files"]
    out, stop = spec["out"], spec["stop"]
    hold = spec["hold"]
    fd = os.open(hold, os.O_RDONLY)
    size = os.fstat(fd).st_size
    whole = os.pread(fd, size, 0)
    if hashlib.sha256(whole).hexdigest() != spec["hold_sha256"]:
        raise SystemExit("the held file has wrong bytes at start")
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    stats: dict = {"ops": 0, "rounds": 0, "errors": [], "slow": []}
    step = 0

    def op(name: str, fn) -> None:
        t0 = time.monotonic()
        try:
            ok = fn()
        except OSError as e:
            stats["errors"].append([t0, name, e.errno, str(e)])
            return
        took = time.monotonic() - t0
        stats["ops"] += 1
        if took > SLOW:
            stats["slow"].append([t0, took, name])
        if not ok:
            stats["errors"].append([t0, name, 0, "wrong bytes"])

    def read_whole(path: str, digest: str):
        def fn() -> bool:
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest() == digest

        return fn

    def read_head(path: str, want: bytes) -> bool:
        with open(path, "rb") as f:
            return f.read(len(want)) == want

    while not os.path.exists(stop):
        for path, digest in files.items():
            op("read " + os.path.basename(path), read_whole(path, digest))
        off = (step * 65_537) % max(1, size - 4096)
        op("open held", lambda: read_head(hold, whole[:4096]))
        op("held fd", lambda off=off: os.pread(fd, 4096, off) == whole[off : off + 4096])
        op("mmap", lambda off=off: mm[off : off + 4096] == whole[off : off + 4096])
        op("listdir", lambda: len(os.listdir(spec["list"])) > 0)
        op("xattr", lambda: float(os.getxattr(hold, "user.nodecache.cached")) >= 0)
        step += 1
        stats["rounds"] += 1
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, out)
    mm.close()
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
