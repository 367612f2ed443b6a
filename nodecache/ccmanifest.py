"""Compile caches, the pure part: key names and the manifest of a sealed tree.

A key is free text a user picks (`qwen2.5-7b@abc/h100/vllm-0.11`); it never
becomes a path itself, only its hash does. A manifest lists a tree's entries
(path, type, mode, size, sha256 or symlink target). Every manifest that comes
from outside (a peer, a bucket, the disk after a crash) goes through `parse`,
which refuses anything that could write outside the tree: absolute or `..`
paths, entries under a symlink or a file, symlinks whose target leaves the
tree, duplicate paths, and sizes and counts past the bounds.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass

KEY_MAX = 512  # characters
MAX_ENTRIES = 200_000  # files, directories and symlinks in one tree
MAX_FILE = 64 * 2**30  # bytes of one file
MAX_TOTAL = 2**40  # bytes of one tree
MAX_PATH = 4096  # bytes of one path
MAX_MANIFEST = 64 * 2**20  # bytes of one manifest document
SHA256_RE = re.compile(r"[0-9a-f]{64}")
NAME_RE = re.compile(r"[0-9a-f]{32}")
TYPES = ("dir", "file", "symlink")
VERSION = 1


class BadKey(ValueError):
    """A compile-cache key that is not acceptable."""


class BadManifest(ValueError):
    """A manifest that must not be used; the message says why."""


def check_key(key: object) -> str:
    """Free text, but printable, one line, bounded."""
    if not isinstance(key, str) or not key.strip():
        raise BadKey("a compile-cache key must be a non-empty string")
    if len(key) > KEY_MAX:
        raise BadKey(f"a compile-cache key is at most {KEY_MAX} characters")
    if not key.isprintable():
        raise BadKey("a compile-cache key must be printable text (no control characters or newlines)")
    return key


def key_name(key: str) -> str:
    """The directory name of a key: its hash, so no key can name a path."""
    return hashlib.sha256(check_key(key).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Entry:
    path: str  # relative, "/"-separated, normalised
    type: str  # dir | file | symlink
    mode: int = 0o755  # permission bits only (0..0o777)
    size: int = 0
    sha256: str = ""
    target: str = ""  # symlinks: relative, inside the tree

    def as_dict(self) -> dict:
        d: dict = {"path": self.path, "type": self.type, "mode": self.mode}
        if self.type == "file":
            d.update(size=self.size, sha256=self.sha256)
        elif self.type == "symlink":
            d["target"] = self.target
        return d


@dataclass(frozen=True)
class Manifest:
    key: str
    sealed_at: float  # seconds since the epoch, on the sealing node
    node: str  # who sealed it (informational)
    entries: tuple[Entry, ...]

    @property
    def files(self) -> int:
        return sum(e.type == "file" for e in self.entries)

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def blobs(self) -> set[str]:
        return {e.sha256 for e in self.entries if e.type == "file"}

    def dump(self) -> bytes:
        doc = {
            "version": VERSION,
            "key": self.key,
            "sealed_at": self.sealed_at,
            "node": self.node,
            "entries": [e.as_dict() for e in self.entries],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def id(self) -> str:
        """Content address of the snapshot: sha256 of its canonical document."""
        return hashlib.sha256(self.dump()).hexdigest()

    def newer_than(self, other: Manifest | None) -> bool:
        """Newest by sealing time wins; equal times are ordered by id, so every node picks the same one."""
        return other is None or (self.sealed_at, self.id) > (other.sealed_at, other.id)


def check_path(path: object) -> str:
    if not isinstance(path, str) or not path or len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise BadManifest(f"bad path {path!r}")
    if "\0" in path or path.startswith("/") or "\\" in path:
        raise BadManifest(f"path {path!r} must be relative, '/'-separated, without NUL")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BadManifest(f"path {path!r} must be normalised (no empty, '.' or '..' parts)")
    return path


def check_target(path: str, target: object) -> str:
    """A symlink target must be relative and stay inside the tree when resolved from the link's folder."""
    if not isinstance(target, str) or not target or "\0" in target or len(target) > MAX_PATH:
        raise BadManifest(f"symlink {path!r}: bad target")
    if target.startswith("/"):
        raise BadManifest(f"symlink {path!r} -> {target!r}: absolute targets leave the tree")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
        raise BadManifest(f"symlink {path!r} -> {target!r} points outside the tree")
    return target


def _int(value: object, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadManifest(f"{what} must be an integer from {low} to {high}")
    return value


def parse_entry(raw: object) -> Entry:
    if not isinstance(raw, dict):
        raise BadManifest("an entry must be an object")
    path = check_path(raw.get("path"))
    kind = raw.get("type")
    if kind not in TYPES:
        raise BadManifest(f"entry {path!r}: type must be one of {TYPES}")
    mode = _int(raw.get("mode", 0o755), f"entry {path!r}: mode", 0, 0o777)
    if kind == "file":
        size = _int(raw.get("size"), f"entry {path!r}: size", 0, MAX_FILE)
        sha = raw.get("sha256")
        if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
            raise BadManifest(f"entry {path!r}: sha256 must be 64 lowercase hex digits")
        return Entry(path, kind, mode, size, sha)
    if kind == "symlink":
        return Entry(path, kind, 0o777, target=check_target(path, raw.get("target")))
    return Entry(path, kind, mode)


def check_entries(entries: list[Entry]) -> tuple[Entry, ...]:
    """Bounds, no duplicates, and every parent a directory listed before its children."""
    if len(entries) > MAX_ENTRIES:
        raise BadManifest(f"{len(entries)} entries: at most {MAX_ENTRIES}")
    kinds: dict[str, str] = {}
    total = 0
    for e in entries:
        if e.path in kinds:
            raise BadManifest(f"path {e.path!r} listed twice")
        parent = posixpath.dirname(e.path)
        if parent and kinds.get(parent) != "dir":
            raise BadManifest(f"entry {e.path!r}: its parent {parent!r} is not a directory listed before it")
        kinds[e.path] = e.type
        total += e.size
        if total > MAX_TOTAL:
            raise BadManifest(f"the tree is larger than {MAX_TOTAL} bytes")
    return tuple(entries)


def parse(data: bytes, key: str | None = None) -> Manifest:
    """A manifest document from anywhere -> Manifest, or BadManifest saying what is wrong with it."""
    if len(data) > MAX_MANIFEST:
        raise BadManifest(f"manifest of {len(data)} bytes: at most {MAX_MANIFEST}")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise BadManifest("manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise BadManifest(f"manifest must be an object with version {VERSION}")
    try:
        got_key = check_key(doc.get("key"))
    except BadKey as e:
        raise BadManifest(str(e)) from None
    if key is not None and got_key != key:
        raise BadManifest("manifest is for another key")
    sealed_at = doc.get("sealed_at")
    if not isinstance(sealed_at, (int, float)) or isinstance(sealed_at, bool) or not 0 <= sealed_at < 1e11:
        raise BadManifest("sealed_at must be a time in seconds since the epoch")
    node = doc.get("node", "")
    if not isinstance(node, str) or len(node) > 256:
        raise BadManifest("node must be a short string")
    raw = doc.get("entries")
    if not isinstance(raw, list):
        raise BadManifest("entries must be a list")
    if len(raw) > MAX_ENTRIES:
        raise BadManifest(f"{len(raw)} entries: at most {MAX_ENTRIES}")
    return Manifest(got_key, float(sealed_at), node, check_entries([parse_entry(r) for r in raw]))
