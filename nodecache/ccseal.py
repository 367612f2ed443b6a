"""Sealing: a key's tree as it is now, made a snapshot (a manifest over blobs), in a thread.

A file unchanged since the last seal (same size, mtime and inode, its blob still here) is not
read again; a file gone or replaced while it is copied is left to the next seal.
"""

from __future__ import annotations

import stat
import time

from . import ccmanifest as cm
from .ccblobs import BlobDir
from .cckeys import Key, KeyDirs
from .ccmanifest import Entry, Manifest
from .cctree import walk


def seal(keys: KeyDirs, blobs: BlobDir, k: Key, node: str) -> Manifest:
    """The key's snapshot, its files copied into `blobs`; the key's stats and measures updated."""
    tree = keys.tree(k.name)
    w = walk(tree)
    entries, stats = [], {}
    for path, kind, st, target in w.entries:
        if path == "":
            continue
        if kind == "dir":
            entries.append(Entry(path, "dir", stat.S_IMODE(st.st_mode) & 0o777))
        elif kind == "symlink":
            entries.append(Entry(path, "symlink", 0o777, target=target))
        else:
            sig = (st.st_size, st.st_mtime_ns, st.st_ino)
            prev = k.stats.get(path)
            if prev and prev[:3] == sig and blobs.path(prev[3]):
                sha, size = prev[3], st.st_size
            else:
                try:
                    sha, size = blobs.copy_in(tree, path)
                except OSError:
                    continue  # gone or replaced meanwhile: the next seal takes it
            stats[path] = (*sig, sha)
            entries.append(Entry(path, "file", stat.S_IMODE(st.st_mode) & 0o777, size, sha))
    m = Manifest(k.key, time.time(), node, cm.check_entries(entries))
    k.stats = stats
    k.fingerprint, k.newest_mtime, k.bytes, k.files = w.fingerprint()
    return m
