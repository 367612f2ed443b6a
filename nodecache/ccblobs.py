"""File contents of sealed compile-cache snapshots: `blobs/<sha256>`, one file per content.

Every blob is written aside in `tmp/` and renamed into place, so a blob is whole or absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import time
from pathlib import Path

from . import ccmanifest as cm
from .cctree import open_in

BUF = 1 << 20


class BlobDir:
    def __init__(self, root: Path, tmp: Path):
        self.root, self.tmp = root, tmp

    def path(self, sha: str) -> Path | None:
        """The blob's file (None: not a sha256, or not here)."""
        if not cm.SHA256_RE.fullmatch(sha):
            return None
        p = self.root / sha
        return p if p.is_file() else None

    def aside(self, what: str) -> Path:
        """A fresh name in tmp/ to write a blob (or anything) before renaming it into place."""
        return self.tmp / f"{what}-{time.monotonic_ns()}"

    def adopt(self, written: Path, sha: str) -> None:
        """A blob written aside (and verified) into place."""
        os.replace(written, self.root / sha)

    def put(self, blobs: dict[str, bytes]) -> None:
        """Verified blobs into place."""
        for sha, data in blobs.items():
            tmp = self.aside(f"put-{sha}")
            with open(tmp, "wb") as f:
                f.write(data)
            self.adopt(tmp, sha)

    def copy_in(self, tree: Path, path: str) -> tuple[str, int]:
        """Copy one file of a tree in while hashing it; the blob is what was hashed. -> (sha256, size)."""
        fd = open_in(tree, path)
        tmp = self.aside(f"blob-{os.getpid()}")
        h, size = hashlib.sha256(), 0
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError("not a regular file")
            with open(tmp, "wb") as out:
                while chunk := os.read(fd, BUF):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    if size > cm.MAX_FILE:
                        raise OSError("file too large")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        sha = h.hexdigest()
        if (self.root / sha).exists():
            tmp.unlink()
        else:
            self.adopt(tmp, sha)
        return sha, size

    def nbytes(self) -> int:
        total = 0
        with os.scandir(self.root) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    total += e.stat(follow_symlinks=False).st_size
        return total

    def gc(self, keep: set[str]) -> int:
        """Delete every blob not in `keep`; how many went."""
        n = 0
        with os.scandir(self.root) as it:
            for e in it:
                if e.name not in keep:
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
                        n += 1
        return n
