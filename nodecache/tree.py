"""The presented tree over the index, built per repo and per folder on first use.

Start-up reads only the index's keys (which repos exist); a repo's refs and
snapshot names are read when its folder is first looked into, a snapshot's
folders one by one as they are looked into. A new repo or revision replaces one
repo's subtree, nothing else: the cost of any event is that of the repo it names.

Snapshot folders and `blobs/` are compact blocks (folders.py) read from the
index and kept in a cache bounded in bytes: a walk of 10^6 files leaves at most
that much behind, and a folder dropped from it is read again (one LMDB get).
Node ids do not depend on it: they are the inode table's, per path or, for an
immutable block, per block (entry i of a block is its range's base + i).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from .folders import EMPTY, Block, merge
from .index.links import Links
from .index.refs import Refs
from .index.snapshots import Snapshots
from .layout import Node, hub_skeleton, lazy_repo_tree, parse_repo_folder, put_repo, repo_folder_name

CACHE_BYTES = 64 << 20  # folder blocks kept in memory: ~1M files' worth of names and ids


class Source(Protocol):
    """What the tree reads from the index: snapshots (keys and blocks), refs, and which repos list a blob."""

    snapshots: Snapshots
    refs: Refs
    links: Links


class BlockCache:
    """Least recently used blocks, at most `max_bytes` of them (one bigger than that is not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._blocks: OrderedDict[tuple, Block | None] = OrderedDict()

    def get(self, key: tuple, load) -> Block | None:
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        block = load()
        size = 64 + (block.nbytes() if block is not None else 0)
        if size <= self.max_bytes:
            self._blocks[key] = block
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, old = self._blocks.popitem(last=False)
                self.nbytes -= 64 + (old.nbytes() if old is not None else 0)
        return block

    def forget(self, prefix: tuple) -> None:
        """Drop the blocks whose key starts with `prefix`."""
        for key in [k for k in self._blocks if k[: len(prefix)] == prefix]:
            old = self._blocks.pop(key)
            self.nbytes -= 64 + (old.nbytes() if old is not None else 0)


class HubTree:
    """Mount root = `HF_HOME`; its `hub/` is the `HF_HUB_CACHE`."""

    def __init__(self, source: Source, cache_bytes: int = CACHE_BYTES):
        self.source = source
        self.blocks = BlockCache(cache_bytes)
        self.root = Node.dir()
        self.hub = self.root.children["hub"] = hub_skeleton()
        self._shown: dict[tuple[str, str], tuple[dict[str, str], list[str]]] = {}  # repo -> (refs, commits)
        for repo_type, repo_id in source.snapshots.repos():
            self.repo_changed(repo_type, repo_id)

    def cached(self, folder: str | None, filling: list[tuple[str, int]]) -> tuple[int, int, int, int]:
        """(blobs, bytes, complete blobs, bytes stored) of one repo folder, or (None) of every repo
        shown (a blob two repos list counts in both), from counters the index keeps: no walk.
        `filling`: (blob id, bytes on disk) of partly stored blobs, added where a repo lists them."""
        repos = set(self._shown) if folder is None else {parse_repo_folder(folder)} & set(self._shown)
        totals = [0, 0, 0, 0]
        for repo in repos:
            totals = [a + b for a, b in zip(totals, self.source.links.repo_bytes(*repo), strict=True)]
        for blob_id, cached in filling:
            totals[3] += cached * sum(1 for repo in self.source.links.repos_of(blob_id) if repo in repos)
        return totals[0], totals[1], totals[2], totals[3]

    def folder_block(self, folder: str, commit: str, path: str) -> Block | None:
        """The block of `path` ("" for the top) in snapshot `commit` of the repo folder `folder`, as shown."""
        repo = parse_repo_folder(folder)
        shown = self._shown.get(repo) if repo is not None else None
        if shown is None or commit not in shown[1]:
            return None
        return self.blocks.get((*repo, commit, path), lambda: self.source.snapshots.folder(*repo, commit, path))

    def commit_blobs(self, folder: str) -> list[tuple[str, Block]]:
        """(commit, its blobs' block) of each snapshot shown in the repo folder `folder`."""
        repo = parse_repo_folder(folder)
        shown = self._shown.get(repo) if repo is not None else None
        found = []
        for commit in shown[1] if shown is not None else ():
            block = self.blocks.get((*repo, "#", commit), lambda c=commit: self.source.snapshots.blobs(*repo, c))
            if block is not None:
                found.append((commit, block))
        return found

    def repo_changed(self, repo_type: str, repo_id: str) -> str | None:
        """Show the repo as the index now has it; its folder name if that changed
        anything (a new repo, a moved ref, a new snapshot), else None."""
        refs, commits = self.source.refs.of(repo_type, repo_id), self.source.snapshots.commits(repo_type, repo_id)
        key = (repo_type, repo_id)
        if self._shown.get(key) == (refs, commits):
            return None  # keep the folders built so far
        self.blocks.forget(key)  # a snapshot dropped as invalid since: shown empty until re-resolved
        folder = repo_folder_name(repo_type, repo_id)

        def folder_of(commit: str, path: str) -> Block | None:
            return self.blocks.get(
                (*key, commit, path), lambda: self.source.snapshots.folder(repo_type, repo_id, commit, path)
            )

        def blobs_of() -> Block:
            def load() -> Block:  # one snapshot: the very block `commit_blobs` gives
                return merge([b for _, b in self.commit_blobs(folder)] or [EMPTY])

            return self.blocks.get((*key, "#"), load) or EMPTY

        repo = lazy_repo_tree(refs, commits, folder_of, blobs_of) if commits else None
        put_repo(self.hub, repo_type, repo_id, repo)
        self._shown[key] = (refs, commits)
        return folder
