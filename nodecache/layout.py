"""The HuggingFace hub-cache layout, as pure functions and plain data.

Nothing here touches the disk or the network: it turns what the index knows
(repos, refs, snapshots and their files) into the exact tree that
`huggingface_hub` expects to find under `HF_HUB_CACHE`, and validates every
name that comes from the outside before anything joins it to a path.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}
_PREFIX_TO_TYPE = {v: k for k, v in REPO_TYPES.items()}

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
BLOB_ID_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REV_PART_RE = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_NAME = 255
MAX_PATH = 4096
MAX_BLOB_SIZE = 5 << 40  # 5 TiB, the largest S3 object; a Hub file is far smaller
MAX_FILES = 2_000_000  # files in one snapshot: the largest datasets hold ~10^6

CACHEDIR_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n# This file is a cache directory tag created by nodecache.\n"
)


class InvalidName(ValueError):
    """A repo id, revision or path from outside that must not become a path."""


# --- validation -------------------------------------------------------------


def validate_repo_id(repo_id: str) -> str:
    """`org/name` or `name`; each part a plain name, no `--` (it is the folder separator)."""
    if not isinstance(repo_id, str):
        raise InvalidName(f"invalid repo id {repo_id!r}: expected 'org/name'")
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or len(repo_id) > 96:
        raise InvalidName(f"invalid repo id {repo_id!r}: expected 'org/name'")
    for part in parts:
        if not _REPO_PART_RE.fullmatch(part) or "--" in part or part[-1] in ".-" or ".." in part:
            raise InvalidName(f"invalid repo id {repo_id!r}")
    return repo_id


def validate_repo_type(repo_type: str) -> str:
    if not isinstance(repo_type, str) or repo_type not in REPO_TYPES:
        raise InvalidName(f"invalid repo type {repo_type!r}: one of {sorted(REPO_TYPES)}")
    return repo_type


def validate_revision(revision: str) -> str:
    """A branch, tag, `refs/pr/N` or commit; it becomes `refs/<revision>`, so no `..`."""
    if not isinstance(revision, str) or not revision or len(revision) > 200:
        raise InvalidName(f"invalid revision {revision!r}")
    for part in revision.split("/"):
        if part in ("", ".", "..") or not _REV_PART_RE.fullmatch(part):
            raise InvalidName(f"invalid revision {revision!r}")
    return revision


def validate_relpath(path: str) -> str:
    """A repo file path: relative, `/`-separated, no `.`/`..`/empty parts, no NUL."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH or "\0" in path or "\\" in path:
        raise InvalidName(f"invalid file path {path!r}")
    for part in path.split("/"):
        if part in ("", ".", "..") or len(part.encode()) > MAX_NAME:
            raise InvalidName(f"invalid file path {path!r}")
    return path


def validate_size(size: object) -> int:
    """A file size from outside: an int in [0, MAX_BLOB_SIZE] (a huge one would size our memory)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BLOB_SIZE:
        raise InvalidName(f"invalid file size {size!r}: an integer from 0 to {MAX_BLOB_SIZE}")
    return size


def validate_blob_id(blob_id: str) -> str:
    if not isinstance(blob_id, str) or not BLOB_ID_RE.fullmatch(blob_id):
        raise InvalidName(f"invalid blob id {blob_id!r}")
    return blob_id


def parse_repo_spec(spec: str) -> tuple[str, str, str]:
    """`[datasets/]org/name[@rev]` -> (repo_type, repo_id, revision)."""
    repo, _, revision = spec.partition("@")
    repo_type = "model"
    first, _, rest = repo.partition("/")
    if first in _PREFIX_TO_TYPE and rest.count("/") == 1:
        repo_type, repo = _PREFIX_TO_TYPE[first], rest
    return repo_type, validate_repo_id(repo), validate_revision(revision or "main")


def format_spec(repo_type: str, repo_id: str, revision: str | None = None) -> str:
    """Inverse of parse_repo_spec."""
    prefix = "" if repo_type == "model" else REPO_TYPES[validate_repo_type(repo_type)] + "/"
    return prefix + repo_id + (f"@{revision}" if revision else "")


# --- names ------------------------------------------------------------------


def repo_folder_name(repo_type: str, repo_id: str) -> str:
    """`models--org--name`, the folder huggingface_hub uses for a repo."""
    return "--".join([REPO_TYPES[validate_repo_type(repo_type)], *validate_repo_id(repo_id).split("/")])


def parse_repo_folder(name: str) -> tuple[str, str] | None:
    """Inverse of repo_folder_name; None for anything that is not a repo folder."""
    parts = name.split("--")
    if len(parts) not in (2, 3) or parts[0] not in _PREFIX_TO_TYPE:
        return None
    try:
        return _PREFIX_TO_TYPE[parts[0]], validate_repo_id("/".join(parts[1:]))
    except InvalidName:
        return None


def blob_symlink_target(path: str, blob_id: str) -> str:
    """Relative link from `snapshots/<commit>/<path>` to `blobs/<id>`.

    Relative, like huggingface_hub makes them, so the tree works wherever it
    is bind-mounted: two `..` to leave `snapshots/<commit>`, one more per
    sub-directory of `path`.
    """
    depth = validate_relpath(path).count("/")
    return "../" * (2 + depth) + "blobs/" + validate_blob_id(blob_id)


# --- the tree ---------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot: where it sits, how big it is, which blob holds it."""

    path: str
    size: int
    blob_id: str


