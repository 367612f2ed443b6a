"""Compile-cache keys on disk: `keys/<name>/meta.json` (the key's text, times, the CSI targets that
use it), `keys/<name>/tree/` (what pods write) and `keys/<name>/sealed.json` (its newest snapshot).

A bad meta.json or sealed.json is logged, counted and left out; it never stops the daemon.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import ccmanifest as cm
from .ccmanifest import BadManifest, Manifest
from .cctree import Walk, walk

log = logging.getLogger("nodecache.compilecache")


@dataclass
class Key:
    key: str
    name: str
    created: float
    last_used: float
    users: set[str] = field(default_factory=set)  # CSI target paths
    bytes: int = 0
    files: int = 0
    fingerprint: str = ""  # of the tree as last walked
    newest_mtime: float = 0.0
    sealed: Manifest | None = None
    sealed_fingerprint: str = ""  # the tree's fingerprint when it was sealed or filled
    stats: dict = field(default_factory=dict)  # path -> (size, mtime_ns, ino, sha256) at the last seal
    uploaded: str = ""  # id of the last snapshot of ours written to the upstream

    def as_dict(self) -> dict:
        return {
            "key": self.key,
            "name": self.name,
            "bytes": self.bytes,
            "files": self.files,
            "in_use": len(self.users),
            "created": self.created,
            "last_used": self.last_used,
            "sealed": None
            if self.sealed is None
            else {
                "id": self.sealed.id,
                "at": self.sealed.sealed_at,
                "node": self.sealed.node,
                "files": self.sealed.files,
                "uploaded": self.uploaded == self.sealed.id,
            },
            "dirty": self.fingerprint != self.sealed_fingerprint,
        }


class KeyDirs:
    """Where each key's state lives, and how it is read and written."""

    def __init__(self, root: Path, on_invalid: Callable[[str], None]):
        self.root = root
        self.on_invalid = on_invalid

    def dir(self, name: str) -> Path:
        return self.root / name

    def tree(self, name: str) -> Path:
        return self.dir(name) / "tree"

    def create(self, key: str, name: str, now: float) -> Key:
        """A new key with an empty tree any pod may write into (pods may run as any uid)."""
        k = Key(key, name, now, now)
        self.tree(name).mkdir(parents=True, exist_ok=True)
        os.chmod(self.tree(name), 0o777)
        self.save(k)
        return k

    def load(self) -> dict[str, Key]:
        """Every key whose directory and meta.json hold up, measured."""
        keys = {}
        for d in sorted(self.root.iterdir()):
            k = self._load(d)
            if k is not None:
                self.tree(d.name).mkdir(exist_ok=True)
                keys[d.name] = k
        for k in keys.values():
            self.measure(k)
        return keys

    def _load(self, d: Path) -> Key | None:
        if not cm.NAME_RE.fullmatch(d.name) or d.is_symlink() or not d.is_dir():
            log.warning("compile caches: ignoring %s (not a key directory)", d)
            self.on_invalid("key_dir")
            return None
        try:
            meta = json.loads((d / "meta.json").read_bytes())
            key = cm.check_key(meta["key"])
            if cm.key_name(key) != d.name:
                raise ValueError("its key does not hash to its name")
            users = meta.get("users", [])
            if not isinstance(users, list) or not all(isinstance(u, str) and u.startswith("/") for u in users):
                raise ValueError("users must be a list of absolute paths")
            k = Key(key, d.name, float(meta["created"]), float(meta["last_used"]), set(users[:10_000]))
            k.uploaded = str(meta.get("uploaded", ""))[:64]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            log.warning("compile caches: ignoring %s: bad meta.json (%s)", d, e)
            self.on_invalid("meta")
            return None
        sealed = d / "sealed.json"
        if sealed.exists():
            try:
                k.sealed = cm.parse(sealed.read_bytes(), key)
                k.sealed_fingerprint = str(meta.get("sealed_fingerprint", ""))
            except (OSError, BadManifest) as e:
                log.warning("compile caches: %s: dropping its snapshot, bad sealed.json (%s)", key, e)
                self.on_invalid("manifest")
                sealed.unlink(missing_ok=True)
        return k

    def save(self, k: Key) -> None:
        doc = {
            "key": k.key,
            "created": k.created,
            "last_used": k.last_used,
            "users": sorted(k.users),
            "sealed_fingerprint": k.sealed_fingerprint,
            "uploaded": k.uploaded,
        }
        tmp = self.dir(k.name) / "meta.json.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.dir(k.name) / "meta.json")

    def publish(self, k: Key, m: Manifest) -> None:
        """Make `m` the key's newest snapshot (its tree is what `m` lists)."""
        tmp = self.dir(k.name) / "sealed.json.tmp"
        tmp.write_bytes(m.dump())
        os.replace(tmp, self.dir(k.name) / "sealed.json")
        k.sealed = m
        k.sealed_fingerprint = k.fingerprint
        self.save(k)

    def measure(self, k: Key) -> Walk | None:
        """Walk the key's tree for its fingerprint, newest mtime, bytes and files."""
        try:
            w = walk(self.tree(k.name))
        except (OSError, BadManifest) as e:
            log.warning("compile cache %s: cannot walk its tree: %s", k.key, e)
            return None
        k.fingerprint, k.newest_mtime, k.bytes, k.files = w.fingerprint()
        return w
