"""A Triton/Inductor-shaped compile-cache tree for tests and the benchmark, and a digest to compare two."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path


def make_tree(root: Path, small: int = 2000, big: int = 3, big_size: int = 2 * 2**20, seed: int = 0) -> int:
    """`small` files of 200 B-8 KiB in hash-named folders (as Triton writes), `big` files of `big_size`,
    a few modes and an in-tree symlink; returns the bytes written."""
    rng = random.Random(seed)
    total = 0
    for i in range(small):
        d = root / "triton" / "cache" / hashlib.sha256(f"{seed}-{i // 10}".encode()).hexdigest()[:40]
        d.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(200, 8192))
        p = d / (f"kernel_{i}.cubin" if i % 3 else f"kernel_{i}.json")
        p.write_bytes(data)
        total += len(data)
        if i % 7 == 0:
            os.chmod(p, 0o600)
    inductor = root / "torch_compile_cache" / "rank_0_0" / "backbone"
    inductor.mkdir(parents=True, exist_ok=True)
    for i in range(big):
        p = inductor / f"graph_{i}.so"
        with open(p, "wb") as f:
            f.write(os.urandom(big_size))
        os.chmod(p, 0o755)
        total += big_size
    os.symlink("backbone/graph_0.so", inductor.parent / "latest.so")
    return total


def digest(root: Path) -> dict[str, tuple]:
    """path -> (kind, mode, size, sha256 or link target), never following a symlink."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("symlink", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o777)
            else:
                out[rel] = ("file", st.st_mode & 0o777, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out
