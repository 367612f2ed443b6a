"""The HuggingFace hub-cache layout, as pure functions and plain data.

Nothing here touches the disk or the network: it turns what the index knows
(repos, refs, snapshots and their files) into the exact tree that
`huggingface_hub` expects to find under `HF_HUB_CACHE`, and validates every
name that comes from the outside before anything joins it to a path.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class RepoSpec:
    """A repo and maybe a revision, validated: what `[datasets/]org/name[@rev]` names.

    Parsed once where it comes in (CLI, config, /v1, mirror, CSI, peer API) and
    passed on as it is. `revision` None means none was given: "main" where one is
    needed (`rev`), every snapshot where the question is "which snapshots".
    """

    repo_type: str
    repo_id: str
    revision: str | None = None

    def __post_init__(self) -> None:
        validate_repo_type(self.repo_type)
        validate_repo_id(self.repo_id)
        if self.revision is not None:
            validate_revision(self.revision)

    @classmethod
    def parse(cls, text: str) -> RepoSpec:
        """`[datasets/]org/name[@rev]`; a bare trailing `@` means `@main`."""
        repo, at, revision = text.partition("@")
        repo_type = "model"
        first, _, rest = repo.partition("/")
        if first in _PREFIX_TO_TYPE and rest.count("/") == 1:
            repo_type, repo = _PREFIX_TO_TYPE[first], rest
        return cls(repo_type, validate_repo_id(repo), (revision or "main") if at else None)

    @property
    def rev(self) -> str:
        """The revision to resolve: the one given, else "main"."""
        return self.revision or "main"

    @property
    def repo(self) -> tuple[str, str]:
        return self.repo_type, self.repo_id

    @property
    def name(self) -> str:
        """`org/name`, `datasets/org/name`: the form repo globs match."""
        return ("" if self.repo_type == "model" else REPO_TYPES[self.repo_type] + "/") + self.repo_id

    def at(self, revision: str | None) -> RepoSpec:
        return RepoSpec(self.repo_type, self.repo_id, revision)

    def __str__(self) -> str:
        return self.name + ("" if self.revision is None else f"@{self.revision}")


def parse_repo_spec(spec: str) -> tuple[str, str, str]:
    """`[datasets/]org/name[@rev]` -> (repo_type, repo_id, revision), "main" when none is given."""
    parsed = RepoSpec.parse(spec)
    return parsed.repo_type, parsed.repo_id, parsed.rev


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


class Node:
    """A node of the presented tree. Exactly one of the kinds applies.

    A folder's children may be given as a loader, run on first use: a snapshot
    of 10^6 files costs nothing until someone looks into it, and then only the
    folders of that snapshot. Its sorted names are kept once computed, so a
    listing continues from an offset without sorting again.
    """

    __slots__ = ("kind", "_children", "_load", "_names", "blob_id", "size", "data", "target")

    def __init__(
        self,
        kind: str,  # "dir" | "blob" | "static" | "symlink"
        children: dict[str, Node] | None = None,
        blob_id: str = "",
        size: int = 0,
        data: bytes = b"",
        target: str = "",
        load: Callable[[], dict[str, Node]] | None = None,
    ):
        self.kind = kind
        self._children = children if children is not None or load is not None else {}
        self._load = load
        self._names: list[str] | None = None
        self.blob_id, self.size, self.data, self.target = blob_id, size, data, target

    @classmethod
    def dir(cls, load: Callable[[], dict[str, Node]] | None = None) -> Node:
        return cls("dir", load=load)

    @property
    def children(self) -> dict[str, Node]:
        if self._children is None:
            self._children = self._load()  # a loader that raises leaves the folder unloaded
            self._load = None
        return self._children

    @property
    def loaded(self) -> bool:
        return self._children is not None

    def names(self) -> list[str]:
        """The children's names, sorted (computed once; `put` keeps it current)."""
        if self._names is None:
            self._names = sorted(self.children)
        return self._names

    def put(self, name: str, node: Node | None) -> None:
        """Add, replace or (None) remove one child, keeping the sorted names."""
        children = self.children
        if self._names is not None and (name in children) != (node is not None):
            i = bisect.bisect_left(self._names, name)
            if node is None:
                del self._names[i]
            else:
                self._names.insert(i, name)
        if node is None:
            children.pop(name, None)
        else:
            children[name] = node

    def child_dir(self, name: str) -> Node:
        node = self.children.get(name)
        if node is None:
            node = self.children[name] = Node.dir()
        return node

    def __repr__(self) -> str:
        return f"Node({self.kind!r})"


def static(data: bytes) -> Node:
    return Node("static", data=data, size=len(data))


