"""The trees pods write into: walked and read by directory fd, never following a symlink, and
built from a snapshot beside the old tree, then swapped in.

Pods own a key's tree and may put anything there: only regular files, directories and symlinks
that stay inside the tree are taken; anything else (fifos, devices, huge files, links out) is
skipped and counted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import ccmanifest as cm
from .ccmanifest import BadManifest, Manifest


@dataclass
class Walk:
    entries: list[tuple[str, str, os.stat_result, str]]  # (path, type, lstat, symlink target)
    skipped: int = 0

    def fingerprint(self) -> tuple[str, float, int, int]:
        h = hashlib.sha256()
        newest, total, files = 0.0, 0, 0
        for path, kind, st, target in self.entries:
            h.update(f"{path}\0{kind}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{target}\n".encode())
            newest = max(newest, st.st_mtime)
            if kind == "file":
                total += st.st_size
                files += 1
        return h.hexdigest(), newest, total, files


def walk(root: Path) -> Walk:
    """Every dir, regular file and in-tree symlink under root, by dir fd (no symlink is ever followed)."""
    out = Walk([])
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    out.entries.append(("", "dir", os.fstat(top), ""))
    stack = [(top, "")]
    try:
        while stack:
            fd, rel = stack.pop()
            try:
                with os.scandir(fd) as it:
                    names = sorted(e.name for e in it)
                for name in names:
                    path = f"{rel}/{name}" if rel else name
                    try:
                        path.encode("utf-8")
                        cm.check_path(path)
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except (UnicodeEncodeError, BadManifest, OSError):
                        out.skipped += 1
                        continue
                    if len(out.entries) >= cm.MAX_ENTRIES:
                        raise BadManifest(f"more than {cm.MAX_ENTRIES} entries in the tree")
                    if stat.S_ISDIR(st.st_mode):
                        try:
                            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                        except OSError:
                            out.skipped += 1
                            continue
                        out.entries.append((path, "dir", st, ""))
                        stack.append((sub, path))
                    elif stat.S_ISREG(st.st_mode) and st.st_size <= cm.MAX_FILE:
                        out.entries.append((path, "file", st, ""))
                    elif stat.S_ISLNK(st.st_mode):
                        try:
                            target = cm.check_target(path, os.readlink(name, dir_fd=fd))
                        except (BadManifest, OSError):
                            out.skipped += 1  # a link out of the tree is never sealed
                            continue
                        out.entries.append((path, "symlink", st, target))
                    else:
                        out.skipped += 1  # fifos, sockets, devices, huge files
            finally:
                os.close(fd)
    except BaseException:
        for fd, _ in stack:
            os.close(fd)
        raise
    out.entries.sort(key=lambda e: e[0])
    return out


def open_in(root: Path, path: str) -> int:
    """Open a regular file under root, component by component, following no symlink."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        parts = path.split("/")
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)


def build(tree: Path, m: Manifest, blob: Callable[[str], Path | None], tmp: Path, name: str) -> None:
    """Build the snapshot's tree in `tmp` (its blobs are all here) and swap it in for `tree`."""
    stage = tmp / f"stage-{name}-{time.monotonic_ns()}"
    stage.mkdir(mode=0o700)
    try:
        for e in m.entries:  # parents come first (check_entries)
            p = stage / e.path
            if e.type == "dir":
                p.mkdir()
            elif e.type == "symlink":
                os.symlink(e.target, p)
            else:
                src = blob(e.sha256)
                if src is None:
                    raise OSError(f"blob {e.sha256} missing")
                shutil.copyfile(src, p)
                os.chmod(p, e.mode)
        for e in reversed(m.entries):
            if e.type == "dir":
                os.chmod(stage / e.path, e.mode)
        os.chmod(stage, 0o777)
        old = tmp / f"old-{name}-{time.monotonic_ns()}"
        os.replace(tree, old)
        os.replace(stage, tree)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
