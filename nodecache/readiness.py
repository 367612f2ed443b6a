"""Which repos are ready on this node, for the node labels, at a cost flat in the number of
repos and files: a repo is ready when the snapshot of one of its refs (any snapshot, for a
repo known by commit only) has every blob stored and verified, so a ref that moved to a
commit not filled yet takes the label away.

The index counts, per snapshot, its blobs that are not complete, and notes the repos
whose counts or refs changed, in the transactions that change them (index.links.Links.take_changed_repos).
The first call reads every repo's counts (keys and small numbers, no file list); each
later one reads only the repos changed since.
"""

from __future__ import annotations

from .index import Index
from .labels import label_key


class ReadyRepos:
    def __init__(self, index: Index):
        self.index = index
        self._ready: set[tuple[str, str]] | None = None

    def _is_ready(self, repo_type: str, repo_id: str) -> bool:
        missing = self.index.links.snapshots_missing(repo_type, repo_id)
        named = set(self.index.refs.of(repo_type, repo_id).values()) or missing.keys()
        return any(missing.get(commit) == 0 for commit in named)

    def labels(self) -> set[str]:
        """The label keys of the ready repos, as of now."""
        if self._ready is None:
            self.index.links.take_changed_repos()  # before the read: a change after it is seen next time
            self._ready = {repo for repo in self.index.snapshots.repos() if self._is_ready(*repo)}
        else:
            for repo in self.index.links.take_changed_repos():
                if self._is_ready(*repo):
                    self._ready.add(repo)
                else:
                    self._ready.discard(repo)
        return {label_key(*repo) for repo in self._ready}
