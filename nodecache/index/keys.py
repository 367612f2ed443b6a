"""How the index spells repos, refs and snapshots as keys and values (pure: no LMDB here).

Keys are `type:org/name\\0` for a repo, followed by a revision (refs, pins) or a commit
(snapshots); every family's tables use the same spelling, so a prefix scan finds a repo's entries.
"""

from __future__ import annotations

import json

from ..layout import (
    COMMIT_RE,
    FileEntry,
    validate_blob_id,
    validate_relpath,
    validate_repo_id,
    validate_repo_type,
    validate_size,
)


def repo_key(repo_type: str, repo_id: str) -> bytes:
    return f"{repo_type}:{repo_id}\0".encode()


MAX_KEY = 511  # LMDB's largest key (MDB_MAXKEYSIZE as py-lmdb builds it): a longer one is BadValsizeError


def folder_room(repo_type: str, repo_id: str) -> int:
    """The bytes a folder's path may take in the key of its block, `<snapshot key>/<path>`
    (snapshots.py): a deeper folder of a listing cannot be stored, so the listing is refused."""
    return MAX_KEY - len(repo_key(repo_type, repo_id)) - 40 - 1  # a commit, "/"


def repo_of(key: bytes) -> bytes:
    """The repo key at the head of a ref's or snapshot's key."""
    return key.partition(b"\0")[0] + b"\0"


def split_key(key: bytes) -> tuple[str, str, str]:
    """`type:org/name\\0tail` -> (repo_type, repo_id, tail), each part checked."""
    head, _, tail = key.decode().partition("\0")
    repo_type, _, repo_id = head.partition(":")
    return validate_repo_type(repo_type), validate_repo_id(repo_id), tail


def commit_of(raw: bytes) -> str:
    """The commit a stored ref names (raises ValueError if it is not one)."""
    commit = json.loads(raw)["commit"]
    if not isinstance(commit, str) or not COMMIT_RE.fullmatch(commit):
        raise ValueError(f"commit {commit!r}")
    return commit


def encode_files(files: list[FileEntry], at: float) -> bytes:
    return json.dumps({"files": [[f.path, f.size, f.blob_id] for f in files], "at": at}).encode()


def decode_files(raw: bytes) -> list[FileEntry]:
    """A stored snapshot's file list, every entry checked (raises one of records.BAD)."""
    items = json.loads(raw)["files"]
    if not isinstance(items, list):
        raise ValueError("files is not a list")
    return [_file(item) for item in items]


def _file(item) -> FileEntry:
    path, size, blob_id = item
    return FileEntry(validate_relpath(path), validate_size(size), validate_blob_id(blob_id))