@dataclass
class Node:
    """A node of the presented tree. Exactly one of the kinds applies."""

    kind: str  # "dir" | "blob" | "static" | "symlink"
    children: dict[str, Node] = field(default_factory=dict)
    blob_id: str = ""
    size: int = 0
    data: bytes = b""
    target: str = ""

    @classmethod
    def dir(cls) -> Node:
        return cls("dir")

    def child_dir(self, name: str) -> Node:
        node = self.children.get(name)
        if node is None:
            node = self.children[name] = Node.dir()
        return node


def static(data: bytes) -> Node:
    return Node("static", data=data, size=len(data))


@dataclass(frozen=True)
class RepoView:
    """Everything the index knows about one repo, as input to the tree builder."""

    repo_type: str
    repo_id: str
    refs: dict[str, str]  # revision -> commit
    snapshots: dict[str, list[FileEntry]]  # commit -> files


def build_repo_tree(view: RepoView) -> Node:
    """`models--org--name/{blobs,refs,snapshots}` for one repo."""
    repo = Node.dir()
    blobs, refs, snaps = repo.child_dir("blobs"), repo.child_dir("refs"), repo.child_dir("snapshots")
    for revision, commit in view.refs.items():
        parts = validate_revision(revision).split("/")
        parent = refs
        for part in parts[:-1]:
            parent = parent.child_dir(part)
        parent.children[parts[-1]] = static(commit.encode())  # no trailing newline
    for commit, files in view.snapshots.items():
        if not COMMIT_RE.fullmatch(commit):
            raise InvalidName(f"invalid commit {commit!r}")
        snap = snaps.child_dir(commit)
        for f in files:
            parts = validate_relpath(f.path).split("/")
            parent = snap
            for part in parts[:-1]:
                parent = parent.child_dir(part)
            parent.children[parts[-1]] = Node("symlink", target=blob_symlink_target(f.path, f.blob_id))
            blobs.children[f.blob_id] = Node("blob", blob_id=f.blob_id, size=f.size)
    return repo


def build_hub_tree(views: Iterable[RepoView]) -> Node:
    """The whole `hub/` directory: repos, `.locks/` and `CACHEDIR.TAG`.

    No `version.txt`: transformers >= 5 no longer reads it, and
    huggingface_hub's scan_cache_dir reports it as a corrupted repo.
    """
    hub = Node.dir()
    hub.children["CACHEDIR.TAG"] = static(CACHEDIR_TAG)
    locks = hub.child_dir(".locks")
    for view in views:
        name = repo_folder_name(view.repo_type, view.repo_id)
        hub.children[name] = build_repo_tree(view)
        locks.child_dir(name)
    return hub


def build_root(views: Iterable[RepoView]) -> Node:
    """Mount root = `HF_HOME`; its `hub/` is the `HF_HUB_CACHE`."""
    root = Node.dir()
    root.children["hub"] = build_hub_tree(views)
    return root


def tree_listing(ids: dict[str, str], base: str, recursive: bool) -> tuple[list[str], dict[str, str]]:
    """What the Hub's `/tree/{rev}/{base}` lists, from {path: blob id}.

    Returns the file paths, and the directories with an oid (a sha1 over what
    they contain: stable for a snapshot, like the Hub's tree oids).
    """
    prefix = base + "/" if base else ""
    files: list[str] = []
    dirs: set[str] = set()
    for path in ids:
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
        dirs.update(prefix + "/".join(parts[:i]) for i in range(1, depth + 1))
        if recursive or len(parts) == 1:
            files.append(path)
    oids = {}
    for d in dirs:
        listing = "".join(f"{p}\0{i}\n" for p, i in ids.items() if p.startswith(d + "/"))
        oids[d] = hashlib.sha1(listing.encode()).hexdigest()
    return files, oids


def walk(node: Node, prefix: str = "") -> Iterable[tuple[str, Node]]:
    """Every (path, node) below `node`, parents first; handy for tests and `ls`."""
    for name in sorted(node.children):
        child = node.children[name]
        path = f"{prefix}/{name}" if prefix else name
        yield path, child
        if child.kind == "dir":
            yield from walk(child, path)
