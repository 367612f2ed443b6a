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
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from .folders import EMPTY, Block, merge, pack

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
    folders looked into. A loader's result is kept (`keep`), or asked for again
    each time: a snapshot folder's loader answers from a bounded cache of
    compact tables (`Table`), so what a walk leaves behind is bounded too.
    A kept folder's sorted names are kept once computed, so a listing
    continues from an offset without sorting again.
    """

    __slots__ = ("kind", "_children", "_load", "_keep", "_names", "blob_id", "size", "data", "target")

    def __init__(
        self,
        kind: str,  # "dir" | "blob" | "static" | "symlink"
        children: dict[str, Node] | None = None,
        blob_id: str = "",
        size: int = 0,
        data: bytes = b"",
        target: str = "",
        load: Callable[[], Mapping[str, Node]] | None = None,
        keep: bool = True,
    ):
        self.kind = kind
        self._children = children if children is not None or load is not None else {}
        self._load, self._keep = load, keep
        self._names: Sequence[str] | None = None
        self.blob_id, self.size, self.data, self.target = blob_id, size, data, target

    @classmethod
    def dir(cls, load: Callable[[], Mapping[str, Node]] | None = None, keep: bool = True) -> Node:
        return cls("dir", load=load, keep=keep)

    @property
    def children(self) -> Mapping[str, Node]:
        if self._children is None:
            children = self._load()  # a loader that raises leaves the folder unloaded
            if not self._keep:
                return children
            self._children, self._load = children, None
        return self._children

    @property
    def loaded(self) -> bool:
        return self._children is not None

    def names(self) -> Sequence[str]:
        """The children's names, sorted (a table's own order; a dict's computed once, `put` keeps it current)."""
        if self._names is not None:
            return self._names
        children = self.children
        if isinstance(children, Table):
            return children.names()
        self._names = sorted(children)
        return self._names

    def put(self, name: str, node: Node | None) -> None:
        """Add, replace or (None) remove one child, keeping the sorted names (a table is read-only)."""
        children = self.children
        if not isinstance(children, dict):
            raise TypeError("a snapshot folder does not change")
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


def _check_part(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name or "\\" in name:
        raise InvalidName(f"invalid name {name!r}")
    return name


class _Names(Sequence[str]):
    __slots__ = ("_block", "_decode")

    def __init__(self, block: Block, decode: Callable[[bytes], str]):
        self._block, self._decode = block, decode

    def __len__(self) -> int:
        return len(self._block)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._decode(self._block.key(i))


class Table(Mapping[str, Node]):
    """A folder's children as one compact block (see `folders`): a Node is made for the
    entry asked for and not kept. Keys are names (UTF-8) or, with `hex_keys`, raw blob ids.
    Each entry is checked when it is read (the block may come from a tampered index)."""

    __slots__ = ("block", "_make", "_hex")

    def __init__(self, block: Block, make: Callable[[str, bytes], Node], hex_keys: bool = False):
        self.block, self._make, self._hex = block, make, hex_keys

    def _name(self, key: bytes) -> str:
        return validate_blob_id(key.hex()) if self._hex else _check_part(key.decode("utf-8", "strict"))

    def _key(self, name: str) -> bytes | None:
        try:
            return bytes.fromhex(validate_blob_id(name)) if self._hex else name.encode("utf-8", "strict")
        except (InvalidName, UnicodeEncodeError):
            return None

    def __getitem__(self, name: str) -> Node:
        i = self.index(name)
        if i < 0:
            raise KeyError(name)
        return self.at(i)[1]

    def index(self, name: str) -> int:
        """The position of `name` in the folder's order, or -1."""
        key = self._key(name) if isinstance(name, str) else None
        return -1 if key is None else self.block.find(key)

    def at(self, i: int) -> tuple[str, Node]:
        """The entry at position `i` (0 <= i < len): its name and a node made for it."""
        key, payload = self.block.entry(i)
        name = self._name(key)
        return name, self._make(name, payload)

    def __contains__(self, name: object) -> bool:
        key = self._key(name) if isinstance(name, str) else None
        return key is not None and self.block.find(key) >= 0

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.block)

    def names(self) -> Sequence[str]:
        return _Names(self.block, self._name)


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


