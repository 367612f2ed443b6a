"""Which files of a snapshot to fill, in which order, once a reader opens a weight file (pure).

A loader that opens one shard reads the others next, in the order of the
checkpoint's index (`model.safetensors.index.json`'s `weight_map`, order of
first appearance), and reads the small files (configs, tokenizers) before
any of them. So: small files first, then the opened shard's siblings in
loader order, starting after the opened one (a loader at shard 3 has read
1 and 2). Only siblings: a repo often holds the same weights in several
formats or precisions, and a loader reads one of them.
"""

from __future__ import annotations

import bisect
import json
import posixpath
import re

from .layout import COMMIT_RE, FileEntry, parse_repo_folder

# What checkpoint loaders read: only opening one of these starts a snapshot fill.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz", ".onnx")
SMALL_MAX = 64 << 20  # a non-weight file up to this size is "small" (tokenizer.json can be ~30 MB)
MAX_SMALL = 64  # small files filled per snapshot, at most
INDEX_MAX = 16 << 20  # an index larger than this is not read
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{3,6})-of-(?P<n>\d{3,6})(?P<ext>\.[A-Za-z0-9]+)$")


def opened_in(fuse_path: str) -> tuple[str, str, str | None] | None:
    """Which repo (and snapshot, if opened by its snapshot path) a file of the mount belongs to.

    `hub/<repo folder>/blobs/<id>` -> (type, repo id, None): what a loader opens, through the
    snapshot's symlink; `hub/<repo folder>/snapshots/<commit>/<path>` -> (type, repo id, commit).
    """
    parts = fuse_path.split("/", 4)
    if len(parts) < 4 or parts[0] != "hub" or (repo := parse_repo_folder(parts[1])) is None:
        return None
    if parts[2] == "blobs" and len(parts) == 4:
        return repo[0], repo[1], None
    if parts[2] == "snapshots" and len(parts) == 5 and COMMIT_RE.fullmatch(parts[3]):
        return repo[0], repo[1], parts[3]
    return None


def locate(files: list[FileEntry], blob_id: str) -> str | None:
    """The path of the blob in a snapshot's file list (the first, if it is there twice)."""
    return next((f.path for f in files if f.blob_id == blob_id), None)


def is_weight(path: str) -> bool:
    return path.lower().endswith(WEIGHT_SUFFIXES)


def first_weight(files: list[FileEntry]) -> FileEntry | None:
    """The weight file a transformers-style loader opens first after reading the snapshot's
    `config.json`: `model.safetensors`, else the first shard of `model-NNNNN-of-MMMMM.safetensors`,
    at the snapshot's root. None for any other layout: which of several formats, precisions or
    folders a loader picks is not known from its config."""
    root = {f.path: f for f in files if "/" not in f.path}
    if "model.safetensors" in root:
        return root["model.safetensors"]
    shards = sorted(
        n for n in root if (m := _SHARD.fullmatch(n)) and m["stem"] == "model" and m["ext"] == ".safetensors"
    )
    return root[shards[0]] if shards else None


def small_files(files: list[FileEntry], opened: str) -> list[FileEntry]:
    """Configs, tokenizers, indexes: of the snapshot's root and the opened file's folder, smallest first."""
    folders = {"", posixpath.dirname(opened)}
    small = [
        f
        for f in files
        if f.path != opened and not is_weight(f.path) and f.size <= SMALL_MAX and posixpath.dirname(f.path) in folders
    ]
    return sorted(small, key=lambda f: (f.size, f.path))[:MAX_SMALL]


def index_files(files: list[FileEntry], opened: str) -> list[FileEntry]:
    """The checkpoint indexes beside the opened file (`*.index.json`) small enough to read."""
    folder = posixpath.dirname(opened)
    return [
        f
        for f in files
        if posixpath.dirname(f.path) == folder and f.path.endswith(".index.json") and 0 < f.size <= INDEX_MAX
    ]


def shard_order(raw: bytes) -> list[str]:
    """File names of an index's `weight_map`, in order of first appearance; [] for anything malformed."""
    try:
        doc = json.loads(raw)
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            return []
        names = [v for v in weight_map.values() if isinstance(v, str)]
    except (ValueError, KeyError, TypeError):
        return []
    return list(dict.fromkeys(names))


def siblings(files: list[FileEntry], opened: str, indexes: dict[str, bytes]) -> tuple[list[FileEntry], list[FileEntry]]:
    """The opened weight file's siblings in loader order: those after it (what the loader reads
    next), and those before it (read already, if the loader started at the first; a fill takes
    them last).

    Siblings are the files an index beside it lists together with it, else
    the shards of the same `stem-NNNNN-of-MMMMM.ext` series (name order).
    """
    folder, name = posixpath.split(opened)
    by_name = {posixpath.basename(f.path): f for f in files if posixpath.dirname(f.path) == folder}
    order: list[str] = []
    for path in sorted(indexes):
        names = shard_order(indexes[path])
        if name in names:
            order = [n for n in names if n in by_name]
            break
    if not order:
        m = _SHARD.fullmatch(name)
        if m is None:
            return [], []
        order = sorted(
            n
            for n in by_name
            if (s := _SHARD.fullmatch(n)) and (s["stem"], s["n"], s["ext"]) == (m["stem"], m["n"], m["ext"])
        )
    i = order.index(name) if name in order else -1
    return [by_name[n] for n in order[i + 1 :]], [by_name[n] for n in order[: max(i, 0)]]


def read_ahead(ends: list[int], at: int, budget: int) -> int:
    """The end (exclusive) of the files after position `at` that fit in `budget` bytes together.

    `ends[i]`: the bytes of the files before position i (accumulate(sizes, initial=0)); a
    search, since a loader opens every file of a series of any length. A budget of 0 reads
    nothing ahead, not even an empty file."""
    if budget <= 0:
        return at + 1
    return max(at + 1, bisect.bisect_right(ends, ends[at + 1] + budget) - 1)