@dataclass(frozen=True)
class RepoView:
    """Everything the index knows about one repo, as input to the tree builder."""

    repo_type: str
    repo_id: str
    refs: dict[str, str]  # revision -> commit
    snapshots: dict[str, list[FileEntry]]  # commit -> files


def _refs_tree(refs: dict[str, str]) -> Node:
    node = Node.dir()
    for revision, commit in refs.items():
        parts = validate_revision(revision).split("/")
        parent = node
        for part in parts[:-1]:
            parent = parent.child_dir(part)
        parent.children[parts[-1]] = static(commit.encode())  # no trailing newline
    return node


def _snapshot_children(files: list[FileEntry]) -> dict[str, Node]:
    """One snapshot's folders, built in one pass over its files."""
    snap = Node.dir()
    for f in files:
        parts = validate_relpath(f.path).split("/")
        parent = snap
        for part in parts[:-1]:
            parent = parent.child_dir(part)
        parent.children[parts[-1]] = Node("symlink", target=blob_symlink_target(f.path, f.blob_id))
    return snap.children


def lazy_repo_tree(refs: dict[str, str], commits: Iterable[str], files_of: Callable[[str], list[FileEntry]]) -> Node:
    """`models--org--name/{blobs,refs,snapshots}`, each snapshot (and `blobs/`) built
    from `files_of(commit)` when first looked into."""
    commits = list(commits)
    for commit in commits:
        if not COMMIT_RE.fullmatch(commit):
            raise InvalidName(f"invalid commit {commit!r}")

    def blobs() -> dict[str, Node]:
        out: dict[str, Node] = {}
        for commit in commits:
            for f in files_of(commit):
                out[validate_blob_id(f.blob_id)] = Node("blob", blob_id=f.blob_id, size=f.size)
        return out

    snaps = {c: Node.dir(functools.partial(lambda c: _snapshot_children(files_of(c)), c)) for c in commits}
    return Node("dir", {"blobs": Node.dir(blobs), "refs": _refs_tree(refs), "snapshots": Node("dir", snaps)})


def build_repo_tree(view: RepoView) -> Node:
    """`models--org--name/{blobs,refs,snapshots}` for one repo, built (and checked) at once."""
    repo = lazy_repo_tree(view.refs, view.snapshots, view.snapshots.__getitem__)
    for _ in walk(repo):
        pass
    return repo


def hub_skeleton() -> Node:
    """`hub/` without repos: `.locks/` and `CACHEDIR.TAG`.

    No `version.txt`: transformers >= 5 no longer reads it, and
    huggingface_hub's scan_cache_dir reports it as a corrupted repo.
    """
    hub = Node.dir()
    hub.children["CACHEDIR.TAG"] = static(CACHEDIR_TAG)
    hub.child_dir(".locks")
    return hub


def put_repo(hub: Node, repo_type: str, repo_id: str, repo: Node | None) -> None:
    """Show (or with None, hide) one repo folder and its `.locks/` folder."""
    name = repo_folder_name(repo_type, repo_id)
    hub.put(name, repo)
    locks = hub.children[".locks"]
    if repo is None:
        locks.put(name, None)
    elif name not in locks.children:
        locks.put(name, Node.dir())


def build_hub_tree(views: Iterable[RepoView]) -> Node:
    """The whole `hub/` directory: repos, `.locks/` and `CACHEDIR.TAG`."""
    hub = hub_skeleton()
    for view in views:
        put_repo(hub, view.repo_type, view.repo_id, build_repo_tree(view))
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

    One pass over the paths, each feeding the hashes of the folders above it
    that are listed: O(files x depth), not O(folders x files).
    """
    prefix = base + "/" if base else ""
    files: list[str] = []
    hashes: dict[str, hashlib._Hash] = {}  # folder -> sha1 over its files
    for path in ids:
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
        for i in range(1, depth + 1):
            d = prefix + "/".join(parts[:i])
            if d not in hashes:
                hashes[d] = hashlib.sha1()
        if recursive or len(parts) == 1:
            files.append(path)
    if hashes:
        for path, blob_id in ids.items():
            line = f"{path}\0{blob_id}\n".encode()
            folder = path
            while "/" in folder:
                folder = folder.rsplit("/", 1)[0]
                h = hashes.get(folder)
                if h is not None:
                    h.update(line)
    return files, {d: h.hexdigest() for d, h in hashes.items()}


def walk(node: Node, prefix: str = "") -> Iterable[tuple[str, Node]]:
    """Every (path, node) below `node`, parents first; handy for tests and `ls`."""
    for name in node.names():
        child = node.children[name]
        path = f"{prefix}/{name}" if prefix else name
        yield path, child
        if child.kind == "dir":
            yield from walk(child, path)