_SIZE = struct.Struct("<Q")


def snapshot_blocks(files: Iterable[FileEntry], checked: bool = False) -> tuple[dict[str, bytes], bytes]:
    """A snapshot's folders as blocks (folder path, "" for its top -> block) and its blobs as one
    block (raw id -> size), in one pass over its files. A sub-folder's entry has an empty payload,
    a file's the raw id of its blob; where a path is both a file and a folder, the folder wins.
    `checked`: the caller has just checked each path and blob id (repos.check_snapshot), so they
    are not checked again (a second check was a third of this pass over 10^6 files)."""
    folders: dict[str, dict[bytes, bytes]] = {"": {}}
    blobs: dict[bytes, bytes] = {}
    size_of = _SIZE.pack
    path_of, id_of = (_same, _same) if checked else (validate_relpath, validate_blob_id)
    for f in files:
        folder, _, name = path_of(f.path).rpartition("/")
        raw = bytes.fromhex(id_of(f.blob_id))
        blobs[raw] = size_of(f.size)  # struct refuses a size that is not a u64
        entries = folders.get(folder)
        if entries is None:  # a new folder, and those above it that are new
            entries = folders[folder] = {}
            child = folder
            while child:
                up, _, part = child.rpartition("/")
                above = folders.get(up)
                if above is not None:
                    above[part.encode()] = b""
                    break
                above = folders[up] = {part.encode(): b""}
                child = up
        key = name.encode()
        if entries.get(key) != b"":
            entries[key] = raw
    return {path: pack(sorted(e.items())) for path, e in folders.items()}, pack(sorted(blobs.items()))


def _same(text: str) -> str:
    return text


def lazy_repo_tree(
    refs: dict[str, str],
    commits: Iterable[str],
    folder_of: Callable[[str, str], Block | None],
    blobs_of: Callable[[], Block],
) -> Node:
    """`models--org--name/{blobs,refs,snapshots}`. A snapshot folder is a table asked from
    `folder_of(commit, folder path)` each time it is used (None: no such folder, shown empty);
    `blobs/` from `blobs_of()` (every snapshot's blobs). Both are expected to cache."""
    commits = list(commits)
    for commit in commits:
        if not COMMIT_RE.fullmatch(commit):
            raise InvalidName(f"invalid commit {commit!r}")

    def table(commit: str, path: str) -> Table:
        up = "../" * (2 + (path.count("/") + 1 if path else 0)) + "blobs/"

        def make(name: str, payload: bytes) -> Node:
            if not payload:
                return Node.dir(functools.partial(table, commit, f"{path}/{name}" if path else name), keep=False)
            return Node("symlink", target=up + validate_blob_id(payload.hex()))

        return Table(folder_of(commit, path) or EMPTY, make)

    def blob(blob_id: str, payload: bytes) -> Node:
        if len(payload) != _SIZE.size:
            raise InvalidName(f"invalid size of blob {blob_id}")
        return Node("blob", blob_id=blob_id, size=validate_size(_SIZE.unpack(payload)[0]))

    snaps = {c: Node.dir(functools.partial(table, c, ""), keep=False) for c in commits}
    blobs = Node.dir(lambda: Table(blobs_of(), blob, hex_keys=True), keep=False)
    return Node("dir", {"blobs": blobs, "refs": _refs_tree(refs), "snapshots": Node("dir", snaps)})


def build_repo_tree(view: RepoView) -> Node:
    """`models--org--name/{blobs,refs,snapshots}` for one repo, built (and checked) at once."""
    built = {commit: snapshot_blocks(files) for commit, files in view.snapshots.items()}
    blocks = {(c, path): Block(raw) for c, (folders, _) in built.items() for path, raw in folders.items()}

    def folder_of(commit: str, path: str) -> Block | None:
        return blocks.get((commit, path))

    repo = lazy_repo_tree(
        view.refs, view.snapshots, folder_of, lambda: merge([Block(b) for _, b in built.values()] or [EMPTY])
    )
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
    children = node.children
    for name in node.names():
        child = children[name]
        path = f"{prefix}/{name}" if prefix else name
        yield path, child
        if child.kind == "dir":
            yield from walk(child, path)
