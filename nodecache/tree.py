"""The presented tree over the index, built per repo and per folder on first use.

Start-up reads only the index's keys (which repos exist); a repo's refs and
snapshot names are read when its folder is first looked into, a snapshot's
files when that snapshot is. A new repo or revision replaces one repo's
subtree, nothing else: the cost of any event is that of the repo it names.
"""

from __future__ import annotations

from typing import Protocol

from .layout import FileEntry, Node, hub_skeleton, lazy_repo_tree, put_repo, repo_folder_name


class Source(Protocol):
    """What the tree reads from the index."""

    def repos(self) -> list[tuple[str, str]]: ...
    def refs(self, repo_type: str, repo_id: str) -> dict[str, str]: ...
    def commits(self, repo_type: str, repo_id: str) -> list[str]: ...
    def get_snapshot(self, repo_type: str, repo_id: str, commit: str) -> list[FileEntry] | None: ...


class HubTree:
    """Mount root = `HF_HOME`; its `hub/` is the `HF_HUB_CACHE`."""

    def __init__(self, source: Source):
        self.source = source
        self.root = Node.dir()
        self.hub = self.root.children["hub"] = hub_skeleton()
        self._shown: dict[tuple[str, str], tuple[dict[str, str], list[str]]] = {}  # repo -> (refs, commits)
        for repo_type, repo_id in source.repos():
            self.repo_changed(repo_type, repo_id)

    def repo_changed(self, repo_type: str, repo_id: str) -> str | None:
        """Show the repo as the index now has it; its folder name if that changed
        anything (a new repo, a moved ref, a new snapshot), else None."""
        refs, commits = self.source.refs(repo_type, repo_id), self.source.commits(repo_type, repo_id)
        key = (repo_type, repo_id)
        if self._shown.get(key) == (refs, commits):
            return None  # keep the folders built so far

        def files_of(commit: str) -> list[FileEntry]:
            files = self.source.get_snapshot(repo_type, repo_id, commit)
            return [] if files is None else files  # dropped as invalid since: shown empty until re-resolved

        repo = lazy_repo_tree(refs, commits, files_of) if commits else None
        put_repo(self.hub, repo_type, repo_id, repo)
        self._shown[key] = (refs, commits)
        return repo_folder_name(repo_type, repo_id)
